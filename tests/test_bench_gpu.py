"""`python -m bench.gpu --device cpu --dry-run`: the GPU benchmark's whole code path (kernel checks, captured vs
eager, step times, throughput of every system) on a tiny model through Triton's interpreter, so the run on a
GPU cannot fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_gpu_benchmark_dry_run(tmp_path):
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--dry-run", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["errors"] == {}
    for part in ("kernels", "graphs", "steps", "throughput"):
        assert isinstance(report[part], dict), part
    assert all(r["replay_eq_eager_bitwise"] for g in report["graphs"].values() for r in g["rows"])
    assert all(r["argmax_eq_unpadded"] == 1.0 for r in report["graphs"]["fp32"]["rows"])
    assert all(x["rel_err"] < 1e-5 for x in report["kernels"]["attention_decode"] if x["dtype"] == "float32")
    assert {r["system"] for r in report["throughput"]["rows"]} >= {"paged int4", "paged:transformers int4",
                                                                   "hf-static int4"}
    assert all(r["output_tokens"] == r["requests"] * report["plan"]["output"] for r in report["throughput"]["rows"])
    assert out.with_suffix(".md").read_text().startswith("# bench.gpu")
