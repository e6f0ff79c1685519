"""`tokenmill bench structured`: what constrained decoding costs.

1. libraries: per decode step, fill one token bitmask per sequence, apply them to a [batch, vocab] float32
   logits tensor and advance each matcher by a token, for xgrammar and llguidance (whichever are installed),
   at batch 1 and 32, walking the tokens of a JSON document valid against SCHEMA. This picked xgrammar.
2. engine: decode throughput of the paged engine (embedded model, CPU) at batch 1 and 32, greedy, with and
   without `json_schema` = SCHEMA, measured side by side in one process.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
    "friends": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 16}, "years": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["name", "years"]}, "maxItems": 4}},
    "required": ["name", "age", "mood", "friends"]}
DOCUMENT = {"name": "Olive the owl", "age": 7, "mood": "calm",
            "friends": [{"name": "Fred", "years": 3}, {"name": "Lily", "years": 5}, {"name": "Tom", "years": 2}]}
PROMPT = "Describe a small forest animal and its friends as JSON with name, age, mood and friends."


def _timed(step, n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        step(i)
    return (time.perf_counter() - start) / n


def library_overhead(tokenizer: Any, vocab: int, batch: int) -> dict[str, float]:
    """Mean seconds per step (fill + apply + accept) for each installed library at this batch size."""
    import torch

    tokens = tokenizer.encode(json.dumps(DOCUMENT, separators=(",", ":")), add_special_tokens=False)
    logits = torch.randn(batch, vocab)
    out: dict[str, float] = {}
    try:
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA), any_whitespace=False)
        matchers = [xgr.GrammarMatcher(compiled) for _ in range(batch)]
        mask = xgr.allocate_token_bitmask(batch, vocab)

        def xgr_step(i: int) -> None:
            for j, m in enumerate(matchers):
                m.fill_next_token_bitmask(mask, j)
            xgr.apply_token_bitmask_inplace(logits, mask, indices=list(range(batch)))
            for m in matchers:
                m.accept_token(tokens[i])

        out["xgrammar"] = _timed(xgr_step, len(tokens))
        for m in matchers:
            m.reset()
        batch_fill = xgr.BatchGrammarMatcher(max_threads=os.cpu_count() or 1)

        def xgr_batch_step(i: int) -> None:
            batch_fill.batch_fill_next_token_bitmask(matchers, mask)
            xgr.apply_token_bitmask_inplace(logits, mask, indices=list(range(batch)))
            for m in matchers:
                m.accept_token(tokens[i])

        out["xgrammar (batch fill)"] = _timed(xgr_batch_step, len(tokens))
    except ImportError:
        pass
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as lltorch

        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            json.dumps(SCHEMA), defaults={"whitespace_flexible": False})
        lms = [llguidance.LLMatcher(lltok, grammar) for _ in range(batch)]
        executor = llguidance.LLExecutor()
        lmask = lltorch.allocate_token_bitmask(batch, vocab)
        bits = torch.arange(32, dtype=torch.int32)

        def ll_step(i: int) -> None:
            lltorch.fill_next_token_bitmask_par(executor, [(m, j) for j, m in enumerate(lms)], lmask)
            # its own apply kernel is torch.compile'd (seconds on first use per shape): plain torch ops instead
            allowed = ((lmask[:, :, None] >> bits) & 1).bool().view(batch, -1)[:, :vocab]
            logits.masked_fill_(~allowed, float("-inf"))
            for m in lms:
                m.consume_token(tokens[i])

        out["llguidance"] = _timed(ll_step, len(tokens))
    except ImportError:
        pass
    return out


def engine_throughput(loaded: Any, batch: int, constrained: bool, max_tokens: int) -> dict[str, float]:
    """Output tokens per second of `batch` concurrent greedy requests through the paged engine over `loaded`
    (load_engine_model's model and tokenizer)."""
    from services.common.sampling import SamplingParams, Structured
    from services.worker.engine.paged_engine import PagedEngine
    from services.worker.engine.types import Request

    engine = PagedEngine(loaded.model, loaded.tokenizer, kv_cache_memory="512MiB", max_num_seqs=64)
    engine.warmup()
    prompt = list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                                       add_generation_prompt=True, tokenize=True, return_dict=False))
    structured = Structured("json_schema", json.dumps(SCHEMA)) if constrained else None
    requests = [Request(str(i), prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, structured=structured))
                for i in range(batch)]
    for r in requests:  # compiled before the clock starts, as the worker compiles off the engine thread
        engine.compile_grammar(r)
    tokens = 0
    start = time.perf_counter()
    for r in requests:
        engine.add_request(r)
    while engine.has_work():
        tokens += sum(len(ev.token_ids) for ev in engine.step())
    elapsed = time.perf_counter() - start
    return {"tokens": tokens, "seconds": round(elapsed, 3), "tok_s": round(tokens / elapsed, 2)}


def main(batches: tuple[int, ...], max_tokens: int, out: Path) -> dict:
    from bench.report import environment
    from services.worker.engine.models.engine_model import load_engine_model

    loaded = load_engine_model("smollm2-135m")
    tokenizer, vocab = loaded.tokenizer, loaded.model.config.vocab_size

    result: dict[str, Any] = {"benchmark": "structured", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "environment": environment(), "schema": SCHEMA, "libraries": {}, "engine": {}}
    for b in batches:
        result["libraries"][str(b)] = {k: round(v * 1e3, 4) for k, v in library_overhead(tokenizer, vocab, b).items()}
        print(f"batch {b}: ms per step (fill + apply + accept): {result['libraries'][str(b)]}", flush=True)
    for b in batches:
        free = engine_throughput(loaded, b, False, max_tokens)
        json_ = engine_throughput(loaded, b, True, max_tokens)
        result["engine"][str(b)] = {"free": free, "json_schema": json_,
                                    "ratio": round(json_["tok_s"] / free["tok_s"], 3)}
        print(f"batch {b}: free {free['tok_s']} tok/s, json_schema {json_['tok_s']} tok/s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result
