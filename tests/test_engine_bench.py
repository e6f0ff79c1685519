"""`tokenmill bench engine` end to end on a tiny workload (direct mode): JSON, table, sane numbers."""

from __future__ import annotations

import json

import pytest
from engine_support import one_thread  # noqa: F401  (module fixture)

from bench.engine import Options, main
from bench.results import SystemSpec, percentile

pytestmark = pytest.mark.usefixtures("one_thread")


def test_percentile():
    assert percentile([], 0.5) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0], 0.95) == 1.95


def test_bench_engine_direct_tiny(tmp_path, capsys):
    out = tmp_path / "engine.json"
    report = main(Options(requests=3, concurrency=(2,), modes=("direct",), min_tokens=3, max_tokens=5,
                          kv_cache_memory="64MiB", out=out))
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    rows = {r["system"]: r for r in data["results"]}
    assert set(rows) == {"hf-static", "paged", "paged:transformers"}
    for r in rows.values():
        assert r["requests"] == 3 and 9 <= r["output_tokens"] <= 15 and r["output_tok_s"] > 0
        assert 0 < r["ttft_p50_s"] <= r["latency_p95_s"] and r["peak_rss_mib"] > 100
        assert r["transport"] == "direct" and r["workload"] == "story"
    extra = rows["paged"]["extra"]
    assert extra["kv_blocks_total"] > 0 and extra["kv_blocks_used_peak"] > 0
    assert {"paged/hf-static direct c=2", "paged:transformers/paged direct c=2"} <= set(data["ratios"])
    assert data["environment"]["cpu_capability"] in ("avx512_bf16", "avx512", "avx2", "none")
    assert "tok/s" in capsys.readouterr().out


def test_system_specs():
    s = SystemSpec.parse("paged+ngram:transformers:none:bfloat16")
    assert (s.name, s.speculative, s.model_impl, s.quantization, s.dtype) == ("paged", "ngram", "transformers",
                                                                              "none", "bfloat16")
    assert s.worker_args() == ["--speculative", "ngram", "--dtype", "bfloat16", "--quantization", "none",
                               "--model-impl", "transformers"]
    a8 = SystemSpec.parse("tokenmill:gguf:activations=int8:kv-cache-dtype=float16")
    assert (a8.quantization, a8.activations, a8.kv_cache_dtype) == ("gguf", "int8", "float16")
    assert a8.worker_args()[-4:] == ["--activations", "int8", "--kv-cache-dtype", "float16"]
    with pytest.raises(ValueError, match="option 'activations=int4'"):
        SystemSpec.parse("tokenmill:activations=int4")
    with pytest.raises(ValueError, match="option 'fp8'"):
        SystemSpec.parse("paged:fp8")


def test_bench_sampling_tiny(tmp_path):
    """`tokenmill bench sampling` on a tiny workload: every configuration runs, the JSON holds the targets' ratios,
    and n's samples hold the prompt's full blocks once (block counts, not timings)."""
    from bench.sampling import N_RUNS, PENALTIES, Options
    from bench.sampling import main as sampling

    out = tmp_path / "sampling.json"
    report = sampling(Options(n=3, prompt_tokens=40, max_tokens=4, batch=2, batch_max_tokens=4, rounds=1,
                              kv_cache_memory="64MiB", out=out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    runs, summary = report["rounds"][0], report["summary"]
    assert set(runs) == set(N_RUNS) | set(PENALTIES)
    assert all(runs[k]["tokens"] == 3 * 4 for k in N_RUNS if k != "n1") and runs["n1"]["tokens"] == 4
    assert all(runs[k]["tokens"] == 2 * 4 for k in PENALTIES)
    kv = summary["kv"]
    assert kv["n8"] == kv["n1_plus_own_blocks"] == 2 + 3 * 1 and kv["same_instant_uncached"] == 3 * 3
    assert runs["same_instant_uncached"]["cached_tokens"] == 0
    assert runs["cached_then_separate"]["cached_tokens"] == 3 * 32  # the prompt's 2 full blocks, for each
    assert set(summary["n8_wall_over"]) == set(summary["n8_cpu_over"]) == set(N_RUNS[2:])
    assert all(runs[k]["cpu_s"] > 0 for k in runs)
    assert set(summary["tok_s_over_plain"]) == set(PENALTIES) - {"plain"}
