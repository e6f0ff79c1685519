"""Typed service settings: one dataclass per service, one place for every default.

Each field becomes a CLI flag (`--max-batch-size`) and an environment variable
(`TOKENMILL_GATEWAY_MAX_BATCH_SIZE`); a flag beats the variable, the variable
beats the default. `tokenmill config` prints the table the README carries, and
the Kubernetes ConfigMap is checked against these same defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import typer

T = TypeVar("T")


def cache_dir() -> Path:
    """Where converted models, kernel builds and logs live: $TOKENMILL_CACHE, else $XDG_CACHE_HOME/tokenmill."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenmill"
    return Path(os.environ.get("TOKENMILL_CACHE", default))


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(slots=True)
class WorkerConfig:
    host: str = setting("127.0.0.1", "Address to bind the gRPC server (and the metrics port) to.")
    port: int = setting(50061, "gRPC port.")
    metrics_port: int = setting(0, "Prometheus /metrics HTTP port on --host; 0 = off.")
    tls_cert: str = setting("", "PEM certificate (chain): serve TLS only. With --tls-key.")
    tls_key: str = setting("", "PEM private key of --tls-cert.")
    tls_ca: str = setting("", "PEM CA: require client certificates signed by it (mTLS with the gateway).")
    worker_id: str = setting("", "Name reported to the gateway; default host:port.")
    model: str = setting("smollm2-135m", "smollm2-135m (embedded), a local folder, or a hub id.")
    quantization: str = setting("auto", "auto (the embedded GGUF's own blocks on a CPU, else none) | none (float) | "
                                "gguf (Q4_1/Q8_0 blocks as stored) | int8 (per channel) | int4 (groups of 32) | nf4; "
                                "int4/128 etc. sets the group size. CUDA: Triton kernels (--model-impl "
                                "transformers --quantization nf4: bitsandbytes).")
    activations: str = setting("fp32", "paged engine on a CPU: fp32 | int8 (quantized layers take int8 activations "
                               "per row in blocks of 32, llama.cpp's Q8, on AMX tiles, AVX512-VNNI or AVX2: faster "
                               "prefill and batches, lower quality; README 'Activation precision').")
    device: str = setting("auto", "auto | cpu | cuda.")
    dtype: str = setting("auto", "auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16.")
    model_impl: str = setting("auto", "paged: auto (native where the architecture is covered) | native (tokenmill's "
                              "forward: Llama, Qwen2, Qwen3, Mistral) | transformers (its modules, any causal LM).")
    engine: str = setting("paged", "paged (continuous batching, paged KV) | hf-static (model.generate).")
    threads: int = setting(0, "torch intra-op threads; 0 = torch's default.")
    max_batch_size: int = setting(32, "hf-static: most requests in one generate() call.")
    block_size: int = setting(16, "paged: tokens per KV block.")
    kv_cache_memory: str = setting("0.25", "paged: KV pool size, bytes (e.g. 2GiB) or a fraction of free memory.")
    kv_cache_dtype: str = setting("auto", "paged: auto (the model's dtype) | float16 | bfloat16 (CPU, tokenmill's C++ "
                                  "attention: K/V stored in 16 bits as llama.cpp's f16 / bf16 caches, half the bytes "
                                  "a decode reads and twice the tokens per GiB; bfloat16 also multiplies in bfloat16 "
                                  "where the CPU has avx512_bf16, ~1.9x the attention of long prompts; lower "
                                  "quality, README 'KV cache precision').")
    max_num_batched_tokens: int = setting(512, "paged: token budget of one engine step.")
    max_num_seqs: int = setting(64, "paged: most sequences running at once.")
    max_model_len: int = setting(0, "Context length cap; 0 = the model's own.")
    prefix_cache: bool = setting(True, "paged: reuse KV blocks of shared prompt prefixes.")
    enforce_eager: bool = setting(False, "paged, CUDA: no CUDA graphs (decode steps launch every kernel).")
    max_waiting_steps: int = setting(0, "paged: while sequences decode, hold new prompts up to this many steps (or "
                                     "until they fill a step's budget) so that they prefill together, as TGI's "
                                     "--max-waiting-tokens; 0 = admit at once.")
    speculative: str = setting("off", "paged: speculative decoding, off | ngram (prompt lookup) | draft "
                               "(self-speculative: the model's first --draft-layers layers).")
    num_speculative_tokens: int = setting(4, "paged: most drafted tokens per sequence and step.")
    draft_layers: int = setting(0, "paged, --speculative draft: layers of the draft; 0 = a quarter.")
    speculative_max_batch: int = setting(64, "paged: speculate only while at most this many sequences decode.")
    speculative_min_acceptance: float = setting(-1.0, "paged: a sequence drafts while its acceptance rate is at "
                                                "least this; < 0 = per mode (ngram 0, draft 0.6).")
    speculative_token_cost: float = setting(0.3, "paged: per-token / fixed cost of a step (measured by bench "
                                            "speculative); sets the acceptance a sequence needs with n decoding: "
                                            "c*n / (1 + c*n).")
    step_delay_ms: float = setting(0.0, "Sleep this long per engine step (tests: a slow worker).")
    otlp_traces_endpoint: str = setting("", "OpenTelemetry: send spans over OTLP/gRPC to this collector (host:port, "
                                        "http://host:port; https:// for TLS); empty = tracing off.")
    grace_period_s: float = setting(30.0, "On SIGTERM, time to finish in-flight requests.")


@dataclass(slots=True)
class GatewayConfig:
    host: str = setting("127.0.0.1", "Address to bind the gRPC, HTTP and metrics servers to.")
    port: int = setting(50051, "gRPC port of the public Inference API.")
    http_port: int = setting(0, "OpenAI-compatible HTTP port (/v1/*, /health, /metrics); 0 = off.")
    metrics_port: int = setting(0, "Separate Prometheus /metrics port on --host; 0 = off.")
    tls_cert: str = setting("", "PEM certificate (chain): gRPC and HTTP serve TLS only; also the client "
                            "certificate shown to workers. With --tls-key.")
    tls_key: str = setting("", "PEM private key of --tls-cert.")
    tls_ca: str = setting("", "PEM CA of the workers' certificates: talk to workers over TLS (mTLS when "
                          "--tls-cert is set).")
    tls_server_name: str = setting("", "Name the workers' certificates are issued for, checked instead of the "
                                   "address dialled (workers found by DNS are dialled by pod IP); empty = address.")
    tokenizer_threads: int = setting(0, "Threads that template and tokenise prompts off the event loop; "
                                     "0 = one per core.")
    workers: str = setting("127.0.0.1:50061", "Worker addresses, comma separated host:port.")
    workers_dns: str = setting("", "DNS name whose A records are workers (headless Service), host:port.")
    max_batch_size: int = setting(32, "Most requests in one batch sent to a worker.")
    max_batch_tokens: int = setting(8192, "Most prompt tokens in one batch.")
    max_wait_ms: float = setting(20.0, "Longest a batch waits to fill before it is sent; an idle paged "
                                  "(continuous-batching) worker gets a request at once.")
    max_queued_requests: int = setting(1024, "Queue bound; beyond it requests get RESOURCE_EXHAUSTED.")
    default_max_tokens: int = setting(256, "max_tokens when a request does not set it.")
    routing: str = setting("prefix-aware", "least-loaded (fewest requests in flight per capacity) | prefix-aware "
                           "(score = cached prefix + load + free KV, weighted; sessions; a balance guard).")
    routing_prefix_weight: float = setting(3.0, "prefix-aware: weight of the cached share of the prompt (0..1).")
    routing_load_weight: float = setting(2.0, "prefix-aware: weight of the load score (1 for the least-loaded "
                                         "candidate, 0 for the most; requests held / capacity).")
    routing_kv_weight: float = setting(1.0, "prefix-aware: weight of the worker's free share of KV blocks.")
    routing_cache_threshold: float = setting(0.5, "prefix-aware: a cached share of the prompt below this counts "
                                             "as none, so the request goes by load (its blocks spread out).")
    routing_balance_abs: int = setting(4, "Balance guard: the best-scored worker yields to the least-loaded one "
                                       "when it has more than this many requests beyond it ...")
    routing_balance_rel: float = setting(1.5, "... and more than this many times its requests.")
    routing_index_blocks: int = setting(65536, "Prefix index: most block hashes remembered per worker (LRU; "
                                        "never more than the worker's KV pool holds).")
    api_key: str = setting("", "If set, clients must send 'authorization: Bearer <key>'.")
    judge_address: str = setting("", "Live quality: the judge (host:port) that scores a sample of completed "
                                 "requests, off the request path; empty = off.")
    judge_sample_rate: float = setting(0.0, "Live quality: share of completed requests sent to the judge (0..1); "
                                       "0 = off.")
    judge_queue_size: int = setting(64, "Live quality: most sampled requests waiting for the judge; beyond it "
                                    "they are dropped and counted (tokenmill:quality_dropped_total).")
    judge_concurrency: int = setting(4, "Live quality: most Score calls in flight to the judge.")
    judge_rubric: str = setting("", "Live quality: rubric the judge scores with; empty = the judge's default.")
    judge_timeout_s: float = setting(300.0, "Live quality: deadline of one Score call.")
    otlp_traces_endpoint: str = setting("", "OpenTelemetry: send spans over OTLP/gRPC to this collector (host:port, "
                                        "http://host:port; https:// for TLS); empty = tracing off.")
    grace_period_s: float = setting(30.0, "On SIGTERM, time to finish in-flight requests.")


@dataclass(slots=True)
class JudgeConfig:
    host: str = setting("127.0.0.1", "Address to bind the gRPC server (and the metrics port) to.")
    port: int = setting(50071, "gRPC port.")
    metrics_port: int = setting(0, "Prometheus /metrics HTTP port on --host; 0 = off.")
    judge_backend: str = setting("local", "local (a causal LM in-process) | openai (an OpenAI-compatible API).")
    model: str = setting("smollm2-135m", "local backend: the judge model.")
    quantization: str = setting("none", "local backend: none | nf4.")
    device: str = setting("auto", "local backend: auto | cpu | cuda.")
    judge_url: str = setting("", "openai backend: base URL, e.g. http://127.0.0.1:8000/v1.")
    judge_model: str = setting("", "openai backend: model name; empty = the first one the endpoint's /models lists.")
    judge_timeout_s: float = setting(120.0, "openai backend: timeout of one HTTP call, seconds.")
    judge_max_retries: int = setting(3, "openai backend: retries on 429/5xx/connection errors (exponential backoff).")
    judge_concurrency: int = setting(8, "openai backend: most calls in flight at once.")
    judge_max_tokens: int = setting(512, "openai backend: max_tokens of the judge model's reply.")
    rubrics: str = setting("", "Extra folder of rubric files (YAML/JSON); adds to or overrides the built-in ones.")
    max_text_chars: int = setting(32768, "Longest prompt or response accepted, in characters.")
    max_batch_items: int = setting(64, "local backend: most queued items scored together in one batch.")
    max_batch_tokens: int = setting(4096, "local backend: most padded tokens in one forward pass.")
    threads: int = setting(0, "local backend: torch intra-op threads; 0 = torch's default.")
    grace_period_s: float = setting(10.0, "On SIGTERM, time to finish in-flight requests.")


SERVICE_CONFIGS: dict[str, type] = {"worker": WorkerConfig, "gateway": GatewayConfig, "judge": JudgeConfig}


def env_name(service: str, name: str) -> str:
    return f"TOKENMILL_{service.upper()}_{name.upper()}"


def _parse(kind: type, raw: str) -> Any:
    if kind is bool:
        return raw.strip().lower() in ("1", "true", "yes", "on")
    return kind(raw)


def _field_type(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def from_env(cls: type[T], service: str, env: dict[str, str] | None = None, **overrides: Any) -> T:
    """Build a config from defaults, then environment variables, then explicit overrides."""
    env = os.environ if env is None else env
    values = {}
    for f in dataclasses.fields(cls):
        raw = env.get(env_name(service, f.name))
        if raw is not None:
            values[f.name] = _parse(_field_type(f), raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)


def typer_command(cls: type[T], service: str, run: Callable[[T], None]) -> Callable[..., None]:
    """A typer command whose options are the config's fields (with envvar fallbacks)."""
    params = []
    for f in dataclasses.fields(cls):
        kind = _field_type(f)
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if kind is bool else [flag]
        option = typer.Option(f.default, *decls, envvar=env_name(service, f.name), help=f.metadata["help"])
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=kind))

    def command(**kwargs: Any) -> None:
        run(cls(**kwargs))

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__doc__ = f"Run the {service} service."
    return command


def markdown_table() -> str:
    rows = ["| service | flag | environment variable | default | meaning |", "|---|---|---|---|---|"]
    for service, cls in SERVICE_CONFIGS.items():
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default != "" else '""'
            env = env_name(service, f.name)
            meaning = f.metadata["help"].replace("|", "\\|")  # "none | nf4" must not split the cell
            rows.append(f"| {service} | `{flag}` | `{env}` | `{default}` | {meaning} |")
    return "\n".join(rows)
