"""The model an engine runs, from a `--model` value: which weight format (`--quantization`), which forward
(tokenmill's native one or transformers' modules, `--model-impl`), on which device. The judge's local
backend loads its scorer through `load_model` too."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from services.common.model_loader import EMBEDDED, load_tokenizer, pick_device, pick_dtype, resolve
from services.worker.engine.layers.linear import set_activations
from services.worker.engine.models.builders import load_config, native_model, quantized_hf_model, weight_source
from services.worker.engine.models.spec import ModelShape, Unsupported
from services.worker.engine.models.weights import check_quantization

log = logging.getLogger("tokenmill.model")

MODEL_IMPLS = ("auto", "native", "transformers")


@dataclass(slots=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    spec: str
    path: str
    device: str
    dtype: Any
    quantization: str
    activations: str = "fp32"

    @property
    def context_length(self) -> int:
        return ModelShape.from_config(self.model.config).context_length


def pick_quantization(quantization: str, spec: str, device: str) -> str:
    """`auto`: the embedded GGUF's own 4-bit blocks on a CPU (`gguf`), float weights elsewhere."""
    if quantization == "auto":
        return "gguf" if spec in EMBEDDED and device == "cpu" else "none"
    check_quantization(quantization)
    return quantization


def load_model(
    spec: str,
    quantization: str = "none",
    device: str = "auto",
    dtype: str = "auto",
    attn_implementation: str | None = None,
) -> LoadedModel:
    """transformers' model and the tokenizer. `none`: the float checkpoint; `nf4` on CUDA: bitsandbytes;
    gguf / int8 / int4 (and nf4 on a CPU): tokenmill's quantized layers inside transformers' model (on CUDA
    their Triton kernels)."""
    from transformers import AutoModelForCausalLM

    path = resolve(spec)
    dev = pick_device(device)
    quantization = pick_quantization(quantization, spec, dev)
    torch_dtype = pick_dtype(dtype, dev)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization == "nf4" and dev.startswith("cuda"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        )
        kwargs["device_map"] = dev
    if quantization == "none" or "quantization_config" in kwargs:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        if quantization == "none":
            model.to(dev)
    else:
        model = quantized_hf_model(spec, path, quantization, dev, torch_dtype, attn_implementation)
    model.eval()
    tokenizer = load_tokenizer(spec)
    return LoadedModel(model, tokenizer, spec, path, dev, torch_dtype, quantization)


def load_engine_model(spec: str, quantization: str = "auto", device: str = "auto", dtype: str = "auto",
                      model_impl: str = "auto", activations: str = "fp32") -> LoadedModel:
    """The paged engine's model: tokenmill's own forward (`native`) where it covers the architecture and
    device (`auto` falls back to transformers' modules, and says why), else transformers'. `activations`:
    the quantized layers' activation precision (layers/linear.py set_activations)."""
    loaded = _engine_model(spec, quantization, device, dtype, model_impl, activations)
    set_activations(loaded.model, activations)  # the transformers path's; the native builder's already chose
    loaded.activations = activations
    return loaded


def _engine_model(spec: str, quantization: str, device: str, dtype: str, model_impl: str,
                  activations: str) -> LoadedModel:
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"unknown --model-impl {model_impl!r}: use one of {', '.join(MODEL_IMPLS)}")
    if model_impl == "transformers":
        return load_model(spec, quantization, device, dtype)
    path = resolve(spec)
    dev = pick_device(device)
    quantization = pick_quantization(quantization, spec, dev)
    torch_dtype = pick_dtype(dtype, dev)
    config, generation = load_config(path)
    try:
        model = native_model(config, generation, weight_source(spec, path, config, quantization), quantization, dev,
                             torch_dtype, activations)
    except Unsupported as exc:
        if model_impl == "native":
            raise ValueError(f"--model-impl native: {exc}") from exc
        log.info("native forward not used (%s): transformers' modules run the model", exc)
        return load_model(spec, quantization, device, dtype)
    return LoadedModel(model, load_tokenizer(spec), spec, path, dev, torch_dtype, quantization)
