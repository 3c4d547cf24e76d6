// CUDA host side of the lion operators: checks arguments, groups tensors by dtype and
// launches the kernels of lion_kernels.cu on the current stream. Nothing here waits on
// the device.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <memory>

#include "lion_batch.h"
#include "lion_kernels.cuh"

namespace lion {
namespace {

cuda::ParamType param_type_of(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::ParamType::kFloat32;
    case at::kBFloat16: return cuda::ParamType::kBFloat16;
    case at::kHalf: return cuda::ParamType::kFloat16;
    default: TORCH_CHECK_TYPE(false, "lion: unsupported param dtype ", t);
  }
}

int32_t blocks_for(int64_t numel) {
  const int64_t blocks = (numel + cuda::kElementsPerBlock - 1) / cuda::kElementsPerBlock;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(),
                    "lion: a tensor of ", numel, " elements is too large for one launch");
  return static_cast<int32_t>(blocks);
}

void lion_update_32bit_cuda(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                            const at::Tensor& lr, double beta1, double beta2,
                            double weight_decay) {
  check_lion_update_32bit_args(params, grads, momenta, lr, beta1, beta2, weight_decay);
  if (params.empty()) return;
  const at::Device device = params[0].device();
  TORCH_CHECK_VALUE(device.is_cuda(), "lion_update_32bit: CUDA kernel got ", device);
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // Kernel parameters are large; keep them off the host stack.
  auto batch = std::make_unique<cuda::Lion32bitBatch>();
  batch->beta1 = static_cast<float>(beta1);
  batch->beta2 = static_cast<float>(beta2);
  batch->weight_decay = static_cast<float>(weight_decay);
  at::Tensor lr_on_device;  // keeps a converted lr alive until the launches are queued
  if (lr.device().is_cpu()) {
    batch->lr = host_learning_rate(lr);
    batch->lr_on_device = nullptr;
  } else {
    lr_on_device = lr.scalar_type() == at::kFloat ? lr : lr.to(at::kFloat);
    batch->lr_on_device = lr_on_device.const_data_ptr<float>();
  }

  FlatOperands flat({params, grads, momenta}, {true, false, true});
  // One launch per dtype present (and per kMaxTensorsPerLaunch tensors).
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    batch->num_tensors = 0;
    batch->first_block[0] = 0;
    auto flush = [&] {
      if (batch->num_tensors == 0) return;
      cuda::launch_lion_32bit(*batch, param_type_of(dtype), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      batch->num_tensors = 0;
    };
    for (size_t t = 0; t < flat.size(); ++t) {
      const at::Tensor& p = flat.get(0, t);
      if (p.scalar_type() != dtype || p.numel() == 0) continue;
      const int32_t blocks = blocks_for(p.numel());
      if (batch->num_tensors == cuda::kMaxTensorsPerLaunch ||
          batch->first_block[batch->num_tensors] > std::numeric_limits<int32_t>::max() - blocks) {
        flush();
      }
      const int32_t slot = batch->num_tensors++;
      batch->params[slot] = p.data_ptr();
      batch->grads[slot] = flat.get(1, t).const_data_ptr();
      batch->momenta[slot] = flat.get(2, t).data_ptr<float>();
      batch->numels[slot] = p.numel();
      batch->first_block[slot + 1] = batch->first_block[slot] + blocks;
    }
    flush();
  }
  flat.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(lion, CUDA, m) {
  m.impl("lion_update_32bit", &lion_update_32bit_cuda);
}

// A sparse gradient dispatches here; the argument checks then refuse it by name.
TORCH_LIBRARY_IMPL(lion, SparseCUDA, m) {
  m.impl("lion_update_32bit", &lion_update_32bit_cuda);
}

}  // namespace lion
