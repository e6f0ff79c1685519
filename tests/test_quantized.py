"""Quantized weights: the formats and kernels, the embedded GGUF read as stored, and the engine against
model.generate on the same weights through the same quantized module.

- `gguf` (the GGUF's own Q4_1 / Q8_0 blocks, fp32 compute) keeps greedy parity with the fp32 model
  dequantised from the same file (near ties < 1e-3 only): they are the same weights;
- every format (gguf, int8, int4, nf4) against transformers' model over the same tokenmill layers, by
  vLLM's check_logprobs_close rule, in every engine scenario; the identical counts are printed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_support import (
    assert_no_leaks,
    check_logprobs_close,
    check_parity,
    drive,
    one_thread,  # noqa: F401  (module fixture)
    params,
    parity_prompts,
    record_logprobs,
    reference_greedy,
    tokens_of,
)

from services.worker.engine.layers import quant
from services.worker.engine.layers.linear import Linear
from services.worker.engine.types import Request

MAX_NEW = 10
FORMATS = ["q4_1", "q8_0", "int4", "int8", "nf4"]
SCENARIOS = ["alone", "together", "staggered", "prefix-hits", "preemption"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_equals_dequantised_matmul(fmt):
    torch.manual_seed(0)
    w, bias = torch.randn(200, 256) * 0.05, torch.randn(200)  # 200 rows: a partial panel of 16
    packed = quant.quantize(w, fmt)
    layer = Linear(packed, bias)
    err = (packed.dequantize() - w).abs().mean() / w.abs().mean()
    assert err < (0.02 if fmt in ("q8_0", "int8") else 0.2), f"{fmt}: quantisation error {err:.3f}"
    for rows in (1, 2, 5, 13, 40):
        x = torch.randn(rows, 256)
        want = F.linear(x, packed.dequantize(), bias)
        assert torch.allclose(layer(x), want, rtol=1e-5, atol=1e-4), f"{fmt}, {rows} rows"
    x = torch.randn(32, 256)  # a row's result does not depend on the rest of the batch (bitwise)
    assert torch.equal(layer(x)[7:8], layer(x[7:8]))
    codes, scales, mins = packed.unpack()
    again = quant.pack(fmt, codes, scales, mins, packed.bits, packed.group)
    assert torch.equal(again.codes, packed.codes) and torch.equal(again.scales, packed.scales)


def test_embedded_gguf_blocks_read_as_stored():
    import gguf

    from services.common.model_loader import embedded_gguf

    reader = gguf.GGUFReader(str(embedded_gguf("smollm2-135m")))
    tensors = {t.name: t for t in reader.tensors}
    for name in ("blk.3.ffn_down.weight", "token_embd.weight"):
        t = tensors[name]
        n, k = int(t.shape[-1]), int(t.shape[0])
        want = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(n, k).astype(np.float32))
        packed = quant.from_gguf(t.tensor_type.name, np.asarray(t.data).reshape(n, -1), n, k)
        rows = torch.tensor([0, 1, 17, n - 1])
        assert torch.equal(packed.dequantize(rows), want[rows]), name
        if n < 10_000:
            assert torch.equal(packed.dequantize(), want), name
    with pytest.raises(ValueError, match="Q4_1, Q8_0"):
        quant.from_gguf("Q5_K", np.zeros((16, 176), np.uint8), 16, 256)


def test_bad_quantization_values_fail_at_start_naming_the_choices():
    from services.common.model_loader import load_engine_model, load_model

    with pytest.raises(ValueError, match="none, gguf, int8, int4, nf4"):
        load_engine_model("smollm2-135m", "int3")
    with pytest.raises(ValueError, match="none, gguf, int8, int4, nf4"):
        load_model("smollm2-135m", "int3")
    with pytest.raises(ValueError, match="auto, native, transformers"):
        load_engine_model("smollm2-135m", model_impl="jax")


@pytest.fixture(scope="module")
def prompts(loaded):
    return parity_prompts(loaded.tokenizer)


@pytest.fixture(scope="module")
def gguf_native():
    from services.common.model_loader import load_engine_model

    lm = load_engine_model("smollm2-135m", "gguf", model_impl="native")
    assert lm.quantization == "gguf" and lm.model.weight_bytes < 110e6  # fp32: 538 MB
    return lm.model


def run_scenario(model, tokenizer, prompts, scenario, logprobs=False):
    from services.worker.engine.engine import PagedEngine

    small = scenario == "preemption"
    longest = max(len(p) for p in prompts) + MAX_NEW
    eng = PagedEngine(model, tokenizer, block_size=8 if small or scenario == "staggered" else 16,
                      num_blocks=-(-longest // 8) + 4 if small else 512,
                      enable_prefix_caching=scenario in ("prefix-hits", "preemption"),
                      max_num_batched_tokens={"staggered": 48, "preemption": 256}.get(scenario, 4096))
    seen = record_logprobs(eng) if logprobs else None
    reqs = [Request(str(i), p, params(MAX_NEW)) for i, p in enumerate(prompts)]
    if scenario == "alone":
        events = {}
        for r in reqs:
            events.update(drive(eng, {0: [r]}))
    elif scenario == "staggered":
        events = drive(eng, {2 * i: [r] for i, r in enumerate(reqs)})
    elif scenario == "prefix-hits":
        drive(eng, {0: reqs[:12]})
        seen and seen.clear()
        events = drive(eng, {i: [r] for i, r in enumerate(reqs)})
        assert sum(1 for evs in events.values() if evs[-1].cached_tokens) >= 9
    else:
        events = drive(eng, {0: reqs})
    if scenario == "preemption":
        assert eng.stats().num_preemptions > 0
    assert_no_leaks(eng)
    return {k: tokens_of(v) for k, v in events.items()}, seen


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_gguf_keeps_greedy_parity_with_the_fp32_dequantised_model(loaded, gguf_native, prompts, scenario, capsys):
    """`loaded` is the fp32 model converted from the same GGUF: the same weight values."""
    refs = fp32_refs(loaded, prompts)
    got, _ = run_scenario(gguf_native, loaded.tokenizer, prompts, scenario)
    ties = check_parity(f"gguf-vs-fp32/{scenario}", got, refs)
    with capsys.disabled():
        print(f"\n[parity] gguf vs fp32 dequantised, {scenario}: {len(refs)} prompts, {ties} near tie(s)")


_FP32: dict = {}


def fp32_refs(loaded, prompts):
    if "refs" not in _FP32:
        loaded.model.set_attn_implementation("sdpa")
        _FP32["refs"] = {str(i): r for i, r in enumerate(reference_greedy(loaded.model, prompts, MAX_NEW))}
    return _FP32["refs"]


@pytest.fixture(scope="module", params=["gguf", "int8", "int4", "nf4"])
def quantized(request, loaded, gguf_native, prompts):
    """(format, engine model, the reference's top-5 logprobs): the reference is transformers' model over the
    same tokenmill layers and packed weights."""
    from services.common.model_loader import load_model
    from services.worker.engine.models.loader import hf_from_hf, native_from_hf, quantized_state

    fmt = request.param
    if fmt == "gguf":
        model, ref = gguf_native, load_model("smollm2-135m", "gguf").model
    else:
        get = quantized_state(loaded.model, fmt)  # quantized once, for both
        model, ref = native_from_hf(loaded.model, fmt, get), hf_from_hf(loaded.model, fmt, get)
    ref.set_attn_implementation("sdpa")
    return fmt, model, {str(i): r for i, r in enumerate(reference_greedy(ref, prompts, MAX_NEW))}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_quantized_engine_close_to_same_module_reference(loaded, quantized, prompts, scenario, capsys):
    fmt, model, refs = quantized
    got, top = run_scenario(model, loaded.tokenizer, prompts, scenario, logprobs=True)
    same = check_logprobs_close(f"{fmt}/{scenario}", got, top, refs)
    with capsys.disabled():
        print(f"\n[logprobs-close] {fmt}, {scenario}: {same} of {len(refs)} prompts identical")


def test_worker_refuses_unknown_quantization_at_start():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "services.cli", "worker", "--quantization", "int3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--quantization 'int3'" in proc.stderr and "gguf, int8, int4, nf4" in proc.stderr


def test_format_group_sizes():
    from services.common.model_loader import pick_quantization

    torch.manual_seed(0)
    w = torch.randn(48, 256)
    assert quant.quantize(w, "int4").group == 32 and quant.quantize(w, "int4/128").group == 128
    assert quant.quantize(w, "int8").group == 256  # per output channel
    coarse = (quant.quantize(w, "int4/128").dequantize() - w).abs().mean()
    assert (quant.quantize(w, "int4").dequantize() - w).abs().mean() < coarse
    assert pick_quantization("int4/64", "smollm2-135m", "cpu") == "int4/64"
    for bad in ("gguf/32", "int4/x", "int3/32"):
        with pytest.raises(ValueError, match="group size"):
            pick_quantization(bad, "smollm2-135m", "cpu")
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        quant.quantize(w, "int4/96")
