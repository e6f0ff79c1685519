// The whole decoder stack in one call: the same layer as models/decoder.py, op for op and kernel for kernel,
// so a CPU step in fp32 runs no Python per layer (the eager Python loop costs ~1.5 ms a step at batch 1).
// Built once per model from Python (DecoderModel), it holds references to the model's tensors.

#include "decoder.h"

#include <algorithm>

at::Tensor Linear::into(const at::Tensor& x, const at::Tensor& y) const {
  if (!bits) return at::linear_out(const_cast<at::Tensor&>(y), x, weight, bias);
  if (q8) q8_linear_into(x.contiguous(), codes, scales, mins, bias, bits, group, q8_unit, y);
  else quant_linear_into(x.contiguous(), codes, scales, mins, table, bias, bits, group, y);
  return y.size(1) == out ? y : y.narrow(1, 0, out);
}

void Decoder::add_layer(at::Tensor in_norm, at::Tensor post_norm, Linear qkv, Linear o, Linear gate_up, Linear down,
                        c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm, int64_t window) {
  if (!layers_.empty()) {  // forward's buffers are sized by the first layer
    const Layer& f = layers_.front();
    TORCH_CHECK(qkv.width() == f.qkv.width() && o.width() == f.o.width() && gate_up.width() == f.gate_up.width() &&
                gate_up.out == f.gate_up.out, "every layer must have the first layer's shapes");
  }
  layers_.push_back({in_norm, post_norm, std::move(qkv), std::move(o), std::move(gate_up), std::move(down), q_norm,
                     k_norm, window});
}

static at::Tensor head_norm(const at::Tensor& x, int64_t heads, const at::Tensor& w, double eps) {
  const int64_t t = x.size(0);
  return rms_norm(x.reshape({t * heads, -1}).contiguous(), w, eps, c10::nullopt).reshape({t, -1});
}

at::Tensor Decoder::forward(at::Tensor h, const Step& s, const std::vector<at::Tensor>& k_caches,
                            const std::vector<at::Tensor>& v_caches, at::Tensor final_norm, int64_t num_layers) const {
  const int64_t n = num_layers > 0 ? std::min<int64_t>(num_layers, layers_.size()) : layers_.size();
  const int64_t qs = heads_ * head_dim_, kvs = kv_heads_ * head_dim_, T = h.size(0);
  std::unique_lock<std::mutex> own(buffers_mu_, std::try_to_lock);  // a concurrent forward allocates its own
  Buffers spare;
  Buffers& b = own.owns_lock() ? buffers_ : spare;
  if (b.rows != T && n > 0) {
    const Layer& l = layers_[0];
    const auto o = h.options();
    b = {T, at::empty({T, h.size(1)}, o), at::empty({T, l.qkv.width()}, o), at::empty({T, qs}, o),
         at::empty({T, l.o.width()}, o), at::empty({T, l.gate_up.width()}, o), at::empty({T, l.gate_up.out / 2}, o)};
  }
  at::Tensor residual;  // undefined before the first layer: nothing to add
  for (int64_t i = 0; i < n; ++i) {
    const Layer& l = layers_[i];
    rms_norm_into(h, l.in_norm, eps_, residual, b.x);
    if (i == 0) residual = h;
    at::Tensor qkv = l.qkv.into(b.x, b.qkv), q = qkv;
    if (l.q_norm.has_value()) {  // normed copies of q and k, then as below
      q = head_norm(qkv.narrow(1, 0, qs), heads_, *l.q_norm, eps_);
      at::Tensor k = head_norm(qkv.narrow(1, qs, kvs), kv_heads_, *l.k_norm, eps_);
      rotary(q, heads_, s.positions, s.cos, s.sin);
      rotary(k, kv_heads_, s.positions, s.cos, s.sin);
      write_kv(k, qkv.narrow(1, qs + kvs, kvs), k_caches[i], v_caches[i], s.slots);
    } else {  // q and k side by side in qkv's rows: one rotary over both heads, K and V read where they lie
      rotary(qkv, heads_ + kv_heads_, s.positions, s.cos, s.sin);
      write_kv_columns(qkv, qs, qs + kvs, k_caches[i], v_caches[i], s.slots);
    }
    paged_attention_into(q, k_caches[i], v_caches[i], s.block_tables, s.token_seq, s.token_pos, heads_, l.window,
                         scale_, b.attn);
    h = l.o.into(b.attn, b.h);
    rms_norm_into(h, l.post_norm, eps_, residual, b.x);
    silu_mul_into(l.gate_up.into(b.x, b.gate_up), b.act);
    h = l.down.into(b.act, b.h);
  }
  return rms_norm(h, final_norm, eps_, residual);
}
