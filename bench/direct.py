"""The engine in this process, behind an AsyncEngine as the worker runs it: the models (loaded once), an engine of
either kind built as the worker builds it, and a probe of the KV memory it reserves against what it holds."""

from __future__ import annotations

from typing import Any

from bench.results import SystemSpec


class Models:
    """Models loaded once per (kind, format, impl, dtype): transformers' (hf-static, transformers-cb) and the
    paged engine's."""

    def __init__(self, model: str) -> None:
        self.model, self.cache = model, {}

    def hf(self, quantization: str, dtype: str) -> Any:
        """transformers' model and tokenizer (LoadedModel)."""
        from services.worker.engine.models.engine_model import load_model

        key = ("hf", quantization, dtype)
        if key not in self.cache:
            self.cache[key] = load_model(self.model, quantization, dtype=dtype)
        return self.cache[key]

    def get(self, spec: SystemSpec) -> Any:
        """The model an engine of `spec` runs."""
        from services.worker.engine.models.engine_model import load_engine_model

        quant, dtype = spec.quantization or "auto", spec.dtype or "auto"
        if spec.name == "hf-static":
            return self.hf(quant, dtype)
        key = ("paged", spec.quantization, spec.model_impl, spec.dtype, spec.activations)
        if key not in self.cache:
            self.cache[key] = load_engine_model(self.model, quant, dtype=dtype, model_impl=spec.model_impl or "auto",
                                                activations=spec.activations or "fp32")
        return self.cache[key]


def make_engine(kind: str, models: Models, kv_cache_memory: str = "", spec_max_batch: int = -1) -> Any:
    """The engine of system spec `kind` with the worker's defaults; kv_cache_memory "" and spec_max_batch -1 leave
    theirs."""
    from services.common.config import WorkerConfig

    cfg, spec = WorkerConfig(), SystemSpec.parse(kind)
    loaded = models.get(spec)
    if spec.name == "hf-static":
        from services.common.sampling import SamplingParams
        from services.worker.engine.hf_static import HFStaticEngine
        from services.worker.engine.types import Request

        loaded.model.set_attn_implementation("sdpa")  # the paged engine may have installed its own
        engine = HFStaticEngine(loaded.model, loaded.tokenizer, cfg.max_batch_size, cfg.max_model_len)
        engine.add_request(Request("warmup", [1, 2, 3], SamplingParams(max_tokens=2, temperature=0.0)))
        engine.step()  # like the paged engine's warmup: the first generate() pays for lazy init
        return engine
    from services.worker.engine.build import engine_options
    from services.worker.engine.paged_engine import PagedEngine

    cfg.speculative = spec.speculative
    cfg.kv_cache_dtype = spec.kv_cache_dtype or cfg.kv_cache_dtype
    cfg.kv_cache_memory = kv_cache_memory or cfg.kv_cache_memory
    if spec_max_batch >= 0:
        cfg.speculative_max_batch = spec_max_batch
    engine = PagedEngine(loaded.model, loaded.tokenizer, **engine_options(cfg))
    engine.warmup()
    return engine


class KVProbe:
    """KV reserved vs held. Paged: blocks in use vs tokens held, from engine stats after each step.
    hf-static: each generate() call reserves batch x (padded prompt + longest max_tokens) tokens."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.peak_blocks, self.total = engine, 0, 0
        self.reserved = self.held = 0
        if engine.name == "hf-static":
            inner = engine._generate

            def generate(batch: list) -> list[list[int]]:
                out = inner(batch)
                width = max(len(r.prompt_token_ids) for r in batch)
                steps = max((len(o) for o in out), default=0)
                self.reserved += len(batch) * (width + steps) * steps
                self.held += sum((len(r.prompt_token_ids) + min(r.params.max_tokens, _until_eos(o, engine.eos_ids)))
                                 for r, o in zip(batch, out, strict=True)) * steps
                return out

            engine._generate = generate

    def __call__(self, stats: Any) -> None:
        if self.engine.name != "paged":
            return
        used = stats.total_kv_blocks - stats.free_kv_blocks
        self.peak_blocks, self.total = max(self.peak_blocks, used), stats.total_kv_blocks
        if stats.kv_tokens:
            self.reserved += used * self.engine.block_size
            self.held += stats.kv_tokens

    def ratio(self) -> float:
        return self.reserved / self.held if self.held else 0.0


def _until_eos(tokens: list[int], eos: set[int]) -> int:
    return next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))


def direct_front(kind: str, models: Models, kv_cache_memory: str = "", spec_max_batch: int = -1
                 ) -> tuple[Any, Any, KVProbe]:
    """(AsyncEngine, engine, KVProbe fed after every step) for `kind`, the engine built on the AsyncEngine's
    thread as the worker builds it (one OpenMP team: see AsyncEngine)."""
    from services.worker.engine.async_engine import AsyncEngine

    probes: list[KVProbe] = []

    def build() -> Any:
        engine = make_engine(kind, models, kv_cache_memory, spec_max_batch)
        probe = KVProbe(engine)
        inner_step = engine.step

        def step() -> list:
            events = inner_step()
            probe(engine.stats())
            return events

        engine.step = step
        probes.append(probe)
        return engine

    front = AsyncEngine(build)
    return front, front.ready.result(), probes[0]
