"""Weights for tokenmill's decoder: read a checkpoint (GGUF blocks as stored, or safetensors), fuse
QKV and gate-up, and quantise to the requested format.

`--quantization`:
- `none`: float weights (a GGUF is dequantised to float32: the fp32 reference model);
- `gguf`: the GGUF's own Q4_1 / Q8_0 blocks, untouched (F32 tensors stay float);
- `int8` / `int4` / `nf4`: quantised here from float weights (layers/quant.py). The embedding and the
  tied LM head stay 8-bit in every format (int8 per channel for `int8`, q8_0 blocks otherwise): a
  4-bit vocabulary projection costs the most quality for the least memory, as llama.cpp also keeps it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.worker.engine.layers import quant
from services.worker.engine.layers.quant import PackedWeight
from services.worker.engine.models.spec import DecoderSpec, ModelShape

Weight = torch.Tensor | PackedWeight
QUANTIZATIONS = ("auto", "none", "gguf", *quant.QUANTIZED)  # --quantization (auto: engine_model.pick_quantization)
GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def gguf_tensors(path: Path, config: Any) -> dict[str, Weight]:
    """Every tensor of a GGUF under its transformers name: Q4_1 / Q8_0 packed as stored, F32 / F16 as float32.
    llama.cpp stores llama-architecture Q and K rows permuted for its rotary layout: undone row-wise."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    shape = ModelShape.from_config(config)
    heads, kv_heads = shape.num_heads, shape.num_kv_heads
    out: dict[str, Weight] = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        name = (f"model.layers.{parts[1]}.{GGUF_LAYER_NAMES[parts[2]]}" if parts[0] == "blk"
                else GGUF_NAMES.get(stem, stem)) + "." + suffix
        n = int(t.shape[-1]) if len(t.shape) > 1 else 1
        k = int(t.shape[0])
        data = np.asarray(t.data)
        if arch == "llama" and parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            data = _unpermute(data.reshape(n, -1), heads if parts[2] == "attn_q" else kv_heads)
        kind = t.tensor_type.name
        if kind in ("F32", "F16"):
            out[name] = torch.from_numpy(data.astype(np.float32).reshape(n, k) if n > 1 else data.astype(np.float32))
        else:
            out[name] = quant.from_gguf(kind, data.reshape(n, -1), n, k)
    return out


def _unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    half = rows.shape[0] // heads // 2
    return rows.reshape(heads, half, 2, -1).swapaxes(2, 1).reshape(rows.shape)


def checkpoint_tensors(folder: Path) -> Callable[[str], torch.Tensor | None]:
    """A lookup into a safetensors checkpoint (reads each tensor when asked)."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), file))
    if not index:
        raise FileNotFoundError(f"no *.safetensors in {folder}")

    def get(name: str) -> torch.Tensor | None:
        file = index.get(name)
        if file is None:
            return None
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    return get


def convert(parts: list[Weight], fmt: str, dtype: torch.dtype) -> Weight:
    """One linear layer's weight (several parts fused along the rows) in `fmt`; floats in `dtype`. Weights
    already packed in `fmt` (or any GGUF blocks, for `gguf`) are kept as they are."""
    if all(isinstance(p, PackedWeight) and (fmt == "gguf" or (p.fmt, p.group) == _format_group(fmt, p))
           for p in parts):
        return parts[0] if len(parts) == 1 else concat_rows(parts)
    w = torch.cat([to_float(p, dtype) for p in parts]) if len(parts) > 1 else to_float(parts[0], dtype)
    if fmt in ("none", "gguf"):  # a float tensor inside a GGUF stays float
        return w
    return quant.quantize(w, fmt)


def _format_group(fmt: str, p: PackedWeight) -> tuple[str, int]:
    if fmt in ("none", "gguf"):
        return "", 0
    base, group = quant.split_format(fmt)
    return base, group or p.in_features


def to_float(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    return (w.dequantize() if isinstance(w, PackedWeight) else w).to(dtype)


def embedding_format(fmt: str) -> str:
    return fmt if fmt in ("none", "gguf") or fmt.startswith("int8") else "q8_0"


def check_quantization(fmt: str, auto: bool = False) -> None:
    """A `--quantization` value: none, gguf, int8, int4 or nf4 (and auto, where it is still to be picked); a
    quantizing format may name its group size (int4/128)."""
    names = QUANTIZATIONS if auto else QUANTIZATIONS[1:]
    base, _, group = fmt.partition("/")
    if base not in names or (group and (base not in quant.QUANTIZED or not group.isdigit())):
        raise ValueError(f"--quantization {fmt!r}: use one of {', '.join(names)} (int4/128: a group size)")


def assemble(spec: DecoderSpec, get: Callable[[str], Weight | None], fmt: str, dtype: torch.dtype) -> dict[str, Any]:
    """The DecoderModel's weights: fused, in `fmt` (see the module doc), floats in `dtype`."""
    check_quantization(fmt)

    def need(name: str) -> Weight:
        w = get(name)
        if w is None:
            raise KeyError(f"checkpoint has no tensor {name}")
        return w

    def norm(name: str) -> torch.Tensor:
        return to_float(need(name), dtype)

    def bias(names: list[str]) -> torch.Tensor | None:
        parts = [get(n) for n in names]
        return None if all(p is None for p in parts) else torch.cat([to_float(p, dtype) for p in parts])

    embed = convert([need("model.embed_tokens.weight")], embedding_format(fmt), dtype)
    head = get("lm_head.weight")
    head = embed if head is None or spec.tie_word_embeddings else convert([head], embedding_format(fmt), dtype)
    layers = []
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        attn = [p + f"self_attn.{x}_proj" for x in "qkv"]
        layer = {
            "input_layernorm": norm(p + "input_layernorm.weight"),
            "post_attention_layernorm": norm(p + "post_attention_layernorm.weight"),
            "qkv": convert([need(n + ".weight") for n in attn], fmt, dtype),
            "qkv_bias": bias([n + ".bias" for n in attn]),
            "o": convert([need(p + "self_attn.o_proj.weight")], fmt, dtype),
            "o_bias": bias([p + "self_attn.o_proj.bias"]),
            "gate_up": convert([need(p + "mlp.gate_proj.weight"), need(p + "mlp.up_proj.weight")], fmt, dtype),
            "down": convert([need(p + "mlp.down_proj.weight")], fmt, dtype),
        }
        if spec.qk_norm:
            layer["q_norm"] = norm(p + "self_attn.q_norm.weight")
            layer["k_norm"] = norm(p + "self_attn.k_norm.weight")
        layers.append(layer)
    return {"embed": embed, "lm_head": head, "norm": norm("model.norm.weight"), "layers": layers}


def concat_rows(parts: list[PackedWeight]) -> PackedWeight:
    """Stack packed weights of one format along the output rows (fused QKV, gate-up): lossless."""
    first = parts[0]
    if any((p.fmt, p.bits, p.group, p.in_features) != (first.fmt, first.bits, first.group, first.in_features)
           for p in parts):
        raise ValueError("fused projections need one format, group size and input width")
    if all(p.out_features % quant.PANEL == 0 for p in parts):
        def cat(attr: str) -> torch.Tensor | None:
            ts = [p.panel_codes() if attr == "codes" else getattr(p, attr) for p in parts]
            return None if ts[0] is None else torch.cat(ts)
        return PackedWeight(first.fmt, sum(p.out_features for p in parts), first.in_features, first.bits,
                            first.group, cat("codes"), cat("scales"), cat("mins"), first.table)
    codes, scales, mins = zip(*(p.unpack() for p in parts), strict=True)
    return quant.pack(first.fmt, np.concatenate(codes), np.concatenate(scales),
                      None if mins[0] is None else np.concatenate(mins), first.bits, first.group)
