"""Phase 7 — quantisation: fp32 / bf16 vs int8 (LLM.int8) vs NF4 (bitsandbytes).

Each variant runs in its own spawned process, so its peak memory is its own (ru_maxrss on CPU, the CUDA
allocator's peak on a GPU). Per variant:
- load through tokenmill's loader (`services.common.model_loader.load_model`: none / nf4 with double quant,
  as the worker loads it); int8 is not a loader option, so it goes through transformers' BitsAndBytesConfig;
- weight memory (`get_memory_footprint`), peak memory;
- perplexity on bench/data/heldout.txt (a fixed text written for this repo; no download);
- serving speed through the production `PagedEngine`: time to first token for a batch, decode tokens/s.
On CPU bitsandbytes runs int8/NF4 through slow fallbacks (its fast CPU kernels need AVX512): expect the memory
savings to show here and the speed-ups only on a GPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.phases.common import Options, write_results

PHASE, TITLE = "quantization", "Phase 7 — quantisation"


def _trim() -> None:
    """Hand freed heap back to the OS (glibc keeps the loader's temporary copies otherwise), so RSS means use."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status(field: str) -> int | None:
    """A memory line of /proc/self/status in bytes (Linux), else None."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _hwm_bytes() -> int:
    """This process's peak RSS. VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork + exec from the parent."""
    hwm = _status("VmHWM")
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return hwm


def measure(variant: str, opts: dict) -> dict:
    """One variant, in a fresh process: load, perplexity, engine speed, peak memory."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import gc

    import torch

    from bench.phases.common import PeakMemory, heldout_text, rss_bytes
    from services.common.model_loader import load_model, load_tokenizer, resolve
    from services.common.sampling import SamplingParams
    from services.worker.engine.engine import PagedEngine
    from services.worker.engine.types import Request

    if opts["threads"]:
        torch.set_num_threads(opts["threads"])
    device, cuda = opts["device"], opts["device"].startswith("cuda")
    base_rss = rss_bytes()
    t0 = time.perf_counter()
    if variant == "int8":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(
            resolve(opts["model"]), quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map=device,
            dtype=torch.bfloat16 if cuda else torch.float32).eval()
        tok = load_tokenizer(opts["model"])
    else:
        lm = load_model(opts["model"], "nf4" if variant == "nf4" else "none", device,
                        {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(variant, "auto"))
        model, tok = lm.model, lm.tokenizer
    load_s = time.perf_counter() - t0
    weights = model.get_memory_footprint()
    gc.collect()
    _trim()
    loaded_rss, loaded_file = rss_bytes(), _status("RssFile") or 0
    cuda_load_peak = torch.cuda.max_memory_allocated() if cuda else 0
    mem = PeakMemory(device).__enter__()  # serving peak: perplexity forward + engine run, after the load

    ids = torch.tensor([tok(heldout_text())["input_ids"][: opts["ppl_tokens"]]], device=device)
    with torch.inference_mode():
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss.float().item()
        ppl_s = time.perf_counter() - t0

    b, p, n = opts["batch"], opts["prompt_len"], opts["new_tokens"]
    engine = PagedEngine(model, tok, block_size=16, num_blocks=b * (-(-(p + n) // 16)) + 4, max_num_seqs=b,
                         max_num_batched_tokens=max(b * p, 256), enable_prefix_caching=False)
    engine.warmup()
    text = ids[0].tolist()
    for i in range(b):
        engine.add_request(Request(f"q{i}", [text[(i * 11 + j) % len(text)] for j in range(p)],
                                   SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)))
    steps, first = [], None
    t_all = time.perf_counter()
    while engine.has_work():
        t0 = time.perf_counter()
        ev = engine.step()
        if cuda:
            torch.cuda.synchronize()
        steps.append(time.perf_counter() - t0)
        if first is None and ev:
            first = time.perf_counter() - t_all
    total = time.perf_counter() - t_all
    decode = sum(steps[1:])
    mem.__exit__(None, None, None)
    load_peak = _hwm_bytes()  # includes the load's transient copies
    return {"variant": variant, "weights_MiB": weights / 2**20, "serve_peak_MiB": mem.peak / 2**20,
            "rss_loaded_MiB": loaded_rss / 2**20, "rss_file_MiB": loaded_file / 2**20,
            "process_peak_MiB": max(cuda_load_peak, mem.peak) / 2**20 if cuda else load_peak / 2**20,
            "process_base_MiB": 0.0 if cuda else base_rss / 2**20, "perplexity": math.exp(loss),
            "ppl_forward_s": ppl_s, "ttft_s": first, "decode_tok_s": b * (n - 1) / decode if decode else float("nan"),
            "batch_latency_s": total, "load_s": load_s, "compute_dtype": str(engine.runner.dtype)}


def _in_subprocess(variant: str, child: dict) -> dict:
    """measure() in a fresh interpreter (its peak memory is its own); a failure becomes an `error` row."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "bench.phases.quantization", variant, json.dumps(child)],
                          capture_output=True, text=True, cwd=root, env=env, check=False)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode == 0 and lines:
        return json.loads(lines[-1])
    err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"variant": variant, "error": f"exit {proc.returncode}: {err[:120]}"}


def run(opts: Options) -> dict:
    variants = opts.pick(["fp32", "bf16", "int8", "nf4"], ["fp32", "bf16", "int8", "nf4"], "variants")
    child = {"device": opts.device, "threads": opts.threads or 0, "model": opts.model,
             "ppl_tokens": opts.pick(192, 100000, "ppl_tokens"), "batch": opts.pick(4, 16, "batch"),
             "prompt_len": opts.pick(32, 128, "prompt_len"), "new_tokens": opts.pick(9, 65, "new_tokens")}
    import torch

    child["threads"] = child["threads"] or (torch.get_num_threads() if not opts.cuda else 0)
    rows = [_in_subprocess(v, child) for v in variants]
    ok = [r for r in rows if "error" not in r]
    ref = next((r for r in ok if r["variant"] == "fp32"), ok[0] if ok else None)
    for r in ok:
        r["weights_x_smaller"] = ref["weights_MiB"] / r["weights_MiB"]
        r["ppl_change_pct"] = 100 * (r["perplexity"] / ref["perplexity"] - 1)
    summary = {f"{r['variant']}: weights MiB / perplexity": f"{r['weights_MiB']:.0f} / {r['perplexity']:.2f}"
               for r in ok}
    summary["failed"] = ", ".join(f"{r['variant']} ({r['error']})" for r in rows if "error" in r) or "none"
    summary["seed (pods)"] = "Qwen2.5-1.5B NF4 + double quant, bf16 compute: 13,558 req/h on 2x RTX 2000 Ada"

    def plot(fig):
        ax1, ax2, ax3 = fig.subplots(1, 3)
        names = [r["variant"] for r in ok]
        ax1.bar(names, [r["serve_peak_MiB"] - r["process_base_MiB"] for r in ok], alpha=0.35,
                label="serving peak - process base")
        ax1.bar(names, [r["weights_MiB"] for r in ok], label="weights")
        ax1.set(ylabel="MiB", title="memory")
        ax1.legend(fontsize=8)
        ax2.bar(names, [r["decode_tok_s"] for r in ok], color="tab:green")
        ax2.set(ylabel="decode tokens/s (engine)", title=f"speed, batch {child['batch']}")
        ax3.bar(names, [r["perplexity"] for r in ok], color="tab:purple")
        ax3.set(ylabel="perplexity (heldout.txt)", title=f"quality, {child['ppl_tokens']} tokens max")

    notes = ["On CPU: process_base is the RSS before loading (Python, torch, transformers), rss_loaded after it, "
             "serve_peak the RSS peak while computing perplexity and serving, process_peak the max RSS including "
             "the load (the loader reads the fp32 checkpoint first, so it is not smaller for smaller variants). "
             "On a GPU serve_peak and process_peak are CUDA allocator peaks (rss_* stay host RSS). "
             "rss_file is the file-backed part of rss_loaded: the "
             "memory-mapped fp32 checkpoint, which stays mapped after a quantised load (reclaimable page cache).",
             "int8 is LLM.int8 via transformers' BitsAndBytesConfig(load_in_8bit=True): tokenmill's loader offers "
             "only none and nf4."]
    return write_results(PHASE, TITLE, opts, config=child, rows=rows, summary=summary, plot=plot, notes=notes,
                         columns=["variant", "compute_dtype", "weights_MiB", "weights_x_smaller", "process_base_MiB",
                                  "rss_loaded_MiB", "rss_file_MiB", "serve_peak_MiB", "process_peak_MiB", "perplexity",
                                  "ppl_change_pct", "ttft_s", "decode_tok_s", "batch_latency_s", "load_s", "error"])


if __name__ == "__main__":  # the child process of _in_subprocess
    print(json.dumps(measure(sys.argv[1], json.loads(sys.argv[2]))))
