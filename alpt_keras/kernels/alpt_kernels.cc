// Native CPU kernels of alpt_keras's training step (issue 15). Built on
// first use against the installed TensorFlow (alpt_keras/kernels/build.py)
// and used only in training steps on CPU; exported SavedModels never
// contain these ops.
//
// Float contract: every kernel adds in the order the stock ops it replaces
// add in (documented per op), with plain IEEE float32 additions; the build
// uses -ffp-contract=off (no fused multiply-adds) and no -march=native.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/resource_mgr.h"
#include "tensorflow/core/framework/resource_var.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace alpt {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::Var;
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

// ---------------------------------------------------------------------------
// AlptTableStep: the whole one-pass table step of the touched rows, read,
// computed and written in place (alpt_keras.update.table_step with per-row
// Δ and any table optimizer and step-size rule), so no row is gathered or
// scattered by separate ops.

REGISTER_OP("AlptTableStep")
    .Input("codes: resource")
    .Input("step_sizes: resource")
    .Input("table_state: num_table_slots * resource")
    .Input("step_size_state: num_step_size_slots * resource")
    .Input("ids: int64")
    .Input("grads: float")
    .Input("offsets: int64")
    .Input("keys: uint32")
    .Input("hyper: float")
    .Input("apply: bool")
    .Attr("table_rule: {'rowwise_adagrad', 'adagrad', 'sgd', 'lazy_adam'}")
    .Attr("step_size_rule: {'rowwise', 'adagrad', 'adam', 'sgd', 'none'}")
    .Attr("num_table_slots: int >= 0")
    .Attr("num_step_size_slots: int >= 0")
    .Attr("num_bits: int >= 2")
    .Attr("packed: bool")
    .Attr("stochastic: bool")
    .SetIsStateful()
    .SetShapeFn(shape_inference::NoOutputs)
    .Doc(R"doc(
One ALPT table step of the unique rows `ids` (global ids of a group, each
in [0, V)) with their summed gradients `grads` [U, D]: the table optimizer
`table_rule` on `w = Δ·ŵ`, then the step-size rule `step_size_rule` on the
per-row Δ from the LSQ gradient ("none": Δ fixed), then the codes
`clip(R(w'/Δ'))`, written into the variables in place. Bitwise what
alpt_keras.update.table_step and the optimizer's scatters compute on CPU
(same elementwise IEEE operations and the documented column-reduction
order). `table_state` holds the rule's slots in alpt_keras.update.rules
order (the accumulator [V, 1] of rowwise_adagrad, the accumulator [V, D]
of adagrad, m and v [V, D] of lazy_adam, none for sgd), `step_size_state`
the step-size rule's ([V, 1] each). `offsets` [T+1] are the group's row offsets and `keys` [T]
the uint32 noise keys hash_key(seed, salt, step) of its logical tables.
`hyper` holds 18 float32 values computed in the graph exactly as the stock
update computes them: for the table optimizer then for the step-size rule,
[lr, epsilon, beta_1, 1 - beta_1, beta_2, 1 - beta_2, 1 - beta_1^t,
1 - beta_2^t]; then lsq_scale and min_step_size. When `apply` is false
nothing is read or written (a skipped step).
)doc");

// lowbias32-style finaliser of alpt_keras.quantizers._mix32 (uint32 wraps).
inline uint32_t Mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352DU;
  x ^= x >> 15;
  x *= 0x2C1B3C6DU;
  x ^= x >> 16;
  return x;
}

// tf.reduce_sum(x, axis=-1) of one row on CPU (TensorFlow's AVX build), in
// the order alpt_keras/update/step.py documents ("Reduction order") and
// tests/core/test_update.py checks against TensorFlow.
inline float ColumnSum(const float* x, int64_t d) {
  const int64_t blocks = d / 8;
  float scalar = 0.0f;
  for (int64_t j = 8 * blocks; j < d; ++j) scalar = scalar + x[j];
  if (blocks == 0) return scalar;
  const int64_t interleaved = (blocks / 4) * 4;
  float lanes[8];
  if (interleaved > 0) {
    float acc[4][8] = {};
    for (int64_t k = 0; k < interleaved; k += 4) {
      for (int a = 0; a < 4; ++a) {
        const float* block = x + 8 * (k + a);
        for (int l = 0; l < 8; ++l) acc[a][l] = acc[a][l] + block[l];
      }
    }
    for (int l = 0; l < 8; ++l) {
      lanes[l] = ((acc[0][l] + acc[1][l]) + acc[2][l]) + acc[3][l];
    }
  } else {
    for (int l = 0; l < 8; ++l) lanes[l] = 0.0f;
  }
  for (int64_t k = interleaved; k < blocks; ++k) {
    const float* block = x + 8 * k;
    for (int l = 0; l < 8; ++l) lanes[l] = lanes[l] + block[l];
  }
  float half[4], quarter[2];
  for (int l = 0; l < 4; ++l) half[l] = lanes[l] + lanes[l + 4];
  for (int l = 0; l < 2; ++l) quarter[l] = half[l] + half[l + 2];
  return scalar + (quarter[0] + quarter[1]);
}

// round_half_up: floor(x) + [x - floor(x) >= 0.5] (exact in float32).
inline float RoundHalfUp(float x) {
  const float low = std::floor(x);
  return low + ((x - low >= 0.5f) ? 1.0f : 0.0f);
}

// tf.maximum on CPU propagates NaN.
inline float MaxPropagateNaN(float x, float y) {
  if (std::isnan(x)) return x;
  if (std::isnan(y)) return y;
  return x < y ? y : x;
}

// Locks several variables' mutexes in address order (no deadlock with other
// multi-variable ops), unlocks on scope exit.
class VarLocks {
 public:
  explicit VarLocks(const std::vector<Var*>& vars) {
    for (Var* v : vars) mutexes_.push_back(v->mu());
    std::sort(mutexes_.begin(), mutexes_.end());
    mutexes_.erase(std::unique(mutexes_.begin(), mutexes_.end()),
                   mutexes_.end());
    for (auto* m : mutexes_) m->lock();
  }
  ~VarLocks() {
    for (auto it = mutexes_.rbegin(); it != mutexes_.rend(); ++it) {
      (*it)->unlock();
    }
  }

 private:
  std::vector<::tensorflow::mutex*> mutexes_;
};

// What TensorFlow's sparse variable updates do before writing in place
// (EnsureSparseVariableAccess): switch the variable to copy-on-read, and
// copy its buffer if a reader still holds it. Call with the lock held.
Status PrepareInPlaceWrite(OpKernelContext* context, Var* var) {
  var->copy_on_read_mode.store(true);
  Tensor* tensor = var->tensor();
  if (tensor->RefCountIsOne()) return ::tensorflow::OkStatus();
  Tensor copy;
  TF_RETURN_IF_ERROR(
      context->allocate_temp(tensor->dtype(), tensor->shape(), &copy));
  if (tensor->TotalBytes() > 0) {
    std::memcpy(const_cast<char*>(copy.tensor_data().data()),
                tensor->tensor_data().data(), tensor->TotalBytes());
  }
  *tensor = copy;
  return ::tensorflow::OkStatus();
}

// Where a table's codes live (alpt_keras/storage.py): an int8 [V, D]
// variable, or `num_bits`-bit fields of int32 words [V, ceil(D·b/32)], code
// j in bits [j·b, j·b + b) of its row's bit string, stored as code + 2^(b-1).
class Codes {
 public:
  Codes(int num_bits, int64_t d, bool packed)
      : bits_(num_bits),
        d_(d),
        packed_(packed),
        words_((d * num_bits + 31) / 32),
        q_neg_(1 << (num_bits - 1)),
        mask_((uint64_t{1} << num_bits) - 1) {}

  // Checks that `codes` is a variable of this layout and keeps its data.
  Status Bind(const Tensor& codes) {
    const bool ok =
        codes.dims() == 2 &&
        (packed_ ? (codes.dtype() == ::tensorflow::DT_INT32 &&
                    codes.dim_size(1) == words_)
                 : (codes.dtype() == ::tensorflow::DT_INT8 &&
                    codes.dim_size(1) == d_));
    if (!ok) {
      return InvalidArgument(
          "codes variable of dtype ",
          ::tensorflow::DataTypeString(codes.dtype()), " and shape ",
          codes.shape().DebugString(), " do not match ", d_, " columns of ",
          bits_, packed_ ? "-bit packed codes" : "-bit int8 codes");
    }
    rows_ = codes.dim_size(0);
    data_ = const_cast<char*>(codes.tensor_data().data());
    return ::tensorflow::OkStatus();
  }

  int64_t rows() const { return rows_; }
  int64_t words() const { return words_; }
  const void* Address(int64_t id) const {
    return data_ + id * (packed_ ? 4 * words_ : d_);
  }

  // The codes of row `id` as int32 `out[D]`.
  void Read(int64_t id, int32_t* out) const {
    if (!packed_) {
      const int8_t* row = reinterpret_cast<const int8_t*>(data_) + id * d_;
      for (int64_t j = 0; j < d_; ++j) out[j] = row[j];
      return;
    }
    const int32_t* row = reinterpret_cast<const int32_t*>(data_) + id * words_;
    for (int64_t j = 0; j < d_; ++j) {
      const int64_t start = j * bits_;
      const int64_t word = start / 32, offset = start % 32;
      uint64_t window = static_cast<uint32_t>(row[word]);
      if (word + 1 < words_) {
        window |= static_cast<uint64_t>(static_cast<uint32_t>(row[word + 1]))
                  << 32;
      }
      out[j] = static_cast<int32_t>((window >> offset) & mask_) - q_neg_;
    }
  }

  // Writes clipped codes `codes[D]` into row `id`; `buffer` holds
  // words() + 1 values.
  void Write(int64_t id, const int32_t* codes, uint64_t* buffer) const {
    if (!packed_) {
      int8_t* row = reinterpret_cast<int8_t*>(data_) + id * d_;
      for (int64_t j = 0; j < d_; ++j) row[j] = static_cast<int8_t>(codes[j]);
      return;
    }
    std::fill(buffer, buffer + words_ + 1, 0);
    for (int64_t j = 0; j < d_; ++j) {
      const int64_t start = j * bits_;
      const uint64_t field = static_cast<uint64_t>(codes[j] + q_neg_)
                             << (start % 32);
      buffer[start / 32] |= field & 0xFFFFFFFFULL;
      buffer[start / 32 + 1] |= field >> 32;
    }
    int32_t* row = reinterpret_cast<int32_t*>(data_) + id * words_;
    for (int64_t k = 0; k < words_; ++k) {
      row[k] = static_cast<int32_t>(static_cast<uint32_t>(buffer[k]));
    }
  }

 private:
  int bits_;
  int64_t d_;
  bool packed_;
  int64_t words_;
  int32_t q_neg_;
  uint64_t mask_;
  int64_t rows_ = 0;
  char* data_ = nullptr;
};

enum class TableRule { kRowwiseAdagrad, kAdagrad, kSgd, kLazyAdam };
enum class StepRule { kRowwise, kAdagrad, kAdam, kSgd, kNone };

// One rule's constants, in the order of `hyper`.
struct RuleConstants {
  float lr, epsilon, beta_1, one_minus_beta_1, beta_2, one_minus_beta_2,
      bias_1, bias_2;
  explicit RuleConstants(const float* h)
      : lr(h[0]),
        epsilon(h[1]),
        beta_1(h[2]),
        one_minus_beta_1(h[3]),
        beta_2(h[4]),
        one_minus_beta_2(h[5]),
        bias_1(h[6]),
        bias_2(h[7]) {}
};

class TableStepOp : public OpKernel {
 public:
  explicit TableStepOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string table_rule, step_rule;
    OP_REQUIRES_OK(context, context->GetAttr("table_rule", &table_rule));
    OP_REQUIRES_OK(context, context->GetAttr("step_size_rule", &step_rule));
    OP_REQUIRES_OK(context,
                   context->GetAttr("num_table_slots", &num_table_slots_));
    OP_REQUIRES_OK(context, context->GetAttr("num_step_size_slots",
                                             &num_step_size_slots_));
    OP_REQUIRES_OK(context, context->GetAttr("num_bits", &num_bits_));
    OP_REQUIRES_OK(context, context->GetAttr("packed", &packed_));
    OP_REQUIRES_OK(context, context->GetAttr("stochastic", &stochastic_));
    int table_slots = 0;
    if (table_rule == "rowwise_adagrad") {
      table_rule_ = TableRule::kRowwiseAdagrad, table_slots = 1;
    } else if (table_rule == "adagrad") {
      table_rule_ = TableRule::kAdagrad, table_slots = 1;
    } else if (table_rule == "sgd") {
      table_rule_ = TableRule::kSgd, table_slots = 0;
    } else {
      table_rule_ = TableRule::kLazyAdam, table_slots = 2;
    }
    int step_slots = 0;
    if (step_rule == "rowwise") {
      step_rule_ = StepRule::kRowwise, step_slots = 1;
    } else if (step_rule == "adagrad") {
      step_rule_ = StepRule::kAdagrad, step_slots = 1;
    } else if (step_rule == "adam") {
      step_rule_ = StepRule::kAdam, step_slots = 2;
    } else if (step_rule == "sgd") {
      step_rule_ = StepRule::kSgd, step_slots = 0;
    } else {
      step_rule_ = StepRule::kNone, step_slots = 0;
    }
    OP_REQUIRES(context, num_table_slots_ == table_slots,
                InvalidArgument("table_rule ", table_rule, " has ",
                                table_slots, " slots, got ",
                                num_table_slots_));
    OP_REQUIRES(context, num_step_size_slots_ == step_slots,
                InvalidArgument("step_size_rule ", step_rule, " has ",
                                step_slots, " slots, got ",
                                num_step_size_slots_));
    OP_REQUIRES(context, num_bits_ >= 2 && num_bits_ <= 8,
                InvalidArgument("num_bits must be in [2, 8], got ",
                                num_bits_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor* apply_in;
    OP_REQUIRES_OK(context, context->input("apply", &apply_in));
    if (!apply_in->scalar<bool>()()) return;  // a skipped step
    const Tensor *ids_in, *grads_in, *offsets_in, *keys_in, *hyper_in;
    OP_REQUIRES_OK(context, context->input("ids", &ids_in));
    OP_REQUIRES_OK(context, context->input("grads", &grads_in));
    OP_REQUIRES_OK(context, context->input("offsets", &offsets_in));
    OP_REQUIRES_OK(context, context->input("keys", &keys_in));
    OP_REQUIRES_OK(context, context->input("hyper", &hyper_in));
    OP_REQUIRES(context, ids_in->dims() == 1,
                InvalidArgument("ids must be a vector, got shape ",
                                ids_in->shape().DebugString()));
    OP_REQUIRES(context, grads_in->dims() == 2 &&
                             grads_in->dim_size(0) == ids_in->dim_size(0),
                InvalidArgument("grads must be [len(ids), D], got ",
                                grads_in->shape().DebugString()));
    OP_REQUIRES(context, hyper_in->NumElements() == 18,
                InvalidArgument("hyper must hold 18 values, got ",
                                hyper_in->NumElements()));
    const int64_t num_tables = keys_in->NumElements();
    OP_REQUIRES(context, num_tables >= 1 &&
                             offsets_in->NumElements() == num_tables + 1,
                InvalidArgument("offsets must hold len(keys) + 1 values"));

    // Variables: codes, Δ, the table rule's slots, the Δ rule's slots.
    const int num_vars = 2 + num_table_slots_ + num_step_size_slots_;
    std::vector<::tensorflow::core::RefCountPtr<Var>> refs(num_vars);
    std::vector<Var*> vars(num_vars);
    for (int i = 0; i < num_vars; ++i) {
      OP_REQUIRES_OK(context, ::tensorflow::LookupResource(
                                  context, ::tensorflow::HandleFromInput(
                                               context, i),
                                  &refs[i]));
      vars[i] = refs[i].get();
    }
    VarLocks locks(vars);
    for (int i = 0; i < num_vars; ++i) {
      OP_REQUIRES(context, vars[i]->is_initialized,
                  ::tensorflow::errors::FailedPrecondition(
                      "ALPT table variable ", i, " is not initialized"));
    }
    const int64_t d = grads_in->dim_size(1);
    const int64_t u = ids_in->dim_size(0);
    Codes stored(num_bits_, d, packed_);
    OP_REQUIRES_OK(context, stored.Bind(*vars[0]->tensor()));
    const int64_t v = stored.rows();
    const bool per_element_state = table_rule_ == TableRule::kAdagrad ||
                                   table_rule_ == TableRule::kLazyAdam;
    for (int i = 1; i < num_vars; ++i) {
      const bool wide = per_element_state && i >= 2 &&
                        i < 2 + num_table_slots_;
      const Tensor* t = vars[i]->tensor();
      OP_REQUIRES(context, t->dtype() == ::tensorflow::DT_FLOAT &&
                               t->NumElements() == (wide ? v * d : v),
                  InvalidArgument("variable ", i, " must be float with ",
                                  wide ? d : 1, " value(s) per row (",
                                  v, " rows), got ",
                                  t->shape().DebugString()));
    }
    const int64_t* ids = ids_in->flat<int64_t>().data();
    const int64_t* offsets = offsets_in->flat<int64_t>().data();
    OP_REQUIRES(context, offsets[0] == 0 && offsets[num_tables] == v,
                InvalidArgument("offsets must run from 0 to ", v));
    for (int64_t r = 0; r < u; ++r) {  // never outside the table's rows
      OP_REQUIRES(context, ids[r] >= 0 && ids[r] < v,
                  InvalidArgument("row id ", ids[r], " is not in [0, ", v,
                                  ")"));
    }
    for (int i = 0; i < num_vars; ++i) {
      OP_REQUIRES_OK(context, PrepareInPlaceWrite(context, vars[i]));
    }
    // The buffer may have been copied (a reader held it): bind again.
    OP_REQUIRES_OK(context, stored.Bind(*vars[0]->tensor()));

    const float* grads = grads_in->flat<float>().data();
    const uint32_t* keys = keys_in->flat<uint32_t>().data();
    const float* hyper = hyper_in->flat<float>().data();
    const RuleConstants table(hyper), step(hyper + 8);
    const float lsq_scale = hyper[16], min_step_size = hyper[17];
    const int32_t q_neg = 1 << (num_bits_ - 1);
    const float q_min = static_cast<float>(-q_neg);
    const float q_max = static_cast<float>(q_neg - 1);
    const float count = static_cast<float>(d);
    std::vector<uint32_t> column_keys(d);
    for (int64_t j = 0; j < d; ++j) {
      const int64_t c = ((j + 1) * int64_t{0x1E3779B9}) & 0xFFFFFFFFLL;
      column_keys[j] = Mix32(static_cast<uint32_t>(c));
    }
    float* step_sizes = vars[1]->tensor()->flat<float>().data();
    float* slot[2] = {nullptr, nullptr};       // the table rule's
    float* step_slot[2] = {nullptr, nullptr};  // the Δ rule's
    for (int k = 0; k < num_table_slots_; ++k) {
      slot[k] = vars[2 + k]->tensor()->flat<float>().data();
    }
    for (int k = 0; k < num_step_size_slots_; ++k) {
      step_slot[k] =
          vars[2 + num_table_slots_ + k]->tensor()->flat<float>().data();
    }
    const bool stochastic = stochastic_;
    const TableRule table_rule = table_rule_;
    const StepRule step_rule = step_rule_;
    const bool learn = step_rule != StepRule::kNone;

    auto rows = [&](int64_t begin, int64_t end) {
      std::vector<float> w(d), squares(d), updated(d), products(d),
          noise(d), first(d), second(d);
      std::vector<int32_t> codes(d);
      std::vector<uint64_t> buffer(stored.words() + 1);
      constexpr int64_t kAhead = 8;  // rows prefetched ahead (random ids)
      for (int64_t r = begin; r < end; ++r) {
        if (r + kAhead < end) {
          const int64_t next = ids[r + kAhead];
          __builtin_prefetch(stored.Address(next), 1);
          __builtin_prefetch(step_sizes + next, 1);
          for (int k = 0; k < num_table_slots_; ++k) {
            __builtin_prefetch(slot[k] + next * (per_element_state ? d : 1),
                               1);
          }
          for (int k = 0; k < num_step_size_slots_; ++k) {
            __builtin_prefetch(step_slot[k] + next, 1);
          }
        }
        const int64_t id = ids[r];
        const float* g = grads + r * d;
        stored.Read(id, codes.data());
        // The table optimizer on w = Δ·ŵ. Simple loops, one operation
        // chain each, so the compiler vectorises them without reordering.
        const float delta = step_sizes[id];
        for (int64_t j = 0; j < d; ++j) {
          w[j] = static_cast<float>(codes[j]) * delta;
        }
        for (int64_t j = 0; j < d; ++j) squares[j] = g[j] * g[j];
        float row_acc = 0.0f;
        switch (table_rule) {
          case TableRule::kRowwiseAdagrad: {
            const float mean_square = ColumnSum(squares.data(), d) / count;
            row_acc = slot[0][id] + mean_square;
            const float denominator = std::sqrt(row_acc) + table.epsilon;
            for (int64_t j = 0; j < d; ++j) {
              updated[j] = w[j] - (table.lr * g[j]) / denominator;
            }
            break;
          }
          case TableRule::kAdagrad: {
            const float* acc = slot[0] + id * d;
            for (int64_t j = 0; j < d; ++j) {
              first[j] = acc[j] + squares[j];
              updated[j] = w[j] - (table.lr * g[j]) /
                                      (std::sqrt(first[j]) + table.epsilon);
            }
            break;
          }
          case TableRule::kSgd:
            for (int64_t j = 0; j < d; ++j) {
              updated[j] = w[j] - table.lr * g[j];
            }
            break;
          case TableRule::kLazyAdam: {
            const float* m = slot[0] + id * d;
            const float* v2 = slot[1] + id * d;
            for (int64_t j = 0; j < d; ++j) {
              first[j] = table.beta_1 * m[j] + table.one_minus_beta_1 * g[j];
              second[j] =
                  table.beta_2 * v2[j] + table.one_minus_beta_2 * squares[j];
              const float m_hat = first[j] / table.bias_1;
              const float v_hat = second[j] / table.bias_2;
              updated[j] =
                  w[j] - table.lr * (m_hat / (std::sqrt(v_hat) +
                                              table.epsilon));
            }
            break;
          }
        }
        // The step-size rule on Δ from LSQ's gradient γ Σ_j g_j s_j.
        float new_delta = delta;
        float step_first = 0.0f, step_second = 0.0f;
        if (learn) {
          for (int64_t j = 0; j < d; ++j) {
            // where(v <= -Q_N, -Q_N, where(v >= Q_P, Q_P, R_D(v) - v)).
            const float ratio = updated[j] / delta;
            const float low = std::floor(ratio);
            const float up = (ratio - low >= 0.5f) ? 1.0f : 0.0f;
            const float inside = (low + up) - ratio;
            const float high = ratio >= q_max ? q_max : inside;
            products[j] = g[j] * (ratio <= q_min ? q_min : high);
          }
          const float step_grad = lsq_scale * ColumnSum(products.data(), d);
          switch (step_rule) {
            case StepRule::kRowwise: {
              const float mean_square =
                  ColumnSum(squares.data(), d) / count;
              step_first = step_slot[0][id] + mean_square;
              const float direction =
                  step_grad / (std::sqrt(step_first) + step.epsilon);
              new_delta = delta * (1.0f - step.lr * direction);
              break;
            }
            case StepRule::kAdagrad: {
              step_first = step_slot[0][id] + step_grad * step_grad;
              const float direction =
                  step_grad / (std::sqrt(step_first) + step.epsilon);
              new_delta = delta - step.lr * direction;
              break;
            }
            case StepRule::kAdam: {
              step_first = step.beta_1 * step_slot[0][id] +
                           step.one_minus_beta_1 * step_grad;
              step_second = step.beta_2 * step_slot[1][id] +
                            step.one_minus_beta_2 * (step_grad * step_grad);
              const float m_hat = step_first / step.bias_1;
              const float v_hat = step_second / step.bias_2;
              new_delta =
                  delta - step.lr * (m_hat / (std::sqrt(v_hat) +
                                              step.epsilon));
              break;
            }
            case StepRule::kSgd:
              new_delta = delta - step.lr * step_grad;
              break;
            case StepRule::kNone:
              break;
          }
          new_delta = MaxPropagateNaN(new_delta, min_step_size);
        }
        // Requantize: clip(R(w' / Δ')) with the row's hashed noise.
        if (stochastic) {
          int64_t t = 0;  // the logical table: offsets[t] <= id
          if (num_tables > 1) {
            t = static_cast<int64_t>(
                    std::upper_bound(offsets + 1, offsets + num_tables, id) -
                    (offsets + 1));
          }
          const uint64_t local = static_cast<uint64_t>(id - offsets[t]);
          const uint32_t row_key =
              Mix32(Mix32(keys[t] ^ static_cast<uint32_t>(local)) ^
                    static_cast<uint32_t>(local >> 32));
          for (int64_t j = 0; j < d; ++j) {
            const uint32_t hash = Mix32(row_key ^ column_keys[j]);
            noise[j] = static_cast<float>(static_cast<int32_t>(hash >> 8)) *
                       (1.0f / 16777216.0f);
          }
        } else {
          for (int64_t j = 0; j < d; ++j) noise[j] = 0.5f;
        }
        for (int64_t j = 0; j < d; ++j) {
          const float scaled = updated[j] / new_delta;
          const float low = std::floor(scaled);
          const float fraction = scaled - low;
          // Stochastic: [u < x - floor(x)]; deterministic (round half
          // up): [x - floor(x) >= 0.5].
          const bool up = stochastic ? (noise[j] < fraction)
                                     : (fraction >= noise[j]);
          const float rounded = low + (up ? 1.0f : 0.0f);
          // tf.clip_by_value: minimum with Q_P, then maximum with -Q_N
          // (NaN stays NaN).
          const float upper = rounded > q_max ? q_max : rounded;
          const float clipped = upper < q_min ? q_min : upper;
          codes[j] = static_cast<int32_t>(clipped);
        }
        stored.Write(id, codes.data(), buffer.data());  // in place
        switch (table_rule) {
          case TableRule::kRowwiseAdagrad:
            slot[0][id] = row_acc;
            break;
          case TableRule::kAdagrad:
            std::memcpy(slot[0] + id * d, first.data(), sizeof(float) * d);
            break;
          case TableRule::kLazyAdam:
            std::memcpy(slot[0] + id * d, first.data(), sizeof(float) * d);
            std::memcpy(slot[1] + id * d, second.data(), sizeof(float) * d);
            break;
          case TableRule::kSgd:
            break;
        }
        if (learn) {
          step_sizes[id] = new_delta;
          if (num_step_size_slots_ > 0) step_slot[0][id] = step_first;
          if (num_step_size_slots_ > 1) step_slot[1][id] = step_second;
        }
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    workers->ParallelFor(u, 40 * d + 100, rows);
  }

 private:
  TableRule table_rule_;
  StepRule step_rule_;
  int num_table_slots_;
  int num_step_size_slots_;
  int num_bits_;
  bool packed_;
  bool stochastic_;
};

REGISTER_KERNEL_BUILDER(Name("AlptTableStep").Device(DEVICE_CPU),
                        TableStepOp);

// ---------------------------------------------------------------------------
// AlptGatherDequantize: the training forward's lookup, `Δ·ŵ` of each id's
// row, in one pass over the ids (the stock ops gather the codes, cast them
// twice, gather Δ and multiply: five passes over [N, D]).

REGISTER_OP("AlptGatherDequantize")
    .Input("codes: resource")
    .Input("step_sizes: resource")
    .Input("ids: int64")
    .Output("rows: float")
    .Attr("num_bits: int >= 2")
    .Attr("output_dim: int >= 1")
    .Attr("packed: bool")
    .Attr("per_row: bool")
    .SetIsStateful()
    .SetShapeFn([](shape_inference::InferenceContext* c) {
      shape_inference::ShapeHandle ids;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(2), 1, &ids));
      int64_t dim;
      TF_RETURN_IF_ERROR(c->GetAttr("output_dim", &dim));
      c->set_output(0, c->Matrix(c->Dim(ids, 0), dim));
      return ::tensorflow::OkStatus();
    })
    .Doc(R"doc(
Rows `float(code) * Δ` [N, output_dim] of `ids` (each in [0, V)): bitwise
`dequantize(read_rows(ids), read_step_sizes(ids))` (one IEEE product per
value). `per_row`: Δ[id]; else the table's one Δ (step_sizes [1, 1]).
)doc");

class GatherDequantizeOp : public OpKernel {
 public:
  explicit GatherDequantizeOp(OpKernelConstruction* context)
      : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("num_bits", &num_bits_));
    OP_REQUIRES_OK(context, context->GetAttr("output_dim", &d_));
    OP_REQUIRES_OK(context, context->GetAttr("packed", &packed_));
    OP_REQUIRES_OK(context, context->GetAttr("per_row", &per_row_));
    OP_REQUIRES(context, num_bits_ >= 2 && num_bits_ <= 8,
                InvalidArgument("num_bits must be in [2, 8], got ",
                                num_bits_));
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& ids_in = context->input(2);
    OP_REQUIRES(context, ids_in.dims() == 1,
                InvalidArgument("ids must be a vector, got shape ",
                                ids_in.shape().DebugString()));
    ::tensorflow::core::RefCountPtr<Var> codes_var, steps_var;
    OP_REQUIRES_OK(context, ::tensorflow::LookupResource(
                                context, ::tensorflow::HandleFromInput(
                                             context, 0),
                                &codes_var));
    OP_REQUIRES_OK(context, ::tensorflow::LookupResource(
                                context, ::tensorflow::HandleFromInput(
                                             context, 1),
                                &steps_var));
    const int64_t n = ids_in.dim_size(0);
    const int64_t d = d_;
    Tensor* rows_out = nullptr;
    OP_REQUIRES_OK(context, context->allocate_output(0, TensorShape({n, d}),
                                                     &rows_out));
    // Shared locks in address order, as ResourceGather reads.
    ::tensorflow::mutex* first = codes_var->mu();
    ::tensorflow::mutex* second = steps_var->mu();
    if (second < first) std::swap(first, second);
    ::tensorflow::tf_shared_lock lock_first(*first);
    std::optional<::tensorflow::tf_shared_lock> lock_second;
    if (second != first) lock_second.emplace(*second);
    OP_REQUIRES(context, codes_var->is_initialized &&
                             steps_var->is_initialized,
                ::tensorflow::errors::FailedPrecondition(
                    "ALPT table variables are not initialized"));
    Codes stored(num_bits_, d, packed_);
    OP_REQUIRES_OK(context, stored.Bind(*codes_var->tensor()));
    const Tensor& steps_t = *steps_var->tensor();
    const int64_t v = stored.rows();
    OP_REQUIRES(context, steps_t.dtype() == ::tensorflow::DT_FLOAT &&
                             steps_t.NumElements() == (per_row_ ? v : 1),
                InvalidArgument("step sizes must be float with ",
                                per_row_ ? v : 1, " values, got ",
                                steps_t.shape().DebugString()));
    const int64_t* ids = ids_in.flat<int64_t>().data();
    for (int64_t r = 0; r < n; ++r) {  // never outside the table's rows
      OP_REQUIRES(context, ids[r] >= 0 && ids[r] < v,
                  InvalidArgument("row id ", ids[r], " is not in [0, ", v,
                                  ")"));
    }
    const float* steps = steps_t.flat<float>().data();
    float* out = rows_out->flat<float>().data();
    const bool per_row = per_row_;

    auto rows = [&](int64_t begin, int64_t end) {
      std::vector<int32_t> codes(d);
      constexpr int64_t kAhead = 8;
      for (int64_t r = begin; r < end; ++r) {
        if (r + kAhead < end) {
          const int64_t next = ids[r + kAhead];
          __builtin_prefetch(stored.Address(next));
          if (per_row) __builtin_prefetch(steps + next);
        }
        const int64_t id = ids[r];
        const float delta = per_row ? steps[id] : steps[0];
        float* row_out = out + r * d;
        stored.Read(id, codes.data());
        for (int64_t j = 0; j < d; ++j) {
          row_out[j] = static_cast<float>(codes[j]) * delta;
        }
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
    workers->ParallelFor(n, 4 * d + 20, rows);
  }

 private:
  int num_bits_;
  int64_t d_;
  bool packed_;
  bool per_row_;
};

REGISTER_KERNEL_BUILDER(Name("AlptGatherDequantize").Device(DEVICE_CPU),
                        GatherDequantizeOp);

}  // namespace
}  // namespace alpt
