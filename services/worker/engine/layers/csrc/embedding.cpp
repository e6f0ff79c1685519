// Rows of a packed weight as float32: the embedding lookup of a quantized model (an embedding is a packed
// weight, often the LM head's, in the layout of quant.py: panels of 16 rows, "panel" or "quad"). The same
// arithmetic as PackedWeight.dequantize, its reference: code (or code book entry) * scale (+ min), in float32.

#include "ops.h"

namespace {

// The code of row `lane` of a panel at column k, as stored (8-bit signed, 4-bit unsigned).
inline int code(const uint8_t* panel, int64_t k, int64_t lane, int64_t bits, bool quad) {
  if (bits == 8) {
    const int64_t at = quad ? ((k / 4) * kPanelRows + lane) * 4 + k % 4 : k * kPanelRows + lane;
    return static_cast<int8_t>(panel[at]);
  }
  if (quad) {  // 8 columns in 4 bytes per row: k..k+3 in the low nibbles, k+4..k+7 in the high
    const uint8_t b = panel[((k / 8) * kPanelRows + lane) * 4 + k % 4];
    return k % 8 < 4 ? b & 15 : b >> 4;
  }
  const uint8_t b = panel[(k / 2) * kPanelRows + lane];  // columns 2i (low nibble), 2i + 1 (high)
  return k % 2 == 0 ? b & 15 : b >> 4;
}

}  // namespace

at::Tensor packed_rows(at::Tensor ids, at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> mins,
                       c10::optional<at::Tensor> table, int64_t bits, int64_t group, int64_t rows, bool quad) {
  TORCH_CHECK(ids.scalar_type() == at::kLong && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.dim() == 2, "ids: int64; codes: uint8 [panels, *]");
  TORCH_CHECK(bits == 4 || bits == 8, "bits must be 4 or 8");
  const int64_t K = codes.size(1) * 8 / bits / kPanelRows, G = K / group;
  TORCH_CHECK(group > 0 && K % group == 0 && scales.scalar_type() == at::kHalf && scales.is_contiguous() &&
                  scales.numel() == codes.size(0) * G * kPanelRows, "scales: contiguous float16 [panels, K / group, 16]");
  const bool has_min = mins.has_value() && mins->defined(), has_table = table.has_value() && table->defined();
  if (has_min) TORCH_CHECK(mins->scalar_type() == at::kHalf && mins->is_contiguous() && mins->numel() == scales.numel());
  if (has_table) TORCH_CHECK(table->scalar_type() == at::kFloat && table->numel() == 16, "table: float32 [16]");
  const at::Tensor flat = ids.reshape(-1).contiguous();
  const int64_t n = flat.numel();
  const int64_t* id = flat.data_ptr<int64_t>();
  auto out = at::empty({n, K}, at::kFloat);
  const float* book = has_table ? table->data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(id[i] >= 0 && id[i] < rows, "token id ", id[i], " is outside the vocabulary (", rows, " tokens)");
    const int64_t p = id[i] / kPanelRows, lane = id[i] % kPanelRows;
    const uint8_t* panel = codes.data_ptr<uint8_t>() + p * codes.size(1);
    const at::Half* sc = scales.data_ptr<at::Half>() + p * G * kPanelRows + lane;
    const at::Half* mn = has_min ? mins->data_ptr<at::Half>() + p * G * kPanelRows + lane : nullptr;
    float* o = out.data_ptr<float>() + i * K;
    for (int64_t k = 0; k < K; ++k) {
      const int c = code(panel, k, lane, bits, quad);
      const float v = (book ? book[c] : static_cast<float>(c)) * static_cast<float>(sc[k / group * kPanelRows]);
      o[k] = mn ? v + static_cast<float>(mn[k / group * kPanelRows]) : v;
    }
  }
  return out;
}
