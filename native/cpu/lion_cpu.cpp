// CPU kernels of the lion operators: vectorized by the compiler and parallel over fixed-size
// chunks of all tensors of a call at once, so that many small tensors still keep every
// thread busy and every element is read and written exactly once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "lion_batch.h"
#include "lion_math.h"

namespace lion {
namespace {

// Elements per work item: large enough to amortize scheduling, small enough to balance a
// few large tensors over all threads.
constexpr int64_t kCpuChunkElements = 1 << 15;

// The param dtypes every kernel supports (the argument checks refuse the others).
#define LION_DISPATCH_PARAM_TYPES(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// Each kernel is built for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and baseline x86-64, and
// the loader picks the best the CPU supports. The loops are plain scalar code over
// lion_math.h that the compiler vectorizes (checked with -fopt-info-vec; it needs
// -fno-trapping-math to turn the sign's comparisons into blends).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LION_CPU_MULTIVERSIONED \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LION_CPU_MULTIVERSIONED
#endif

template <typename scalar_t>
__attribute__((always_inline)) inline void lion_32bit_loop(
    scalar_t* __restrict__ p, const scalar_t* __restrict__ g, float* __restrict__ m, int64_t n,
    const LionCoefficients k) {
  for (int64_t i = 0; i < n; ++i) {
    float pf = static_cast<float>(p[i]);
    float mf = m[i];
    lion_update(pf, static_cast<float>(g[i]), mf, k);
    p[i] = static_cast<scalar_t>(pf);
    m[i] = mf;
  }
}

LION_CPU_MULTIVERSIONED void lion_32bit_span(float* p, const float* g, float* m, int64_t n,
                                             const LionCoefficients& k) {
  lion_32bit_loop(p, g, m, n, k);
}
LION_CPU_MULTIVERSIONED void lion_32bit_span(c10::BFloat16* p, const c10::BFloat16* g, float* m,
                                             int64_t n, const LionCoefficients& k) {
  lion_32bit_loop(p, g, m, n, k);
}
LION_CPU_MULTIVERSIONED void lion_32bit_span(c10::Half* p, const c10::Half* g, float* m,
                                             int64_t n, const LionCoefficients& k) {
  lion_32bit_loop(p, g, m, n, k);
}

// Runs `body(tensor_index, begin, end)` over all elements of `numels`, cut into chunks that
// are spread over the intra-op thread pool regardless of which tensor they belong to.
template <typename Body>
void parallel_over_chunks(const std::vector<int64_t>& numels, const Body& body) {
  std::vector<int64_t> first_chunk(numels.size() + 1, 0);
  for (size_t t = 0; t < numels.size(); ++t) {
    first_chunk[t + 1] = first_chunk[t] + (numels[t] + kCpuChunkElements - 1) / kCpuChunkElements;
  }
  const int64_t total_chunks = first_chunk.back();
  at::parallel_for(0, total_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    size_t t = std::upper_bound(first_chunk.begin(), first_chunk.end(), chunk_begin) -
               first_chunk.begin() - 1;
    for (int64_t c = chunk_begin; c < chunk_end; ++c) {
      while (c >= first_chunk[t + 1]) ++t;
      const int64_t begin = (c - first_chunk[t]) * kCpuChunkElements;
      body(t, begin, std::min(numels[t], begin + kCpuChunkElements));
    }
  });
}

void lion_update_32bit_cpu(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                           const at::Tensor& lr, double beta1, double beta2,
                           double weight_decay) {
  check_lion_update_32bit_args(params, grads, momenta, lr, beta1, beta2, weight_decay);
  if (params.empty()) return;
  TORCH_CHECK_VALUE(params[0].device().is_cpu(), "lion_update_32bit: CPU kernel got ",
                    params[0].device());
  const auto k = make_lion_coefficients(host_learning_rate(lr), static_cast<float>(beta1),
                                        static_cast<float>(beta2),
                                        static_cast<float>(weight_decay));
  FlatOperands flat({params, grads, momenta}, {true, false, true});
  std::vector<int64_t> numels;
  numels.reserve(flat.size());
  for (size_t t = 0; t < flat.size(); ++t) numels.push_back(flat.get(0, t).numel());

  parallel_over_chunks(numels, [&](size_t t, int64_t begin, int64_t end) {
    const at::Tensor& p = flat.get(0, t);
    float* m = flat.get(2, t).data_ptr<float>() + begin;
    LION_DISPATCH_PARAM_TYPES(p.scalar_type(), "lion_update_32bit", [&] {
      lion_32bit_span(p.data_ptr<scalar_t>() + begin,
                                flat.get(1, t).data_ptr<scalar_t>() + begin, m, end - begin, k);
    });
  });
  flat.write_back();
}

}  // namespace

TORCH_LIBRARY_IMPL(lion, CPU, m) {
  m.impl("lion_update_32bit", &lion_update_32bit_cpu);
}

// A sparse gradient dispatches here; the argument checks then refuse it by name.
TORCH_LIBRARY_IMPL(lion, SparseCPU, m) {
  m.impl("lion_update_32bit", &lion_update_32bit_cpu);
}

}  // namespace lion
