// CUDA kernels of the lion operators. One launch updates every tensor of a batch: each
// block finds its tensor by binary search over first_block and updates one span of it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../lion_math.h"
#include "lion_kernels.cuh"

namespace lion::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // elements per vector access: 16 bytes of fp32, 8 of bf16/fp16

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// kVec consecutive elements as one aligned memory access.
template <typename T>
struct alignas(sizeof(T) * kVec) Pack {
  T v[kVec];
};

template <typename T>
__device__ __forceinline__ void load_pack(const T* __restrict__ src, float (&out)[kVec]) {
  const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(src);
#pragma unroll
  for (int j = 0; j < kVec; ++j) out[j] = to_float(pack.v[j]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* __restrict__ dst, const float (&in)[kVec]) {
  Pack<T> pack;
#pragma unroll
  for (int j = 0; j < kVec; ++j) pack.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T>*>(dst) = pack;
}

// The tensor that block `block` belongs to: the last t with first_block[t] <= block.
__device__ __forceinline__ int tensor_of_block(const int32_t* first_block, int num_tensors,
                                               int32_t block) {
  int lo = 0, hi = num_tensors - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_block[mid] <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
lion_32bit_kernel(const __grid_constant__ Lion32bitBatch batch) {
  const int t = tensor_of_block(batch.first_block, batch.num_tensors, blockIdx.x);
  const int64_t n = batch.numels[t];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - batch.first_block[t]) * kElementsPerBlock;
  const int64_t end = min(n, begin + kElementsPerBlock);
  T* __restrict__ p = static_cast<T*>(batch.params[t]);
  const T* __restrict__ g = static_cast<const T*>(batch.grads[t]);
  float* __restrict__ m = batch.momenta[t];

  const float lr = batch.lr_on_device != nullptr ? *batch.lr_on_device : batch.lr;
  const auto k = make_lion_coefficients(lr, batch.beta1, batch.beta2, batch.weight_decay);

  const bool aligned =
      (reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g)) % sizeof(Pack<T>) == 0 &&
      reinterpret_cast<uintptr_t>(m) % sizeof(Pack<float>) == 0;
  if (aligned) {
    // begin is a multiple of kVec, so every full pack below is aligned.
    for (int64_t i = begin + threadIdx.x * kVec; i < end; i += kThreads * kVec) {
      if (i + kVec <= end) {
        float pv[kVec], gv[kVec], mv[kVec];
        load_pack(p + i, pv);
        load_pack(g + i, gv);
        load_pack(m + i, mv);
#pragma unroll
        for (int j = 0; j < kVec; ++j) lion_update(pv[j], gv[j], mv[j], k);
        store_pack(p + i, pv);
        store_pack(m + i, mv);
      } else {
        for (int64_t e = i; e < end; ++e) {
          float pf = to_float(p[e]), mf = m[e];
          lion_update(pf, to_float(g[e]), mf, k);
          p[e] = from_float<T>(pf);
          m[e] = mf;
        }
      }
    }
  } else {
    for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
      float pf = to_float(p[e]), mf = m[e];
      lion_update(pf, to_float(g[e]), mf, k);
      p[e] = from_float<T>(pf);
      m[e] = mf;
    }
  }
}

}  // namespace

void launch_lion_32bit(const Lion32bitBatch& batch, ParamType type, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(batch.first_block[batch.num_tensors]);
  if (blocks == 0) return;
  switch (type) {
    case ParamType::kFloat32:
      lion_32bit_kernel<float><<<blocks, kThreads, 0, stream>>>(batch);
      break;
    case ParamType::kBFloat16:
      lion_32bit_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(batch);
      break;
    case ParamType::kFloat16:
      lion_32bit_kernel<__half><<<blocks, kThreads, 0, stream>>>(batch);
      break;
  }
}

}  // namespace lion::cuda
