// The whole decoder stack in one call: the same layer as models/decoder.py, op for op and kernel for kernel,
// so a CPU step in fp32 runs no Python per layer (the eager Python loop costs ~1.5 ms a step at batch 1).
// Built once per model from Python (DecoderModel), it holds references to the model's tensors.

#include "decoder.h"

#include <algorithm>

at::Tensor Linear::operator()(const at::Tensor& x) const {
  if (bits) {
    at::Tensor y = q8 ? q8_linear(x.contiguous(), codes, scales, mins, bias, bits, group, q8_unit)
                      : quant_linear(x.contiguous(), codes, scales, mins, table, bias, bits, group);
    return y.size(1) == out ? y : y.narrow(1, 0, out);
  }
  return at::linear(x, weight, bias);
}

void Decoder::add_layer(at::Tensor in_norm, at::Tensor post_norm, Linear qkv, Linear o, Linear gate_up, Linear down,
                        c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm, int64_t window) {
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
  const int64_t qs = heads_ * head_dim_, kvs = kv_heads_ * head_dim_;
  at::Tensor residual;
  for (int64_t i = 0; i < n; ++i) {
    const Layer& l = layers_[i];
    at::Tensor x;
    if (i == 0) {
      residual = h;
      x = rms_norm(h, l.in_norm, eps_, c10::nullopt);
    } else {
      x = rms_norm(h, l.in_norm, eps_, residual);
    }
    at::Tensor qkv = l.qkv(x), q = qkv;
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
    at::Tensor a = paged_attention(q, k_caches[i], v_caches[i], s.block_tables, s.token_seq, s.token_pos, heads_,
                                   l.window, scale_);
    h = l.o(a);
    x = rms_norm(h, l.post_norm, eps_, residual);
    h = l.down(silu_mul(l.gate_up(x)));
  }
  return rms_norm(h, final_norm, eps_, residual);
}
