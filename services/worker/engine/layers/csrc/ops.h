// The kernels every other file may call (one declaration each; bindings.cpp exposes them to Python). An `_into`
// variant writes a caller's buffer (the C++ decoder reuses its buffers step to step) and checks its shape.
#pragma once

#include <ATen/ATen.h>

#include <string>

constexpr int kPanelRows = 16;  // rows per panel of a packed weight (quant.py's PANEL)

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
at::Tensor paged_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                           at::Tensor token_seq, at::Tensor token_pos, int64_t num_heads, int64_t window, double scale);
void paged_attention_into(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& block_tables, const at::Tensor& token_seq, const at::Tensor& token_pos,
                          int64_t num_heads, int64_t window, double scale, const at::Tensor& out);
void write_kv(at::Tensor k, at::Tensor v, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slots);
// write_kv of K and V read from columns [k_col, ...) and [v_col, ...) of x's rows (the decoder's fused qkv output)
void write_kv_columns(const at::Tensor& x, int64_t k_col, int64_t v_col, at::Tensor k_cache, at::Tensor v_cache,
                      at::Tensor slots);
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps, c10::optional<at::Tensor> residual);
void rms_norm_into(const at::Tensor& x, const at::Tensor& weight, double eps, const c10::optional<at::Tensor>& residual,
                   const at::Tensor& out);
void rotary(at::Tensor x, int64_t heads, at::Tensor positions, at::Tensor cos, at::Tensor sin);
at::Tensor silu_mul(at::Tensor gate_up);
void silu_mul_into(const at::Tensor& gate_up, const at::Tensor& out);
at::Tensor argmax_rows(at::Tensor x);
at::Tensor parallel_cover(int64_t n, int64_t grain, int64_t fail_at);
