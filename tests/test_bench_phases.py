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


def test_quantization_counts_resident_weights_of_every_format(tmp_path):
    """Phase 7 on the tiny random Qwen2: a row per tokenmill format whose weights (weight_bytes of the engine's
    model) match the format's definition, quality from bench.quality, speed from the paged engine."""
    from bench.phases.quantization import FORMATS
    from bench.quality import tiny_qwen2
    from services.worker.engine.layers.linear import weight_bytes
    from services.worker.engine.models.builders import native_from_hf

    opts = make_options(True, "cpu", tmp_path, "tiny-qwen2", 0, "quantization")
    opts.extra.update(batches=[1, 2], prompt_len=8, new_tokens=3, ppl_tokens=128, chunk=64)
    doc = run_phase("quantization", opts)
    rows = {r["format"]: r for r in doc["rows"]}
    assert list(rows) == list(FORMATS)
    assert "GGUF" in rows["gguf"]["error"]  # the tiny model has no GGUF file; the embedded model's run has the row
    ok = {f: r for f, r in rows.items() if f != "gguf"}
    for fmt, r in ok.items():
        assert abs(r["weights_vs_expected"] - 1) < 0.02, (fmt, r["weights_MiB"], r["expected_MiB"])
        assert r["decode_tok_s_b1"] > 0 and r["decode_tok_s_b2"] > 0 and r["ttft_ms_b1"] > 0
    sizes = [ok[f]["weights_MiB"] for f in ("none", "int8", "int4", "int4/64", "nf4")]
    assert sizes == sorted(sizes, reverse=True)  # fewer bits, then larger groups, then no mins: smaller
    assert 3.5 < ok["none"]["weights_MiB"] / ok["int8"]["weights_MiB"] < 4.5
    assert 4.5 < ok["none"]["weights_MiB"] / ok["int4"]["weights_MiB"] < 5.5
    assert ok["none"]["kl_mean"] == 0 and ok["none"]["top1"] == 1 and ok["int8"]["kl_mean"] < ok["int4"]["kl_mean"]
    # what the phase used to read (parameters only) misses the packed codes: the counting matters
    int4 = native_from_hf(tiny_qwen2(), "int4")
    params_only = sum(p.numel() * p.element_size() for p in int4.parameters())
    assert params_only < 0.2 * weight_bytes(int4) and abs(weight_bytes(int4) / 2**20 - ok["int4"]["weights_MiB"]) < 1e-9
    setup = doc["setup"]
    assert setup["forward"].startswith("native") and setup["threads"] >= 1 and setup["kernels"]
    assert "forward native" in (tmp_path / "quantization.md").read_text()


def test_bench_job_configmap_holds_the_worker_defaults(monkeypatch):
    """The benchmark Job's ConfigMap is config.py's engine defaults, the rendered Jobs (GPU and CPU) read it,
    and the phases build their engines from those variables."""
    import yaml

    from bench.phases.common import ENGINE_SETTINGS, bench_config_data, worker_settings
    from services.k8s.jobs import default_jobs_dir, overlay_dir, render

    committed = yaml.safe_load((default_jobs_dir() / "base" / "bench-config.yaml").read_text())
    assert committed["data"] == bench_config_data()
    assert committed["data"]["TOKENMILL_WORKER_QUANTIZATION"] == "auto" == worker_settings().quantization
    assert committed["data"]["TOKENMILL_WORKER_MODEL_IMPL"] == "auto"
    assert len(committed["data"]) == len(ENGINE_SETTINGS)
    for overlay in ("gpu", "cpu"):
        objects = render(overlay_dir(overlay))
        assert any(o["kind"] == "ConfigMap" and o["metadata"]["name"] == "tokenmill-bench-config" for o in objects)
        job = next(o for o in objects if o["kind"] == "Job" and o["metadata"]["name"] == "tokenmill-bench")
        run = job["spec"]["template"]["spec"]["initContainers"][0]
        assert run["envFrom"] == [{"configMapRef": {"name": "tokenmill-bench-config", "optional": True}}]
    monkeypatch.setenv("TOKENMILL_WORKER_QUANTIZATION", "int8")
    assert worker_settings().quantization == "int8"  # a ConfigMap value reaches the phases
