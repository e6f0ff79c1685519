"""Phase 7 — quantisation: tokenmill's own weight formats through its own layers and the paged engine.

Formats (`--quantization`): `none` (fp32, the reference), `gguf` (the embedded GGUF's Q4_1 / Q8_0 blocks as
stored: the worker's default on a CPU), `int8` (per output channel), `int4` (groups of 32), `int4/64`, `nf4`
(bitsandbytes' code book, groups of 64, tokenmill's kernels). Per format:
- resident weights: `weight_bytes` of the engine's model (layers/linear.py: packed codes + scales + mins +
  code book, float tensors, a tied head once), next to what the format's definition predicts from the
  checkpoint's shapes (`expected_bytes`: an independent count, so a tensor left out shows as a gap);
- quality: perplexity, KL(fp32 || format) and top-1 agreement with fp32 from `bench.quality.evaluate`, the
  code of `tokenmill bench quality` (transformers' model over tokenmill's layers, the same packed values);
- speed: the model as the worker loads it (`load_engine_model`, `--model-impl` from the worker's settings:
  tokenmill's forward and C++ kernels on a CPU) in a `PagedEngine` built from the worker's settings, at batch
  1 and 32: time to first token (all prompts arriving at once; median over the batch) and decode tokens/s
  over the steps in which every sequence decodes.
bitsandbytes (LLM.int8, its NF4) is not a row: see NOTES.
"""

from __future__ import annotations

import gc
import statistics

import torch

from bench.phases.common import Options, make_engine, run_requests, setup_of, text_prompts, write_results

PHASE, TITLE = "quantization", "Phase 7 — quantisation (tokenmill's formats)"
FORMATS = ("none", "gguf", "int8", "int4", "int4/64", "nf4")
NOTES = [
    "weights_MiB = weight_bytes of the engine's model: packed codes + fp16 scales + fp16 mins (asymmetric "
    "formats) + the NF4 code book + float tensors (norms, biases), each stored tensor once. expected_MiB counts "
    "the same from the format's definition and the checkpoint's shapes (output rows padded to panels of 16); "
    "weights_vs_expected near 1 says nothing was left out (the previous version of this phase read "
    "get_memory_footprint, which sees parameters only and reported NF4 as 0.134 MiB).",
    "The embedding and LM head stay 8-bit in every quantizing format (q8_0 blocks; int8 per channel for int8; "
    "the GGUF's Q8_0 for gguf); the embedded model ties them, so they count once.",
    "The embedded model's fp32 reference is its Q4_1 GGUF dequantised: gguf and int4 (groups of 32) find the "
    "same blocks, so their KL is float rounding (~1e-9); int4/64 and nf4 requantise 4-bit-derived weights.",
    "bitsandbytes rows (LLM.int8, its NF4) are dropped: the worker never runs them by default (tokenmill's "
    "loader uses bitsandbytes only for --quantization nf4 on CUDA with --model-impl transformers or --engine "
    "hf-static), they do not go "
    "through tokenmill's layers or forward, and on a CPU their matmuls are PyTorch fallbacks (5.8 tok/s at "
    "batch 1 measured on this machine, shared/ENV-NOTES.md). tokenmill's nf4 row uses bitsandbytes' code book.",
]


def _packed_bytes(n: int, k: int, fmt: str) -> int:
    """Bytes of one [n, k] weight in a packed format, from its definition (layers/quant.py's docstring)."""
    base, _, group = fmt.partition("/")
    bits = 8 if base in ("int8", "q8_0") else 4
    g = int(group) if group else {"int8": k, "q8_0": 32, "int4": 32, "q4_1": 32, "nf4": 64}[base]
    rows = -(-n // 16) * 16  # output rows padded to whole panels of 16
    scales = rows * (k // g) * 2  # fp16 per group and row
    mins = scales if base in ("int4", "q4_1") else 0
    return rows * k * bits // 8 + scales + mins + (16 * 4 if base == "nf4" else 0)


def expected_bytes(ref: torch.nn.Module, fmt: str) -> int:
    """Resident weight bytes `fmt` should take for transformers model `ref`: linear layers in the format,
    embedding / LM head in its 8-bit format, everything else float32; tied tensors once."""
    lin = "q4_1" if fmt == "gguf" else fmt  # the embedded GGUF stores every linear layer as Q4_1
    emb = "none" if fmt == "none" else ("int8" if fmt.startswith("int8") else "q8_0")
    embeds = {id(m.weight) for m in (ref.get_input_embeddings(), ref.get_output_embeddings()) if m is not None}
    linears = {id(m.weight) for m in ref.modules() if isinstance(m, torch.nn.Linear)}
    total = 0
    for p in ref.parameters():  # a tied head is the embedding's Parameter: listed once
        as_fmt = emb if id(p) in embeds else (lin if id(p) in linears else "none")
        total += p.numel() * 4 if as_fmt == "none" or fmt == "none" else _packed_bytes(*p.shape, as_fmt)
    return total


def quality_rows(opts: Options, formats: tuple[str, ...]) -> tuple[dict[str, dict], dict[str, str], dict]:
    """Per format: perplexity, KL and top-1 vs fp32 from bench.quality (the `bench quality` code)."""
    from bench import quality
    from services.common.model_loader import load_tokenizer

    if opts.model not in quality.MODELS:
        return {}, {"all": f"bench quality covers {', '.join(quality.MODELS)}, not {opts.model}"}, {}
    qopts = quality.Options(models=(opts.model,), formats=formats, tokens=opts.pick(1024, 20480, "ppl_tokens"),
                            chunk=opts.pick(256, 512, "chunk"))
    text = "\n\n".join(quality.prose_paragraphs())
    ids = torch.tensor(load_tokenizer("smollm2-135m")(text, add_special_tokens=False)["input_ids"][: qopts.tokens])
    skipped: dict[str, str] = {}
    rows = quality.evaluate(opts.model, ids, qopts, skipped)
    gc.collect()
    info = {"text": quality.SOURCE, "tokens": qopts.tokens, "chunk": qopts.chunk,
            "positions": qopts.tokens // qopts.chunk * (qopts.chunk - 1)}
    return {r.format: r for r in rows}, skipped, info


def engine_model(opts: Options, fmt: str):
    """The format as the worker loads it (its --model-impl and --dtype), for the speed runs."""
    from bench.phases.common import worker_settings
    from services.common.model_loader import load_tokenizer
    from services.worker.engine.models import Unsupported
    from services.worker.engine.models.engine_model import load_engine_model

    cfg = worker_settings()
    if opts.model == "tiny-qwen2":  # the tests' model: tokenmill's forward over the tiny random Qwen2
        from bench.quality import tiny_qwen2
        from services.worker.engine.models.builders import native_from_hf
        from services.worker.engine.models.engine_model import LoadedModel

        if fmt == "gguf":
            raise Unsupported("no GGUF file: gguf keeps a GGUF's own blocks (embedded model only)")
        ref = tiny_qwen2()
        tok = load_tokenizer("smollm2-135m")  # text_prompts folds its ids into the tiny vocabulary
        return LoadedModel(native_from_hf(ref, fmt), tok, "tiny-qwen2", "", "cpu", torch.float32, fmt), ref
    lm = load_engine_model(opts.model, fmt, opts.device, cfg.dtype, cfg.model_impl)
    return lm, None


def shapes_model(opts: Options) -> torch.nn.Module:
    """transformers' model of the checkpoint on the meta device: its parameter shapes and ties, no weights."""
    from transformers import AutoModelForCausalLM

    from services.common.model_loader import resolve
    from services.worker.engine.models.builders import load_config

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(load_config(resolve(opts.model))[0])


def speed(lm, batch: int, prompt_len: int, new_tokens: int, device: str, kv_cache_dtype: str = "auto") -> dict:
    per_seq = -(-(prompt_len + new_tokens) // 16)
    engine = make_engine(lm, num_blocks=batch * per_seq + 4, block_size=16, enable_prefix_caching=False,
                         kv_cache_dtype=kv_cache_dtype)
    prompts = text_prompts(lm.tokenizer, batch, prompt_len, lm.model.config.vocab_size)
    r = run_requests(engine, prompts, new_tokens, device)
    del engine
    steps = sum(t for t, _ in r["decode"])
    return {"ttft_s": statistics.median(r["ttft"]), "decode_tok_s": sum(n for _, n in r["decode"]) / steps
            if steps else float("nan")}


def run(opts: Options) -> dict:
    from services.worker.engine.layers.linear import weight_bytes

    formats = tuple(opts.pick(FORMATS, FORMATS, "formats"))
    batches = opts.pick([1, 32], [1, 32], "batches")
    prompt_len, new_tokens = opts.pick(32, 128, "prompt_len"), opts.pick(9, 65, "new_tokens")
    quality, skipped, qinfo = quality_rows(opts, formats) if opts.extra.get("quality", True) else ({}, {}, {})
    ref = shapes_model(opts) if opts.model != "tiny-qwen2" else None  # shapes for expected_bytes
    rows, setups = [], {}
    for fmt in formats:
        try:
            lm, tiny_ref = engine_model(opts, fmt)
        except (ValueError, RuntimeError) as exc:  # gguf of a model without a GGUF file, a device without kernels
            rows.append({"format": fmt, "error": str(exc).splitlines()[0][:160]})
            continue
        ref = tiny_ref if tiny_ref is not None else ref
        wb, exp = weight_bytes(lm.model), expected_bytes(ref, fmt)
        row = {"format": fmt, "weights_MiB": wb / 2**20, "expected_MiB": exp / 2**20, "weights_vs_expected": wb / exp}
        q = quality.get(fmt)
        if q is not None:
            row.update(perplexity=q.perplexity, ppl_ratio=q.ppl_ratio, kl_mean=q.kl_mean, kl_p99=q.kl_p99,
                       top1=q.top1, quality_weights_MiB=q.weights_MiB)
        for b in batches:
            s = speed(lm, b, prompt_len, new_tokens, opts.device)
            row[f"ttft_ms_b{b}"], row[f"decode_tok_s_b{b}"] = 1e3 * s["ttft_s"], s["decode_tok_s"]
        setups[fmt] = setup_of(lm)
        rows.append(row)
        del lm
        gc.collect()
    ok = [r for r in rows if "error" not in r]
    base = next((r for r in ok if r["format"] == "none"), None)
    for r in ok:
        if base is not None:
            r["x_smaller"] = base["weights_MiB"] / r["weights_MiB"]
            for b in batches:
                r[f"speed_b{b}_x"] = r[f"decode_tok_s_b{b}"] / base[f"decode_tok_s_b{b}"]
    summary = {f"{r['format']}: weights MiB / PPL ratio / top-1 / decode tok/s b1, b{batches[-1]}":
               f"{r['weights_MiB']:.1f} / {r.get('ppl_ratio', float('nan')):.4f} / "
               f"{100 * r.get('top1', float('nan')):.1f}% / {r['decode_tok_s_b1']:.1f}, "
               f"{r[f'decode_tok_s_b{batches[-1]}']:.1f}" for r in ok}
    summary["weights within 10 % of the format's definition"] = all(abs(r["weights_vs_expected"] - 1) <= 0.1
                                                                    for r in ok)
    summary["failed"] = ", ".join(f"{r['format']} ({r['error']})" for r in rows if "error" in r) or "none"
    summary["seed (pods)"] = ("Qwen2.5-1.5B NF4 (bitsandbytes) + double quant, bf16 compute: 13,558 req/h on "
                              "2x RTX 2000 Ada")

    def plot(fig):
        ax1, ax2, ax3 = fig.subplots(1, 3)
        names = [r["format"] for r in ok]
        ax1.bar(names, [r["weights_MiB"] for r in ok])
        ax1.set(ylabel="MiB", title="resident weights (weight_bytes)")
        width = 0.4
        for i, b in enumerate(batches):
            ax2.bar([j + i * width for j in range(len(ok))], [r[f"decode_tok_s_b{b}"] for r in ok], width,
                    label=f"batch {b}")
        ax2.set_xticks([j + width / 2 for j in range(len(ok))], names)
        ax2.set(ylabel="decode tokens/s (paged engine)", title="speed")
        ax2.legend(fontsize=8)
        ax3.bar(names, [r.get("kl_mean", 0.0) for r in ok], color="tab:purple")
        ax3.set(ylabel="KL(fp32 || format), mean", yscale="symlog", title="quality")
        for ax in (ax1, ax2, ax3):
            ax.tick_params(axis="x", labelsize=8, rotation=30)

    config = {"formats": list(formats), "batches": batches, "prompt_len": prompt_len, "new_tokens": new_tokens,
              "quality": qinfo, "quality_skipped": skipped, "setup_per_format": setups,
              "engine": "PagedEngine (the worker's engine_options; KV blocks sized to the run, prefix cache off)"}
    columns = ["format", "weights_MiB", "expected_MiB", "x_smaller", "perplexity", "ppl_ratio", "kl_mean", "kl_p99",
               "top1"]
    for b in batches:
        columns += [f"ttft_ms_b{b}", f"decode_tok_s_b{b}"]
    columns += ["error"] if len(ok) < len(rows) else []
    setup = setups.get("gguf") or next(iter(setups.values()), setup_of())
    setup = {**setup, "format": ", ".join(r["format"] for r in ok) or "none loaded"}
    return write_results(PHASE, TITLE, opts, config=config, rows=rows, summary=summary, plot=plot, notes=NOTES,
                         columns=columns, setup=setup)

