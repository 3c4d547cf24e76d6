// The interface between the host code (lion_cuda.cpp, which sees torch) and the kernels
// (lion_kernels.cu, which does not): plain structs passed by value as kernel parameters,
// so that one launch covers a whole list of tensors with no host-to-device copy.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace lion::cuda {

enum class ParamType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Tensors per launch. Kernel parameters may take up to 32764 bytes since CUDA 12.1 on sm_70+
// (checked below for every batch); the largest batch, Lion8bitBatch, takes about 23 KB.
// Longer lists take several launches.
constexpr int kMaxTensorsPerLaunch = 384;

// Elements one thread block of percentile clipping's norm and of blockwise quantization
// covers; a tensor of n elements gets ceil(n / this) blocks.
constexpr int64_t kElementsPerBlock = 8192;

// Elements one thread block of the 32-bit update covers (Production32bitShape's span). On an
// H200 (bench_results/h200/9f9f246-kernel-shapes.json), 2048 elements in rounds of two packs
// with streaming hints beat 8192 one pack at a time by 4% to 8% on every benchmark set.
constexpr int64_t kElementsPer32bitBlock = 2048;

// A hyperparameter as the kernels take it: read at on_device when that is set (a tensor on
// the params' device, so that changing it needs no host synchronization), else value (read
// on the host when the operator was called).
struct DeviceOrHostFloat {
  const float* on_device;
  float value;
};

struct Hyperparameters {
  DeviceOrHostFloat lr, beta1, beta2, weight_decay;
};

struct Lion32bitBatch {
  void* params[kMaxTensorsPerLaunch];
  const void* grads[kMaxTensorsPerLaunch];
  float* momenta[kMaxTensorsPerLaunch];
  const float* grad_scale[kMaxTensorsPerLaunch];  // percentile clipping's scale, or null
  int64_t numels[kMaxTensorsPerLaunch];
  // first_block[t] is the first block of tensor t; first_block[num_tensors] the total.
  int32_t first_block[kMaxTensorsPerLaunch + 1];
  int32_t num_tensors;
  Hyperparameters hyper;
};

void launch_lion_32bit(const Lion32bitBatch& batch, ParamType type, cudaStream_t stream);

// Elements one thread block updates in the 8-bit kernels: 8 warps, each taking
// kQuantBlocksPerWarp consecutive quantization blocks of 256.
constexpr int kQuantBlocksPerWarp = 2;
constexpr int64_t kElements8bitPerBlock = 8 * kQuantBlocksPerWarp * 256;

enum class Scaling : int { kBlockwise = 0, kStatic = 1 };

struct Lion8bitBatch {
  void* params[kMaxTensorsPerLaunch];
  const void* grads[kMaxTensorsPerLaunch];
  uint8_t* codes[kMaxTensorsPerLaunch];
  float* scales[kMaxTensorsPerLaunch];      // blockwise: absmax per 256; static: max1
  float* new_scales[kMaxTensorsPerLaunch];  // static only: new_max1
  const float* grad_scale[kMaxTensorsPerLaunch];  // percentile clipping's scale, or null
  int64_t numels[kMaxTensorsPerLaunch];
  int32_t first_block[kMaxTensorsPerLaunch + 1];
  int32_t num_tensors;
  const float* qmap;
  const uint8_t* encode_table;  // compact and folded tables, from launch_build_encode_table
  Hyperparameters hyper;
};

struct StepCounters {
  float* steps[kMaxTensorsPerLaunch];
  int32_t count;
};

// Percentile clipping over a batch of gradients: squared norms (float64 per-block partial
// sums, then summed per tensor in a fixed order, so results are deterministic), the gnorm
// history, and one scale per tensor.
struct GradNormBatch {
  const void* grads[kMaxTensorsPerLaunch];
  float* gnorm_vecs[kMaxTensorsPerLaunch];
  const float* steps[kMaxTensorsPerLaunch];
  int64_t numels[kMaxTensorsPerLaunch];
  int32_t first_block[kMaxTensorsPerLaunch + 1];
  int32_t num_tensors;
  int32_t percentile;
  float* scale_of[kMaxTensorsPerLaunch];  // where each tensor's scale goes
  double* partial_sums;  // one per block
};

void launch_percentile_clipping(const GradNormBatch& batch, ParamType type, cudaStream_t stream);

// Adds 1 to every counter of the batch: one launch.
void launch_increment_steps(const StepCounters& counters, cudaStream_t stream);

// Fills the compact and folded encode tables of qmap (kEncodeTablesBytes, 16-byte aligned;
// lion_math.h).
void launch_build_encode_table(const float* qmap, uint8_t* table, cudaStream_t stream);

// Blockwise: one launch. Static: four (zero new_max1, reduce it, update, max1 = new_max1).
void launch_lion_8bit(const Lion8bitBatch& batch, ParamType type, Scaling scaling,
                      cudaStream_t stream);

constexpr size_t kMaxKernelParameterBytes = 32764;
static_assert(sizeof(Lion32bitBatch) <= kMaxKernelParameterBytes);
static_assert(sizeof(Lion8bitBatch) <= kMaxKernelParameterBytes);
static_assert(sizeof(GradNormBatch) <= kMaxKernelParameterBytes);
static_assert(sizeof(StepCounters) <= kMaxKernelParameterBytes);

// Blockwise quantization of n float32 values (for inspection and tests).
void launch_quantize_blockwise(const float* input, const uint8_t* encode_table,
                               const float* qmap, int64_t n, int64_t blocksize, uint8_t* codes,
                               float* absmax, cudaStream_t stream);
void launch_dequantize_blockwise(const uint8_t* codes, const float* absmax, const float* qmap,
                                 int64_t n, int64_t blocksize, float* out, cudaStream_t stream);

}  // namespace lion::cuda
