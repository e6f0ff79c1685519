"""Phase 4 — attention kernels: naive vs PyTorch SDPA backends vs tokenmill's paged attention.

Shapes are the embedded model's (9 query heads, 3 KV heads, head_dim 64). Two workloads over sequence length:
- prefill: one causal sequence of L tokens attending to itself;
- decode: a batch of sequences, one new token each, attending to L cached tokens.
Implementations: naive (QKᵀ, mask, softmax, ·V, fp32: materialises the L×L scores), SDPA forced to each backend
(math, memory-efficient, flash, cuDNN) and unrestricted, and the engine's paged attention in both of its paths:
`tokenmill-paged` is `services.worker.engine.attention.paged_attention` as the engine calls it (writes K/V into
the paged slots, then on a CPU in fp32 tokenmill's C++ kernel attends over each sequence's blocks in place;
on CUDA the Triton kernels, elsewhere the PyTorch path), `tokenmill-paged-gather` the PyTorch path itself (each
decode group's blocks gathered into one padded batch, one masked SDPA). The profiler names the aten kernel that
actually ran, so a silent fallback (the seed's T4 lesson) shows in the table; the C++ kernel is not an aten op,
so its row names the path the engine's dispatch took.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.phases.common import Options, ops_that_ran, setup_of, tensor_peak_bytes, timeit, write_results

PHASE, TITLE = "attention", "Phase 4 — attention kernels"
HEADS, KV_HEADS, DIM, BLOCK = 9, 3, 64, 16
BACKENDS = {"sdpa-math": SDPBackend.MATH, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION}


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    q, k, v = q.float(), k.float(), v.float()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if causal:
        ql, kl = q.shape[-2], k.shape[-2]
        scores = scores.masked_fill(torch.ones(ql, kl, dtype=torch.bool, device=q.device).triu(kl - ql + 1), -1e30)
    return scores.softmax(-1) @ v


def _paged_setup(q, k, v, batch: int, ctx: int, decode: bool):
    """A KVCache holding `batch` sequences of ctx tokens, and the engine's StepContext for one step."""
    from services.worker.engine.kv_cache import KVCache
    from services.worker.engine.step import build_context

    dev, per = q.device, -(-ctx // BLOCK)
    kv = KVCache(1, KV_HEADS, DIM, batch * per + 1, BLOCK, q.dtype, dev)
    tables = [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(batch)]
    if not decode:
        return build_context(kv, list(range(ctx)), [0] * ctx, tables[:1], 0, [(0, ctx, 0, tables[0])])
    for i, t in enumerate(tables):  # the cached context: ctx - 1 tokens per sequence
        slots = torch.tensor([t[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx - 1)], device=dev)
        kv.write(0, slots, k[i, :, : ctx - 1].transpose(0, 1), v[i, :, : ctx - 1].transpose(0, 1))
    return build_context(kv, [ctx - 1] * batch, list(range(batch)), tables, batch, [])


def _cases(device: str, dtype: torch.dtype, ctx: int, batch: int, decode: bool) -> dict:
    from services.worker.engine import attention as paged

    g = torch.Generator(device=device).manual_seed(0)
    qlen, b = (1, batch) if decode else (ctx, 1)
    q = torch.randn(b, HEADS, qlen, DIM, device=device, dtype=dtype, generator=g)
    k = torch.randn(b, KV_HEADS, ctx, DIM, device=device, dtype=dtype, generator=g)
    v = torch.randn(b, KV_HEADS, ctx, DIM, device=device, dtype=dtype, generator=g)
    causal = not decode
    cases = {"naive-fp32": lambda: naive(q, k, v, causal)}

    kf, vf = (t.repeat_interleave(HEADS // KV_HEADS, dim=1) for t in (k, v))  # MHA-shaped, outside the timing

    for name, backend in BACKENDS.items():
        def forced(backend=backend):  # every backend takes MHA shapes; not all take enable_gqa
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kf, vf, is_causal=causal)
        cases[name] = forced

    def sdpa_gqa():  # as the engine calls it: grouped K/V, torch picks the kernel
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    cases["sdpa-default"] = sdpa_gqa
    ctx_obj = _paged_setup(q, k, v, batch, ctx, decode)
    module = types.SimpleNamespace(layer_idx=0, sliding_window=None)
    if decode:  # the packed row: one new token per sequence
        pq, pk, pv = (t[:, :, -1].transpose(0, 1)[None] for t in (q, k, v))
    else:
        pq, pk, pv = q, k, v

    def paged_fn():
        paged.current = ctx_obj
        try:
            return paged.paged_attention(module, pq, pk, pv, None, scaling=DIM**-0.5)[0]
        finally:
            paged.current = None
    cases["tokenmill-paged"] = paged_fn  # the C++ kernel on a CPU in fp32 (reads the blocks in place)
    cases["tokenmill-paged"].path = _engine_path(device, dtype)
    flat = [t[0].transpose(0, 1).reshape(t.shape[2], -1) for t in (pq, pk, pv)]

    def gather_fn():  # the PyTorch path (no C++ kernels, other dtypes): gather each group's blocks, masked SDPA
        return paged._attend_torch(ctx_obj, 0, *flat, HEADS, None, DIM**-0.5)
    cases["tokenmill-paged-gather"] = gather_fn
    return cases


def _engine_path(device: str, dtype: torch.dtype) -> str:
    """The branch attention.attend takes for these shapes (the C++ kernel is no aten op: the profiler misses it)."""
    from services.worker.engine.layers import kernels

    if device.startswith("cuda"):
        return "Triton paged attention (layers/gpu/attention.py)"
    if kernels.cpu_ops(torch.device(device), dtype) is not None and kernels.attention_fits(DIM, HEADS, KV_HEADS):
        return "C++ paged attention (layers/csrc/attention.cpp), blocks in place"
    return "PyTorch path: gather + masked SDPA"


def _kernel(names: list[str]) -> str:
    inner = [n for n in names if n.startswith("aten::_scaled_dot_product") or n.startswith("aten::_efficient")
             or n.startswith("aten::_flash")]
    return ", ".join(n.replace("aten::", "") for n in inner) or ("math (no fused kernel)" if names else "none")


def run(opts: Options) -> dict:
    dev = opts.device
    lengths = opts.pick([128, 256, 512, 1024], [512, 1024, 2048, 4096, 8192, 16384] if opts.cuda
                        else [256, 512, 1024, 2048, 4096], "lengths")
    batch = opts.pick(8, 32, "decode_batch")
    dtype = torch.float16 if opts.cuda else torch.float32
    repeat = opts.pick(3, 10, "repeat")
    rows = []
    for workload in ("prefill", "decode"):
        missing: set[str] = set()
        for ctx in lengths:
            for impl, fn in _cases(dev, dtype, ctx, batch, workload == "decode").items():
                if impl in missing:
                    continue  # no kernel at the first length: reported once
                row = {"workload": workload, "seq_len": ctx, "impl": impl,
                       "dtype": "float32" if impl == "naive-fp32" else str(dtype).replace("torch.", "")}
                try:
                    row["ms"] = 1e3 * timeit(fn, dev, repeat=repeat)
                    row["peak_MiB"] = tensor_peak_bytes(fn, dev) / 2**20
                    row["kernel_ran"] = getattr(fn, "path", None) or (
                        "matmul+softmax" if impl == "naive-fp32" else _kernel(ops_that_ran(fn)))
                except RuntimeError as exc:  # the forced backend has no kernel for this device / shape / dtype
                    row.update(ms=float("nan"), peak_MiB=float("nan"),
                               kernel_ran="unavailable: " + str(exc).splitlines()[0][:60])
                    missing.add(impl)
                rows.append(row)
    ok = [r for r in rows if r["ms"] == r["ms"]]
    longest = max(lengths)
    pre = {r["impl"]: r for r in ok if r["workload"] == "prefill" and r["seq_len"] == longest}
    default_kernel = pre.get("sdpa-default", {}).get("kernel_ran", "?")
    summary = {
        f"prefill {longest}: naive vs sdpa-default (ms)": f"{pre['naive-fp32']['ms']:.2f} vs "
                                                         f"{pre['sdpa-default']['ms']:.2f}",
        f"prefill {longest}: naive vs sdpa-default peak (MiB)": f"{pre['naive-fp32']['peak_MiB']:.1f} vs "
                                                               f"{pre['sdpa-default']['peak_MiB']:.1f}",
        "sdpa-default ran": default_kernel,
        "unavailable backends": ", ".join(sorted({r["impl"] for r in rows if r["ms"] != r["ms"]})) or "none",
    }

    def plot(fig):
        axes = fig.subplots(1, 3)
        for ax, (workload, key, label) in zip(axes, [("prefill", "ms", "prefill time (ms)"),
                                                     ("prefill", "peak_MiB", "prefill peak memory (MiB)"),
                                                     ("decode", "ms", f"decode time, batch {batch} (ms)")],
                                              strict=True):
            for impl in dict.fromkeys(r["impl"] for r in ok):
                sel = [r for r in ok if r["impl"] == impl and r["workload"] == workload]
                if sel:
                    ax.plot([r["seq_len"] for r in sel], [max(r[key], 1e-3) for r in sel], "o-", label=impl)
            ax.set_xscale("log", base=2)
            ax.set(yscale="log", xlabel="sequence length", title=label)
        axes[0].legend(fontsize=7)

    impls = list(dict.fromkeys(r["impl"] for r in ok))
    pivot = []
    for workload in ("prefill", "decode"):
        for ctx in lengths:
            cell = {r["impl"]: r for r in ok if r["workload"] == workload and r["seq_len"] == ctx}
            pivot.append({"workload": workload, "seq_len": ctx, **{
                i: f"{cell[i]['ms']:.3g} ms / {cell[i]['peak_MiB']:.3g} MiB" for i in impls if i in cell}})
    last = {r["impl"]: r for r in rows}  # at the longest length each impl ran
    ran = [{k: r[k] for k in ("impl", "dtype", "kernel_ran")} for r in last.values()]

    config = {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "block_size": BLOCK, "lengths": lengths,
              "decode_batch": batch, "dtype": str(dtype), "repeat": repeat}
    notes = ["kernel_ran is read from the profiler (the aten op that executed), not from the backend requested.",
             "Forced sdpa-* backends get K/V expanded to all 9 heads (some kernels refuse enable_gqa); "
             "sdpa-default gets the 3 grouped KV heads with enable_gqa=True, as the engine calls it.",
             "peak_MiB: CUDA allocator peak on a GPU; on CPU the profiler's replay of tensor allocations.",
             "tokenmill-paged includes writing the new K/V into the paged pool, as in the engine; "
             "tokenmill-paged-gather is the PyTorch fallback (CPU without the C++ kernels, other dtypes): it "
             "copies each decode group's blocks into a padded batch first."]
    return write_results(PHASE, TITLE, opts, config=config, rows=rows, summary=summary, plot=plot, notes=notes,
                         setup=setup_of(fmt="n/a (random q, k, v at the embedded model's head shapes)",
                                        forward="attention only", kernels=_engine_path(dev, dtype), device=dev,
                                        dtype=dtype),
                         columns=["workload", "seq_len", *impls], table_rows=pivot,
                         tables={"which kernel actually ran": (ran, ["impl", "dtype", "kernel_ran"])})
