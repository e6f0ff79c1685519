"""A stand-in for llama.cpp's `llama-server` (a test double of a peer, not of tokenmill): enough of its command line
(--port, -np, --version) and HTTP API (/health, /completion, streamed /v1/chat/completions) for bench compare and
bench/peers/llama_probe.py, and a crash on demand, as the AMX build of the real one does on some machines.

FAKE_LLAMA_CRASH: "" never crashes; "always" dies of SIGSEGV on its first completion request; "np=N" does so only
when started with -np N. It logs its argv first, so a test can see which server args it was given.
"""

from __future__ import annotations

import ctypes
import faulthandler
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def crashes() -> bool:
    mode = os.environ.get("FAKE_LLAMA_CRASH", "")
    return mode == "always" or (mode.startswith("np=") and arg("-np", "1") == mode[3:])


def crash() -> None:
    print("ggml_backend_amx_mul_mat: general protection fault at ldtilecfg (fake)", flush=True)
    faulthandler.disable()
    ctypes.string_at(0)  # a real SIGSEGV, in this thread, before any reply


class Handler(BaseHTTPRequestHandler):
    def log_message(self, fmt: str, *args: object) -> None:
        print(f"request: {fmt % args}", flush=True)

    def send(self, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.send(b'{"status": "ok"}')

    def do_POST(self) -> None:
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if crashes():
            crash()
        if self.path == "/completion":
            self.send(json.dumps({"content": " fake", "tokens_predicted": 1, "tokens_evaluated": 10}).encode())
            return
        n = max(1, int(req.get("max_tokens", 4)))
        chunks = [{"choices": [{"delta": {"content": f" t{i}"}}]} for i in range(n)]
        chunks.append({"choices": [], "usage": {"completion_tokens": n}})
        self.send("".join(f"data: {json.dumps(c)}\n\n" for c in chunks).encode() + b"data: [DONE]\n\n",
                  "text/event-stream")


def main() -> None:
    if "--version" in sys.argv:
        print("version: 0 (fake)\nbuilt with a test for a stand-in", file=sys.stderr)
        return
    print("argv: " + " ".join(sys.argv[1:]), flush=True)
    ThreadingHTTPServer(("127.0.0.1", int(arg("--port", "8080"))), Handler).serve_forever()


if __name__ == "__main__":
    main()
