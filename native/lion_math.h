// The element math of every lion_ops kernel, shared by the CPU and the CUDA code so that
// the CPU tests exercise exactly the arithmetic the GPU runs (neither side fuses
// multiply-adds, so the two agree bit for bit). Everything is computed in fp32, whatever
// the param dtype. Plain scalar code: the CPU build vectorizes it, the GPU runs it per thread.
#pragma once

#if defined(__CUDACC__)
#define LION_HOST_DEVICE __host__ __device__ __forceinline__
#else
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

}  // namespace lion
