// Native CPU kernels of alpt_keras's training step (issue 15). Built on
// first use against the installed TensorFlow (alpt_keras/kernels/build.py)
// and used only in training steps on CPU; exported SavedModels never
// contain these ops.
//
// Float contract: every kernel adds in the order the stock ops it replaces
// add in (documented per op), with plain IEEE float32 additions; the build
// uses -ffp-contract=off (no fused multiply-adds) and no -march=native.

#include <cstdint>
#include <cstring>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace alpt {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::errors::InvalidArgument;
namespace shape_inference = ::tensorflow::shape_inference;

REGISTER_OP("AlptUniqueSegmentSum")
    .Input("ids: int64")
    .Input("values: float")
    .Output("unique_ids: int64")
    .Output("positions: int32")
    .Output("sums: float")
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle ids, values;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 1, &ids));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &values));
      c->set_output(0, c->Vector(c->UnknownDim()));
      c->set_output(1, ids);
      c->set_output(2, c->Matrix(c->UnknownDim(), c->Dim(values, 1)));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
The unique ids of `ids` and the rows of `values` summed per unique id, in
one pass: bitwise what `unique_ids, positions = tf.unique(ids)` and
`tf.math.unsorted_segment_sum(values, positions, size(unique_ids))` give on
CPU. Unique ids come in order of first occurrence; each sum starts at +0.0
and adds its rows in input order.
)doc");

// splitmix64's finaliser: a well-mixed 64-bit hash of an id.
inline uint64_t Mix(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

class UniqueSegmentSumOp : public OpKernel {
 public:
  explicit UniqueSegmentSumOp(OpKernelConstruction* context)
      : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& ids_in = context->input(0);
    const Tensor& values_in = context->input(1);
    OP_REQUIRES(context, ids_in.dims() == 1,
                InvalidArgument("ids must be a vector, got shape ",
                                ids_in.shape().DebugString()));
    OP_REQUIRES(context, values_in.dims() == 2 &&
                             values_in.dim_size(0) == ids_in.dim_size(0),
                InvalidArgument("values must be [len(ids), D], got ",
                                values_in.shape().DebugString(), " for ",
                                ids_in.dim_size(0), " ids"));
    const int64_t n = ids_in.dim_size(0);
    const int64_t d = values_in.dim_size(1);
    OP_REQUIRES(context, n < (int64_t{1} << 31),
                InvalidArgument("too many ids: ", n));
    const int64_t* ids = ids_in.flat<int64_t>().data();
    const float* values = values_in.flat<float>().data();

    Tensor* positions_out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(1, TensorShape({n}),
                                                     &positions_out));
    int32_t* positions = positions_out->flat<int32_t>().data();

    // Open addressing, capacity a power of two >= 2n: slot -> unique index.
    uint64_t capacity = 16;
    while (capacity < 2 * static_cast<uint64_t>(n)) capacity <<= 1;
    const uint64_t mask = capacity - 1;
    std::vector<int32_t> slots(capacity, -1);
    std::vector<int64_t> unique;
    unique.reserve(n < 1024 ? n : n / 4);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t id = ids[i];
      uint64_t s = Mix(static_cast<uint64_t>(id)) & mask;
      while (true) {
        const int32_t u = slots[s];
        if (u < 0) {
          slots[s] = static_cast<int32_t>(unique.size());
          positions[i] = slots[s];
          unique.push_back(id);
          break;
        }
        if (unique[u] == id) {
          positions[i] = u;
          break;
        }
        s = (s + 1) & mask;
      }
    }
    const int64_t u = static_cast<int64_t>(unique.size());

    Tensor* unique_out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({u}),
                                                     &unique_out));
    if (u > 0) {
      std::memcpy(unique_out->flat<int64_t>().data(), unique.data(),
                  sizeof(int64_t) * u);
    }
    Tensor* sums_out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(2, TensorShape({u, d}),
                                                     &sums_out));
    float* sums = sums_out->flat<float>().data();
    // +0.0 then each row in input order, as unsorted_segment_sum.
    std::memset(sums, 0, sizeof(float) * u * d);
    for (int64_t i = 0; i < n; ++i) {
      float* out = sums + static_cast<int64_t>(positions[i]) * d;
      const float* row = values + i * d;
      for (int64_t k = 0; k < d; ++k) out[k] += row[k];
    }
  }
};

REGISTER_KERNEL_BUILDER(Name("AlptUniqueSegmentSum").Device(DEVICE_CPU),
                        UniqueSegmentSumOp);

}  // namespace
}  // namespace alpt
