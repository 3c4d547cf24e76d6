// The paging_support operator (it takes no tensor, so it has one kernel for every backend),
// and zeros_paged_like's autograd registration.
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "paging.h"

#ifdef LION_OPS_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace lion {
namespace {

int64_t paging_support(at::Device device) {
  if (!device.is_cuda()) return kNoPaging;
#ifdef LION_OPS_WITH_CUDA
  const c10::DeviceIndex count = c10::cuda::device_count();
  // (current_device() fails with the driver's error where there is no device: asked after)
  const c10::DeviceIndex index =
      device.has_index() ? device.index() : (count > 0 ? c10::cuda::current_device() : 0);
  TORCH_CHECK_VALUE(index >= 0 && index < count, "paging_support: no device ", device,
                    " (this machine has ", static_cast<int>(count), " CUDA devices)");
  return cuda::paging_support(index);
#else
  return kNoPaging;  // built without the CUDA kernels
#endif
}

}  // namespace

TORCH_LIBRARY_IMPL(lion, CompositeExplicitAutograd, m) {
  m.impl("paging_support", &paging_support);
}

// zeros_paged_like makes new state, which is never differentiable: autograd passes it by, so
// that zeros laid out like a param that requires grad do not themselves require grad.
TORCH_LIBRARY_IMPL(lion, Autograd, m) {
  m.impl("zeros_paged_like", torch::CppFunction::makeFallthrough());
}

}  // namespace lion
