// Shapes of the 32-bit Lion kernel, for timing against the one the library uses (an
// experiment, not part of the package). It compiles the library's own kernel source with
// other Shape32bit arguments, so what it times is the library's code; tools/kernel_shapes.py
// builds it with nvcc, checks every shape against the CPU operator bit for bit and times
// them, and tests/test_cuda_emulated.py runs the same check in the CPU emulation.
//
// C interface (ctypes): kernel_shape_count(), kernel_shape_name(i), kernel_shape_launch(...).
#include "lion_kernels.cu"

#include <cstdio>
#include <memory>

#define KERNEL_SHAPES_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using lion::cuda::Caching;
using lion::cuda::Lion32bitBatch;
using lion::cuda::ParamType;
using lion::cuda::Shape32bit;

struct ShapeEntry {
  const char* name;
  int64_t span;
  void (*launch)(const Lion32bitBatch&, ParamType, cudaStream_t);
};

#define LION_SHAPE(span, unroll, caching)                                                 \
  ShapeEntry{"span=" #span " unroll=" #unroll " " #caching, span,                         \
             &lion::cuda::launch_32bit_shaped<Shape32bit<span, unroll, Caching::caching>>}

// The first is the library's (Production32bitShape, checked below).
const ShapeEntry kShapes[] = {
    LION_SHAPE(8192, 1, kDefault),
    LION_SHAPE(8192, 2, kDefault),
    LION_SHAPE(8192, 4, kDefault),
    LION_SHAPE(16384, 2, kDefault),
    LION_SHAPE(16384, 4, kDefault),
    LION_SHAPE(4096, 1, kDefault),
    LION_SHAPE(4096, 2, kDefault),
    LION_SHAPE(4096, 4, kDefault),
    LION_SHAPE(2048, 1, kDefault),
    LION_SHAPE(2048, 2, kDefault),
    LION_SHAPE(1024, 1, kDefault),
    LION_SHAPE(8192, 1, kStreaming),
    LION_SHAPE(8192, 2, kStreaming),
    LION_SHAPE(4096, 2, kStreaming),
    LION_SHAPE(2048, 2, kStreaming),
};
constexpr int kShapeCount = sizeof(kShapes) / sizeof(kShapes[0]);
static_assert(std::is_same_v<lion::cuda::Production32bitShape,
                             Shape32bit<8192, 1, Caching::kDefault>>,
              "kShapes[0] must be the library's shape");

}  // namespace

KERNEL_SHAPES_EXPORT int kernel_shape_count() { return kShapeCount; }

KERNEL_SHAPES_EXPORT const char* kernel_shape_name(int shape) {
  return shape >= 0 && shape < kShapeCount ? kShapes[shape].name : nullptr;
}

// One launch of shape `shape` over `count` tensors of one dtype (0 float32, 1 bfloat16,
// 2 float16), hyperparameters {lr, beta1, beta2, weight_decay} given as values.
// Returns 0, or: -1 a bad shape, dtype or count, -2 too many blocks, or a CUDA error code.
KERNEL_SHAPES_EXPORT int kernel_shape_launch(int shape, int dtype, int count,
                                             void* const* params, const void* const* grads,
                                             float* const* momenta, const int64_t* numels,
                                             const float* hyper, void* stream) {
  if (shape < 0 || shape >= kShapeCount || dtype < 0 || dtype > 2 || count < 0 ||
      count > lion::cuda::kMaxTensorsPerLaunch) {
    return -1;
  }
  auto batch = std::make_unique<Lion32bitBatch>();
  batch->num_tensors = count;
  batch->first_block[0] = 0;
  for (int t = 0; t < count; ++t) {
    batch->params[t] = params[t];
    batch->grads[t] = grads[t];
    batch->momenta[t] = momenta[t];
    batch->grad_scale[t] = nullptr;
    batch->numels[t] = numels[t];
    const int64_t blocks = batch->first_block[t] + lion::count_blocks(numels[t], kShapes[shape].span);
    if (blocks > INT32_MAX) return -2;
    batch->first_block[t + 1] = static_cast<int32_t>(blocks);
  }
  lion::cuda::DeviceOrHostFloat* fields[] = {&batch->hyper.lr, &batch->hyper.beta1,
                                             &batch->hyper.beta2, &batch->hyper.weight_decay};
  for (int i = 0; i < 4; ++i) *fields[i] = {nullptr, hyper[i]};
  kShapes[shape].launch(*batch, static_cast<ParamType>(dtype),
                        static_cast<cudaStream_t>(stream));
#if defined(__CUDACC__)
  return static_cast<int>(cudaGetLastError());
#else
  return 0;
#endif
}
