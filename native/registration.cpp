// Every schema of the `lion` operator library, one line of comment each. Kernels are
// registered per backend in cpu/ and cuda/; fake (meta) implementations are in
// lion_ops/ops.py, which set_python_module names so torch can point users to it.
#include <torch/library.h>

TORCH_LIBRARY(lion, m) {
  m.set_python_module("lion_ops.ops");

  // Lion step with fp32 momentum, in place, for lists of same-shaped params/grads/momenta on one device.
  m.def(
      "lion_update_32bit(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momenta, Tensor lr, "
      "float beta1, float beta2, float weight_decay) -> ()");
}
