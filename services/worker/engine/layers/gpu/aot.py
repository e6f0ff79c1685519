"""Compile the Triton kernels for a GPU without one: what the interpreter cannot check (the GPU compiler's own
rules, shared-memory limits) is checked here, for Hopper (sm_90) by default, with the ptxas in Triton's wheel.

`record()` notes every kernel launch under the interpreter (argument types, constexprs, warps and stages)
without executing it; `model_launches()` makes, that way, every launch a model of a given shape can issue on
a GPU (each weight format, activation dtype, batch-size bucket and prefill size); `compile_launches()`
compiles each distinct one for the target, in a process without the interpreter (there the kernels are real
`triton.jit` functions):

    python -m services.worker.engine.layers.gpu.aot [--model qwen2.5-1.5b|smollm2-135m] [--arch 90]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int64: "i64", torch.uint8: "u8", torch.int8: "i8", torch.bool: "i1"}
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may take on Hopper


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument {value!r}")


@contextmanager
def record(launches: list[dict[str, Any]]) -> Iterator[None]:
    """Inside: every interpreted kernel launch is appended to `launches` instead of running."""
    from triton.runtime.interpreter import InterpretedFunction

    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        constexprs = {k: v for k, v in kwargs.items() if k not in options}
        names = self.arg_names
        launches.append({"module": self.fn.__module__, "kernel": self.fn.__name__, "options": options,
                         "constexprs": constexprs,
                         "signature": {names[i]: _arg_type(a) for i, a in enumerate(args)}})

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


def distinct(launches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


def compile_launches(launches: list[dict[str, Any]], arch: int = 90) -> list[dict[str, Any]]:
    """Compile each launch for CUDA `arch`; returns one result per launch (ok, error, shared memory)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = []
    for launch in distinct(launches):
        fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
        signature = dict(launch["signature"])
        signature.update(dict.fromkeys(launch["constexprs"], "constexpr"))
        name = f"{launch['kernel']}{launch['constexprs']}"
        try:
            compiled = triton.compile(ASTSource(fn, signature, launch["constexprs"]), target=target,
                                      options=launch["options"])
            shared = compiled.metadata.shared
            result = {"kernel": name, "ok": shared <= SHARED_LIMIT, "shared_bytes": shared}
            if shared > SHARED_LIMIT:
                result["error"] = f"shared memory {shared} > {SHARED_LIMIT}"
            results.append(result)
        except Exception as exc:
            results.append({"kernel": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    return results


SHAPES = {  # hidden, intermediate, heads, KV heads, head dim, vocab
    "qwen2.5-1.5b": (1536, 8960, 12, 2, 128, 151936),
    "smollm2-135m": (576, 1536, 9, 3, 64, 49152),
}


def model_launches(shape: tuple[int, ...], formats: tuple[str, ...] = ("none", "int4", "nf4", "int8"),
                   dtypes: tuple[torch.dtype, ...] = (torch.bfloat16, torch.float32), sms: int = 132,
                   buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256), prefill: int = 2048
                   ) -> list[dict[str, Any]]:
    """Every kernel launch of a decoder of `shape` (SHAPES) on a GPU with `sms` multiprocessors, recorded (not
    run) under the interpreter: tensors are never read, so none holds data."""
    from services.worker.engine.layers import gpu
    from services.worker.engine.layers.quant import DEFAULT_GROUP, PANEL, PackedWeight, split_format

    gpu.interpret()
    from services.worker.engine.layers.gpu import attention, elementwise, quant

    hidden, inter, heads, kv_heads, d, vocab = shape
    sms_before = gpu.num_sms
    gpu.num_sms = lambda device: sms  # the launch shapes of the real GPU
    launches: list[dict[str, Any]] = []

    def packed(fmt: str, n: int, k: int) -> PackedWeight:
        base, group = split_format(fmt)
        group = group or k
        bits = 8 if base in ("int8", "q8_0") else 4
        panels = -(-n // PANEL)
        scales = torch.empty(panels, k // group, PANEL, dtype=torch.float16)
        return PackedWeight(base, n, k, bits, group, torch.empty(panels, k * bits // 8 * PANEL, dtype=torch.uint8),
                            scales, scales if base in ("int4", "q4_1") else None,
                            torch.empty(16) if base == "nf4" else None)

    try:
        with record(launches):
            for dtype in dtypes:
                for fmt in formats:
                    if fmt == "none":
                        continue
                    head_fmt = "int8" if fmt == "int8" else "q8_0"
                    layers = [(fmt, (heads + 2 * kv_heads) * d, hidden, True), (fmt, hidden, hidden, False),
                              (fmt, 2 * inter, hidden, False), (fmt, hidden, inter, False),
                              (head_fmt, vocab, hidden, False)]
                    for f, n, k, bias in layers:
                        p = packed(f, n, k)
                        for rows in (*buckets, prefill):
                            quant.matmul(torch.empty(rows, k, dtype=dtype), p,
                                         torch.empty(n, dtype=dtype) if bias else None)
                        if p.bits == 8 or DEFAULT_GROUP.get(f):
                            quant.dequantize(p, dtype)
                k_cache = torch.empty(8, kv_heads, 16, d, dtype=dtype)
                for b in buckets:
                    q = torch.empty(b, heads * d, dtype=dtype)
                    splits = attention.decode_splits(b, kv_heads, sms)
                    attention.decode(q, k_cache, k_cache, torch.empty(b, 4, dtype=torch.int32),
                                     torch.empty(b, dtype=torch.int32), heads, None, d**-0.5, splits)
                tiles = torch.empty(3, 3, dtype=torch.int32)
                q = torch.empty(prefill, heads * d, dtype=dtype)
                attention.prefill(q, k_cache, k_cache, torch.empty(2, 4, dtype=torch.int32),
                                  torch.empty(prefill, dtype=torch.int32), tiles, heads, None, d**-0.5, q)
                for rows in (1, prefill):
                    x = torch.empty(rows, hidden, dtype=dtype)
                    elementwise.rms_norm(x, torch.empty(hidden, dtype=dtype), 1e-6, torch.empty_like(x))
                    elementwise.rms_norm(x, torch.empty(hidden, dtype=dtype), 1e-6)
                    elementwise.silu_mul(torch.empty(rows, 2 * inter, dtype=dtype))
                    qkv = torch.empty(rows, (heads + 2 * kv_heads) * d, dtype=dtype)
                    qq, kk, vv = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
                    elementwise.rotary_kv_write(qq, kk, vv, torch.empty(rows, dtype=torch.long),
                                                torch.empty(rows, dtype=torch.long), torch.empty(64, d // 2),
                                                torch.empty(64, d // 2), k_cache, k_cache, heads)
    finally:
        gpu.num_sms = sms_before
    return distinct(launches)


def main() -> None:
    ap = argparse.ArgumentParser(description="compile every Triton kernel launch of a model for a CUDA architecture")
    ap.add_argument("--model", choices=sorted(SHAPES), default="qwen2.5-1.5b")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--launches", type=Path, help="a JSON list of recorded launches instead of --model's")
    ap.add_argument("--lean", action="store_true", help="bf16 and int4 only, three buckets (the tests' check)")
    args = ap.parse_args()
    if args.launches:
        launches = json.loads(args.launches.read_text())
    else:  # record in a child process under the interpreter; compile here, without it
        import subprocess

        subset = ", formats=('int4',), dtypes=(torch.bfloat16,), buckets=(1, 16, 64)" if args.lean else ""
        code = (f"import json, torch; from services.worker.engine.layers.gpu import aot; "
                f"print(json.dumps(aot.model_launches(aot.SHAPES[{args.model!r}]{subset})))")
        launches = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                             text=True).stdout)
    results = compile_launches(launches, args.arch)
    for r in results:
        print(("ok  " if r["ok"] else "FAIL") + f" {r['kernel']}" + (f"\n     {r['error']}" if not r["ok"] else ""))
    failed = sum(not r["ok"] for r in results)
    print(f"{len(results) - failed} of {len(results)} kernel variants compile for sm_{args.arch}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
