"""`python -m bench.gpu`: tokenmill's CUDA engine measured in one prepared run (about 6-8 minutes on an H200).

The Qwen2.5-1.5B-Instruct architecture with random weights (GPU nodes reach no model hub), prompts of random
token ids, greedy, `ignore_eos`. Parts, in order (`--parts`), each written to the JSON as it ends:
1. kernels: every Triton kernel against its reference on the device (paged attention vs gather + SDPA, the
   dequantising GEMV/GEMM vs a dequantised matmul, the fused small ops) and timed: a pass over all the model's
   linear layers per format and row count (fused kernel, dequantise + cuBLAS, bf16 cuBLAS, torch's int4 tinygemm);
2. graphs: logits of captured decode steps vs the same padded step run eagerly (bitwise) and vs the unpadded
   eager forward, over batch sizes that cross bucket boundaries both ways; fp32 and int4/bf16;
3. steps: decode step time per batch size (1 ... 256) at ~512 tokens of context, bf16 / int4 / nf4, CUDA graphs
   (and int4 eager), with the batch-1 memory floor;
4. throughput: closed-loop clients at concurrency 1 / 8 / 32 / 64 / 256, 512 prompt + 128 output tokens:
   tokenmill's forward (int4; bf16 and nf4 too) vs `--model-impl transformers` vs `--engine hf-static` (int4),
   with TTFT of the 512-token prompt at concurrency 1.
`--dry-run` runs the same code on a tiny model, on the CPU through Triton's interpreter (or on a GPU, quickly),
so the real run cannot fail on a typo. A time budget (`--budget-s`) skips what would not fit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

QWEN25_15B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                  bos_token_id=151643, eos_token_id=151645)
TINY = dict(QWEN25_15B, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
FORMATS = ("none", "int4", "nf4")  # none = bf16 weights


class IdTokenizer:
    """Random weights have no tokenizer; text deltas are the ids themselves."""

    pad_token_id = None

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(f" {i}" for i in ids)


class Plan:
    """Sizes of the run: the real one, or the dry run's."""

    def __init__(self, dry: bool) -> None:
        self.dry = dry
        self.spec = TINY if dry else QWEN25_15B
        self.prompt = 16 if dry else 512
        self.output = 3 if dry else 128
        self.batches = (1, 3) if dry else (1, 2, 8, 32, 64, 128, 256)
        self.concurrency = (1, 3) if dry else (1, 8, 32, 64, 256)
        self.max_num_seqs = 8 if dry else 256
        self.max_batched = 64 if dry else 8192
        self.kv_memory = "16MiB" if dry else "12GiB"
        self.max_waiting_steps = 2 if dry else 8  # throughput runs: prompts prefilled together (see Scheduler)
        self.step_formats: tuple[str, ...] = FORMATS
        self.skip: tuple[str, ...] = ()  # "system@concurrency" throughput runs left out
        self.graph_sizes = (3, 8, 5, 1) if dry else (3, 8, 5, 17, 9, 1, 33, 2, 64, 40)
        self.rows = (1, 20) if dry else (1, 16, 64, 256, 2048)
        self.reps = 1 if dry else 10


# ---- timing and the machine --------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_ms(fn, reps: int, warmup: int = 2) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU; on the CPU one call: the dry run only rehearses)."""
    if not torch.cuda.is_available():
        reps, warmup = 1, 0
    for _ in range(warmup):
        fn()
    times = []
    if torch.cuda.is_available():
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def time_graph_ms(fn, reps: int, inner: int = 20) -> float:
    """Milliseconds per call of fn() with the host out of the way: `inner` calls captured in one CUDA graph,
    replayed (an eager call of a small kernel times Python's launch, not the GPU). fn() as it is on a CPU."""
    if not torch.cuda.is_available():
        return time_ms(fn, reps)
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    return time_ms(graph.replay, reps) / inner


def environment(device: torch.device) -> dict[str, Any]:
    """The stack, the GPU (nvidia-smi) and the host (bench.report.environment: CPU model and flags)."""
    import transformers
    import triton

    from bench.report import environment as host

    env: dict[str, Any] = {"torch": torch.__version__, "triton": triton.__version__,
                           "transformers": transformers.__version__, "python": platform.python_version(),
                           "date": datetime.date.today().isoformat(), "host": host()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device=props.name, sms=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1))
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True,
                                               text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as exc:
            env["nvidia_smi"] = f"unavailable: {exc}"
    else:
        env["device"] = "cpu (Triton interpreter)"
    with contextlib.suppress(OSError):
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       timeout=10).stdout.strip()
    return env


def ceilings(device: torch.device, plan: Plan) -> dict[str, float]:
    """The two roofs, measured: device-to-device copy (bytes read + written) and a bf16 matrix product."""
    n = 1 << (20 if plan.dry else 30)
    src = torch.randn(n // 2, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), plan.reps)
    size = 256 if plan.dry else 8192
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    mm = time_ms(lambda: a @ b, plan.reps)
    return {"copy_gb_s": round(2 * src.numel() * 2 / ms / 1e6, 1), "bf16_tflop_s": round(2 * size**3 / mm / 1e9, 1)}


# ---- the models ------------------------------------------------------------------------------------------------
def build_hf(spec: dict, device: torch.device, dtype: torch.dtype, layers: int | None = None) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**(spec if layers is None else dict(spec, num_hidden_layers=layers)))
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    for p in model.parameters():  # random init's std 0.02 gives near-flat logits; wider weights give real argmaxes
        p.data.mul_(2.0)
    return model.eval()


def random_prompts(n: int, vocab: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine(model: Any, plan: Plan, **kw: Any) -> Any:
    from services.worker.engine.paged_engine import PagedEngine

    return PagedEngine(model, IdTokenizer(), kv_cache_memory=plan.kv_memory, max_num_seqs=plan.max_num_seqs,
                       max_num_batched_tokens=plan.max_batched, **kw)


# ---- 1. kernels ------------------------------------------------------------------------------------------------
def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.isnan().any():
        return float("nan")
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def part_kernels(plan: Plan, device: torch.device, models: dict[str, Any]) -> dict[str, Any]:
    from services.worker.engine.layers import gpu, ops
    from services.worker.engine.layers.gpu import attention as A
    from services.worker.engine.layers.gpu import elementwise as E
    from services.worker.engine.layers.gpu import quant as Q

    spec, out = plan.spec, {}
    heads, kv_heads = spec["num_attention_heads"], spec["num_key_value_heads"]
    d = spec["hidden_size"] // heads
    bs, rng = 16, random.Random(0)

    # paged decode attention vs gather + SDPA, bf16 and fp32, ragged contexts
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        for batch, ctx in ((1, 64 if plan.dry else 4096), (5 if plan.dry else 64, 40 if plan.dry else 1024)):
            lens = [max(1, ctx - rng.randrange(0, ctx // 2)) for _ in range(batch)]
            lens[0] = ctx
            blocks = sum(-(-n // bs) for n in lens) + 1
            k_cache = torch.randn(blocks, kv_heads, bs, d, device=device, dtype=dtype)
            v_cache = torch.randn_like(k_cache)
            perm = torch.randperm(blocks - 1).tolist()
            tables, at = [], 0
            for n in lens:
                tables.append(perm[at : at + -(-n // bs)])
                at += -(-n // bs)
            width = max(len(t) for t in tables)
            tab = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
            lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
            q = torch.randn(batch, heads * d, device=device, dtype=dtype)
            splits = A.decode_splits(batch, kv_heads, gpu.num_sms(device))
            got = A.decode(q, k_cache, v_cache, tab, lens_t, heads, None, d**-0.5, splits)
            refs = []
            for i, n in enumerate(lens):
                keys = torch.arange(n, device=device)
                blk = torch.tensor(tables[i], device=device)[keys // bs]
                k = k_cache[blk, :, keys % bs].float().transpose(0, 1)  # [kv_heads, n, d]
                v = v_cache[blk, :, keys % bs].float().transpose(0, 1)
                qh = q[i].float().view(kv_heads, heads // kv_heads, d)
                refs.append(torch.nn.functional.scaled_dot_product_attention(qh, k, v, scale=d**-0.5).reshape(-1))
            ref = torch.stack(refs)
            ms = time_graph_ms(lambda q=q, k_cache=k_cache, v_cache=v_cache, tab=tab, lens_t=lens_t, splits=splits:
                         A.decode(q, k_cache, v_cache, tab, lens_t, heads, None, d**-0.5, splits), plan.reps)
            kv_bytes = 2 * sum(lens) * kv_heads * d * k_cache.element_size()
            rows.append({"dtype": str(dtype).removeprefix("torch."), "batch": batch, "context_max": ctx,
                         "splits": splits, "rel_err": rel_err(got, ref),
                         "max_abs_err": float((got.float() - ref).abs().max()),
                         "us": round(ms * 1e3, 1), "kv_gb_s": round(kv_bytes / ms / 1e6, 1)})
    out["attention_decode"] = rows

    # prefill chunks (one with a cached prefix) vs SDPA over the gathered keys
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        chunk = 24 if plan.dry else 512
        specs = [(0, chunk, 0), (chunk, 2 * chunk, chunk // 2)]  # (start, end, cached prefix)
        lens = [c + e - s for s, e, c in specs]
        blocks = sum(-(-n // bs) for n in lens) + 1
        k_cache = torch.randn(blocks, kv_heads, bs, d, device=device, dtype=dtype)
        v_cache = torch.randn_like(k_cache)
        tables = [list(range(0, -(-lens[0] // bs))), list(range(-(-lens[0] // bs), blocks - 1))]
        width = max(len(t) for t in tables)
        tab = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
        pos = torch.cat([torch.arange(c, c + e - s) for s, e, c in specs]).to(device=device, dtype=torch.int32)
        tiles = torch.tensor(A.prefill_tiles([(s, e, i) for i, (s, e, _) in enumerate(specs)]), dtype=torch.int32,
                             device=device)
        q = torch.randn(2 * chunk, heads * d, device=device, dtype=dtype)
        got = torch.empty_like(q)
        A.prefill(q, k_cache, v_cache, tab, pos, tiles, heads, None, d**-0.5, got)
        refs = []
        for i, (s, e, _) in enumerate(specs):
            keys = torch.arange(lens[i], device=device)
            blk = torch.tensor(tables[i], device=device)[keys // bs]
            k = k_cache[blk, :, keys % bs].float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            v = v_cache[blk, :, keys % bs].float().transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            qh = q[s:e].float().view(e - s, heads, d).transpose(0, 1)
            mask = keys[None, :] <= pos[s:e, None].long()
            refs.append(torch.nn.functional.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=d**-0.5)
                        .transpose(0, 1).reshape(e - s, -1))
        ref = torch.cat(refs)
        ms = time_graph_ms(lambda q=q, k_cache=k_cache, v_cache=v_cache, tab=tab, pos=pos, tiles=tiles, got=got:
                           A.prefill(q, k_cache, v_cache, tab, pos, tiles, heads, None, d**-0.5, got), plan.reps)
        flops = 4 * heads * d * sum((e - s) * (c + (e - s) / 2) for s, e, c in specs)
        rows.append({"dtype": str(dtype).removeprefix("torch."), "tokens": 2 * chunk, "rel_err": rel_err(got, ref),
                     "us": round(ms * 1e3, 1), "tflop_s": round(flops / ms / 1e9, 2)})
    out["attention_prefill"] = rows

    # fused small ops vs their PyTorch versions, bf16
    hidden = spec["hidden_size"]
    x = torch.randn(64, hidden, device=device, dtype=torch.bfloat16)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device=device, dtype=torch.bfloat16)
    r1, r2 = res.clone(), res.clone()
    gate_up = torch.randn(64, 2 * spec["intermediate_size"], device=device, dtype=torch.bfloat16)
    with gpu.disabled():
        ref_norm, ref_silu = ops.rms_norm(x, w, 1e-6, r2), ops.silu_mul(gate_up)
    out["fused"] = {"rms_norm_residual_rel_err": rel_err(E.rms_norm(x, w, 1e-6, r1), ref_norm),
                    "residual_rel_err": rel_err(r1, r2), "silu_mul_rel_err": rel_err(E.silu_mul(gate_up), ref_silu)}

    # the model's matrices one by one, per format and row count: error vs the dequantised matmul, then the
    # call timed inside a CUDA graph (several copies of each weight are cycled, so L2 does not hold it):
    # tokenmill's fused kernel, dequantise + cuBLAS, and bf16 cuBLAS on the float model's matrix
    rows = []
    dense = {name: m for name, m in models["none"].named_modules() if type(m).__name__ == "Linear"}
    for fmt, model in models.items():
        if fmt == "none":
            continue
        for name, lin in model.named_modules():
            if type(lin).__name__ != "Linear" or not (name.startswith("layers.0.") or name == "lm_head"):
                continue
            copies = [lin.packed] + [dataclasses.replace(lin.packed, codes=lin.packed.codes.clone(), copies={})
                                     for _ in range(0 if plan.dry else 3)]
            for m_rows in plan.rows:
                x = torch.randn(m_rows, lin.in_features, device=device, dtype=torch.bfloat16) * 0.5
                ref = x.float() @ lin.packed.dequantize().float().T
                row: dict[str, Any] = {"format": fmt, "matrix": name, "n": lin.out_features, "k": lin.in_features,
                                       "rows": m_rows, "rel_err": rel_err(lin(x), ref)}
                turn = iter(range(1 << 30))

                def fused(x=x, copies=copies, turn=turn) -> None:
                    Q.matmul(x, copies[next(turn) % len(copies)])

                def dequant(x=x, copies=copies, turn=turn) -> None:
                    torch.nn.functional.linear(x, Q.dequantize(copies[next(turn) % len(copies)], x.dtype))

                before = Q.DEQUANT_MIN_ROWS
                try:
                    Q.DEQUANT_MIN_ROWS = 1 << 30
                    row["fused_us"] = round(time_graph_ms(fused, plan.reps) * 1e3, 1)
                finally:
                    Q.DEQUANT_MIN_ROWS = before
                row["dequant_cublas_us"] = round(time_graph_ms(dequant, plan.reps) * 1e3, 1)
                w = dense[name].weight
                row["bf16_cublas_us"] = round(time_graph_ms(lambda x=x, w=w: torch.nn.functional.linear(x, w),
                                                            plan.reps) * 1e3, 1)
                row["fused_gb_s"] = round(lin.packed.nbytes / (row["fused_us"] * 1e3), 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out["linear"] = rows
    out["tinygemm"] = tinygemm(plan, device)
    return out


def tinygemm(plan: Plan, device: torch.device) -> Any:
    """torch's own int4 weight-only kernel (tinygemm, bf16 scale and zero per group of 32) on the gate-up
    shape, for comparison with tokenmill's GEMV/GEMM over the same sizes (a maintained alternative)."""
    from services.worker.engine.layers.gpu import quant as Q
    from services.worker.engine.layers.quant import quantize

    if device.type != "cuda":
        return "skipped: CUDA only"
    spec = plan.spec
    n, k = 2 * spec["intermediate_size"], spec["hidden_size"]
    w = torch.randn(n, k, device=device) * 0.05
    try:
        on_cpu = quantize(w.cpu(), "int4")
        packed = on_cpu.to(device)
        codes, scales, mins = on_cpu.unpack()  # [n, k] codes, [n, k/32] scales and mins
        q = torch.as_tensor(codes, device=device).to(torch.int32)
        q_packed = (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)
        weight = torch.ops.aten._convert_weight_to_int4pack(q_packed, 8)
        s = torch.as_tensor(scales, device=device).float()
        z = torch.as_tensor(mins, device=device).float() + 8 * s  # tinygemm: w = (q - 8) * s + z
        sz = torch.stack([s.T, z.T], dim=-1).to(torch.bfloat16).contiguous()  # [k/32, n, 2]
        out = []
        for m_rows in plan.rows:
            x = torch.randn(m_rows, k, device=device, dtype=torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm(x, weight, 32, sz)
            ms = time_graph_ms(lambda x=x: torch.ops.aten._weight_int4pack_mm(x, weight, 32, sz), plan.reps)
            ours = time_graph_ms(lambda x=x: Q.matmul(x, packed), plan.reps)
            out.append({"rows": m_rows, "tinygemm_us": round(ms * 1e3, 1), "tokenmill_us": round(ours * 1e3, 1),
                        "rel_err_vs_tokenmill": rel_err(y, Q.matmul(x, packed).float())})
        return out
    except Exception as exc:  # an API that moved between torch versions: say so, keep the run going
        return f"failed: {type(exc).__name__}: {exc}"


# ---- 2. captured vs eager ---------------------------------------------------------------------------------------
def part_graphs(plan: Plan, device: torch.device, hf_fp32: Any, native_int4: Any) -> dict[str, Any]:
    from services.worker.engine import step
    from services.worker.engine.model_runner import ModelRunner
    from services.worker.engine.models.builders import native_from_hf

    out = {}
    for name, model in (("fp32", native_from_hf(hf_fp32)), ("int4_bf16", native_int4)):
        runner = ModelRunner(model, 16, "2GiB" if not plan.dry else "4MiB")
        runner.enable_graphs(64 if not plan.dry else 8, 4096 if not plan.dry else 256, capture=device.type == "cuda")
        graphs, kv = runner.graphs, runner.kv
        for t in (*kv.k, *kv.v):
            t.normal_()
        rng = random.Random(1)
        seqs, at = [], 0
        for _ in range(max(plan.graph_sizes)):
            pos = rng.randrange(1, 1000 if not plan.dry else 100)
            need = pos // 16 + 1
            seqs.append((list(range(at, at + need)), pos))
            at += need
        assert at <= kv.num_blocks, "KV pool too small for the graph check"
        rows = []
        for n in plan.graph_sizes:
            tables, positions = [t for t, _ in seqs[:n]], [p for _, p in seqs[:n]]
            ids = [rng.randrange(100, plan.spec["vocab_size"]) for _ in range(n)]
            with torch.inference_mode():
                replay = graphs.run(ids, positions, tables).float()
                b = graphs.bucket(n)
                eager = graphs.forward(b)[:n].float()  # the same padded step, not captured
                ctx = step.build_context(kv, positions, list(range(n)), tables, n, [])
                plain = runner.logits(runner.forward(torch.tensor(ids, device=device), ctx)).float()
            rows.append({"n": n, "bucket": b, "replay_eq_eager_bitwise": bool(torch.equal(replay, eager)),
                         "max_abs_vs_unpadded": float((replay - plain).abs().max()),
                         "argmax_eq_unpadded": float((replay.argmax(-1) == plain.argmax(-1)).float().mean())})
        out[name] = {"captured": bool(graphs.graphs), "buckets": graphs.buckets, "replays": graphs.replays,
                     "capture_s": round(runner.graph_capture_s, 2), "rows": rows}
        print(name, json.dumps(rows), flush=True)
        del runner, graphs, kv
        free()
    return out


# ---- 3. step times ---------------------------------------------------------------------------------------------
def part_steps(plan: Plan, device: torch.device, models: dict[str, Any], copy_gb_s: float,
               deadline: float) -> dict[str, Any]:
    from services.common.sampling import SamplingParams
    from services.worker.engine.types import Request

    out: dict[str, Any] = {}
    runs = [(fmt, False) for fmt in models if fmt in plan.step_formats] + [("int4", True)]
    for fmt, eager in runs:
        if time.perf_counter() > deadline:
            out[f"{fmt}{' eager' if eager else ''}"] = "skipped: time budget"
            continue
        model = models[fmt]
        t0 = time.perf_counter()
        eng = engine(model, plan, enforce_eager=eager)
        built = time.perf_counter() - t0
        res: dict[str, Any] = {"engine_build_s": round(built, 1),
                               "graph_capture_s": round(eng.runner.graph_capture_s, 1)}
        for b in plan.batches if not eager else plan.batches[:: 3]:
            prompts = random_prompts(b, plan.spec["vocab_size"], plan.prompt, seed=b)
            for i, p in enumerate(prompts):
                eng.add_request(Request(f"s{b}-{i}", p, SamplingParams(max_tokens=plan.prompt // 2, temperature=0.0,
                                                                       ignore_eos=True)))
            while eng.scheduler.waiting or any(s.num_output_tokens == 0 for s in eng.scheduler.running):
                eng.step()
            eng.step()
            sync()
            t = time.perf_counter()
            steps = plan.reps * 2
            for _ in range(steps):
                eng.step()
            sync()
            step_ms = (time.perf_counter() - t) / steps * 1e3
            row = {"step_ms": round(step_ms, 3), "tok_s": round(b / step_ms * 1e3, 1)}
            graphs = eng.runner.graphs
            bucket = graphs.bucket(b) if graphs is not None else None
            if graphs is not None and bucket in graphs.graphs:
                row["graph_replay_ms"] = round(time_ms(graphs.graphs[bucket].replay, plan.reps), 3)
            res[b] = row
            for i in range(b):
                eng.abort_request(f"s{b}-{i}")
            print(fmt, "eager" if eager else "graphs", b, json.dumps(row), flush=True)
        if 1 in res and not eager:
            weights = model.weight_bytes
            kv = 2 * plan.spec["num_hidden_layers"] * plan.spec["num_key_value_heads"] * \
                (plan.spec["hidden_size"] // plan.spec["num_attention_heads"]) * 2 * (plan.prompt + 20)
            floor = (weights + kv) / (copy_gb_s * 1e6)
            res["batch1_floor_ms"] = round(floor, 3)
            res["batch1_weights_mb"] = round(weights / 1e6, 1)
            res["batch1_step_over_floor"] = round(res[1]["step_ms"] / floor, 2)
        out[f"{fmt}{' eager' if eager else ''}"] = res
        del eng
        free()
    return out


# ---- 4. throughput -------------------------------------------------------------------------------------------------
def run_clients(eng: Any, n: int, concurrency: int, plan: Plan, label: str) -> dict[str, Any]:
    """`concurrency` closed-loop clients over an AsyncEngine around `eng` (built once per system: CUDA graphs are
    captured once), n requests of plan.prompt random tokens and plan.output tokens each."""
    from bench.harness import closed_loop, timed
    from bench.results import Sample, summarise
    from services.common.sampling import SamplingParams
    from services.worker.engine.async_engine import AsyncEngine
    from services.worker.engine.types import Request

    prompts = random_prompts(n, plan.spec["vocab_size"], plan.prompt, seed=concurrency)
    front = AsyncEngine(eng)

    async def one(i: int) -> Sample:
        params = SamplingParams(max_tokens=plan.output, temperature=0.0, ignore_eos=True)
        return await timed(front, Request(f"c{concurrency}-{i}", prompts[i], params))

    try:
        samples, wall = asyncio.run(closed_loop(n, concurrency, one))
    finally:
        front.shutdown()
    r = asdict(summarise(label, "direct", f"{plan.prompt}+{plan.output} ignore_eos", concurrency, samples, wall, 0))
    r.pop("peak_rss_mib", None)
    keys = ("system", "concurrency", "requests", "output_tok_s", "ttft_p50_s")
    print(json.dumps({k: r[k] for k in keys}), flush=True)
    return r


def part_throughput(plan: Plan, device: torch.device, models: dict[str, Any], hf_int4: Any, deadline: float
                    ) -> dict[str, Any]:
    from services.worker.engine.hf_static import HFStaticEngine

    def paged(model):
        return lambda: engine(model, plan, max_waiting_steps=plan.max_waiting_steps)

    def static():
        hf_int4.set_attn_implementation("sdpa")
        return HFStaticEngine(hf_int4, IdTokenizer(), max_batch_size=64)

    low, high = plan.concurrency[:1], plan.concurrency[-2:]
    systems = [("paged int4", paged(models["int4"]), plan.concurrency, 2),
               ("paged:transformers int4", paged(hf_int4), tuple(sorted({*low, *high})), 1),
               ("hf-static int4", static, tuple(sorted({*low, *plan.concurrency[-2:-1]})), 1),
               ("paged bf16", paged(models["none"]), plan.concurrency[3:], 2),
               ("paged nf4", paged(models["nf4"]), plan.concurrency[3:], 2)]
    rows = []
    for label, build, concs, waves in systems:
        concs = tuple(c for c in concs if f"{label}@{c}" not in plan.skip)
        if not concs:
            continue
        if time.perf_counter() > deadline:
            rows.extend({"system": label, "concurrency": c, "skipped": "time budget"} for c in concs)
            continue
        t0 = time.perf_counter()
        eng = build()
        built = time.perf_counter() - t0
        for c in concs:
            if f"{label}@{c}" in plan.skip:
                continue
            if time.perf_counter() > deadline:
                rows.append({"system": label, "concurrency": c, "skipped": "time budget"})
                continue
            rows.append(run_clients(eng, c if plan.dry else max(4, waves * c), c, plan, label))
            rows[-1]["engine_build_s"] = round(built, 1)
        del eng
        free()
    by = {(r["system"], r["concurrency"]): r.get("output_tok_s") for r in rows}
    ratios = {}
    for c in plan.concurrency:
        ours = by.get(("paged int4", c))
        for other in ("paged:transformers int4", "hf-static int4"):
            if ours and by.get((other, c)):
                ratios[f"paged int4 / {other} c={c}"] = round(ours / by[(other, c)], 2)
    ttft = next((r["ttft_p50_s"] for r in rows if r["system"] == "paged int4" and r["concurrency"] == 1), None)
    return {"rows": rows, "ratios": ratios, "ttft_512_c1_p50_s": ttft}


# ---- report ------------------------------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    lines = [f"# bench.gpu — {report['env'].get('device')} — {report['env'].get('date')}", ""]
    steps = report.get("steps", {})
    if isinstance(steps, dict) and steps:
        batches = sorted({b for v in steps.values() if isinstance(v, dict) for b in v if isinstance(b, int)})
        context = report["plan"]["prompt"]
        lines += [f"Decode step (engine.step wall ms; graph replay ms) at ~{context} tokens of context",
                  "", "| weights | " + " | ".join(str(b) for b in batches) + " |",
                  "|---|" + "---|" * len(batches)]
        for fmt, v in steps.items():
            if isinstance(v, dict):
                cells = [f"{v[b]['step_ms']:.2f}" + (f" ({v[b]['graph_replay_ms']:.2f})" if "graph_replay_ms" in v[b]
                                                      else "") if b in v else "" for b in batches]
                lines.append(f"| {fmt} | " + " | ".join(cells) + " |")
        lines.append("")
    tp = report.get("throughput", {})
    if isinstance(tp, dict) and tp.get("rows"):
        lines += ["| system | conc | requests | output tok/s | TTFT p50 | latency p50 |", "|---|---|---|---|---|---|"]
        for r in tp["rows"]:
            if "skipped" in r:
                lines.append(f"| {r['system']} | {r['concurrency']} | skipped ({r['skipped']}) | | | |")
            else:
                lines.append(f"| {r['system']} | {r['concurrency']} | {r['requests']} | {r['output_tok_s']:.0f} | "
                             f"{r['ttft_p50_s']:.3f} s | {r['latency_p50_s']:.2f} s |")
        lines += ["", "Ratios: " + ", ".join(f"{k} {v}x" for k, v in tp.get("ratios", {}).items()), ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (cpu: Triton's interpreter; implies tiny)")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, a few seconds a part: rehearse the run")
    ap.add_argument("--parts", default="kernels,graphs,steps,throughput")
    ap.add_argument("--budget-s", type=float, default=420.0, help="skip what would start after this many seconds")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default bench/measured/gpu-<device>-<date>.json)")
    ap.add_argument("--step-formats", default=",".join(FORMATS), help="weights of the steps part (none = bf16)")
    ap.add_argument("--skip", default="", help="throughput runs to leave out: 'system@concurrency,...'")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from services.worker.engine.layers import gpu

    device = torch.device("cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and device.type != "cuda":
        sys.exit("--device cuda: no CUDA device here")
    dry = args.dry_run or device.type == "cpu"
    if device.type == "cpu":
        gpu.interpret()
        with gpu.on_cpu():
            run(args, device, dry)
    else:
        run(args, device, dry)


def run(args: argparse.Namespace, device: torch.device, dry: bool) -> None:
    from services.worker.engine.models.builders import hf_from_hf, native_from_hf, quantized_state

    start = time.perf_counter()
    deadline = start + args.budget_s
    plan = Plan(dry)
    plan.step_formats = tuple(args.step_formats.split(","))
    plan.skip = tuple(x for x in args.skip.split(",") if x)
    tag = "dry" if dry else ("h200" if "H200" in (torch.cuda.get_device_name() if device.type == "cuda" else "") else
                             device.type)
    out_path = args.out or Path("bench/measured") / f"gpu-{tag}-{datetime.date.today().isoformat()}.json"
    report: dict[str, Any] = {"benchmark": "bench.gpu", "model": "Qwen2.5-1.5B-Instruct architecture, random weights"
                              if not dry else "tiny Qwen2 (dry run)", "env": environment(device),
                              "plan": {k: v for k, v in vars(plan).items() if k != "spec"}, "errors": {}}
    report["ceilings"] = ceilings(device, plan)
    print(json.dumps(report["env"]), json.dumps(report["ceilings"]), flush=True)

    def save(part: str, value: Any, t0: float) -> None:
        report[part] = value
        report.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=1, default=str))
        out_path.with_suffix(".md").write_text(markdown(report))
        print(f"== {part} done in {report['seconds'][part]} s (total {time.perf_counter() - start:.0f} s)", flush=True)

    t0 = time.perf_counter()
    hf = build_hf(plan.spec, device, torch.bfloat16)
    states = {fmt: quantized_state(hf, fmt) for fmt in FORMATS}
    models = {fmt: native_from_hf(hf, fmt, states[fmt]) for fmt in FORMATS}
    hf_int4 = hf_from_hf(hf, "int4", states["int4"]).to(device)
    del states
    free()
    save("models", {fmt: {"weight_mb": round(m.weight_bytes / 1e6, 1)} for fmt, m in models.items()}, t0)
    parts = args.parts.split(",")
    for part in parts:
        t0 = time.perf_counter()
        if time.perf_counter() > deadline:
            save(part, "skipped: time budget", t0)
            continue
        try:
            if part == "kernels":
                save(part, part_kernels(plan, device, models), t0)
            elif part == "graphs":
                fp32 = build_hf(plan.spec, device, torch.float32, layers=1 if dry else 4)
                save(part, part_graphs(plan, device, fp32, models["int4"]), t0)
                del fp32
            elif part == "steps":
                save(part, part_steps(plan, device, models, report["ceilings"]["copy_gb_s"], deadline), t0)
            elif part == "throughput":
                save(part, part_throughput(plan, device, models, hf_int4, deadline), t0)
            else:
                raise ValueError(f"unknown part {part!r}")
        except Exception as exc:  # one broken part must not lose the others' numbers
            import traceback

            traceback.print_exc()
            report["errors"][part] = f"{type(exc).__name__}: {exc}"
            save(part, "failed", t0)
        free()
    print(f"total {time.perf_counter() - start:.0f} s; wrote {out_path}", flush=True)
    if report["errors"]:
        sys.exit(f"parts failed: {report['errors']}")


if __name__ == "__main__":
    main()
