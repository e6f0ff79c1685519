// Python bindings of tokenmill's CPU kernels (one extension module; see layers/kernels.py).
#include <torch/extension.h>

torch::Tensor quant_linear(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, c10::optional<torch::Tensor> mins,
                           c10::optional<torch::Tensor> table, c10::optional<torch::Tensor> bias, int64_t bits,
                           int64_t group);
torch::Tensor paged_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                              torch::Tensor token_seq, torch::Tensor token_pos, int64_t num_heads, int64_t window,
                              double scale);
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots);
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps, c10::optional<torch::Tensor> residual);
void rotary(torch::Tensor x, int64_t heads, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin);
torch::Tensor silu_mul(torch::Tensor gate_up);

static std::string isa() {
#if defined(__AVX512F__)
  return "avx512";
#else
  return "avx2";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear, "y = x @ dequant(W)^T, panel-packed 4/8-bit weights, fp32 activations");
  m.def("paged_attention", &paged_attention, "attention of each token over its sequence's paged K/V, in place");
  m.def("write_kv", &write_kv, "store tokens' K/V in their cache slots");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after residual += x (written back)");
  m.def("rotary", &rotary, "rotary embedding in place (rotate-half convention)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("isa", &isa, "the vector ISA of this build");
}
