"""`tokenmill bench quality`: what each weight format costs in quality, against the fp32 model.

Per model and format (`none` = the fp32 reference, `gguf` = the embedded GGUF's own Q4_1/Q8_0 blocks, `int8`,
`int4`, `nf4` quantized from the fp32 weights by tokenmill's layers; embedding and LM head stay 8-bit):
- perplexity of the text;
- KL(fp32 || format) of the next-token distributions: mean, median, 99th percentile and max over the scored
  positions (as llama.cpp's `perplexity --kl-divergence` reports them);
- top-1 agreement: the fraction of positions whose argmax equals the fp32 model's.
With `--activations fp32,int8`, each integer-coded format also gets a row with the worker's `--activations int8`
(activations quantized per row in blocks of 32 before the integer kernel). With `--kv-cache-dtype
auto,float16,bfloat16`, each format also gets a row per 16-bit cache: every layer's keys (after RoPE) and values
are stored in such a cache and attended by the engine's own C++ paged attention (transformers' attention
replaced), so the row has the cache's rounding and, for bfloat16 on an avx512_bf16 CPU, its bfloat16 products.
Every format runs transformers' model over tokenmill's Linear/Embedding modules (the same modules the engine
uses), one forward per non-overlapping chunk of `--chunk` tokens, no cache, no sampling. In a chunk, positions
1..chunk-1 are scored (each predicts the next token of the chunk from the chunk's own prefix only).

Text: the prose paragraphs of the Python Language Reference that CPython ships as `pydoc_data/topics.py`
(indented code and grammar blocks, headings and short or non-sentence paragraphs dropped; topics in sorted
order; repeated paragraphs once), so nothing is downloaded. The tiny random Qwen2 reads the same token ids
modulo its vocabulary: its perplexity is meaningless, only its KL and top-1 agreement mean something. Its
weights are transformers' default initialisation (std 0.02), so its next-token distribution is nearly uniform
(entropy close to ln(vocab)): its KL values are small and its top-1 agreement counts near ties. Compare its
formats with each other, not with the trained model's numbers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.report import options_record

FORMATS = ("none", "gguf", "int8", "int4", "int4/64", "nf4")  # int4 = groups of 32, int4/64 = groups of 64
MODELS = ("smollm2-135m", "tiny-qwen2")
TINY_QWEN2 = dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                  tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
TINY_SEED = 0
INT8_ACT = " +int8 activations"  # a format's row with --activations int8 (the worker's flag)
KV16 = {"float16": " +float16 KV", "bfloat16": " +bfloat16 KV"}  # a format's row with that --kv-cache-dtype
SOURCE = "CPython's pydoc_data/topics.py (Python Language Reference topics), prose paragraphs"


@dataclass(slots=True)
class Options:
    models: tuple[str, ...] = MODELS
    formats: tuple[str, ...] = FORMATS
    tokens: int = 20480
    chunk: int = 512
    threads: int = 0
    quick: bool = False
    out: Path = Path("results/quality.json")
    activations: tuple[str, ...] = ("fp32",)  # int8: also each integer-coded format with int8 activations
    kv_cache_dtypes: tuple[str, ...] = ("auto",)  # float16 / bfloat16: also each format with such a KV cache


@dataclass(slots=True)
class Row:
    model: str
    format: str
    weights_MiB: float
    positions: int
    perplexity: float
    ppl_ratio: float
    kl_mean: float
    kl_median: float
    kl_p99: float
    kl_max: float
    top1: float
    entropy: float
    forward_s: float
    activations: str = "fp32"
    kv_cache_dtype: str = "auto"


@dataclass(slots=True)
class Tally:
    nll: list[torch.Tensor] = field(default_factory=list)
    kl: list[torch.Tensor] = field(default_factory=list)
    same: list[torch.Tensor] = field(default_factory=list)
    entropy: list[torch.Tensor] = field(default_factory=list)
    seconds: float = 0.0


def prose_paragraphs() -> list[str]:
    """The Language Reference's prose: unindented paragraphs of >= 80 characters that read as sentences."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    out: list[str] = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.split("\n")
            if any(line.startswith(" ") for line in lines):  # code, grammar, nested list items
                continue
            text = " ".join(line.strip() for line in lines)
            if len(text) >= 80 and text[0].isupper() and text.endswith(".") and text not in seen:
                seen.add(text)
                out.append(text)
    return out


def tiny_qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(TINY_SEED)
    return Qwen2ForCausalLM(Qwen2Config(**TINY_QWEN2)).eval()


def cache_attention(dtype: torch.dtype, block_size: int = 16):
    """A transformers attention function: one causal sequence's K/V written to a paged `dtype` cache and
    attended by the engine's C++ kernel, as the worker's --kv-cache-dtype runs it."""
    from services.worker.engine.kv_cache import cpu_shapes
    from services.worker.engine.layers import kernels

    ops = kernels.load()

    def attend(module, query, key, value, attention_mask, scaling=None, **kwargs):
        (b, heads, n, d), kv_heads = query.shape, key.shape[1]
        if b != 1 or ops is None:
            raise ValueError("a 16-bit KV cache row needs tokenmill's C++ kernels and one sequence per forward")
        blocks = -(-n // block_size)
        shape_k, shape_v = cpu_shapes(kv_heads, blocks, d, block_size, dtype)
        k_cache, v_cache = torch.empty(shape_k, dtype=dtype), torch.empty(shape_v, dtype=dtype)
        rows = lambda t: t[0].transpose(0, 1).reshape(n, -1).float().contiguous()  # noqa: E731  [n, heads * d]
        ops.write_kv(rows(key), rows(value), k_cache, v_cache, torch.arange(n))
        pos = torch.arange(n, dtype=torch.int32)
        out = ops.paged_attention(rows(query), k_cache, v_cache, torch.arange(blocks, dtype=torch.int32)[None],
                                  torch.zeros(n, dtype=torch.int32), pos, heads,
                                  getattr(module, "sliding_window", None) or 0, scaling or d**-0.5)
        return out.view(1, n, heads, d).to(query.dtype), None

    return attend


def fp32_model(name: str) -> Any:
    """The fp32 reference: the embedded model's float weights, or the tiny random Qwen2 (seeded)."""
    from services.common.model_loader import EMBEDDED
    from services.worker.engine.models.engine_model import load_model

    return load_model(name, "none", "cpu", "float32").model if name in EMBEDDED else tiny_qwen2()


def format_model(name: str, ref: Any, fmt: str) -> Any:
    from services.worker.engine.models.builders import hf_from_hf
    from services.worker.engine.models.engine_model import load_model

    if fmt == "none":
        return ref
    if fmt == "gguf":
        return load_model(name, "gguf", "cpu", "float32").model
    return hf_from_hf(ref, fmt)


def evaluate(name: str, ids: torch.Tensor, opts: Options, skipped: dict[str, str]) -> list[Row]:
    """One model: every format over the same chunks, each chunk compared with the fp32 logits at once."""
    from services.common.model_loader import EMBEDDED

    ref = fp32_model(name)
    ids = ids % ref.config.vocab_size
    from services.worker.engine.layers.linear import set_activations

    models: dict[str, Any] = {}
    for fmt in opts.formats:
        if fmt == "gguf" and name not in EMBEDDED:
            skipped[f"{name}/gguf"] = "no GGUF file: gguf keeps a GGUF's own blocks (embedded model only)"
            continue
        models[fmt] = format_model(name, ref, fmt)
        if "int8" in opts.activations and fmt not in ("none", "nf4"):
            models[fmt + INT8_ACT] = format_model(name, ref, fmt)
            set_activations(models[fmt + INT8_ACT], "int8")
        for kv in (k for k in opts.kv_cache_dtypes if k in KV16):
            from transformers import AttentionInterface

            AttentionInterface.register(f"tokenmill_kv_{kv}", cache_attention(getattr(torch, kv)))
            kv16 = format_model(name, ref, fmt) if fmt != "none" else fp32_model(name)  # its own attention
            shared, own = kv16.config, copy.copy(kv16.config)  # hf_from_hf shares the reference's config
            for module in kv16.modules():
                if getattr(module, "config", None) is shared:
                    module.config = own
            kv16.set_attn_implementation(f"tokenmill_kv_{kv}")
            models[fmt + KV16[kv]] = kv16
    tallies = {fmt: Tally() for fmt in models}
    chunks = ids[: len(ids) // opts.chunk * opts.chunk].view(-1, opts.chunk)
    with torch.inference_mode():
        for i, chunk in enumerate(chunks):
            x, target = chunk[None], chunk[1:, None]
            t0 = time.perf_counter()
            ref_logp = torch.log_softmax(ref(x, use_cache=False).logits[0, :-1].float(), -1)
            ref_s, ref_p = time.perf_counter() - t0, ref_logp.exp()
            for fmt, model in models.items():
                t0 = time.perf_counter()
                logp = ref_logp if fmt == "none" else torch.log_softmax(
                    model(x, use_cache=False).logits[0, :-1].float(), -1)
                tally = tallies[fmt]
                tally.seconds += ref_s if fmt == "none" else time.perf_counter() - t0
                tally.nll.append(-logp.gather(1, target)[:, 0].double())
                tally.kl.append((ref_p * (ref_logp - logp)).sum(-1).double())
                tally.same.append(logp.argmax(-1) == ref_logp.argmax(-1))
                tally.entropy.append(-(logp.exp() * logp).sum(-1).double())
            print(f"  {name}: chunk {i + 1}/{len(chunks)}", end="\r", flush=True)
    print()
    from services.worker.engine.layers.linear import weight_bytes

    ref_ppl = math.exp(torch.cat(tallies["none"].nll).mean().item()) if "none" in tallies else float("nan")
    rows = []
    for fmt, tally in tallies.items():
        kl = torch.cat(tally.kl)
        ppl = math.exp(torch.cat(tally.nll).mean().item())
        kv = next((k for k, suffix in KV16.items() if fmt.endswith(suffix)), "auto")
        base = fmt.removesuffix(INT8_ACT).removesuffix(KV16.get(kv, ""))
        rows.append(Row(name, base, weight_bytes(models[fmt]) / 2**20, len(kl), ppl,
                        ppl / ref_ppl, kl.mean().item(), kl.median().item(), torch.quantile(kl, 0.99).item(),
                        kl.max().item(), torch.cat(tally.same).double().mean().item(),
                        torch.cat(tally.entropy).mean().item(), tally.seconds,
                        "int8" if fmt.endswith(INT8_ACT) else "fp32", kv))
        print(f"  {name} {fmt}: ppl {ppl:.3f}, KL mean {rows[-1].kl_mean:.5f}, top-1 {rows[-1].top1:.4f}")
    return rows


def environment() -> dict[str, Any]:
    import transformers

    from bench.report import environment as machine
    from services.worker.engine.layers import kernels

    return {**machine(), "transformers": transformers.__version__, "tokenmill_kernels": kernels.load() is not None}


def markdown_table(rows: list[Row]) -> str:
    lines = ["| model | format | weights MiB | PPL | PPL / fp32 | KL mean | KL median | KL p99 | KL max | top-1 "
             "| entropy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fmt = r.format + (", int8 activations" if r.activations == "int8" else "") + (
            f", {r.kv_cache_dtype} KV" if r.kv_cache_dtype != "auto" else "")
        lines.append(f"| {r.model} | {fmt} | {r.weights_MiB:.1f} | {r.perplexity:.3f} | {r.ppl_ratio:.4f} | "
                     f"{r.kl_mean:.3g} | {r.kl_median:.3g} | {r.kl_p99:.3g} | {r.kl_max:.3g} | "
                     f"{100 * r.top1:.2f}% | {r.entropy:.2f} |")
    return "\n".join(lines)


def main(opts: Options) -> dict[str, Any]:
    from services.common.model_loader import load_tokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from services.worker.engine.models.weights import check_quantization

    for fmt in opts.formats:
        check_quantization(fmt)
    from services.worker.engine.kv_cache import KV_CACHE_DTYPES

    if set(opts.kv_cache_dtypes) - set(KV_CACHE_DTYPES):
        raise ValueError(f"--kv-cache-dtype {','.join(opts.kv_cache_dtypes)}: use {', '.join(KV_CACHE_DTYPES)}")
    if set(opts.models) - set(MODELS):
        raise ValueError(f"unknown model {sorted(set(opts.models) - set(MODELS))}: use {', '.join(MODELS)}")
    if opts.threads:
        torch.set_num_threads(opts.threads)
    from services.worker.engine.layers import kernels

    kernels.load()  # built (or loaded from the cache) here, not inside the first quantized format's timing
    paragraphs = prose_paragraphs()
    text = "\n\n".join(paragraphs)
    tokenizer = load_tokenizer("smollm2-135m")
    all_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(all_ids) < opts.tokens:
        raise ValueError(f"--tokens {opts.tokens}: the text has only {len(all_ids)} tokens")
    ids = torch.tensor(all_ids[: opts.tokens])
    print(f"text: {len(paragraphs)} paragraphs, {len(all_ids)} tokens; using {opts.tokens} in chunks of "
          f"{opts.chunk}; models {opts.models}, formats {opts.formats}", flush=True)
    t0 = time.perf_counter()
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    for name in opts.models:
        rows += evaluate(name, ids, opts, skipped)
    total_s = time.perf_counter() - t0
    report = {
        "benchmark": "quality", "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(["tokenmill bench quality", *sys.argv[sys.argv.index("quality") + 1:]])
        if "quality" in sys.argv else " ".join(sys.argv),
        "options": options_record(opts),
        "environment": environment(),
        "text": {"source": SOURCE, "python": sys.version.split()[0], "paragraphs": len(paragraphs),
                 "chars": len(text), "sha256": hashlib.sha256(text.encode()).hexdigest(),
                 "tokenizer": "smollm2-135m", "tokens_available": len(all_ids), "tokens_used": opts.tokens,
                 "chunk": opts.chunk, "chunks": opts.tokens // opts.chunk,
                 "positions_scored": opts.tokens // opts.chunk * (opts.chunk - 1)},
        "models": {"smollm2-135m": "embedded SmolLM2-135M-Instruct; fp32 reference = its Q4_1 GGUF dequantised",
                   "tiny-qwen2": {"config": TINY_QWEN2, "seed": TINY_SEED, "ids": "the text's ids modulo vocab_size",
                                  "note": "random weights (std 0.02): perplexity meaningless, only KL and top-1 "
                                          "matter; near-uniform outputs, so top-1 agreement counts near ties"}},
        "skipped": skipped, "total_s": total_s, "rows": [asdict(r) for r in rows],
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(report, indent=2) + "\n")
    t = report["text"]
    md = [f"# Quality per weight format ({report['date']})", "", f"Command: `{report['command']}`", "",
          f"Text: {SOURCE}, Python {t['python']}: {t['tokens_used']} tokens (SmolLM2 tokenizer) in "
          f"{t['chunks']} non-overlapping chunks of {t['chunk']}, {t['positions_scored']} positions scored. "
          "KL = KL(fp32 || format) per position; top-1 = argmax equals fp32's. tiny-qwen2 = random weights "
          f"(seed {TINY_SEED}, hidden {TINY_QWEN2['hidden_size']}, {TINY_QWEN2['num_hidden_layers']} layers, "
          f"vocab {TINY_QWEN2['vocab_size']}): its perplexity is meaningless and its outputs are nearly uniform "
          "(entropy column), so its top-1 agreement counts near ties.", "", markdown_table(rows), ""]
    md += [f"- skipped {k}: {v}" for k, v in skipped.items()]
    md.append(f"- total {total_s:.0f} s, {report['environment']['cpu']}, {torch.get_num_threads()} torch threads")
    opts.out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print()
    print(markdown_table(rows))
    print(f"wrote {opts.out} and {opts.out.with_suffix('.md')} ({total_s:.0f} s)")
    return report
