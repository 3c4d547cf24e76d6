// Argument checking and memory-layout preparation shared by the CPU and CUDA kernels of
// the list ("multi-tensor") operators.
#pragma once

#include <ATen/core/Tensor.h>

#include <deque>
#include <initializer_list>
#include <optional>
#include <utility>
#include <vector>

namespace lion {

// The hyperparameters of the update operators are 0-dim floating-point tensors, each on the
// CPU (read on the host when the operator is called, and range-checked then) or on the
// params' device (read by the CUDA kernel, so that changing one needs neither a host
// synchronization nor, under torch.compile, a new graph; not range-checked per call).
// The values of those on the CPU, rounded to float32 as the kernels use them; 0 for the others.
struct HostHyperparameters {
  float lr = 0.f, beta1 = 0.f, beta2 = 0.f, weight_decay = 0.f;
};

// What the checks of an update operator hand to its kernel.
struct CheckedUpdate {
  const float* grad_scales = nullptr;  // one float32 per param, or nullptr when absent
  HostHyperparameters host;
};

// The complete argument checks of each operator, shared by its CPU and CUDA kernels.
// Nothing is modified before they pass.
CheckedUpdate check_lion_update_32bit_args(at::TensorList params, at::TensorList grads,
                                           at::TensorList momenta, const at::Tensor& lr,
                                           const at::Tensor& beta1, const at::Tensor& beta2,
                                           const at::Tensor& weight_decay,
                                           const std::optional<at::Tensor>& grad_scales);
CheckedUpdate check_lion_update_8bit_blockwise_args(
    at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmaxes,
    const at::Tensor& qmap, const at::Tensor& lr, const at::Tensor& beta1,
    const at::Tensor& beta2, const at::Tensor& weight_decay,
    const std::optional<at::Tensor>& grad_scales);
CheckedUpdate check_lion_update_8bit_static_args(
    at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList max1s,
    at::TensorList new_max1s, const at::Tensor& qmap, const at::Tensor& lr,
    const at::Tensor& beta1, const at::Tensor& beta2, const at::Tensor& weight_decay,
    const std::optional<at::Tensor>& grad_scales);
void check_quantize_blockwise_args(const at::Tensor& input, const at::Tensor& qmap,
                                   int64_t blocksize);
void check_dequantize_blockwise_args(const at::Tensor& codes, const at::Tensor& absmax,
                                     const at::Tensor& qmap, int64_t blocksize);

// zeros_paged_like: checks its arguments and returns the strides of its result (like's own
// when like is dense and non-overlapping and the format is preserve, else contiguous).
std::vector<int64_t> paged_like_strides(const at::Tensor& like,
                                        std::optional<at::MemoryFormat> memory_format);
// prefetch_paged: dense tensors, all on one device. Returns that device (CPU if empty).
at::Device check_prefetch_paged_args(at::TensorList tensors);

// Checks what every update operator takes: the hyperparameter tensors and the (param, grad)
// pairs. Throws a ValueError/TypeError naming the argument. Returns the values of the
// hyperparameters that are on the CPU.
HostHyperparameters check_update_args(const char* op, at::TensorList params,
                                      at::TensorList grads, const at::Tensor& lr,
                                      const at::Tensor& beta1, const at::Tensor& beta2,
                                      const at::Tensor& weight_decay);

// How a per-param state tensor is shaped relative to its param.
enum class StateShape {
  kLikeParam,      // the param's shape (momentum, 8-bit codes)
  kOnePerBlock,    // 1-D, one entry per 256-element block (blockwise absmax)
  kOneElement,     // a single element (per-tensor scale)
};

// Checks the state list `name`: one tensor per param, of `dtype`, on the params' device.
void check_state_list(const char* op, const char* name, at::TensorList params,
                      at::TensorList states, at::ScalarType dtype, StateShape shape);

// Refuses a call in which two of the tensors it writes (the entries of `lists`, each a
// (name, list) pair) start at the same address, such as one param passed twice (a tied
// weight listed twice): two threads, or two CUDA blocks, would read and write it at once;
// and one in which a tensor it writes overlaps itself (an expanded view). Empty tensors are
// exempt.
void check_distinct_outputs(const char* op,
                            std::initializer_list<std::pair<const char*, at::TensorList>> lists);

// Checks a quantization map: 256 float32 values, contiguous, on `device`, and on the CPU
// that they are sorted ascending (a GPU's map is not read on the host: there an unsorted map
// gives codes that are not the nearest entries).
void check_qmap(const char* op, const at::Tensor& qmap, at::Device device);

// Checks optional per-tensor gradient scales: float32, one per param, on the params' device.
// Returns their data, or nullptr when absent.
const float* grad_scales_data(const char* op, const std::optional<at::Tensor>& grad_scales,
                              at::TensorList params);

// Checks the arguments of percentile_clipping.
void check_percentile_clipping_args(at::TensorList grads, at::TensorList gnorm_vecs,
                                    at::TensorList steps, int64_t percentile);

// Checks the step counters of increment_steps: one-element float32 tensors on one device.
void check_step_counters(at::TensorList steps);


// Which element orders a kernel may walk its operands in.
enum class ElementOrder {
  kAny,      // any one order shared by all operands: the update is elementwise
  kLogical,  // the tensors' logical (row-major) order: blockwise state, whose blocks are
             // 256 consecutive elements in that order, as quantize_blockwise makes them
};

// Makes the i-th tensor of every operand list walkable as a flat array, all in the same
// element order (the i-th tensors of all lists have one shape). A group of contiguous tensors,
// or (with ElementOrder::kAny) one whose written tensors are dense and share strides, is used
// in place (a transposed param with a transposed momentum is fine), read-only ones laid out
// otherwise being copied into that layout; any other group is replaced by contiguous copies,
// and write_back() copies the mutated ones back. Tensors used in place are referred to, not
// copied (the lists outlive the operator call): no reference counting per tensor.
class FlatOperands {
 public:
  FlatOperands(std::vector<at::TensorList> lists, std::vector<bool> mutated,
               ElementOrder order = ElementOrder::kAny);
  FlatOperands(const FlatOperands&) = delete;  // flat_ points into copies_
  FlatOperands& operator=(const FlatOperands&) = delete;
  const at::Tensor& get(size_t list, size_t index) const { return *flat_[list][index]; }
  size_t size() const { return flat_.empty() ? 0 : flat_[0].size(); }
  void write_back();

 private:
  std::vector<std::vector<const at::Tensor*>> flat_;
  std::deque<at::Tensor> copies_;  // the copies flat_ points to (a deque: they never move)
  std::vector<std::pair<const at::Tensor*, const at::Tensor*>> pending_;  // (original, copy)
};

}  // namespace lion
