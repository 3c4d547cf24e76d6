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
};

LION_HOST_DEVICE LionCoefficients make_lion_coefficients(
    float lr, float beta1, float beta2, float weight_decay) {
  // Decoupled weight decay first, as bitsandbytes and the paper: p <- p * (1 - lr * wd).
  return {lr, beta1, 1.f - beta1, beta2, 1.f - beta2, 1.f - lr * weight_decay};
}

// One Lion step for one element, all in fp32:
//   p <- p * (1 - lr*wd)
//   c <- b1*m + (1 - b1)*g
//   p <- p - lr*sign(c)
//   m <- b2*m + (1 - b2)*g
LION_HOST_DEVICE void lion_update(float& p, float g, float& m, const LionCoefficients& k) {
  p = p * k.decay;
  const float c = k.beta1 * m + k.one_minus_beta1 * g;
  p = p - k.lr * sign_of(c);
  m = k.beta2 * m + k.one_minus_beta2 * g;
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

// The code of the map entry nearest to m / scale (ties go to the larger entry). Then, as
// bitsandbytes' CUDA kernels do, a code whose entry has the wrong sign bit is moved one step
// toward m's sign, so that quantization never flips the momentum's sign. scale 0 (an
// all-zero block) encodes everything as 0.0.
LION_HOST_DEVICE uint8_t encode_momentum(const float* qmap, float m, float scale) {
  const float x = scale > 0.f ? m / scale : 0.f;
  int lo = 0, hi = kQuantMapSize - 1;  // invariant: the answer is in [lo, hi]
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (qmap[mid] <= x) lo = mid; else hi = mid;
  }
  int code = (x - qmap[lo] < qmap[hi] - x) ? lo : hi;
  if (x <= qmap[0]) code = 0;
  if (sign_bit(qmap[code]) != sign_bit(x)) code += x > 0.f ? 1 : -1;
  return static_cast<uint8_t>(code);
}

}  // namespace lion
