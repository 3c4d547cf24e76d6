// Lets g++ compile CUDA kernel source as C++ for the CPU emulation (tests only). Included
// first by the rewritten copy of native/cuda/lion_kernels.cu (see build.py), whose launches
// become calls to lion_emu::launch. __CUDACC__ and __CUDA_ARCH__ stay undefined, so the CUDA
// headers give their host versions (the bf16/fp16 conversions included) and lion_math.h
// its host branch (std::sqrt, std::fabs, std::signbit: the same IEEE results as sqrtf,
// fabsf and signbit on the device, which runs without fast math and with --fmad=false).
#pragma once

#include <cuda_runtime_api.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "emu_runtime.h"

#if defined(__CUDACC__) || defined(__CUDA_ARCH__)
#error "the CUDA emulation compiles kernels with a host compiler"
#endif

// The execution-space and launch annotations are nothing on the host (the CUDA headers
// already define most as empty without __CUDACC__; these make sure).
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __host__
#define __host__
#undef __forceinline__
#define __forceinline__ inline __attribute__((always_inline))
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __grid_constant__
#define __grid_constant__
// Blocks run one after another, so a function's static variable is the block's shared
// memory. build.py rewrites each `__shared__ T name[N];` into a static array followed by
// lion_emu::declare_shared(name): the first thread of a block to pass the declaration fills it
// with 0xff bytes (NaN as floats), so a read of shared memory that the block has not written
// shows up rather than the previous block's data. (A section attribute would be simpler, but
// g++ ignores it for statics of function templates.)
#undef __shared__
#define __shared__ static

#define threadIdx (::lion_emu::g_thread_idx)
#define blockIdx (::lion_emu::g_block_idx)
#define blockDim (::lion_emu::g_block_dim)
#define gridDim (::lion_emu::g_grid_dim)
#define warpSize 32

namespace lion_emu {
namespace {

template <typename T>
inline uint32_t to_bits(T value) {
  static_assert(sizeof(T) == 4, "the emulation shuffles 32-bit values only");
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}

template <typename T>
inline T from_bits(uint32_t bits) {
  T value;
  std::memcpy(&value, &bits, 4);
  return value;
}
}  // namespace
}  // namespace lion_emu

// ---- device built-ins used by the kernels ---------------------------------------------------
inline void __syncthreads() {
  asm volatile("" ::: "memory");
  ::lion_emu::syncthreads();
  asm volatile("" ::: "memory");
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  asm volatile("" ::: "memory");
  ::lion_emu::syncwarp(mask);
  asm volatile("" ::: "memory");
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  asm volatile("" ::: "memory");
  T result;
  if constexpr (sizeof(T) == 8) {  // as CUDA does for double: two 32-bit shuffles
    uint32_t halves[2];
    std::memcpy(halves, &var, 8);
    for (uint32_t& half : halves) {
      half = ::lion_emu::shuffle_xor_bits(mask, half, lane_mask, width);
    }
    std::memcpy(&result, halves, 8);
  } else {
    result = ::lion_emu::from_bits<T>(
        ::lion_emu::shuffle_xor_bits(mask, ::lion_emu::to_bits(var), lane_mask, width));
  }
  asm volatile("" ::: "memory");
  return result;
}

// Blocks and threads never run at the same time, so a read-modify-write is atomic.
inline int atomicMax(int* address, int value) {
  const int old = *address;
  if (value > old) *address = value;
  return old;
}
inline unsigned atomicMax(unsigned* address, unsigned value) {
  const unsigned old = *address;
  if (value > old) *address = value;
  return old;
}
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

inline int __float_as_int(float x) { return ::lion_emu::from_bits<int>(::lion_emu::to_bits(x)); }
inline unsigned __float_as_uint(float x) {
  return ::lion_emu::from_bits<unsigned>(::lion_emu::to_bits(x));
}
inline float __int_as_float(int x) { return ::lion_emu::from_bits<float>(::lion_emu::to_bits(x)); }
inline float __uint_as_float(unsigned x) {
  return ::lion_emu::from_bits<float>(::lion_emu::to_bits(x));
}

// Cache-hinted loads and stores (the streaming hint of the 32-bit kernel's shapes): plain
// accesses, since a hint changes nothing a kernel can observe.
template <typename T>
inline T __ldcs(const T* address) { return *address; }
template <typename T>
inline void __stcs(T* address, T value) { *address = value; }

// CUDA's min/max overloads for integers (fminf/fmaxf/fabsf/sqrtf come from <cmath>).
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
