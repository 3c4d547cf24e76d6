// The element math of every lion_ops kernel, shared by the CPU and the CUDA code so that
// the CPU tests exercise exactly the arithmetic the GPU runs (neither side fuses
// multiply-adds, so the two agree bit for bit). Everything is computed in fp32, whatever
// the param dtype. Plain scalar code: the CPU build vectorizes it, the GPU runs it per thread.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define LION_HOST_DEVICE __host__ __device__ __forceinline__
#else
#include <cmath>
#define LION_HOST_DEVICE inline
#endif

namespace lion {

// sign(0) = 0 and sign(NaN) = NaN, as torch.sign: a NaN gradient must show up in the
// params rather than silently freezing them.
LION_HOST_DEVICE float sign_of(float x) {
  return x > 0.f ? 1.f : (x < 0.f ? -1.f : x);
}

// Per-call constants of the Lion update, precomputed once so that the element loop does
// the same operations in the same order on every backend.
struct LionCoefficients {
  float lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay;
  float grad_scale;  // percentile clipping's gnorm_scale for this tensor (1: off)
};

LION_HOST_DEVICE LionCoefficients make_lion_coefficients(
    float lr, float beta1, float beta2, float weight_decay) {
  // Decoupled weight decay first, as bitsandbytes and the paper: p <- p * (1 - lr * wd).
  return {lr, beta1, 1.f - beta1, beta2, 1.f - beta2, 1.f - lr * weight_decay, 1.f};
}

// One Lion step for one element, all in fp32, with g scaled by grad_scale first (exact when
// it is 1):
//   p <- p * (1 - lr*wd)
//   c <- b1*m + (1 - b1)*g
//   p <- p - lr*sign(c)
//   m <- b2*m + (1 - b2)*g
LION_HOST_DEVICE void lion_update(float& p, float g_raw, float& m, const LionCoefficients& k) {
  const float g = g_raw * k.grad_scale;
  p = p * k.decay;
  const float c = k.beta1 * m + k.one_minus_beta1 * g;
  p = p - k.lr * sign_of(c);
  m = k.beta2 * m + k.one_minus_beta2 * g;
}

// ---- percentile clipping -----------------------------------------------------------------------
// bitsandbytes 0.49: each param keeps its last kGnormHistory squared gradient norms; step t
// records ||g||^2 at slot t % kGnormHistory (every slot at t = 1); the gradient is scaled by
// clip / current when current = ||g|| exceeds clip = sqrt(the percentile-th smallest record).

constexpr int kGnormHistory = 100;

LION_HOST_DEVICE int gnorm_slot(float step) {
  return static_cast<int>(static_cast<int64_t>(step) % kGnormHistory);
}

LION_HOST_DEVICE float gnorm_scale(float current_squared, float clip_squared) {
#if defined(__CUDA_ARCH__)
  const float current = sqrtf(current_squared), clip = sqrtf(clip_squared);
#else
  const float current = std::sqrt(current_squared), clip = std::sqrt(clip_squared);
#endif
  return current > clip ? clip / current : 1.f;
}

// ---- 8-bit state -------------------------------------------------------------------------------
// Momentum stored as uint8 codes into a 256-entry signed map (bitsandbytes' dynamic map,
// sorted ascending, 0.0 at index 127) times a float32 scale: one scale per block of
// kQuantBlockSize consecutive elements (blockwise) or one per tensor (static).

constexpr int kQuantBlockSize = 256;
constexpr int kQuantMapSize = 256;

LION_HOST_DEVICE bool sign_bit(float x) {
#if defined(__CUDA_ARCH__)
  return signbit(x);
#else
  return std::signbit(x);
#endif
}

LION_HOST_DEVICE float decode_momentum(const float* qmap, uint8_t code, float scale) {
  return qmap[code] * scale;
}

// Encoding maps x = m / scale to the nearest map entry: the number of midpoints
// (qmap[j] + qmap[j+1]) / 2 that are <= x (so ties go to the larger entry). To avoid a
// binary search per element, a table indexed by the top 16 bits of x's order-preserving key
// gives the number of midpoints below that bucket; the few midpoints inside the bucket
// (at most one for the dynamic map) are then compared directly. The table depends on qmap
// only, and is built once per call (encode_table_entry).
constexpr int kEncodeTableSize = 1 << 16;

LION_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}

// Unsigned keys that order like the floats (-0.0 just below +0.0).
LION_HOST_DEVICE uint32_t order_key(float x) {
  const uint32_t bits = float_bits(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

LION_HOST_DEVICE float map_midpoint(const float* qmap, int j) {
  return (qmap[j] + qmap[j + 1]) * 0.5f;
}

// Table entry `bucket`: how many midpoints have keys below bucket << 16.
LION_HOST_DEVICE uint8_t encode_table_entry(const float* qmap, uint32_t bucket) {
  const uint32_t bucket_start = bucket << 16;
  int lo = 0, hi = kQuantMapSize - 1;  // answer in [0, 255]
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (order_key(map_midpoint(qmap, mid)) < bucket_start) lo = mid + 1; else hi = mid;
  }
  return static_cast<uint8_t>(lo);
}

// 1 / scale, or 0 for an all-zero block (whose momentum then encodes as 0.0).
LION_HOST_DEVICE float inverse_scale(float scale) { return scale > 0.f ? 1.f / scale : 0.f; }

// The code of x = m * inverse_scale(scale). kOneMidpointPerBucket: the caller checked that no
// table bucket holds two midpoints (true of the dynamic map), so one comparison resolves it;
// otherwise the comparisons go on while needed. Both give the same code.
// Then a code whose entry has the wrong sign bit is moved one step toward x's sign, as
// bitsandbytes' CUDA kernels do, so quantization never flips the momentum's sign.
template <bool kOneMidpointPerBucket>
LION_HOST_DEVICE uint8_t encode_normalized(const uint8_t* table, const float* qmap, float x) {
  int code = static_cast<int>(table[order_key(x) >> 16]);
  if (kOneMidpointPerBucket) {
    const float midpoint = map_midpoint(qmap, code < kQuantMapSize - 1 ? code : kQuantMapSize - 2);
    code += (code < kQuantMapSize - 1) & (midpoint <= x);
  } else {
    while (code < kQuantMapSize - 1 && map_midpoint(qmap, code) <= x) ++code;
  }
  const int wrong_sign = sign_bit(qmap[code]) != sign_bit(x);
  code += wrong_sign * (x > 0.f ? 1 : -1);
  return static_cast<uint8_t>(code);
}

}  // namespace lion
