"""tokenmill's own forward for the Llama / Qwen2 / Qwen3 / Mistral decoders over the paged cache.

One packed row of T tokens per step (decodes first, then prefill chunks); per layer: fused RMSNorm
(+ residual), one QKV projection, rotary in place, paged attention, output projection, fused RMSNorm,
one gate-up projection, SiLU * up, down projection. The step's metadata (StepContext) is built once
by the model runner.

On CUDA the loop below runs Triton kernels (rotary fused with the KV-cache write; layers/gpu/) and a
decode-only step is replayed from a CUDA graph (cuda_graphs.py). On a CPU in float32 the same layer loop
runs as one C++ call (layers/csrc/decoder.cpp: the same kernels in the same order, so the same numbers; no
Python per layer); the loop below is that path's reference and serves every other device and dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from services.worker.engine.attention import attend
from services.worker.engine.layers import kernels, ops
from services.worker.engine.layers.linear import Embedding, Linear, lm_head, weight_bytes
from services.worker.engine.models.spec import DecoderSpec, rotary_tables
from services.worker.engine.step import StepContext


class DecoderLayer(nn.Module):
    def __init__(self, spec: DecoderSpec, index: int, w: dict[str, Any]) -> None:
        super().__init__()
        self.index, self.window = index, spec.windows[index]
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_size, self.kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.eps, self.scale = spec.rms_norm_eps, spec.head_dim**-0.5
        self.input_norm = nn.Parameter(w["input_layernorm"], requires_grad=False)
        self.post_norm = nn.Parameter(w["post_attention_layernorm"], requires_grad=False)
        self.qkv = Linear(w["qkv"], w.get("qkv_bias"))
        self.o = Linear(w["o"], w.get("o_bias"))
        self.gate_up = Linear(w["gate_up"])
        self.down = Linear(w["down"])
        self.q_norm = nn.Parameter(w["q_norm"], requires_grad=False) if spec.qk_norm else None
        self.k_norm = nn.Parameter(w["k_norm"], requires_grad=False) if spec.qk_norm else None

    def forward(self, h: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext, cos: torch.Tensor,
                sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = h
            x = ops.rms_norm(h, self.input_norm, self.eps)
        else:
            x = ops.rms_norm(h, self.input_norm, self.eps, residual)
        qkv = self.qkv.forward(x)  # .forward: no module hooks on the hot path
        q, k, v = qkv.split_with_sizes((self.q_size, self.kv_size, self.kv_size), dim=-1)
        if self.q_norm is not None:
            q = ops.head_rms_norm(q, self.num_heads, self.q_norm, self.eps)
            k = ops.head_rms_norm(k, self.num_kv_heads, self.k_norm, self.eps)
        if ctx.kv.triton:  # rotary and the KV-cache write in one kernel; attention finds k, v in the cache
            from services.worker.engine.layers.gpu import elementwise

            elementwise.rotary_kv_write(q, k, v, ctx.positions, ctx.slot_mapping, cos, sin, ctx.kv.k[self.index],
                                        ctx.kv.v[self.index], self.num_heads)
            k = v = None
        else:
            q = ops.rotary(q, self.num_heads, ctx.positions, cos, sin)
            k = ops.rotary(k, self.num_kv_heads, ctx.positions, cos, sin)
        a = attend(ctx, self.index, q, k, v, self.num_heads, self.window, self.scale)
        h = self.o.forward(a)
        x = ops.rms_norm(h, self.post_norm, self.eps, residual)
        return self.down.forward(ops.silu_mul(self.gate_up.forward(x))), residual


class DecoderModel(nn.Module):
    """The causal LM: embeddings, layers, final norm, LM head. `config` / `generation_config` are the
    checkpoint's, so the engine reads EOS ids and limits as it does from a transformers model."""

    def __init__(self, config: Any, weights: dict[str, Any], generation_config: Any = None) -> None:
        super().__init__()
        self.config, self.generation_config = config, generation_config
        self.spec = spec = DecoderSpec.from_config(config)
        self.embed = Embedding(weights["embed"])
        self.layers = nn.ModuleList(DecoderLayer(spec, i, weights["layers"][i]) for i in range(spec.num_layers))
        self.norm = nn.Parameter(weights["norm"], requires_grad=False)
        self.lm_head = lm_head(weights["lm_head"])
        cos, sin = rotary_tables(config, spec.context_length)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.use_fused = True  # the C++ layer loop where it applies (tests turn it off to compare)
        self._fused: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.device

    @property
    def weight_bytes(self) -> int:
        return weight_bytes(self)

    def forward(self, input_ids: torch.Tensor, ctx: StepContext, num_layers: int | None = None) -> torch.Tensor:
        """input_ids [T] -> final-normed hidden states [T, hidden] (after the first num_layers layers)."""
        h = self.embed.forward(input_ids)  # .forward: no module hooks on the hot path
        if h.dtype != self.norm.dtype:
            h = h.to(self.norm.dtype)
        fused = self._fused_decoder() if self.use_fused and not ctx.kv.triton else None
        if fused is not None:
            ops_ = kernels.load()
            step = ops_.Step(ctx.positions, ctx.slot_mapping, ctx.block_tables, ctx.token_seq, ctx.token_pos,
                             self.cos, self.sin)
            return fused.forward(h, step, ctx.kv.k, ctx.kv.v, self.norm, num_layers or 0)
        residual = None
        cos, sin = self.cos, self.sin
        for i, layer in enumerate(self.layers):
            if i == num_layers:
                break
            h, residual = layer.forward(h, residual, ctx, cos, sin)
        return ops.rms_norm(h, self.norm, self.spec.rms_norm_eps, residual)

    def _fused_decoder(self) -> Any:
        """The C++ layer loop, built on first use: CPU, float32, attention shapes the kernel takes."""
        if self._fused is None:
            spec, k = self.spec, kernels.cpu_ops(self.device, self.dtype)
            self._fused = False
            if k is not None and kernels.attention_fits(spec.head_dim, spec.num_heads, spec.num_kv_heads):
                self._fused = k.Decoder(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.rms_norm_eps,
                                        spec.head_dim**-0.5)
                for layer in self.layers:
                    self._fused.add_layer(layer.input_norm, layer.post_norm, *(_kernel_linear(k, lin) for lin in (
                        layer.qkv, layer.o, layer.gate_up, layer.down)), layer.q_norm, layer.k_norm, layer.window or 0)
        return self._fused or None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> [rows, vocab]."""
        return self.lm_head.forward(hidden)


def _kernel_linear(k: Any, layer: Linear) -> Any:
    p = layer.packed
    if p is None:
        return k.Linear(layer.weight, None, None, None, None, layer.bias, 0, 0, layer.out_features, False, 0)
    q8 = layer.uses_q8()
    return k.Linear(None, p.codes, p.scales, p.mins, p.table, layer.kernel_bias, p.bits, p.group, layer.out_features,
                    q8, kernels.q8_unit() if q8 else 0)
