"""Phase 8 — attention variants: KV cache bytes per token of MHA, GQA, MQA and MLA at the same model width.

Small plain-PyTorch decode layers at the embedded model's width (hidden 576, 9 query heads of 64, 30 layers):
- MHA caches K and V for all 9 heads; GQA (SmolLM2's own: 3 KV heads) and MQA (1) share K/V across groups;
- MLA (DeepSeek-V2 style) caches one latent c_kv of d_c = 4·head_dim per token plus a shared RoPE key of
  head_dim/2, and up-projects K/V from the latent at attention time (no weight absorption here).
Each layer decodes T tokens into a preallocated cache; the cache tensors' bytes are measured and checked
against the formula, then the max batch at a fixed KV budget and context follows. The GQA row is also checked
against the engine's own pool layout (`KVCache.bytes_per_block`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bench.phases.common import Options, setup_of, timeit, write_results

PHASE, TITLE = "attention-variants", "Phase 8 — attention variants: KV bytes per token"
D, HEADS, DIM, LAYERS = 576, 9, 64, 30


class DecodeAttention(nn.Module):
    """One attention layer that decodes a token at a time into its own preallocated cache."""

    def __init__(self, kind: str, kv_heads: int = HEADS, latent: int = 4 * DIM, rope: int = DIM // 2) -> None:
        super().__init__()
        self.kind, self.kv_heads, self.latent, self.rope = kind, kv_heads, latent, rope
        self.q = nn.Linear(D, HEADS * DIM, bias=False)
        self.o = nn.Linear(HEADS * DIM, D, bias=False)
        if kind == "mla":
            self.down = nn.Linear(D, latent + rope, bias=False)  # c_kv and the decoupled RoPE key
            self.up_k = nn.Linear(latent, HEADS * (DIM - rope), bias=False)
            self.up_v = nn.Linear(latent, HEADS * DIM, bias=False)
        else:
            self.kv = nn.Linear(D, 2 * kv_heads * DIM, bias=False)
        self.cache: list[torch.Tensor] = []
        self.pos = 0

    def allocate(self, batch: int, max_len: int, dtype: torch.dtype, device: str) -> None:
        shapes = [(batch, max_len, self.latent + self.rope)] if self.kind == "mla" else \
            [(batch, self.kv_heads, max_len, DIM)] * 2
        self.cache = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
        self.pos = 0

    def cache_bytes(self) -> int:
        return sum(t.nbytes for t in self.cache)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [B, 1, D]
        b, p = x.shape[0], self.pos
        q = self.q(x).view(b, 1, HEADS, DIM).transpose(1, 2)
        if self.kind == "mla":
            self.cache[0][:, p] = self.down(x)[:, 0]
            c = self.cache[0][:, : p + 1]
            lat, k_rope = c[..., : self.latent], c[..., self.latent:]
            k_nope = self.up_k(lat).view(b, p + 1, HEADS, DIM - self.rope)
            k = torch.cat([k_nope, k_rope[:, :, None].expand(b, p + 1, HEADS, self.rope)], -1).transpose(1, 2)
            v = self.up_v(lat).view(b, p + 1, HEADS, DIM).transpose(1, 2)
        else:
            kv = self.kv(x).view(b, 2, self.kv_heads, DIM)
            self.cache[0][:, :, p], self.cache[1][:, :, p] = kv[:, 0], kv[:, 1]
            k, v = self.cache[0][:, :, : p + 1], self.cache[1][:, :, : p + 1]
        self.pos += 1
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=k.shape[1] != HEADS)
        return self.o(out.transpose(1, 2).reshape(b, 1, HEADS * DIM))


VARIANTS = {"MHA": ("mha", HEADS), "GQA (SmolLM2)": ("gqa", 3), "MQA": ("mqa", 1), "MLA": ("mla", 0)}


def formula_bytes(kind: str, kv_heads: int, esize: int) -> int:
    """KV cache bytes per token per layer."""
    return (4 * DIM + DIM // 2) * esize if kind == "mla" else 2 * kv_heads * DIM * esize


def run(opts: Options) -> dict:
    dev = opts.device
    dtype = torch.bfloat16 if opts.cuda else torch.float32
    esize = torch.finfo(dtype).bits // 8
    tokens = opts.pick(64, 512, "tokens")
    batch = opts.pick(4, 32, "batch")
    budget = opts.pick(4 * 2**30, 40 * 2**30, "kv_budget_bytes")
    context = opts.pick(4096, 8192, "context")
    torch.manual_seed(0)
    rows = []
    for name, (kind, kv_heads) in VARIANTS.items():
        layer = DecodeAttention(kind, kv_heads or HEADS).to(dev, dtype).eval()
        layer.allocate(batch, tokens, dtype, dev)
        x = torch.randn(batch, 1, D, device=dev, dtype=dtype)
        with torch.inference_mode():
            for _ in range(tokens):
                layer(x)
            measured = layer.cache_bytes() / (batch * tokens)
            layer.pos = tokens - 1  # time one more token at full context (overwrites the last slot)

            def step(layer=layer, x=x):
                layer.pos = tokens - 1
                layer(x)
            ms = 1e3 * timeit(step, dev, repeat=opts.pick(5, 20, "repeat"))
        per_token = formula_bytes(kind, kv_heads, esize)
        model_token = per_token * LAYERS
        rows.append({"variant": name, "kv_heads": kv_heads or "latent", "cached_values_per_token_layer":
                     per_token // esize, "bytes_per_token_layer": per_token, "measured_bytes_per_token_layer":
                     measured, "KiB_per_token_model": model_token / 1024, "x_vs_MHA": 0.0,
                     f"max_batch_{context}ctx": budget // (model_token * context), "decode_ms_layer": ms,
                     "params_M": sum(p.numel() for p in layer.parameters()) / 1e6})
    for r in rows:
        r["x_vs_MHA"] = rows[0]["bytes_per_token_layer"] / r["bytes_per_token_layer"]

    from services.worker.engine.kv_cache import KVCache

    engine_token = KVCache.bytes_per_block(LAYERS, 3, DIM, 16, dtype) / 16
    gqa_token = rows[1]["KiB_per_token_model"] * 1024
    summary = {
        "all measured == formula": all(r["measured_bytes_per_token_layer"] == r["bytes_per_token_layer"]
                                       for r in rows),
        "engine pool bytes/token (GQA, 30 layers) vs formula": f"{engine_token:.0f} vs {gqa_token:.0f}",
        "KV budget / context": f"{budget / 2**30:.0f} GiB / {context} tokens ({str(dtype).replace('torch.', '')})",
        "max batch MHA / GQA / MQA / MLA": " / ".join(str(r[f"max_batch_{context}ctx"]) for r in rows),
    }

    def plot(fig):
        ax1, ax2 = fig.subplots(1, 2)
        names = [r["variant"] for r in rows]
        ax1.bar(names, [r["KiB_per_token_model"] for r in rows], color="tab:blue")
        ax1.set(ylabel="KiB per token (30 layers)", title="KV cache per token")
        ax2.bar(names, [r[f"max_batch_{context}ctx"] for r in rows], color="tab:green")
        ax2.set(ylabel="sequences", title=f"max batch: {budget / 2**30:.0f} GiB KV, {context}-token context")
        for ax in (ax1, ax2):
            ax.tick_params(axis="x", labelsize=8)

    config = {"hidden": D, "heads": HEADS, "head_dim": DIM, "layers": LAYERS, "mla_latent": 4 * DIM,
              "mla_rope_dim": DIM // 2, "dtype": str(dtype), "tokens": tokens, "batch": batch,
              "kv_budget_bytes": budget, "context": context}
    notes = ["measured = bytes of the layer's cache tensors after decoding, per token (preallocated for T tokens).",
             "MLA trades memory for compute: without weight absorption every step up-projects the whole latent "
             "cache (decode_ms_layer); absorbing W_uk into W_q and W_uv into W_o removes that."]
    return write_results(PHASE, TITLE, opts, config=config, rows=rows, summary=summary, plot=plot, notes=notes,
                         setup=setup_of(fmt="n/a (random fp32 layers)", forward="plain PyTorch decode layers",
                                        kernels="PyTorch", device=opts.device, dtype=dtype),
                         columns=["variant", "kv_heads", "cached_values_per_token_layer", "bytes_per_token_layer",
                                  "measured_bytes_per_token_layer", "KiB_per_token_model", "x_vs_MHA",
                                  f"max_batch_{context}ctx", "decode_ms_layer", "params_M"])
