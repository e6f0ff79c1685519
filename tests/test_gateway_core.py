"""The gateway core in-process: tokenisation off the event loop, and the one direction of its imports."""

from __future__ import annotations

import ast
import asyncio
import threading
from pathlib import Path

import grpc
import pytest

from services.common.config import GatewayConfig
from services.common.model_loader import load_tokenizer
from services.common.sampling import SamplingParams
from services.gateway.core import Gateway, GatewayError
from services.gateway.validation import Validator

GATEWAY = Path(__file__).resolve().parents[1] / "services" / "gateway"


class HeldTokenizer:
    """The real tokenizer, but each encode waits (up to 60 s) for a coroutine on the gateway's loop to let it
    go: if tokenising ran on the loop, that coroutine could not run first and the wait would time out."""

    def __init__(self, tokenizer, started: threading.Event, release: threading.Event, log: list) -> None:
        self.tokenizer, self.started, self.release, self.log = tokenizer, started, release, log

    def encode(self, text: str, **kwargs):
        self.started.set()
        self.log.append(("released", self.release.wait(60)))
        ids = self.tokenizer.encode(text, **kwargs)
        self.log.append(("tokenised", len(ids)))
        return ids

    def __len__(self) -> int:
        return len(self.tokenizer)


def test_tokenising_a_maximal_prompt_leaves_the_loop_free():
    tokenizer = load_tokenizer("smollm2-135m")
    context = 2048
    prompt = "word " * (context - 16)  # about as long as a prompt that fits can be

    async def run() -> list:
        started, release, log = threading.Event(), threading.Event(), []
        gw = Gateway(GatewayConfig(workers="127.0.0.1:1", tokenizer_threads=2))
        gw.validator = Validator(HeldTokenizer(tokenizer, started, release, log), "smollm2-135m", context, 16)

        async def other_stream() -> None:  # stands for another request's tokens going out meanwhile
            while not started.is_set():
                await asyncio.sleep(0.001)
            log.append(("coroutine ran", True))
            release.set()

        task = asyncio.create_task(other_stream())
        sampling = SamplingParams(max_tokens=4)
        with pytest.raises(GatewayError) as err:  # no worker is live: it fails after tokenising, as it should
            await gw.admit(request_id="", model="", prompt=prompt, messages=[], sampling=sampling, priority=0,
                           streaming=False)
        await task
        await gw.close()
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        return log

    log = asyncio.run(run())
    assert log[0] == ("coroutine ran", True), log
    assert log[1] == ("released", True) and log[2][0] == "tokenised" and log[2][1] > context // 2, log


def _gateway_imports(name: str) -> set[str]:
    tree = ast.parse((GATEWAY / f"{name}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("services.gateway"):
            found.add(node.module.rsplit(".", 1)[-1] if node.module != "services.gateway" else "")
            found |= {a.name for a in node.names} if node.module == "services.gateway" else set()
    return found - {""}


def test_fronts_depend_on_the_core_never_the_reverse():
    fronts = {"server", "http", "openai_schema", "openai_format"}  # gRPC front; HTTP front and its helpers
    core = [p.stem for p in GATEWAY.glob("*.py") if p.stem not in fronts | {"main", "__init__"}]
    for name in core:
        assert not _gateway_imports(name) & fronts, f"core module {name} imports a front"
    assert "http" not in _gateway_imports("server") and "openai_schema" not in _gateway_imports("server")
    assert "server" not in _gateway_imports("http")
    assert {"core"} <= _gateway_imports("server") and {"core"} <= _gateway_imports("http")


def test_token_chunks_waiting_in_the_queue_go_out_as_one():
    """A caller that fell behind gets the tokens queued meanwhile in one chunk (one write), never past a finish,
    an error or another choice's tokens, and nothing is lost or reordered."""
    from services.gateway.pending import Chunk, coalesce

    async def run() -> None:
        q: asyncio.Queue = asyncio.Queue()
        for c in (Chunk(" b", [2], logprobs=["lb"]), Chunk(" c", [3], logprobs=["lc"]), Chunk(" x", [9], index=1),
                  Chunk(" d", [4]), Chunk(finish_reason="stop")):
            q.put_nowait(c)
        merged, held = coalesce(Chunk("a", [1], logprobs=["la"]), q)
        assert (merged.text, merged.token_ids, merged.index) == ("a b c", [1, 2, 3], 0)
        assert merged.logprobs == ["la", "lb", "lc"]
        assert held.index == 1 and held.token_ids == [9]  # another choice: held for the next chunk
        merged, held = coalesce(Chunk(" d0", [5]), q)  # " d" joins; the finish is held back
        assert merged.token_ids == [5, 4] and held.finish_reason == "stop" and q.empty()
        final, held = coalesce(Chunk(finish_reason="length"), q)  # a finish takes nothing with it
        assert final.finish_reason == "length" and held is None
        error = Chunk(error=(grpc.StatusCode.INTERNAL, "boom"))
        q.put_nowait(Chunk("e", [6]))
        assert coalesce(error, q) == (error, None) and q.qsize() == 1
        assert coalesce(Chunk("f", [7]), asyncio.Queue()) == (Chunk("f", [7]), None)  # nothing waits for more

    asyncio.run(run())
