"""What tokenmill's own forward needs to know of a decoder, read from its transformers config."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # static tables; dynamic and longrope depend on the length


class Unsupported(ValueError):
    """The native forward does not cover this model; `--model-impl auto` falls back to transformers."""


def text_config(config: Any) -> Any:
    """The language model's config (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@dataclass(slots=True)
class ModelShape:
    """What the engines, the KV pool and the loader read of any decoder's config (tokenmill's forward or
    transformers' modules)."""

    context_length: int  # max_position_embeddings; 2048 where the config has none
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    windows: list[int | None]  # per layer: sliding window or None
    # the window every layer shares (Mistral; Qwen2 with all layers sliding), else None: only then can blocks
    # that left the window be freed (mixed models keep all blocks and mask per layer)
    window: int | None

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        cfg = text_config(config)
        heads = cfg.num_attention_heads
        layers = cfg.num_hidden_layers
        window = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if types is not None:
            windows = [window if t == "sliding_attention" else None for t in types]
        else:
            windows = [window] * layers  # Mistral: every layer, when set
        windows = [int(w) if w else None for w in windows]
        return cls(
            context_length=int(getattr(cfg, "max_position_embeddings", 0) or 2048), num_layers=layers,
            num_heads=heads, num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, windows=windows,
            window=windows[0] if windows and all(w == windows[0] for w in windows) else None,
        )


@dataclass(slots=True)
class DecoderSpec(ModelShape):
    """The shape plus what tokenmill's own forward needs; only for the architectures it covers."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head's q and k before the rotary embedding

    @classmethod
    def from_config(cls, config: Any) -> DecoderSpec:
        cfg = text_config(config)
        kind = getattr(cfg, "model_type", "")
        if kind not in ARCHITECTURES:
            raise Unsupported(f"model type {kind!r}: the native forward covers {', '.join(ARCHITECTURES)}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise Unsupported(f"activation {cfg.hidden_act!r}: the native forward uses SiLU")
        rope = rope_parameters(cfg)
        if rope.get("rope_type", "default") not in ROPE_TYPES:
            raise Unsupported(f"rope type {rope.get('rope_type')!r}: the native forward covers {', '.join(ROPE_TYPES)}")
        shape = ModelShape.from_config(cfg)
        return cls(
            **{f.name: getattr(shape, f.name) for f in fields(ModelShape)}, model_type=kind,
            hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qk_norm=kind == "qwen3",
        )


def rope_parameters(cfg: Any) -> dict:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    return dict(params)


def rotary_tables(config: Any, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [length, head_dim / 2] as transformers computes them (its own rope initialisers, then
    position * inv_freq, cos / sin, times the attention scaling)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary = LlamaRotaryEmbedding(text_config(config))
    freqs = torch.arange(length, dtype=torch.long)[:, None].float() * rotary.inv_freq.float()[None, :]
    return freqs.cos() * rotary.attention_scaling, freqs.sin() * rotary.attention_scaling
