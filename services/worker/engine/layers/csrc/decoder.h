// The decoder stack as one C++ call (decoder.cpp): weights by reference, the step's metadata as tensors.
#pragma once

#include "ops.h"
#include "q8.h"

#include <mutex>
#include <vector>

struct Linear {  // packed (bits > 0: codes, scales, mins / table, padded bias) or float (weight, bias)
  at::Tensor weight, codes, scales;
  c10::optional<at::Tensor> mins, table, bias;
  int64_t bits = 0, group = 0, out = 0;
  bool q8 = false;       // codes in quad layout, int8 activations (q8_gemm.cpp)
  int64_t q8_unit = 0;   // q8: q8_linear's unit (> 0: AMX from this many rows, 0: VNNI, -1: AVX2)
  PackedWeights w{};     // packed: the checked weight's pointers and shape (prepare)
  const float* bias_ptr = nullptr;
  int64_t width() const { return bits ? codes.size(0) * kPanelRows : out; }  // the columns a kernel writes
  // Checks a packed weight once (one call of the checked kernel) and keeps its pointers: a call through the
  // tensors read their metadata, cache lines the weight stream evicts between one step and the next
  void prepare();
  // y = this(x) into y [M, width()] (a packed weight's padding columns included); returns the first `out` columns
  at::Tensor into(const at::Tensor& x, const at::Tensor& y) const;
};

struct Step {  // engine/step.py's StepContext, the tensors only
  at::Tensor positions, slots, block_tables, token_seq, token_pos, cos, sin;
};
// engine/step.py's build_context on a CPU: a step's tensors from the scheduler's lists in one call, [input ids,
// positions, slots (int64), token_seq, token_pos (int32), block_tables (int32 [B, widest table], zero padded)]
std::vector<at::Tensor> step_tensors(const std::vector<int64_t>& ids, const std::vector<int64_t>& pos,
                                     const std::vector<int64_t>& token_seq,
                                     const std::vector<std::vector<int64_t>>& tables, int64_t block_size);

struct Layer {
  at::Tensor in_norm, post_norm;
  const float *in_w = nullptr, *post_w = nullptr;  // the norms' weights, checked at add_layer
  Linear qkv, o, gate_up, down;
  c10::optional<at::Tensor> q_norm, k_norm;
  int64_t window;
};

// A forward's activations, reused step to step while the row count stays (8 allocations a layer were ~3 us of it).
struct Buffers {
  int64_t rows = -1;
  at::Tensor x, qkv, attn, h, gate_up, act;  // normed input, projections, attention, o / down output, SiLU * up
};

class Decoder {
 public:
  Decoder(int64_t heads, int64_t kv_heads, int64_t head_dim, double eps, double scale)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(eps), scale_(scale) {}
  void add_layer(at::Tensor in_norm, at::Tensor post_norm, Linear qkv, Linear o, Linear gate_up, Linear down,
                 c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm, int64_t window);
  // h [T, hidden] (embedded tokens) -> final-normed hidden states after the first num_layers layers (0 = all)
  at::Tensor forward(at::Tensor h, const Step& step, const std::vector<at::Tensor>& k_caches,
                     const std::vector<at::Tensor>& v_caches, at::Tensor final_norm, int64_t num_layers) const;

 private:
  int64_t heads_, kv_heads_, head_dim_;
  double eps_, scale_;
  std::vector<Layer> layers_;
  mutable Buffers buffers_;  // forward's, when no other forward holds them (mutex below)
  mutable std::mutex buffers_mu_;
};
