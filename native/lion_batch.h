// Argument checking and memory-layout preparation shared by the CPU and CUDA kernels of
// the list ("multi-tensor") operators.
#pragma once

#include <ATen/core/Tensor.h>

#include <string_view>
#include <utility>
#include <vector>

namespace lion {

// Checks one call of lion_update_32bit; throws a ValueError/TypeError naming the argument.
void check_lion_update_32bit_args(
    at::TensorList params, at::TensorList grads, at::TensorList momenta, const at::Tensor& lr,
    double beta1, double beta2, double weight_decay);

// The learning rate as a float, for an lr tensor that lives on the CPU.
float host_learning_rate(const at::Tensor& lr);

// Makes the i-th tensor of every operand list walkable as a flat array, all in the same
// element order. A group whose tensors are dense and share strides is used in place (a
// transposed param with a transposed grad and momentum is fine); any other group is
// replaced by contiguous copies, and write_back() copies the mutated ones back.
class FlatOperands {
 public:
  FlatOperands(std::vector<at::TensorList> lists, std::vector<bool> mutated);
  const at::Tensor& get(size_t list, size_t index) const { return flat_[list][index]; }
  size_t size() const { return flat_.empty() ? 0 : flat_[0].size(); }
  void write_back();

 private:
  std::vector<std::vector<at::Tensor>> flat_;
  std::vector<std::pair<at::Tensor, at::Tensor>> pending_;  // (original, contiguous copy)
};

}  // namespace lion
