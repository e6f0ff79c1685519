"""Phase benchmarks (bench/phases) in tiny configurations: the files they write, their JSON fields, and that
the measured values are physically sane. Timings are compared only where the gap is many-fold."""

from __future__ import annotations

import json

import pytest

from bench.phases import PHASES, make_options, run_phase

COMMON = {"schema", "phase", "title", "options", "env", "config", "rows", "summary", "notes"}


def _run(name, tmp_path, **extra):
    opts = make_options(True, "cpu", tmp_path, "smollm2-135m", 0, name)
    opts.extra.update(extra)
    doc = run_phase(name, opts)
    for ext in ("json", "png", "md"):
        assert (tmp_path / f"{name}.{ext}").stat().st_size > 0, ext
    on_disk = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(on_disk) >= COMMON and on_disk["phase"] == name
    assert on_disk["env"]["device"] == "cpu" and on_disk["env"]["quick"] is True
    assert "![" in (tmp_path / f"{name}.md").read_text()
    return doc


def test_phase_names_match_the_kubernetes_jobs():
    from services.k8s.jobs import BENCH_PHASES

    assert set(PHASES) <= set(BENCH_PHASES)


def test_kv_cache_beats_recompute_at_long_lengths(tmp_path):
    doc = _run("kv-cache", tmp_path, lengths=[4, 24])
    short, long = doc["rows"]
    assert {"new_tokens", "recompute_s", "cached_s", "speedup"} <= set(long)
    assert long["recompute_s"] > short["recompute_s"] > 0 and long["cached_s"] > short["cached_s"] > 0
    assert long["speedup"] > 1.3  # at 24 tokens recompute already costs several times more per step
    assert doc["summary"]["greedy tokens equal (recompute vs cached)"] == 1.0


def test_paged_memory_is_no_larger_than_naive(tmp_path):
    doc = _run("paged-memory", tmp_path, prompt_lens=[20, 70, 5], output_lens=[3, 2, 6], chat_requests=3,
               chat_max_tokens=2)
    naive_max, naive_pad, paged, ideal = (r["kv_MiB"] for r in doc["rows"][:4])
    assert ideal <= paged <= naive_pad <= naive_max
    assert paged < naive_pad  # very different lengths: padding to the longest wastes most of it
    off, on = doc["rows"][4:6]
    assert off["strategy"].endswith("off") and on["strategy"].endswith("on")
    assert on["kv_MiB"] <= off["kv_MiB"] and on["prefix_hit_rate"] > 0 == off["prefix_hit_rate"]
    assert on["prefill_tokens_computed"] < off["prefill_tokens_computed"]
    sweep = doc["tables"]["block-size sweep (same sequences, production BlockManager)"]
    assert sweep[0]["waste_pct"] == 0 and all(s["waste_pct"] >= 0 for s in sweep)


def test_attention_variants_measured_equals_formula(tmp_path):
    doc = _run("attention-variants", tmp_path, tokens=8, batch=2, repeat=1)
    rows = {r["variant"]: r for r in doc["rows"]}
    for r in rows.values():
        assert r["measured_bytes_per_token_layer"] == r["bytes_per_token_layer"] > 0
    mha, gqa, mqa, mla = (rows[k]["bytes_per_token_layer"] for k in ("MHA", "GQA (SmolLM2)", "MQA", "MLA"))
    assert mqa < gqa < mha and mla < mha
    assert mha / gqa == 3 and mha / mqa == 9
    assert rows["MQA"]["max_batch_4096ctx"] >= rows["MHA"]["max_batch_4096ctx"]


def test_attention_kernels_report_what_ran(tmp_path):
    doc = _run("attention", tmp_path, lengths=[256], decode_batch=2, repeat=1)
    rows = {(r["workload"], r["impl"]): r for r in doc["rows"]}
    naive, flash = rows[("prefill", "naive-fp32")], rows[("prefill", "sdpa-default")]
    assert naive["peak_MiB"] > flash["peak_MiB"]  # the naive one materialises the 256x256 scores per head
    assert "scaled_dot_product" in rows[("prefill", "sdpa-math")]["kernel_ran"]
    assert rows[("decode", "tokenmill-paged")]["ms"] > 0


@pytest.mark.parametrize("phase", ["attention-variants"])
def test_cli_command(tmp_path, phase):
    from typer.testing import CliRunner

    from bench.cli import app

    result = CliRunner().invoke(app, [phase, "--quick", "--device", "cpu", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert {p.suffix for p in (tmp_path / "r").iterdir()} == {".json", ".png", ".md"}
