// The kernels every other file may call (one declaration each; bindings.cpp exposes them to Python). An `_into`
// variant writes a caller's buffer (the C++ decoder reuses its buffers step to step) and checks its shape.
#pragma once

#include <ATen/ATen.h>

#include <string>

constexpr int kPanelRows = 16;  // rows per panel of a packed weight (quant.py's PANEL)

// A packed weight as the kernels read it: the fp32-activation kernel's panel layout, or the int8-activation
// kernels' quad layout (q8.h; no table there). The checked entry points (quant_linear_into, q8_linear_into) check
// one, then call the raw kernel; the C++ decoder checks each of its weights once and keeps this.
struct PackedWeights {
  const uint8_t* codes;    // [P, K * bits / 8 * 16]
  const at::Half* scales;  // [P, K / G, 16]
  const at::Half* mins;    // [P, K / G, 16] or null
  const float* table;      // [16] (NF4) or null
  int64_t K, G, P, bits;
  int64_t pstride() const { return K * bits / 8 * kPanelRows; }  // code bytes per panel
};
// The view of checked weight tensors (K from the codes' width).
PackedWeights packed_weights(const at::Tensor& codes, const at::Tensor& scales, const c10::optional<at::Tensor>& mins,
                             const c10::optional<at::Tensor>& table, int64_t bits, int64_t group);
void quant_linear_raw(const PackedWeights& w, const float* x, int64_t M, const float* bias, float* y);
at::Tensor quant_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> mins,
                        c10::optional<at::Tensor> table, c10::optional<at::Tensor> bias, int64_t bits, int64_t group);
void quant_linear_into(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& table,
                       const c10::optional<at::Tensor>& bias, int64_t bits, int64_t group, const at::Tensor& y);
at::Tensor q8_linear(at::Tensor x, at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> mins,
                     c10::optional<at::Tensor> bias, int64_t bits, int64_t group, int64_t unit);
void q8_linear_into(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& mins, const c10::optional<at::Tensor>& bias, int64_t bits,
                    int64_t group, int64_t unit, const at::Tensor& y);
at::Tensor packed_rows(at::Tensor ids, at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> mins,
                       c10::optional<at::Tensor> table, int64_t bits, int64_t group, int64_t rows, bool quad);
int64_t q8_peak(int64_t unit, int64_t iters);
bool amx_enable();
std::string q8_units();
// A K / V cache pair as the kernels read it (cache_view checks the pair: dtypes, layout, geometry).
struct CacheView {
  void *k, *v;
  at::ScalarType dtype;
  int64_t kv_heads, blocks, head_dim, block_size;
};
CacheView cache_view(const at::Tensor& k, const at::Tensor& v);
void check_attention(const CacheView& c, int64_t num_heads);  // what attention adds to cache_view's checks
// paged_attention_into / write_kv on checked pointers (the C++ decoder checks each layer's caches once a step)
void paged_attention_raw(const float* q, int64_t q_stride, int64_t T, int64_t num_heads, const CacheView& c,
                         const int32_t* block_tables, int64_t tables_stride, const int32_t* token_seq,
                         const int32_t* token_pos, int64_t window, double scale, float* out);
void write_kv_raw(const float* k, int64_t k_stride, const float* v, int64_t v_stride, int64_t rows, const CacheView& c,
                  const int64_t* slots);
at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                           at::Tensor token_seq, at::Tensor token_pos, int64_t num_heads, int64_t window, double scale);
void paged_attention_into(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& token_pos,
                          int64_t num_heads, int64_t window, double scale, const at::Tensor& out);
void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, c10::optional<at::Tensor> residual);
void rms_norm_into(const at::Tensor& x, const at::Tensor& weight, double eps, const c10::optional<at::Tensor>& residual,
                   const at::Tensor& out);
// rms_norm_into on checked pointers: rows of x (x_stride apart), residual (null: none) and out dense [T, N]
void rms_norm_raw(const float* x, int64_t x_stride, const float* w, double eps, float* residual, float* out, int64_t T,
                  int64_t N);
void rotary(at::Tensor x, int64_t heads, at::Tensor positions, at::Tensor cos, at::Tensor sin);
at::Tensor silu_mul(at::Tensor gate_up);
void silu_mul_into(const at::Tensor& gate_up, const at::Tensor& out);
at::Tensor argmax_rows(at::Tensor x);
at::Tensor parallel_cover(int64_t n, int64_t grain, int64_t fail_at);
