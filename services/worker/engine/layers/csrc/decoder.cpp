// The whole decoder stack in one call: the same layer as models/decoder.py, op for op and kernel for kernel,
// so a CPU step in fp32 runs no Python per layer (the eager Python loop costs ~1.5 ms a step at batch 1).
// Built once per model from Python (DecoderModel), it holds references to the model's tensors.

#include "decoder.h"

#include <algorithm>

at::Tensor Linear::into(const at::Tensor& x, const at::Tensor& y) const {
  if (!bits) return at::linear_out(const_cast<at::Tensor&>(y), x, weight, bias);
  TORCH_CHECK(x.is_contiguous() && x.size(1) == w.K && y.is_contiguous() && y.size(0) == x.size(0) &&
              y.size(1) == width(), "packed linear: x [M, K] and y [M, width] contiguous");
  if (q8) q8_linear_raw(w, x.data_ptr<float>(), x.size(0), bias_ptr, q8_unit, y.data_ptr<float>());
  else quant_linear_raw(w, x.data_ptr<float>(), x.size(0), bias_ptr, y.data_ptr<float>());
  return y.size(1) == out ? y : y.narrow(1, 0, out);
}

void Linear::prepare() {
  if (!bits) return;
  const int64_t K = codes.size(1) * 8 / (bits * kPanelRows);
  const auto f32 = scales.options().dtype(at::kFloat);
  const at::Tensor x = at::zeros({1, K}, f32), y = at::empty({1, width()}, f32);
  if (q8) q8_linear_into(x, codes, scales, mins, bias, bits, group, q8_unit, y);  // its checks, once
  else quant_linear_into(x, codes, scales, mins, table, bias, bits, group, y);
  w = packed_weights(codes, scales, mins, q8 ? c10::optional<at::Tensor>() : table, bits, group);
  bias_ptr = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
}

// Five torch.tensor calls and a .to from Python were ~85 us of a batch-1 decode step on Zen 4 (cold code: the
// weight stream empties the caches every step); this one call ~40.
std::vector<at::Tensor> step_tensors(const std::vector<int64_t>& ids, const std::vector<int64_t>& pos,
                                     const std::vector<int64_t>& token_seq,
                                     const std::vector<std::vector<int64_t>>& tables, int64_t block_size) {
  const int64_t T = pos.size(), B = tables.size();
  TORCH_CHECK(block_size > 0 && token_seq.size() == pos.size() && ids.size() == pos.size(),
              "step_tensors: ids, positions and token_seq of one length, block_size > 0");
  int64_t width = 0;
  for (const auto& t : tables) width = std::max<int64_t>(width, t.size());
  at::Tensor longs = at::empty({3, T}, at::kLong), ints = at::empty({2 * T + B * width}, at::kInt);
  int64_t* l = longs.data_ptr<int64_t>();
  int32_t* n = ints.data_ptr<int32_t>();
  for (int64_t t = 0; t < T; ++t) {
    const int64_t s = token_seq[t], p = pos[t];
    TORCH_CHECK(s >= 0 && s < B && p >= 0 && p / block_size < static_cast<int64_t>(tables[s].size()),
                "step_tensors: token ", t, " (sequence ", s, ", position ", p, ") has no block in its table");
    l[t] = ids[t], l[T + t] = p, l[2 * T + t] = tables[s][p / block_size] * block_size + p % block_size;
    n[t] = static_cast<int32_t>(s), n[T + t] = static_cast<int32_t>(p);
  }
  for (int64_t b = 0; b < B; ++b) {
    int32_t* row = n + 2 * T + b * width;
    std::copy(tables[b].begin(), tables[b].end(), row);
    std::fill(row + tables[b].size(), row + width, 0);
  }
  return {longs[0], longs[1], longs[2], ints.narrow(0, 0, T), ints.narrow(0, T, T),
          ints.narrow(0, 2 * T, B * width).view({B, width})};
}

void Decoder::add_layer(at::Tensor in_norm, at::Tensor post_norm, Linear qkv, Linear o, Linear gate_up, Linear down,
                        c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm, int64_t window) {
  if (!layers_.empty()) {  // forward's buffers are sized by the first layer
    const Layer& f = layers_.front();
    TORCH_CHECK(qkv.width() == f.qkv.width() && o.width() == f.o.width() && gate_up.width() == f.gate_up.width() &&
                gate_up.out == f.gate_up.out, "every layer must have the first layer's shapes");
  }
  for (Linear* l : {&qkv, &o, &gate_up, &down}) l->prepare();
  TORCH_CHECK(in_norm.dim() == 1 && in_norm.is_contiguous() && in_norm.scalar_type() == at::kFloat &&
              post_norm.sizes() == in_norm.sizes() && post_norm.is_contiguous() &&
              post_norm.scalar_type() == at::kFloat, "norm weights: contiguous float32 [hidden]");
  TORCH_CHECK(layers_.empty() || in_norm.numel() == layers_.front().in_norm.numel(), "every layer's hidden size");
  layers_.push_back({in_norm, post_norm, in_norm.data_ptr<float>(), post_norm.data_ptr<float>(), std::move(qkv),
                     std::move(o), std::move(gate_up), std::move(down), q_norm, k_norm, window});
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
  if (n > 0)
    TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && h.scalar_type() == at::kFloat &&
                h.size(1) == layers_[0].in_norm.numel(), "h: contiguous float32 [T, hidden]");
  const int64_t hidden = h.size(1);
  // the step's metadata and each layer's caches, checked once here: their tensors' metadata sits in lines the
  // weight stream evicts, and each kernel call re-read it (a DRAM miss or more a layer and cache)
  TORCH_CHECK(k_caches.size() >= static_cast<size_t>(n) && v_caches.size() >= static_cast<size_t>(n),
              "a K and a V cache per layer");
  std::vector<CacheView> caches;
  caches.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    caches.push_back(cache_view(k_caches[i], v_caches[i]));
    check_attention(caches.back(), heads_);
    TORCH_CHECK(caches.back().kv_heads == kv_heads_ && caches.back().head_dim == head_dim_,
                "a cache does not match the model's KV heads");
  }
  TORCH_CHECK(s.slots.scalar_type() == at::kLong && s.slots.is_contiguous() && s.slots.numel() >= T, "slots: int64 [T]");
  TORCH_CHECK(s.block_tables.scalar_type() == at::kInt && s.block_tables.is_contiguous() && s.block_tables.dim() == 2,
              "block_tables: int32 [B, max blocks]");
  TORCH_CHECK(s.token_seq.scalar_type() == at::kInt && s.token_pos.scalar_type() == at::kInt &&
              s.token_seq.is_contiguous() && s.token_pos.is_contiguous() && s.token_seq.numel() >= T &&
              s.token_pos.numel() >= T, "token_seq / token_pos: int32 [T]");
  const int64_t* slots = s.slots.data_ptr<int64_t>();
  const int32_t *tables = s.block_tables.data_ptr<int32_t>(), *seq = s.token_seq.data_ptr<int32_t>(),
                *pos = s.token_pos.data_ptr<int32_t>();
  const int64_t table_stride = s.block_tables.size(1);
  auto norm = [&](const at::Tensor& x, const float* w) {  // into b.x; x's rows dense, any row stride
    TORCH_CHECK(x.stride(1) == 1 && x.size(1) == hidden && x.size(0) == T, "norm input: [T, hidden]");
    rms_norm_raw(x.data_ptr<float>(), x.stride(0), w, eps_, residual.defined() ? residual.data_ptr<float>() : nullptr,
                 b.x.data_ptr<float>(), T, hidden);
  };
  for (int64_t i = 0; i < n; ++i) {
    const Layer& l = layers_[i];
    norm(h, l.in_w);
    if (i == 0) residual = h;
    at::Tensor qkv = l.qkv.into(b.x, b.qkv), q = qkv;
    if (l.q_norm.has_value()) {  // normed copies of q and k, then as below
      q = head_norm(qkv.narrow(1, 0, qs), heads_, *l.q_norm, eps_);
      at::Tensor k = head_norm(qkv.narrow(1, qs, kvs), kv_heads_, *l.k_norm, eps_);
      rotary(q, heads_, s.positions, s.cos, s.sin);
      rotary(k, kv_heads_, s.positions, s.cos, s.sin);
      write_kv_raw(k.data_ptr<float>(), k.stride(0), qkv.data_ptr<float>() + qs + kvs, qkv.stride(0), T, caches[i], slots);
    } else {  // q and k side by side in qkv's rows: one rotary over both heads, K and V read where they lie
      rotary(qkv, heads_ + kv_heads_, s.positions, s.cos, s.sin);
      const float* row = qkv.data_ptr<float>();
      write_kv_raw(row + qs, qkv.stride(0), row + qs + kvs, qkv.stride(0), T, caches[i], slots);
    }
    paged_attention_raw(q.data_ptr<float>(), q.stride(0), T, heads_, caches[i], tables, table_stride, seq, pos, l.window,
                        scale_, b.attn.data_ptr<float>());
    h = l.o.into(b.attn, b.h);
    norm(h, l.post_w);
    silu_mul_into(l.gate_up.into(b.x, b.gate_up), b.act);
    h = l.down.into(b.act, b.h);
  }
  return rms_norm(h, final_norm, eps_, residual);
}
