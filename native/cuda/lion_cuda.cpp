// CUDA host side of the lion operators: checks arguments, groups tensors by dtype and
// launches the kernels of lion_kernels.cu on the current stream. Nothing here waits on
// the device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#include "lion_batch.h"
#include "lion_math.h"
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

at::Device check_on_cuda(const char* op, at::TensorList params) {
  TORCH_CHECK_VALUE(params[0].device().is_cuda(), op, ": CUDA kernel got ", params[0].device());
  return params[0].device();
}

int32_t blocks_for(int64_t numel, int64_t elements_per_block) {
  const int64_t blocks = (numel + elements_per_block - 1) / elements_per_block;
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(),
                    "lion: a tensor of ", numel, " elements is too large for one launch");
  return static_cast<int32_t>(blocks);
}

// The compact and folded encode tables of qmap (lion_math.h), built on the device for this
// call: one small launch, no host synchronization. The caching allocator keeps them alive for
// the stream.
at::Tensor encode_table(const at::Tensor& qmap, cudaStream_t stream) {
  at::Tensor table = at::empty({kEncodeTablesBytes}, qmap.options().dtype(at::kByte));
  cuda::launch_build_encode_table(qmap.const_data_ptr<float>(), table.data_ptr<uint8_t>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return table;
}

// Fills the hyperparameters of a batch: those on the CPU were read by the checks (no sync);
// those on the device are read by the kernel. Returns the float32 device tensors to keep
// alive until the launches are queued.
std::vector<at::Tensor> set_hyperparameters(cuda::Hyperparameters& hyper,
                                            const HostHyperparameters& host, const at::Tensor& lr,
                                            const at::Tensor& beta1, const at::Tensor& beta2,
                                            const at::Tensor& weight_decay) {
  std::vector<at::Tensor> alive;
  const auto set = [&](cuda::DeviceOrHostFloat& field, const at::Tensor& t, float host_value) {
    field.value = host_value;
    field.on_device = nullptr;
    if (t.device().is_cpu()) return;
    at::Tensor t32 = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
    field.on_device = t32.const_data_ptr<float>();
    alive.push_back(std::move(t32));
  };
  set(hyper.lr, lr, host.lr);
  set(hyper.beta1, beta1, host.beta1);
  set(hyper.beta2, beta2, host.beta2);
  set(hyper.weight_decay, weight_decay, host.weight_decay);
  return alive;
}

// Packs the tensors of `flat` into batches of at most kMaxTensorsPerLaunch tensors and one
// dtype, calling fill(slot, t) for each tensor and launch(dtype) for each full batch.
template <typename Batch, typename Fill, typename Launch>
void for_each_batch(Batch& batch, const FlatOperands& flat, int64_t elements_per_block,
                    const Fill& fill, const Launch& launch) {
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    batch.num_tensors = 0;
    batch.first_block[0] = 0;
    auto flush = [&] {
      if (batch.num_tensors == 0) return;
      launch(param_type_of(dtype));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      batch.num_tensors = 0;
    };
    for (size_t t = 0; t < flat.size(); ++t) {
      const at::Tensor& p = flat.get(0, t);
      if (p.scalar_type() != dtype || p.numel() == 0) continue;
      const int32_t blocks = blocks_for(p.numel(), elements_per_block);
      if (batch.num_tensors == cuda::kMaxTensorsPerLaunch ||
          batch.first_block[batch.num_tensors] > std::numeric_limits<int32_t>::max() - blocks) {
        flush();
      }
      const int32_t slot = batch.num_tensors++;
      batch.params[slot] = p.data_ptr();
      batch.grads[slot] = flat.get(1, t).const_data_ptr();
      batch.numels[slot] = p.numel();
      batch.first_block[slot + 1] = batch.first_block[slot] + blocks;
      fill(slot, t);
    }
    flush();
  }
}

void lion_update_32bit_cuda(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                            const at::Tensor& lr, const at::Tensor& beta1,
                            const at::Tensor& beta2, const at::Tensor& weight_decay,
                            const std::optional<at::Tensor>& grad_scales) {
  constexpr const char* op = "lion_update_32bit";
  const CheckedUpdate checked = check_lion_update_32bit_args(
      params, grads, momenta, lr, beta1, beta2, weight_decay, grad_scales);
  const float* scales = checked.grad_scales;
  if (params.empty()) return;
  const at::Device device = check_on_cuda(op, params);
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  // Kernel parameters are large; keep them off the host stack.
  auto batch = std::make_unique<cuda::Lion32bitBatch>();
  const auto hyper_alive =
      set_hyperparameters(batch->hyper, checked.host, lr, beta1, beta2, weight_decay);

  FlatOperands flat({params, grads, momenta}, {true, false, true});
  for_each_batch(
      *batch, flat, cuda::kElementsPer32bitBlock,
      [&](int32_t slot, size_t t) {
        batch->momenta[slot] = flat.get(2, t).data_ptr<float>();
        batch->grad_scale[slot] = scales != nullptr ? scales + t : nullptr;
      },
      [&](cuda::ParamType type) { cuda::launch_lion_32bit(*batch, type, stream); });
  flat.write_back();
}

void lion_update_8bit_cuda(const char* op, cuda::Scaling scaling, at::TensorList params,
                           at::TensorList grads, at::TensorList codes, at::TensorList scales,
                           at::TensorList new_scales, const at::Tensor& qmap,
                           const CheckedUpdate& checked, const at::Tensor& lr,
                           const at::Tensor& beta1, const at::Tensor& beta2,
                           const at::Tensor& weight_decay) {
  const float* grad_scales = checked.grad_scales;
  const at::Device device = check_on_cuda(op, params);
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();

  auto batch = std::make_unique<cuda::Lion8bitBatch>();
  batch->qmap = qmap.const_data_ptr<float>();
  const at::Tensor table = encode_table(qmap, stream);
  batch->encode_table = table.const_data_ptr<uint8_t>();
  const auto hyper_alive =
      set_hyperparameters(batch->hyper, checked.host, lr, beta1, beta2, weight_decay);

  FlatOperands flat({params, grads, codes}, {true, false, true},
                    scaling == cuda::Scaling::kBlockwise ? ElementOrder::kLogical
                                                         : ElementOrder::kAny);
  for_each_batch(
      *batch, flat, cuda::kElements8bitPerBlock,
      [&](int32_t slot, size_t t) {
        batch->codes[slot] = flat.get(2, t).data_ptr<uint8_t>();
        batch->grad_scale[slot] = grad_scales != nullptr ? grad_scales + t : nullptr;
        batch->scales[slot] = scales[t].data_ptr<float>();
        batch->new_scales[slot] = new_scales.empty() ? nullptr : new_scales[t].data_ptr<float>();
      },
      [&](cuda::ParamType type) { cuda::launch_lion_8bit(*batch, type, scaling, stream); });
  flat.write_back();
}

void lion_update_8bit_blockwise_cuda(at::TensorList params, at::TensorList grads,
                                     at::TensorList codes, at::TensorList absmaxes,
                                     const at::Tensor& qmap, const at::Tensor& lr,
                                     const at::Tensor& beta1, const at::Tensor& beta2,
                                     const at::Tensor& weight_decay,
                                     const std::optional<at::Tensor>& grad_scales) {
  constexpr const char* op = "lion_update_8bit_blockwise";
  const CheckedUpdate checked = check_lion_update_8bit_blockwise_args(
      params, grads, codes, absmaxes, qmap, lr, beta1, beta2, weight_decay, grad_scales);
  if (params.empty()) return;
  lion_update_8bit_cuda(op, cuda::Scaling::kBlockwise, params, grads, codes, absmaxes, {}, qmap,
                        checked, lr, beta1, beta2, weight_decay);
}

void lion_update_8bit_static_cuda(at::TensorList params, at::TensorList grads,
                                  at::TensorList codes, at::TensorList max1s,
                                  at::TensorList new_max1s, const at::Tensor& qmap,
                                  const at::Tensor& lr, const at::Tensor& beta1,
                                  const at::Tensor& beta2, const at::Tensor& weight_decay,
                                  const std::optional<at::Tensor>& grad_scales) {
  constexpr const char* op = "lion_update_8bit_static";
  const CheckedUpdate checked = check_lion_update_8bit_static_args(
      params, grads, codes, max1s, new_max1s, qmap, lr, beta1, beta2, weight_decay, grad_scales);
  if (params.empty()) return;
  // The launches skip empty tensors; their new scale is the max over no elements, 0, as on
  // the CPU.
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) {
      max1s[i].zero_();
      new_max1s[i].zero_();
    }
  }
  lion_update_8bit_cuda(op, cuda::Scaling::kStatic, params, grads, codes, max1s, new_max1s, qmap,
                        checked, lr, beta1, beta2, weight_decay);
}

at::Tensor percentile_clipping_cuda(at::TensorList grads, at::TensorList gnorm_vecs,
                                   at::TensorList steps, int64_t percentile) {
  check_percentile_clipping_args(grads, gnorm_vecs, steps, percentile);
  if (grads.empty()) return at::empty({0}, at::TensorOptions().dtype(at::kFloat));
  const at::Device device = check_on_cuda("percentile_clipping", grads);
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const auto options = grads[0].options().dtype(at::kFloat);
  at::Tensor scales = at::empty({static_cast<int64_t>(grads.size())}, options);
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(grads.size());
  int64_t total_blocks = 0;
  for (const at::Tensor& g : grads) {
    contiguous.push_back(g.contiguous());
    total_blocks += blocks_for(g.numel(), cuda::kElementsPerBlock);
  }
  at::Tensor partials =
      at::empty({std::max<int64_t>(total_blocks, 1)}, options.dtype(at::kDouble));
  auto batch = std::make_unique<cuda::GradNormBatch>();
  batch->percentile = static_cast<int32_t>(percentile);
  int64_t partial_offset = 0;
  for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16, at::kHalf}) {
    // Tensors of one dtype, in slots; their scales land at their own positions afterwards.
    std::vector<size_t> members;
    for (size_t t = 0; t < grads.size(); ++t) {
      if (grads[t].scalar_type() == dtype) members.push_back(t);
    }
    for (size_t start = 0; start < members.size(); start += cuda::kMaxTensorsPerLaunch) {
      const size_t count = std::min<size_t>(cuda::kMaxTensorsPerLaunch, members.size() - start);
      batch->num_tensors = static_cast<int32_t>(count);
      batch->first_block[0] = 0;
      for (size_t s = 0; s < count; ++s) {
        const size_t t = members[start + s];
        batch->grads[s] = contiguous[t].const_data_ptr();
        batch->gnorm_vecs[s] = gnorm_vecs[t].data_ptr<float>();
        batch->steps[s] = steps[t].const_data_ptr<float>();
        batch->numels[s] = contiguous[t].numel();
        batch->scale_of[s] = scales.data_ptr<float>() + t;
        batch->first_block[s + 1] =
            batch->first_block[s] + blocks_for(contiguous[t].numel(), cuda::kElementsPerBlock);
      }
      batch->partial_sums = partials.data_ptr<double>() + partial_offset;
      partial_offset += batch->first_block[count];
      cuda::launch_percentile_clipping(*batch, param_type_of(dtype), stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }
  return scales;
}

void increment_steps_cuda(at::TensorList steps) {
  check_step_counters(steps);
  if (steps.empty()) return;
  const at::Device device = check_on_cuda("increment_steps", steps);
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  auto counters = std::make_unique<cuda::StepCounters>();
  counters->count = 0;
  for (const at::Tensor& step : steps) {
    counters->steps[counters->count++] = step.data_ptr<float>();
    if (counters->count == cuda::kMaxTensorsPerLaunch) {
      cuda::launch_increment_steps(*counters, stream);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      counters->count = 0;
    }
  }
  cuda::launch_increment_steps(*counters, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cuda(const at::Tensor& input,
                                                           const at::Tensor& qmap,
                                                           int64_t blocksize) {
  check_quantize_blockwise_args(input, qmap, blocksize);
  c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous().to(at::kFloat);
  const int64_t n = x.numel();
  TORCH_CHECK_VALUE(count_blocks(n, blocksize) <= std::numeric_limits<int32_t>::max(),
                    "quantize_blockwise: ", n, " elements in blocks of ", blocksize,
                    " make more blocks than one launch takes; use a larger blocksize");
  at::Tensor codes = at::empty(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({count_blocks(n, blocksize)}, input.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  const at::Tensor table = encode_table(qmap, stream);
  cuda::launch_quantize_blockwise(x.const_data_ptr<float>(), table.const_data_ptr<uint8_t>(),
                                  qmap.const_data_ptr<float>(), n, blocksize,
                                  codes.data_ptr<uint8_t>(), absmax.data_ptr<float>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cuda(const at::Tensor& codes, const at::Tensor& absmax,
                                     const at::Tensor& qmap, int64_t blocksize) {
  check_dequantize_blockwise_args(codes, absmax, qmap, blocksize);
  const int64_t n = codes.numel();
  c10::cuda::CUDAGuard guard(codes.device());
  const at::Tensor c = codes.contiguous();
  const at::Tensor a = absmax.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  cuda::launch_dequantize_blockwise(c.const_data_ptr<uint8_t>(), a.const_data_ptr<float>(),
                                    qmap.const_data_ptr<float>(), n, blocksize,
                                    out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lion, CUDA, m) {
  m.impl("lion_update_32bit", &lion_update_32bit_cuda);
  m.impl("lion_update_8bit_blockwise", &lion_update_8bit_blockwise_cuda);
  m.impl("lion_update_8bit_static", &lion_update_8bit_static_cuda);
  m.impl("increment_steps", &increment_steps_cuda);
  m.impl("percentile_clipping", &percentile_clipping_cuda);
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
}

// A sparse tensor dispatches here; the argument checks then refuse it by name.
TORCH_LIBRARY_IMPL(lion, SparseCUDA, m) {
  m.impl("lion_update_32bit", &lion_update_32bit_cuda);
  m.impl("lion_update_8bit_blockwise", &lion_update_8bit_blockwise_cuda);
  m.impl("lion_update_8bit_static", &lion_update_8bit_static_cuda);
  m.impl("increment_steps", &increment_steps_cuda);
  m.impl("percentile_clipping", &percentile_clipping_cuda);
  m.impl("quantize_blockwise", &quantize_blockwise_cuda);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cuda);
}

}  // namespace lion
