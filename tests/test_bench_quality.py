"""`tokenmill bench quality --quick` on the tiny random Qwen2: the files it writes, their fields, and sane values
(the fp32 reference agrees with itself exactly; int8 is closer to fp32 than int4). No timing assertions."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

ROW = {"model", "format", "weights_MiB", "positions", "perplexity", "ppl_ratio", "kl_mean", "kl_median", "kl_p99",
       "kl_max", "top1", "entropy", "forward_s", "activations", "kv_cache_dtype"}


def test_quality_quick_on_tiny_qwen2(tmp_path):
    from bench.cli import app
    from services.worker.engine.layers import kernels

    int8 = kernels.load() is not None and kernels.matrix_unit() != "fp32"
    activations = ["--activations", "fp32,int8"] if int8 else []
    kv = "auto,float16,bfloat16" if kernels.load() is not None else "auto"  # 16-bit caches: the C++ attention

    out = tmp_path / "quality.json"
    result = CliRunner().invoke(app, ["quality", "--quick", "--models", "tiny-qwen2", "--formats", "int8,int4,nf4",
                                      "--out", str(out), "--kv-cache-dtype", kv, *activations])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert {"benchmark", "date", "command", "options", "environment", "text", "models", "rows", "total_s"} <= set(doc)
    assert {"torch", "cpu_flags", "cpu_capability"} <= set(doc["environment"])
    text = doc["text"]
    assert "pydoc_data/topics.py" in text["source"] and text["tokens_available"] >= 20000
    assert text["tokens_used"] == 1024 and text["positions_scored"] == 4 * 255
    rows = {r["format"]: r for r in doc["rows"] if r["activations"] == "fp32" and r["kv_cache_dtype"] == "auto"}
    assert list(rows) == ["none", "int8", "int4", "nf4"]
    if int8:  # int8 activations: a row per integer-coded format, noisier than its fp32-activation row
        a8 = {r["format"]: r for r in doc["rows"] if r["activations"] == "int8"}
        assert list(a8) == ["int8", "int4"] and all(a8[f]["weights_MiB"] == rows[f]["weights_MiB"] for f in a8)
        assert all(a8[f]["kl_mean"] > rows[f]["kl_mean"] for f in a8)
    # a 16-bit KV cache: a row per format (fp32 included), the same weights, logits moved by the rounding;
    # bfloat16 (8 significant bits to float16's 11) further from fp32
    for dtype in ("float16", "bfloat16") if kv != "auto" else ():
        kv16 = {r["format"]: r for r in doc["rows"] if r["kv_cache_dtype"] == dtype}
        assert list(kv16) == ["none", "int8", "int4", "nf4"] and all(r["activations"] == "fp32" for r in kv16.values())
        assert all(kv16[f]["weights_MiB"] == rows[f]["weights_MiB"] for f in kv16)
        assert kv16["none"]["perplexity"] != rows["none"]["perplexity"]  # K/V rounding reached the logits
        assert f"none, {dtype} KV |" in out.with_suffix(".md").read_text()
    if kv != "auto":
        by = {r["kv_cache_dtype"]: r for r in doc["rows"] if r["format"] == "none"}
        assert 0 < by["float16"]["kl_p99"] < by["bfloat16"]["kl_p99"]
    for r in rows.values():
        assert set(r) == ROW and r["model"] == "tiny-qwen2" and r["positions"] == 1020
        assert all(math.isfinite(r[k]) for k in ROW - {"model", "format", "activations", "kv_cache_dtype"})
        assert r["kl_mean"] >= -1e-6 and 0 <= r["top1"] <= 1
    ref = rows["none"]
    assert ref["kl_mean"] == ref["kl_max"] == 0 and ref["top1"] == 1 and ref["ppl_ratio"] == 1
    assert rows["int8"]["kl_mean"] < rows["int4"]["kl_mean"] and rows["int8"]["kl_mean"] < rows["nf4"]["kl_mean"]
    assert rows["int4"]["weights_MiB"] < rows["int8"]["weights_MiB"] < ref["weights_MiB"]
    md = out.with_suffix(".md").read_text()
    assert "| tiny-qwen2 | int4 |" in md and "pydoc_data" in md
