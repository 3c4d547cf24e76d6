// The element math of every lion_ops kernel, shared by the CPU and the CUDA code so that
// the CPU tests exercise exactly the arithmetic the GPU runs. Functions are templated on
// the value type: `float` in the CUDA kernels and the CPU tails, at::vec::Vectorized<float>
// in the CPU vector loops. Everything is computed in fp32, whatever the param dtype.
#pragma once

#if defined(__CUDACC__)
#define LION_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LION_HOST_DEVICE inline
#include <ATen/cpu/vec/vec.h>
#endif

namespace lion {

// sign(0) = 0 and sign(NaN) = NaN, as torch.sign: a NaN gradient must show up in the
// params rather than silently freezing them.
LION_HOST_DEVICE float sign_of(float x) {
  return x > 0.f ? 1.f : (x < 0.f ? -1.f : x);
}

#if !defined(__CUDACC__)
inline at::vec::Vectorized<float> sign_of(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec zero(0.f), one(1.f);
  // Comparison results are all-ones bit masks; AND with 1.0 turns them into 0.0 / 1.0.
  Vec s = ((x > zero) & one) - ((x < zero) & one);
  return Vec::blendv(s, x, x.isnan());
}
#endif

// Per-call constants of the Lion update, precomputed once so that the element loop does
// the same operations in the same order on every backend.
template <typename V>
struct LionCoefficients {
  V lr, beta1, one_minus_beta1, beta2, one_minus_beta2, decay;
};

LION_HOST_DEVICE LionCoefficients<float> make_lion_coefficients(
    float lr, float beta1, float beta2, float weight_decay) {
  // Decoupled weight decay first, as bitsandbytes and the paper: p <- p * (1 - lr * wd).
  return {lr, beta1, 1.f - beta1, beta2, 1.f - beta2, 1.f - lr * weight_decay};
}

template <typename V>
inline LionCoefficients<V> broadcast(const LionCoefficients<float>& k) {
  return {V(k.lr), V(k.beta1), V(k.one_minus_beta1), V(k.beta2), V(k.one_minus_beta2),
          V(k.decay)};
}

// One Lion step for one element (or one vector of elements), all in fp32:
//   p <- p * (1 - lr*wd)
//   c <- b1*m + (1 - b1)*g
//   p <- p - lr*sign(c)
//   m <- b2*m + (1 - b2)*g
template <typename V>
LION_HOST_DEVICE void lion_update(V& p, const V& g, V& m, const LionCoefficients<V>& k) {
  p = p * k.decay;
  const V c = k.beta1 * m + k.one_minus_beta1 * g;
  p = p - k.lr * sign_of(c);
  m = k.beta2 * m + k.one_minus_beta2 * g;
}

}  // namespace lion
