// Python bindings of tokenmill's CPU kernels (one extension module; see layers/kernels.py).
#include <torch/extension.h>

#include "decoder.h"

static std::string isa() {
#if defined(__AVX512BF16__)
  return "avx512_bf16";  // attention.cpp multiplies a bfloat16 cache in bfloat16
#elif defined(__AVX512F__)
  return "avx512";
#else
  return "avx2";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quant_linear", &quant_linear, "y = x @ dequant(W)^T, panel-packed 4/8-bit weights, fp32 activations");
  m.def("q8_linear", &q8_linear, "y = q8(x) @ dequant(W)^T on AMX, VNNI or AVX2, quad-layout 4/8-bit weights");
  m.def("packed_rows", &packed_rows, "rows of a packed weight as float32 (an embedding lookup)");
  m.def("q8_peak", &q8_peak, "multiply-adds of an issue-rate loop on the AVX2 (-1) or VNNI (0) unit, all threads");
  m.def("amx_enable", &amx_enable, "ask the OS for the AMX tile state; true when granted");
  m.def("q8_units", &q8_units, "the integer units of this build, best first: amx,vnni,avx2 / vnni,avx2 / avx2");
  m.def("paged_attention", &paged_attention, "attention of each token over its sequence's paged K/V, in place");
  m.def("write_kv", &write_kv, "store tokens' K/V in their cache slots");
  m.def("rms_norm", &rms_norm, "RMSNorm, optionally after residual += x (written back)");
  m.def("rotary", &rotary, "rotary embedding in place (rotate-half convention)");
  m.def("silu_mul", &silu_mul, "silu(gate) * up");
  m.def("argmax_rows", &argmax_rows, "per row, the first index of its largest value (NaN largest), as torch.argmax");
  m.def("step_tensors", &step_tensors, "a step's ids, positions, slots, token_seq, token_pos and block tables");
  m.def("isa", &isa, "the vector ISA of this build");
  m.def("parallel_cover", &parallel_cover, "tests: visits per index of the kernels' parallel loop over [0, n)");
  py::class_<Linear>(m, "Linear")
      .def(py::init([](c10::optional<at::Tensor> weight, c10::optional<at::Tensor> codes,
                       c10::optional<at::Tensor> scales, c10::optional<at::Tensor> mins,
                       c10::optional<at::Tensor> table, c10::optional<at::Tensor> bias, int64_t bits, int64_t group,
                       int64_t out, bool q8, int64_t q8_unit) {
        Linear l;
        l.q8 = q8, l.q8_unit = q8_unit;
        if (weight) l.weight = *weight;
        if (codes) l.codes = *codes;
        if (scales) l.scales = *scales;
        l.mins = mins, l.table = table, l.bias = bias, l.bits = bits, l.group = group, l.out = out;
        return l;
      }));
  py::class_<Step>(m, "Step")
      .def(py::init([](at::Tensor positions, at::Tensor slots, at::Tensor block_tables, at::Tensor token_seq,
                       at::Tensor token_pos, at::Tensor cos, at::Tensor sin) {
        return Step{positions, slots, block_tables, token_seq, token_pos, cos, sin};
      }));
  py::class_<Decoder>(m, "Decoder")
      .def(py::init<int64_t, int64_t, int64_t, double, double>())
      .def("add_layer", &Decoder::add_layer)
      .def("forward", &Decoder::forward, py::call_guard<py::gil_scoped_release>());
}
