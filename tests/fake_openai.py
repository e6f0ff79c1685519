"""A stand-in for an EXTERNAL OpenAI-compatible chat API (OpenAI, or any vLLM/TGI server), not a tokenmill
component: tests/test_judge_openai.py points a real judge server at it. Its reply is chosen by a marker such
as `[[mode:fenced]]` in the text being judged.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler
from typing import ClassVar


class FakeOpenAI(BaseHTTPRequestHandler):
    """Stands in for an external OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models)."""

    calls: ClassVar[Counter] = Counter()
    auth: ClassVar[list[str]] = []
    formats: ClassVar[list[str]] = []  # response_format type of each chat call ("" when absent)
    lock = threading.Lock()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: dict | str, headers: dict | None = None) -> None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        with contextlib.suppress(BrokenPipeError):  # the judge gave up waiting ("slow")
            self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})
        else:
            self._send(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path != "/v1/chat/completions":
            return self._send(404, {"error": {"message": "not found"}})
        user = body["messages"][-1]["content"]
        mode = (re.search(r"\[\[mode:(\w+)\]\]", user) or [None, "json"])[1]
        with self.lock:
            self.calls[mode] += 1
            n = self.calls[mode]
            self.auth.append(self.headers.get("authorization", ""))
            self.formats.append((body.get("response_format") or {}).get("type", ""))
        if mode == "noformat" and "response_format" in body:
            return self._send(400, {"error": {"message": "response_format is not supported by this server"}})
        if mode.startswith("verdict"):
            return self._chat(body, self._verdict(mode, user))
        scores = {"moral_clarity": 4, "age_appropriateness": 5, "narrative_coherence": 3, "relevance": 5}
        content = {
            "json": json.dumps({"scores": scores, "rationale": "Clear moral, gentle tone."}),
            "fenced": "Sure! Here is my rating:\n```json\n" + json.dumps({"scores": scores}) + "\n```\nHope it helps.",
            "list": json.dumps({"scores": [{"name": k, "score": v, "rationale": f"{k} ok"}
                                           for k, v in scores.items()]}),
            "prose": ("**Moral clarity**: 4/5 - clear.\nAge appropriateness: 5\nNarrative coherence = 3\n"
                      "Relevance: 5/5"),
            "fraction": json.dumps({"moral_clarity": 0.85, "age_appropriateness": 0.97, "narrative_coherence": 0.72,
                                    "relevance": 0.94}),
            "nojson": "I am sorry, but I cannot rate stories.",
            "partial": json.dumps({"scores": {"moral_clarity": 4}}),
            "brevity": '{"brevity": 3}',
        }
        if mode == "flaky503" and n == 1:
            return self._send(503, {"error": {"message": "overloaded"}})
        if mode == "ratelimit" and n == 1:
            return self._send(429, {"error": {"message": "slow down"}}, {"retry-after": "0"})
        if mode == "down":
            return self._send(503, {"error": {"message": "still overloaded"}})
        if mode == "unauthorized":
            return self._send(401, {"error": {"message": "invalid api key"}})
        if mode == "slow":
            time.sleep(1.5)  # longer than the judge's --judge-timeout-s
        if mode == "notchat":
            return self._send(200, {"unexpected": True})
        self._chat(body, content.get(mode, content["json"]))

    def _chat(self, body: dict, text: str) -> None:
        self._send(200, {"id": "cmpl-1", "object": "chat.completion", "model": body["model"],
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": "stop"}]})

    @staticmethod
    def _verdict(mode: str, user: str) -> str:
        """verdict_first: always 'A' (a position-biased judge); verdict_good: the response marked [[good]]."""
        better = "A"
        if mode == "verdict_good":
            a, b = user.index("Response A:"), user.index("Response B:")
            better = "A" if a < user.index("[[good]]") < b else "B"
        dims = re.findall(r"^- (\w+):", user, re.M)
        return json.dumps({"verdicts": {d: {"better": better, "confidence": 0.9} for d in dims},
                           "rationale": f"{better} reads better"})
