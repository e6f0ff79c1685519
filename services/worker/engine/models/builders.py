"""Models in a tokenmill weight format, from a checkpoint's tensors:

- `native_model`: tokenmill's DecoderModel (fused projections);
- `hf_model`: transformers' own model for the same config whose linear and embedding modules are
  tokenmill's layers over the same weights: `--model-impl transformers`, the `hf-static` engine, and the
  reference the tests compare a quantized engine with (same weights, same quantized module).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from services.common.model_loader import EMBEDDED, embedded_gguf
from services.worker.engine.layers.hugepages import move_weights
from services.worker.engine.layers.linear import Embedding, Linear, lm_head, set_activations
from services.worker.engine.models.decoder import DecoderModel
from services.worker.engine.models.spec import DecoderSpec, Unsupported
from services.worker.engine.models.weights import (
    Weight,
    assemble,
    check_quantization,
    checkpoint_tensors,
    convert,
    embedding_format,
    gguf_tensors,
    to_float,
)


def load_config(path: str) -> tuple[Any, Any]:
    """(config, generation config or None) of a checkpoint folder or hub id."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(path)
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    return config, generation


def weight_source(spec: str, path: str, config: Any, fmt: str) -> Callable[[str], Weight | None]:
    """Tensor lookup by transformers name: the embedded GGUF's blocks for `gguf`, else safetensors."""
    if fmt == "gguf":
        if spec not in EMBEDDED:
            raise ValueError(f"--quantization gguf keeps a GGUF file's own blocks: {spec!r} is not a GGUF model "
                             f"(the embedded {', '.join(EMBEDDED)} is); use int8, int4 or nf4 for other checkpoints")
        return gguf_tensors(embedded_gguf(spec), config).get
    folder = Path(path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors"]))
    return checkpoint_tensors(folder)


def check_device(fmt: str, device: str) -> None:
    """tokenmill's formats run its C++ kernels on a CPU and its Triton kernels on CUDA; nothing else."""
    from services.worker.engine.layers import gpu

    if device != "cpu" and fmt not in ("none", "auto") and not gpu.applies(torch.device(device)):
        raise Unsupported(f"--quantization {fmt} on {device} needs tokenmill's Triton kernels (CUDA with Triton); "
                          "use none, or nf4 with --model-impl transformers (bitsandbytes)")


def native_model(config: Any, generation: Any, get: Callable[[str], Weight | None], fmt: str, device: str,
                 dtype: torch.dtype, activations: str = "fp32") -> DecoderModel:
    spec = DecoderSpec.from_config(config)
    check_device(fmt, device)
    if device != "cpu":  # quantise on the device: seconds for a 1.5B model on a GPU, minutes on a few cores
        read = get

        def get(name: str) -> Weight | None:
            w = read(name)
            return w.to(device) if isinstance(w, torch.Tensor) else w

    model = DecoderModel(config, assemble(spec, get, fmt, dtype), generation).to(device)
    if device == "cpu":
        # the codes' layout first (int8 activations reorder them into new tensors): the 2 MiB pages then hold the
        # codes the kernels read (after the move, the reordered codes sat in 4 KiB pages: decode b1 1.07x slower)
        set_activations(model, activations)
        move_weights(model)
    return model.eval()


def quantized_state(model: nn.Module, fmt: str) -> Callable[[str], Weight | None]:
    """`model`'s tensors by name, its linear layers' weights quantized to `fmt` once (the embedding and LM
    head to their 8-bit format): feed it to both builders and they share the same packed values."""
    state = model.state_dict()
    if fmt == "none":
        return state.get
    embed = {n + ".weight" for n, m in model.named_modules() if m in (model.get_input_embeddings(),
                                                                        model.get_output_embeddings())}
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    packed = {n: convert([state[n]], embedding_format(fmt) if n in embed else fmt, state[n].dtype)
              for n in linear | embed if n in state}
    return lambda name: packed.get(name, state.get(name))


def native_from_hf(model: nn.Module, fmt: str = "none",
                   get: Callable[[str], Weight | None] | None = None) -> DecoderModel:
    """tokenmill's forward over an in-memory transformers model's weights (tests and benchmarks)."""
    p = next(model.parameters())
    return native_model(model.config, model.generation_config, get or quantized_state(model, fmt), fmt,
                        p.device.type, p.dtype)


def hf_from_hf(model: nn.Module, fmt: str, get: Callable[[str], Weight | None] | None = None) -> nn.Module:
    """transformers' model over tokenmill's layers with `model`'s weights quantized to `fmt`: the reference
    for a quantized engine (pass the same `get` to native_from_hf for the same packed values)."""
    ref = hf_model(model.config, get or quantized_state(model, fmt), fmt, next(model.parameters()).dtype)
    ref.generation_config = model.generation_config
    return ref


def quantized_hf_model(spec: str, path: str, fmt: str, device: str, dtype: torch.dtype,
                       attn_implementation: str | None = None) -> nn.Module:
    """transformers' model of a checkpoint over tokenmill's layers in `fmt`, on `device` (the worker's
    `--model-impl transformers` and `--engine hf-static` with gguf / int8 / int4 / nf4 weights)."""
    check_device(fmt, device)
    config, generation = load_config(path)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = hf_model(config, weight_source(spec, path, config, fmt), fmt, dtype).to(device)
    model.generation_config = generation
    return model


def hf_model(config: Any, get: Callable[[str], Weight | None], fmt: str, dtype: torch.dtype) -> nn.Module:
    """transformers' model for `config` over tokenmill's layers and weights in `fmt` (unfused)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    check_quantization(fmt)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    embed_fmt = embedding_format(fmt)
    embed_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    embed = convert([get(embed_name + ".weight")], embed_fmt, dtype)
    for name, module in list(model.named_modules()):
        if module is model.get_input_embeddings():
            layer = Embedding(embed)
            layer.dtype = dtype
        elif module is model.get_output_embeddings():
            head = get(name + ".weight")
            tied = head is None or getattr(config, "tie_word_embeddings", False)
            layer = lm_head(embed if tied else convert([head], embed_fmt, dtype))
        elif isinstance(module, nn.Linear):
            bias = get(name + ".bias")
            layer = Linear(convert([get(name + ".weight")], fmt, dtype),
                           None if bias is None else to_float(bias, torch.float32))
        else:
            for pname, param in module.named_parameters(recurse=False):
                param.data = to_float(get(f"{name}.{pname}"), dtype)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model.eval()
