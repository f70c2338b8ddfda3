// A fused ALPT row update, built only by benchmarks/profile_step.py to
// measure what a custom training kernel would give. Not part of the
// library: training uses stock TF ops, and exports never contain this op.
//
// For each touched row (row-wise Adagrad rows, the row-wise Δ rule,
// stochastic rounding with the library's counter-based hash):
//   w = Δ·ŵ;  inc = mean(g²);  w' = w - lr·g/(√(acc+inc)+ε)
//   ∂L/∂Δ = γ Σ_j g_j s_j  (LSQ, v = w'/Δ);  Δ' = max(Δ(1 - lr_Δ ∂L/∂Δ /
//   (√(acc_Δ+inc)+ε_Δ)), Δ_min);  ŵ' = clip(floor(w'/Δ') + [u < frac])
#include <cmath>
#include <cstdint>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

using namespace tensorflow;

REGISTER_OP("AlptRowUpdate")
    .Input("codes: int32")        // [U, D]
    .Input("step_size: float")    // [U, 1]
    .Input("accumulator: float")  // [U, 1]
    .Input("step_accumulator: float")  // [U, 1]
    .Input("grads: float")        // [U, D]
    .Input("row_ids: int64")      // [U]
    .Input("key: uint32")         // scalar: hash key of (seed, salt, step)
    .Attr("num_bits: int")
    .Attr("learning_rate: float")
    .Attr("step_size_learning_rate: float")
    .Attr("epsilon: float")
    .Attr("step_size_epsilon: float")
    .Attr("min_step_size: float")
    .Output("new_codes: int32")
    .Output("new_step_size: float")
    .Output("increment: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      c->set_output(0, c->input(0));
      c->set_output(1, c->input(1));
      c->set_output(2, c->input(2));
      return OkStatus();
    });

namespace {

inline uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x2C1B3C6Du;
  return x ^ (x >> 16);
}

class AlptRowUpdateOp : public OpKernel {
 public:
  explicit AlptRowUpdateOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    int bits;
    OP_REQUIRES_OK(ctx, ctx->GetAttr("num_bits", &bits));
    q_min_ = -static_cast<float>(1 << (bits - 1));
    q_max_ = static_cast<float>((1 << (bits - 1)) - 1);
    OP_REQUIRES_OK(ctx, ctx->GetAttr("learning_rate", &lr_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("step_size_learning_rate", &step_lr_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("epsilon", &eps_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("step_size_epsilon", &step_eps_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("min_step_size", &min_step_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& codes = ctx->input(0);
    const int64_t rows = codes.dim_size(0), dim = codes.dim_size(1);
    auto c = codes.matrix<int32>();
    auto delta = ctx->input(1).matrix<float>();
    auto acc = ctx->input(2).matrix<float>();
    auto step_acc = ctx->input(3).matrix<float>();
    auto g = ctx->input(4).matrix<float>();
    auto ids = ctx->input(5).vec<int64_t>();
    const uint32_t key = ctx->input(6).scalar<uint32>()();
    Tensor *out_codes, *out_step, *out_inc;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, codes.shape(), &out_codes));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(1, ctx->input(1).shape(),
                                             &out_step));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, ctx->input(2).shape(),
                                             &out_inc));
    auto nc = out_codes->matrix<int32>();
    auto ns = out_step->matrix<float>();
    auto ni = out_inc->matrix<float>();
    const float gamma = 1.0f / std::sqrt(static_cast<float>(dim) * q_max_);
    auto work = [&](int64_t begin, int64_t end) {
      float w2[256];
      for (int64_t i = begin; i < end; ++i) {
        const float d = delta(i, 0);
        float sq = 0.f;
        for (int64_t j = 0; j < dim; ++j) sq += g(i, j) * g(i, j);
        const float inc = sq / static_cast<float>(dim);
        const float scale = lr_ / (std::sqrt(acc(i, 0) + inc) + eps_);
        float step_grad = 0.f;
        for (int64_t j = 0; j < dim; ++j) {
          w2[j] = static_cast<float>(c(i, j)) * d - scale * g(i, j);
          const float v = w2[j] / d;
          float s;
          if (v <= q_min_) {
            s = q_min_;
          } else if (v >= q_max_) {
            s = q_max_;
          } else {
            const float low = std::floor(v);
            s = (v - low >= 0.5f ? low + 1.f : low) - v;
          }
          step_grad += g(i, j) * s;
        }
        step_grad *= gamma;
        float nd = d * (1.f - step_lr_ * step_grad /
                                  (std::sqrt(step_acc(i, 0) + inc) +
                                   step_eps_));
        nd = std::max(nd, min_step_);
        const uint64_t id = static_cast<uint64_t>(ids(i));
        const uint32_t row_key = Mix32(
            Mix32(key ^ static_cast<uint32_t>(id)) ^
            static_cast<uint32_t>(id >> 32));
        for (int64_t j = 0; j < dim; ++j) {
          const uint32_t col_key =
              Mix32(static_cast<uint32_t>((j + 1) * 0x1E3779B9ull));
          const float u = static_cast<float>(Mix32(row_key ^ col_key) >> 8) *
                          (1.0f / 16777216.0f);
          const float x = w2[j] / nd;
          const float low = std::floor(x);
          float r = low + (u < x - low ? 1.f : 0.f);
          r = std::min(std::max(r, q_min_), q_max_);
          nc(i, j) = static_cast<int32>(r);
        }
        ns(i, 0) = nd;
        ni(i, 0) = inc;
      }
    };
    auto* pool = ctx->device()->tensorflow_cpu_worker_threads();
    Shard(pool->num_threads, pool->workers, rows, 40 * dim, work);
  }

 private:
  float q_min_, q_max_, lr_, step_lr_, eps_, step_eps_, min_step_;
};

REGISTER_KERNEL_BUILDER(Name("AlptRowUpdate").Device(DEVICE_CPU),
                        AlptRowUpdateOp);

}  // namespace
