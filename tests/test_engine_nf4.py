"""NF4 (bitsandbytes 4-bit) weights run in the paged engine: greedy tokens equal the same model's generate.

bitsandbytes picks its 4-bit kernel by input shape (a GEMV for one row, dequantise + matmul otherwise), and
the two differ by a few 1e-2 in the logits even inside transformers (one token at a time vs two at once), so
the near-tie rule here allows gaps up to NF4_TIE instead of fp32's 1e-3.
"""

from __future__ import annotations

import pytest
import torch
from engine_support import (
    assert_no_leaks,
    check_parity,
    drive,
    one_thread,  # noqa: F401  (module fixture)
    reference_greedy,
    tokens_of,
)

from services.common.sampling import SamplingParams
from services.worker.engine.types import Request

NF4_TIE = 0.1

pytestmark = pytest.mark.usefixtures("one_thread")


def test_nf4_model_in_paged_engine():
    pytest.importorskip("bitsandbytes")
    from services.common.model_loader import load_model
    from services.worker.engine.engine import PagedEngine

    lm = load_model("smollm2-135m", quantization="nf4")
    assert lm.quantization == "nf4" and "4bit" in type(lm.model.model.layers[0].mlp.up_proj).__name__
    tok = lm.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in ("What is 2+2?", "Name a color.")]
    refs = {str(i): r for i, r in enumerate(reference_greedy(lm.model, prompts, 5))}
    engine = PagedEngine(lm.model, tok, num_blocks=32)
    assert engine.runner.dtype == torch.float32  # the compute dtype on CPU; bf16 on CUDA
    events = drive(engine, {0: [Request(str(i), p, SamplingParams(max_tokens=5, temperature=0.0))
                                for i, p in enumerate(prompts)]})
    ties = check_parity("nf4", {k: tokens_of(v) for k, v in events.items()}, refs, tie_gap=NF4_TIE)
    print(f"[parity] nf4: {len(refs)} prompts, {ties} near tie(s) (gap <= {NF4_TIE})")
    assert_no_leaks(engine)
