"""`tokenmill bench kernels`: the machine's roofs and each kernel's share of them (a small run: two kernels, two
batch sizes, one weight copy). Checks the report's fields and arithmetic, not the speeds."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest


def test_shares_pick_the_roof_that_binds() -> None:
    from bench.kernels import shares

    roof = {"read_bytes_per_s": 10e9, "best_matrix_flops": 100e9}
    # 2 FLOP a byte: 20 GFLOP/s at the read roof, below the 100 GFLOP/s matrix roof: read-bound
    got = shares(2e9, 1_000_000_000, 1.0, roof)
    assert got["bound"] == "read" and got["flops_per_byte"] == 2.0
    assert got["gb_s"] == pytest.approx(1.0) and got["pct_read_roof"] == pytest.approx(10.0)
    assert got["pct_matrix_roof"] == pytest.approx(2.0) and got["pct_roof"] == pytest.approx(10.0)
    # 256 FLOP a byte: matrix-bound, its share is of the matrix rate
    got = shares(50e9, 195_312_500, 1.0, roof)
    assert got["bound"] == "matrix" and got["pct_roof"] == pytest.approx(50.0)


def test_kernels_report_roofs_shares_and_lscpu(tmp_path: Path) -> None:
    from bench.kernels import LAYERS, SHAPES, Options, main
    from services.worker.engine.layers import kernels

    out = tmp_path / "kernels.json"
    ops = kernels.load()  # without tokenmill's C++ kernels: no integer unit, no -a8 kernel
    names = ("fp32-linear", "tokenmill-q8_0", *(("tokenmill-q8_0-a8",) if ops is not None else ()))
    main(Options(rows=(1, 4), copies=1, repeat=1, kernels=names, out=out, quick=True))
    report = json.loads(out.read_text())
    roofs = report["roofs"]
    assert roofs["read_bytes_per_s"] > 0 and roofs["read_buffer_MiB"] == 256
    assert {"float32", "bfloat16"} <= set(roofs["matmul_flops"]) and all(v > 0 for v in roofs["matmul_flops"].values())
    assert "int8" in roofs["matmul_flops"] or "int8" in roofs["notes"]  # measured, or why not
    assert roofs["best_matrix_flops"] == max(roofs["matmul_flops"].values())
    units = [u for u in ops.q8_units().split(",") if u != "amx"] if ops is not None else []
    assert {f"int8-{u}" for u in units} <= set(roofs["matmul_flops"])

    weights = LAYERS * sum(math.prod(s) for k, s in SHAPES.items() if k != "lm_head") + math.prod(SHAPES["lm_head"])
    by = {(r["kernel"], r["rows"]): r for r in report["results"]}
    assert set(by) == {(k, m) for k in names for m in (1, 4)}
    if ops is not None:  # int8 activations read the same codes
        assert by[("tokenmill-q8_0-a8", 1)]["weight_bytes"] == by[("tokenmill-q8_0", 1)]["weight_bytes"]
    assert report["environment"]["int8_unit"] == kernels.matrix_unit()
    assert by[("fp32-linear", 1)]["weight_bytes"] == 4 * weights
    assert weights < by[("tokenmill-q8_0", 1)]["weight_bytes"] < 1.2 * weights  # int8 codes + fp16 scales
    for r in report["results"]:
        seconds = r["model_ms"] / 1e3
        assert r["pct_read_roof"] == pytest.approx(100 * r["weight_bytes"] / seconds / roofs["read_bytes_per_s"])
        assert r["pct_matrix_roof"] == pytest.approx(100 * r["gflops"] * 1e9 / roofs["best_matrix_flops"])
        assert r["pct_roof"] == pytest.approx(r["pct_read_roof"] if r["bound"] == "read" else r["pct_matrix_roof"])
    assert by[("fp32-linear", 1)]["bound"] == "read"  # batch-1 fp32: half a FLOP a byte

    env = report["environment"]
    assert env["lscpu"]["flags"] and set(env["cpu_flags"]) <= set(env["lscpu"]["flags"])
    md = out.with_suffix(".md").read_text()
    assert "Roofs" in md and "% of roof" in md and "| tokenmill-q8_0 |" in md
