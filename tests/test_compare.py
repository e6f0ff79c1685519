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
           "--workloads", "story,fixed128", "--fixed-tokens", "8", "--threads", "1",
           "--llama-server", str(tmp_path / "no-llama-server"), "--out-dir", str(tmp_path)]
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
    assert report["crashed"] == {}
    fields = ("output_tok_s", "requests_per_hour", "ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s",
              "latency_p99_s", "peak_rss_mib", "transport")
    for r in rows:
        for f in fields:
            assert f in r, f
        assert r["requests"] == 4
        assert r["output_tok_s"] > 0 and r["requests_per_hour"] > 0 and r["peak_rss_mib"] > 50
        assert 0 < r["ttft_p50_s"] <= r["ttft_p95_s"] <= r["latency_p99_s"] + 1e-9
        assert r["latency_p50_s"] <= r["latency_p95_s"] <= r["latency_p99_s"] + 1e-9
        assert r["extra"]["prompt_tok_s"] > 0
        assert r["extra"]["prompt_tokens"] >= 4 * 10, r["extra"]
        if r["workload"] == "fixed128":  # ignore_eos: every system produces exactly max_tokens per request
            assert r["output_tokens"] == 4 * 8, r
        else:
            assert 4 <= r["output_tokens"] <= 4 * 8
    for metric in ("tok/s", "prompt tok/s", "TTFT p50"):
        assert f"tokenmill/hf-static {metric} story c=2" in report["ratios"], report["ratios"]
    md = (tmp_path / "compare.md").read_text()
    assert "| tokenmill | fixed128 | 2 |" in md and "skipped llama.cpp" in md
    assert "tokenmill" in proc.stdout and "wrote" in proc.stdout


def test_system_spec_with_dtype(tmp_path: Path) -> None:
    from bench.compare import Options
    from bench.systems import make_system

    system = make_system("tokenmill:bfloat16", Options(), tmp_path, 64)
    assert system.name == "tokenmill:bfloat16" and system.opts.dtype == "bfloat16"
    assert make_system("hf-static", Options(dtype="float32"), tmp_path, 64).opts.dtype == "float32"
    assert make_system("tokenmill:transformers", Options(), tmp_path, 64).spec.model_impl == "transformers"
    with pytest.raises(ValueError, match="runs its own weights"):
        make_system("llama.cpp:bfloat16", Options(), tmp_path, 64)
    with pytest.raises(ValueError, match="unknown system"):
        make_system("nonesuch", Options(), tmp_path, 64)


def test_long_workload_prompts_are_long_distinct_and_fresh_per_concurrency() -> None:
    """~target-token prompts of stdlib docs + a question; no two share a prefix past the common template (so no
    prefix-cache hit), each concurrency level and each warm-up has its own, the story prompts are reused."""
    from bench.compare import Options, build_works
    from services.common.model_loader import load_tokenizer

    target = 300
    opts = Options(requests=3, requests_c1=2, concurrency=(1, 4), workloads=("story", "long"), long_tokens=target)
    tokenizer = load_tokenizer("smollm2-135m")
    works = build_works(tokenizer, opts)
    assert list(works) == ["story", "long"]
    long = works["long"]
    assert len(long.prompts) == 2 * (3 + 1) and long.fresh and long.ignore_eos
    assert "standard-library modules of Python" in long.source
    for text, ids in zip(long.prompts, long.prompt_ids, strict=True):
        assert 0.75 * target <= len(ids) <= 1.05 * target, len(ids)
        assert text.startswith("Here is part of the Python documentation.") and text.endswith(("?", "."))
    ids = long.prompt_ids
    common = min(next(k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
                 for i, a in enumerate(ids) for b in ids[i + 1:])
    template = len(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Here is part of the Python documentation."}], tokenize=True,
        return_dict=False))
    assert common <= template, (common, template)  # prompts part ways within the shared header

    (t0, w0), (t1, w1) = long.level(0, 3), long.level(1, 3)
    seen = t0.prompts + w0.prompts + t1.prompts + w1.prompts
    assert len(t0.prompts) == 3 and len(w0.prompts) == 1 and len(set(seen)) == 8
    (s0, sw0), (s1, _) = works["story"].level(0, 3), works["story"].level(1, 3)
    assert s0.prompts == s1.prompts and len(s0.prompts) == 3 and len(sw0.prompts) == 1


def test_ratios_per_metric() -> None:
    from bench.compare import ratios
    from bench.results import Result

    def row(system: str, tok_s: float, prompt_tok_s: float, ttft: float) -> Result:
        return Result(system, "", "long", 8, 4, 1.0, 4, tok_s, 1.0, ttft, ttft, 1.0, 1.0, 1.0, 1.0, 0.0,
                      {"prompt_tok_s": prompt_tok_s})

    got = ratios([row("tokenmill", 300, 4000, 0.25), row("llama.cpp", 100, 1000, 0.5), row("hf-static", 50, 0, 1.0)])
    assert got == {"tokenmill/llama.cpp tok/s long c=8": 3.0, "tokenmill/llama.cpp prompt tok/s long c=8": 4.0,
                   "tokenmill/llama.cpp TTFT p50 long c=8": 0.5, "tokenmill/hf-static tok/s long c=8": 6.0,
                   "tokenmill/hf-static TTFT p50 long c=8": 0.25}
