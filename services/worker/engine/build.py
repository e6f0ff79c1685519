"""The worker's engine of either kind (`--engine paged | hf-static`) from its settings: load the model the
engine runs, build the engine, warm it up."""

from __future__ import annotations

from typing import Any

from services.worker.engine.speculative import SpecConfig

ENGINES = ("paged", "hf-static")


def engine_options(config: Any) -> dict[str, Any]:
    """PagedEngine keyword arguments from a WorkerConfig (the worker and the benchmarks both build from it)."""
    return dict(block_size=config.block_size, kv_cache_memory=config.kv_cache_memory,
                kv_cache_dtype=config.kv_cache_dtype,
                max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=config.max_model_len, enable_prefix_caching=config.prefix_cache,
                enforce_eager=config.enforce_eager, max_waiting_steps=config.max_waiting_steps,
                speculative=SpecConfig(config.speculative, config.num_speculative_tokens, config.draft_layers,
                                       config.speculative_max_batch, config.speculative_min_acceptance,
                                       config.speculative_token_cost))


def build_engine(config: Any) -> tuple[Any, Any]:
    """(LoadedModel, engine) per `config.engine`. hf-static: transformers' model under `model.generate`;
    paged: the native forward or transformers' modules (--model-impl), its KV pool sized from
    --kv-cache-memory, warmed up."""
    if config.engine == "hf-static":
        from services.worker.engine.hf_static import HFStaticEngine
        from services.worker.engine.models.engine_model import load_model

        loaded = load_model(config.model, config.quantization, config.device, config.dtype)
        return loaded, HFStaticEngine(loaded.model, loaded.tokenizer, config.max_batch_size, config.max_model_len)
    if config.engine == "paged":
        from services.worker.engine.models.engine_model import load_engine_model
        from services.worker.engine.paged_engine import PagedEngine

        loaded = load_engine_model(config.model, config.quantization, config.device, config.dtype,
                                   config.model_impl, config.activations)
        engine = PagedEngine(loaded.model, loaded.tokenizer, **engine_options(config))
        engine.warmup()
        return loaded, engine
    raise SystemExit(f"unknown --engine {config.engine!r}: use {' or '.join(ENGINES)}")
