"""`tokenmill bench compare` in a tiny configuration: tokenmill and the seed's hf-static design only (no llama.cpp
build, no vLLM in CI), 4 requests, a few tokens, concurrency 1 and 2. Checks the files and fields, not timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_compare_tiny(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "bench.cli", "compare", "--systems", "tokenmill,hf-static,llama.cpp",
           "--requests", "4", "--concurrency", "1,2", "--min-tokens", "4", "--max-tokens", "8",
           "--fixed-tokens", "8", "--threads", "1", "--llama-server", str(tmp_path / "no-llama-server"),
           "--out-dir", str(tmp_path)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("compare.json", "compare.md", "compare.png"):
        assert (tmp_path / name).stat().st_size > 0, name

    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["failed"] == {}, report["failed"]
    assert "llama.cpp" in report["skipped"] and "no llama-server binary" in report["skipped"]["llama.cpp"]
    rows = report["results"]
    keys = {(r["system"], r["workload"], r["concurrency"]) for r in rows}
    assert keys == {(s, w, c) for s in ("tokenmill", "hf-static") for w in ("story", "fixed128") for c in (1, 2)}
    fields = ("output_tok_s", "requests_per_hour", "ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s",
              "latency_p99_s", "peak_rss_mib", "transport")
    for r in rows:
        for f in fields:
            assert f in r, f
        assert r["requests"] == 4
        assert r["output_tok_s"] > 0 and r["requests_per_hour"] > 0 and r["peak_rss_mib"] > 50
        assert 0 < r["ttft_p50_s"] <= r["ttft_p95_s"] <= r["latency_p99_s"] + 1e-9
        assert r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_p99_s"] + 1e-9
        if r["workload"] == "fixed128":  # ignore_eos: every system produces exactly max_tokens per request
            assert r["output_tokens"] == 4 * 8, r
        else:
            assert 4 <= r["output_tokens"] <= 4 * 8
    assert any(k.startswith("tokenmill/hf-static tok/s") for k in report["ratios"])
    md = (tmp_path / "compare.md").read_text()
    assert "| tokenmill | fixed128 | 2 |" in md and "skipped llama.cpp" in md
    assert "tokenmill" in proc.stdout and "wrote" in proc.stdout


def test_system_spec_with_dtype(tmp_path: Path) -> None:
    from bench.compare import Options, make_system

    system = make_system("tokenmill:bfloat16", Options(), tmp_path, 64)
    assert system.name == "tokenmill:bfloat16" and system.opts.dtype == "bfloat16"
    assert make_system("hf-static", Options(dtype="float32"), tmp_path, 64).opts.dtype == "float32"
    assert make_system("tokenmill:transformers", Options(), tmp_path, 64).spec.model_impl == "transformers"
    with pytest.raises(ValueError, match="runs its own weights"):
        make_system("llama.cpp:bfloat16", Options(), tmp_path, 64)
    with pytest.raises(ValueError, match="unknown system"):
        make_system("nonesuch", Options(), tmp_path, 64)
