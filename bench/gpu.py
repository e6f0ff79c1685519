"""`python -m bench.gpu`: the engine on a CUDA device, with the Qwen2.5-1.5B-Instruct architecture and random
weights (GPU nodes reach no model hub).

1. greedy parity (fp32): the paged engine over tokenmill's forward and over transformers' modules, all prompts
   in one batch, vs `model.generate` on each prompt alone;
2. throughput (bf16): hf-static vs paged (native forward) vs paged:transformers, closed-loop clients at several
   concurrencies (bench.engine's runner), and the decode step's time at batch 1 / 8 / 64 per forward;
3. NF4: the random model saved, loaded back through the worker's loader with `--quantization nf4`
   (bitsandbytes, bf16 compute), parity and paged throughput;
4. speculative decoding (fp32): greedy parity with drafting forced on (ngram, self-draft), and a sampled run.
`--parts` picks among parity, throughput, nf4, spec.
Prompts are random token ids; every request is greedy with ignore_eos. Writes JSON after each part.
`--tiny` shrinks the model so the script can be tried on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from bench.results import SystemSpec

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  bos_token_id=151643, eos_token_id=151645)
TINY = dict(QWEN25_15B, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=4096, bos_token_id=1, eos_token_id=2)


class IdTokenizer:
    """Random weights have no tokenizer; text deltas are the ids themselves."""

    pad_token_id = None

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(f" {i}" for i in ids)


def build_model(spec: dict, device: str) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**spec)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    return model.eval()


def random_prompts(n: int, vocab: int, lo: int, hi: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def reference(model: Any, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    """model.generate on each prompt alone (sdpa attention, greedy, exactly `tokens` new tokens)."""
    model.set_attn_implementation("sdpa")
    dev = next(model.parameters()).device
    ref = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=dev)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                 min_new_tokens=tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
            ref.append(out[0, len(p):].tolist())
    return ref


def parity(model: Any, prompts: list[list[int]], tokens: int, spec: Any = None, sampled: bool = False,
           engine_model: Any = None, ref: list[list[int]] | None = None) -> dict:
    """Paged engine over `engine_model` (default: `model` itself, i.e. transformers' modules; all prompts at once,
    staggered by one step each) vs model.generate alone (`ref`: reference(model, prompts, tokens), computed
    here when not given)."""
    from services.common.sampling import SamplingParams
    from services.worker.engine.engine import PagedEngine
    from services.worker.engine.types import Request

    if ref is None:
        ref = reference(model, prompts, tokens)
    engine = PagedEngine(engine_model or model, IdTokenizer(), kv_cache_memory="2GiB", max_num_batched_tokens=256,
                         speculative=spec)
    got: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    while pending or engine.has_work():
        if pending:  # one new request per step: prefills land next to running decodes
            i, p = pending.pop(0)
            engine.add_request(Request(str(i), p, SamplingParams(max_tokens=tokens, temperature=0.8 if sampled
                                                                 else 0.0, seed=i, ignore_eos=True)))
        for ev in engine.step():
            got.setdefault(ev.request_id, []).extend(ev.token_ids)
    leaked = engine.block_manager.num_blocks - engine.block_manager.num_free_blocks
    first_diff = []
    for i, r in enumerate(ref):
        g = got.get(str(i), [])
        first_diff.append(next((j for j, (a, b) in enumerate(zip(r, g, strict=False)) if a != b),
                               None if len(g) == len(r) else min(len(g), len(r))))
    s = engine.stats()
    return {"prompts": len(prompts), "tokens_each": tokens, "identical": sum(d is None for d in first_diff),
            "first_divergence": first_diff, "kv_blocks_left_in_use": leaked, "spec_drafted": s.spec_draft_tokens,
            "spec_accepted": s.spec_accepted_tokens, "lengths": [len(got.get(str(i), [])) for i in range(len(ref))]}


class Preloaded:
    """bench.engine's model cache, filled with the in-memory models (no checkpoint to load on a GPU node)."""

    def __init__(self, hf: Any) -> None:
        from services.worker.engine.models.loader import native_from_hf

        self.hf, self.native = hf, None
        self.make_native = lambda: native_from_hf(hf.model)

    def get(self, spec: Any) -> Any:
        if spec.name == "hf-static" or spec.model_impl == "transformers":
            return self.hf
        if self.native is None:
            self.native = SimpleNamespace(model=self.make_native(), tokenizer=self.hf.tokenizer)
        return self.native


def throughput(models: Preloaded, plan: list[tuple[int, int]], engines: tuple[str, ...], max_tokens: tuple[int, int],
               vocab: int) -> list[dict]:
    """bench.engine's direct runner, one workload per (concurrency, requests)."""
    from bench.engine import Options, Workload, run_direct

    results: list[Any] = []
    for conc, n in plan:
        prompts = random_prompts(n, vocab, 40, 80, seed=conc)
        rng = random.Random(conc)
        work = Workload([""] * n, prompts, [rng.randint(*max_tokens) for _ in prompts])
        opts = Options(requests=n, concurrency=(conc,), engines=engines, modes=("direct",))
        run_direct(models, work, opts, results)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return [asdict(r) for r in results]


def step_times(models: Preloaded, batches: tuple[int, ...], vocab: int) -> dict[str, dict[int, float]]:
    """Milliseconds per pure decode step (context ~100 tokens) at each batch size, per forward."""
    from services.common.sampling import SamplingParams
    from services.worker.engine.engine import PagedEngine
    from services.worker.engine.types import Request

    out: dict[str, dict[int, float]] = {}
    for impl in ("native", "transformers"):
        model = models.get(SystemSpec.parse(f"paged:{impl}")).model
        out[impl] = {}
        for b in batches:
            engine = PagedEngine(model, IdTokenizer(), kv_cache_memory="2GiB", max_num_seqs=max(batches))
            for i, p in enumerate(random_prompts(b, vocab, 96, 96, seed=b)):
                engine.add_request(Request(str(i), p, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)))
            for _ in range(4):
                engine.step()  # prefills, then the first decodes
            sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
            sync()
            t = time.perf_counter()
            for _ in range(20):
                engine.step()
            sync()
            out[impl][b] = (time.perf_counter() - t) / 20 * 1e3
            del engine
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("results/gpu.json"))
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model, to try the script on a CPU")
    ap.add_argument("--parts", default="parity,throughput,nf4,spec")
    ap.add_argument("--tokenizer-dir", default="", help="tokenizer files saved next to the NF4 checkpoint")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    spec = TINY if args.tiny else QWEN25_15B
    small = args.tiny or device == "cpu"
    report: dict[str, Any] = {"benchmark": "gpu-engine", "model": "Qwen2.5-1.5B-Instruct architecture, random weights"
                              if not args.tiny else "tiny Qwen2", "device": torch.cuda.get_device_name()
                              if device == "cuda" else "cpu", "torch": torch.__version__}
    import transformers

    report["transformers"] = transformers.__version__

    def save(part: str, value: Any, t0: float) -> None:
        report[part] = value
        report[f"{part}_s"] = round(time.perf_counter() - t0, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
        print(f"== {part} done in {report[f'{part}_s']} s", flush=True)

    parts = set(args.parts.split(","))
    t0 = time.perf_counter()
    model = build_model(spec, device)
    prompts = random_prompts(4 if small else 12, spec["vocab_size"], 8, 64, seed=1)
    if "parity" in parts:
        from services.worker.engine.models.loader import native_from_hf

        tokens = 8 if small else 32
        ref = reference(model, prompts, tokens)
        result = {"native": parity(model, prompts, tokens, engine_model=native_from_hf(model), ref=ref),
                  "transformers": parity(model, prompts, tokens, ref=ref)}
        save("parity_fp32", result, t0)
        print(json.dumps(report["parity_fp32"]), flush=True)
    if "spec" in parts:
        from services.worker.engine.speculative import SpecConfig

        t0 = time.perf_counter()
        echo = [p[:8] * 4 for p in prompts]  # repeated patterns give the ngram drafts something to find
        out = {}
        for mode in ("ngram", "draft"):
            forced = SpecConfig(mode, 4, draft_layers=spec["num_hidden_layers"] // 4 or 1, min_acceptance=0.0,
                                token_cost=0.0)
            out[mode] = parity(model, echo, 8 if small else 32, forced)
            out[f"{mode}_sampled"] = parity(model, echo, 8 if small else 32, forced, sampled=True)
        save("speculative_fp32", out, t0)
        print(json.dumps({k: {x: v[x] for x in ("identical", "spec_drafted", "spec_accepted",
                                                 "kv_blocks_left_in_use")} for k, v in out.items()}), flush=True)
    if not parts & {"throughput", "nf4"}:
        return

    t0 = time.perf_counter()
    model.to(torch.bfloat16)
    loaded = SimpleNamespace(model=model, tokenizer=IdTokenizer())
    models = Preloaded(loaded)
    plan = [(1, 2), (4, 8)] if small else [(1, 4), (8, 24), (32, 64), (64, 128)]
    if "throughput" in parts:
        steps = step_times(models, (1, 8) if small else (1, 8, 64), spec["vocab_size"])
        print("decode step ms:", json.dumps(steps), flush=True)
        rows = throughput(models, plan, ("hf-static", "paged", "paged:transformers"), (8, 16) if small else (32, 256),
                          spec["vocab_size"])
        by = {(r["system"], r["concurrency"]): r["output_tok_s"] for r in rows}
        ratios = {f"{e}/hf-static c={c}": by[(e, c)] / by[("hf-static", c)] for c, _ in plan
                  for e in ("paged", "paged:transformers")}
        save("throughput_bf16", {"decode_step_ms": steps, "rows": rows, "ratios": ratios}, t0)
        print(json.dumps(ratios), flush=True)

    if "nf4" not in parts:
        return
    t0 = time.perf_counter()
    from services.common.model_loader import load_model

    folder = Path("/tmp/tokenmill-qwen-random")
    model.save_pretrained(folder)
    if args.tokenizer_dir:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(args.tokenizer_dir).save_pretrained(folder)
    del model, loaded, models
    nf4 = load_model(str(folder), "nf4", device, "auto")
    nf4.tokenizer = IdTokenizer()
    part = {"weights_gib": round(sum(p.numel() * p.element_size() for p in nf4.model.parameters()) / 2**30, 2),
            "parity": parity(nf4.model, prompts[:6], 8 if small else 32)}
    part["rows"] = throughput(Preloaded(nf4), plan[-2:-1], ("paged:transformers",), (8, 16) if small else (32, 256),
                              spec["vocab_size"])
    save("nf4", part, t0)
    print(json.dumps(part["parity"]), part["weights_gib"], "GiB of weights", flush=True)


if __name__ == "__main__":
    sys.exit(main())
