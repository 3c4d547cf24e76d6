// Shapes of the 32-bit and blockwise 8-bit Lion kernels, for timing against the ones the
// library uses (an experiment, not part of the package). It compiles the library's own kernel
// source with other Shape32bit and Shape8bit arguments, so what it times is the library's
// code; tools/kernel_shapes.py builds it with nvcc, checks every shape against the CPU
// operator bit for bit and times them, and tests/test_cuda_emulated.py runs the same check in
// the CPU emulation.
//
// C interface (ctypes): kernel_shape_count(), kernel_shape_name(i), kernel_shape_launch(...),
// and for the 8-bit kernel kernel_shape8_count(), _name(i), _tables_bytes(), _build_tables(...),
// kernel_shape8_launch(...).
#include "lion_kernels.cu"

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
    LION_SHAPE(2048, 2, kStreaming),
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
};
constexpr int kShapeCount = sizeof(kShapes) / sizeof(kShapes[0]);
static_assert(std::is_same_v<lion::cuda::Production32bitShape,
                             Shape32bit<2048, 2, Caching::kStreaming>>,
              "kShapes[0] must be the library's shape");

// Shapes of the blockwise 8-bit kernel, fp32 params only (what the benchmark's sets use):
// its encoder and its register budget.
using lion::cuda::Encoder;
using lion::cuda::Lion8bitBatch;
using lion::cuda::Scaling;
using lion::cuda::Shape8bit;

struct Shape8Entry {
  const char* name;
  void (*launch)(const Lion8bitBatch&, Scaling, cudaStream_t);
};

#define LION_SHAPE8(encoder, min_blocks)                                                  \
  Shape8Entry{"8-bit " #encoder " min_blocks=" #min_blocks,                               \
              &lion::cuda::launch_8bit_typed<float, Shape8bit<Encoder::encoder, min_blocks>>}

// The first is the library's (Production8bitShape, checked below).
const Shape8Entry kShapes8[] = {
    LION_SHAPE8(kFoldedLane, 0),
    LION_SHAPE8(kFoldedLane, 5),
    LION_SHAPE8(kFolded, 0),
    LION_SHAPE8(kCompact, 0),
};
constexpr int kShape8Count = sizeof(kShapes8) / sizeof(kShapes8[0]);
static_assert(std::is_same_v<lion::cuda::Production8bitShape, Shape8bit<Encoder::kFoldedLane, 0>>,
              "kShapes8[0] must be the library's shape");

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
    const int64_t blocks =
        batch->first_block[t] + lion::count_blocks(numels[t], kShapes[shape].span);
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

KERNEL_SHAPES_EXPORT int kernel_shape8_count() { return kShape8Count; }

KERNEL_SHAPES_EXPORT const char* kernel_shape8_name(int shape) {
  return shape >= 0 && shape < kShape8Count ? kShapes8[shape].name : nullptr;
}

// Bytes of the encode tables that kernel_shape8_build_tables fills.
KERNEL_SHAPES_EXPORT int kernel_shape8_tables_bytes() { return lion::kEncodeTablesBytes; }

// The encode tables of a 256-entry float32 map on the device (as the library builds them).
KERNEL_SHAPES_EXPORT int kernel_shape8_build_tables(const float* qmap, uint8_t* tables,
                                                    void* stream) {
  lion::cuda::launch_build_encode_table(qmap, tables, static_cast<cudaStream_t>(stream));
#if defined(__CUDACC__)
  return static_cast<int>(cudaGetLastError());
#else
  return 0;
#endif
}

// One blockwise 8-bit step of shape `shape` over `count` float32 params (codes: uint8, one
// absmax per 256 elements), qmap and tables on the device. Returns as kernel_shape_launch.
KERNEL_SHAPES_EXPORT int kernel_shape8_launch(int shape, int count, void* const* params,
                                              const void* const* grads, uint8_t* const* codes,
                                              float* const* absmaxes, const int64_t* numels,
                                              const float* qmap, const uint8_t* tables,
                                              const float* hyper, void* stream) {
  if (shape < 0 || shape >= kShape8Count || count < 0 ||
      count > lion::cuda::kMaxTensorsPerLaunch) {
    return -1;
  }
  auto batch = std::make_unique<Lion8bitBatch>();
  batch->num_tensors = count;
  batch->first_block[0] = 0;
  for (int t = 0; t < count; ++t) {
    batch->params[t] = params[t];
    batch->grads[t] = grads[t];
    batch->codes[t] = codes[t];
    batch->scales[t] = absmaxes[t];
    batch->new_scales[t] = nullptr;
    batch->grad_scale[t] = nullptr;
    batch->numels[t] = numels[t];
    const int64_t blocks = batch->first_block[t] +
                           lion::count_blocks(numels[t], lion::cuda::kElements8bitPerBlock);
    if (blocks > INT32_MAX) return -2;
    batch->first_block[t + 1] = static_cast<int32_t>(blocks);
  }
  batch->qmap = qmap;
  batch->encode_table = tables;
  lion::cuda::DeviceOrHostFloat* fields[] = {&batch->hyper.lr, &batch->hyper.beta1,
                                             &batch->hyper.beta2, &batch->hyper.weight_decay};
  for (int i = 0; i < 4; ++i) *fields[i] = {nullptr, hyper[i]};
  kShapes8[shape].launch(*batch, Scaling::kBlockwise, static_cast<cudaStream_t>(stream));
#if defined(__CUDACC__)
  return static_cast<int>(cudaGetLastError());
#else
  return 0;
#endif
}
