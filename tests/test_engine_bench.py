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
    with pytest.raises(ValueError, match="option 'fp8'"):
        SystemSpec.parse("paged:fp8")
