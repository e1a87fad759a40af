// A decoder block in one call: the same kernels, in the same order, as the block's Python forward on the kernel
// path (runtime/model.py Block.forward), so the two give bitwise the same result; only the per-op cost is gone.
//
// At a few rows a block's kernels do little work (a Q4_1 block of the default model: ~0.4 ms on a 2-core AVX2
// guest), and the Python side of its ~15 ops (module calls, argument checks, the dispatcher's boxing) cost ~0.2 ms
// more: 30 blocks made that ~7 ms of a 21.5 ms decode step. Here the block's weights are bound once (at load time,
// Transformer.prepare) and a step is one call per block, whose ops go through the dispatcher's unboxed C++ path
// straight to the kernels of the other files.
//
// FusedBlock(heads, kv_heads, head_dim, scale, eps, gemma, norms): norms = [attention's, MLP's] for a Llama
// block, + [post-attention, post-MLP, q, k] for Gemma's. Then each projection (0 q|k|v, 1 output, 2 gate|up,
// 3 down) is bound as a small_gemm weight (packed) or as GGUF row blocks (quantized, one call per block of rows
// in order), with an optional bias. forward(x [B, n, hidden], cos, sin [B, n, 1, head_dim], kv [2, B, kv_heads,
// capacity, head_dim] (the cache's layer), lengths [B], width, mask [B, 1, n, width] or none) -> [B, n, hidden]:
// writes the new keys and values to each row's scratch slots [length, length + n), as KVCache.write does.

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include "registration.h"

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace {

#define SG_QUOTE(x) #x
#define SG_STRING(x) SG_QUOTE(x)

// The typed handle of an op of this library (registered by the other files), for unboxed calls.
template <typename Signature>
c10::TypedOperatorHandle<Signature> library_op(const char* name) {
  const std::string qualified = std::string(SG_STRING(SG_LIBNAME)) + "::" + name;
  return c10::Dispatcher::singleton().findSchemaOrThrow(qualified.c_str(), "").typed<Signature>();
}

using OptTensor = std::optional<at::Tensor>;

// The ops' C++ signatures, exactly as the other files register their kernels.
using LinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&, std::string_view);
using QuantLinearFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, int64_t,
                                 int64_t, const OptTensor&, std::string_view);
using AttentionFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double);
using RmsNormFn = at::Tensor(const at::Tensor&, const at::Tensor&, double, bool);
using RmsNormHeadsFn = void(const at::Tensor&, const at::Tensor&, double, int64_t, int64_t, bool);
using RopeFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);
using ActMulFn = at::Tensor(const at::Tensor&);

struct Ops {
  c10::TypedOperatorHandle<LinearFn> linear = library_op<LinearFn>("linear");
  c10::TypedOperatorHandle<QuantLinearFn> quant_linear = library_op<QuantLinearFn>("quant_linear");
  c10::TypedOperatorHandle<AttentionFn> attention = library_op<AttentionFn>("attention");
  c10::TypedOperatorHandle<RmsNormFn> rms_norm = library_op<RmsNormFn>("rms_norm");
  c10::TypedOperatorHandle<RmsNormHeadsFn> rms_norm_heads_ = library_op<RmsNormHeadsFn>("rms_norm_heads_");
  c10::TypedOperatorHandle<RopeFn> rope_ = library_op<RopeFn>("rope_");
  c10::TypedOperatorHandle<ActMulFn> silu_mul = library_op<ActMulFn>("silu_mul");
  c10::TypedOperatorHandle<ActMulFn> gelu_tanh_mul = library_op<ActMulFn>("gelu_tanh_mul");
};

const Ops& ops() {
  static const Ops handles;  // looked up once, after every file's ops are registered
  return handles;
}

// GGUF blocks of some rows of a projection, as cpu.QuantWeight holds them.
struct QuantRows {
  at::Tensor qs, scales;
  OptTensor mins;
  int64_t form, n;
};

// A projection as runtime/model.py Linear computes it on the kernel path.
struct Projection {
  at::Tensor packed;  // small_gemm's layout (defined), or
  int64_t n = 0;
  std::vector<QuantRows> parts;  // GGUF row blocks, in order
  OptTensor bias;

  at::Tensor operator()(const at::Tensor& x) const {
    const Ops& op = ops();
    if (packed.defined()) {  // cpu.linear
      const int64_t K = x.size(-1);
      std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
      shape.back() = n;
      return op.linear.call(x.reshape({-1, K}).contiguous(), packed, n, bias, "auto").reshape(shape);
    }
    TORCH_CHECK(!parts.empty(), "FusedBlock: a projection was never bound");
    const at::Tensor xc = x.contiguous();
    if (parts.size() == 1) {  // cpu.quant_linear
      const QuantRows& p = parts[0];
      return op.quant_linear.call(xc, p.qs, p.scales, p.mins, p.form, p.n, bias, "auto");
    }
    std::vector<at::Tensor> ys;  // Linear.forward's torch.cat of the parts, then the bias
    for (const QuantRows& p : parts)
      ys.push_back(op.quant_linear.call(xc, p.qs, p.scales, p.mins, p.form, p.n, std::nullopt, "auto"));
    at::Tensor y = at::cat(ys, -1);
    return bias.has_value() ? y.add(*bias) : y;
  }
};

struct FusedBlock : torch::CustomClassHolder {
  enum Norm { kAttention, kMlp, kPostAttention, kPostMlp, kQ, kK };

  int64_t heads, kv_heads, head_dim;
  double scale, eps;
  bool gemma;
  std::vector<at::Tensor> norms;
  std::array<Projection, 4> projections;

  FusedBlock(int64_t heads, int64_t kv_heads, int64_t head_dim, double scale, double eps, bool gemma,
             std::vector<at::Tensor> norms)
      : heads(heads), kv_heads(kv_heads), head_dim(head_dim), scale(scale), eps(eps), gemma(gemma), norms(norms) {
    TORCH_CHECK(norms.size() == (gemma ? 6u : 2u), "FusedBlock: 2 norms (Llama) or 6 (Gemma)");
  }

  Projection& projection(int64_t which) {
    TORCH_CHECK(which >= 0 && which < 4, "FusedBlock: projections are 0 (qkv), 1 (output), 2 (gate|up), 3 (down)");
    return projections[which];
  }

  void packed(int64_t which, at::Tensor weight, int64_t n) {
    Projection& p = projection(which);
    p.packed = weight;
    p.n = n;
  }

  void quantized(int64_t which, at::Tensor qs, at::Tensor scales, OptTensor mins, int64_t form, int64_t n) {
    projection(which).parts.push_back({qs, scales, mins, form, n});
  }

  void bias(int64_t which, at::Tensor bias) { projection(which).bias = bias.contiguous(); }

  at::Tensor norm(const at::Tensor& x, Norm which) const {
    return ops().rms_norm.call(x.contiguous(), norms[which], eps, gemma);
  }

  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor kv, std::vector<int64_t> lengths,
                     int64_t width, OptTensor mask) {
    const Ops& op = ops();
    const int64_t B = x.size(0), n = x.size(1), H = heads, G = kv_heads, d = head_dim;
    TORCH_CHECK(static_cast<int64_t>(lengths.size()) == B && kv.dim() == 5 && kv.size(1) == B,
                "FusedBlock.forward: kv [2, B, kv_heads, capacity, head_dim] and lengths [B] for x [B, n, hidden]");
    // attention (Block.attend)
    const at::Tensor qkv = projections[0](norm(x, kAttention)).view({B, n, H + 2 * G, d});
    if (gemma) {
      op.rms_norm_heads_.call(qkv, norms[kQ], eps, 0, H, true);
      op.rms_norm_heads_.call(qkv, norms[kK], eps, H, G, true);
    }
    op.rope_.call(qkv, cos.contiguous(), sin.contiguous(), H + G);
    const at::Tensor entries = qkv.narrow(2, H, 2 * G).view({B, n, 2, G, d}).permute({2, 0, 3, 1, 4});
    for (int64_t b = 0; b < B; ++b) kv.select(1, b).narrow(2, lengths[b], n).copy_(entries.select(1, b));
    const at::Tensor keys = kv.select(0, 0).narrow(2, 0, width), values = kv.select(0, 1).narrow(2, 0, width);
    const at::Tensor q = qkv.narrow(2, 0, H).transpose(1, 2);
    const at::Tensor heads_out = op.attention.call(q, keys, values, mask, scale).transpose(1, 2).reshape({B, n, H * d});
    at::Tensor h = projections[1](heads_out);
    x = x.add(gemma ? norm(h, kPostAttention) : h);
    // MLP
    const at::Tensor gate_up = projections[2](norm(x, kMlp));
    h = projections[3](gemma ? op.gelu_tanh_mul.call(gate_up) : op.silu_mul.call(gate_up));
    return x.add(gemma ? norm(h, kPostMlp) : h);
  }
};

}  // namespace

SG_TORCH_LIBRARY_FRAGMENT(SG_LIBNAME, m) {
  m.class_<FusedBlock>("FusedBlock")
      .def(torch::init<int64_t, int64_t, int64_t, double, double, bool, std::vector<at::Tensor>>())
      .def("packed", &FusedBlock::packed)
      .def("quantized", &FusedBlock::quantized)
      .def("bias", &FusedBlock::bias)
      .def("forward", &FusedBlock::forward);
}
