// CPU kernels of the lion operators: vectorized with at::vec and parallel over fixed-size
// chunks of all tensors of a call at once, so that many small tensors still keep every
// thread busy and every element is read and written exactly once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
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

template <typename scalar_t>
void lion_32bit_span(scalar_t* p, const scalar_t* g, float* m, int64_t n,
                     const LionCoefficients<float>& k) {
  using Vec = at::vec::Vectorized<float>;
  const auto kv = broadcast<Vec>(k);
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (; i + Vec::size() <= n; i += Vec::size()) {
      Vec pv = Vec::loadu(p + i);
      Vec mv = Vec::loadu(m + i);
      lion_update(pv, Vec::loadu(g + i), mv, kv);
      pv.store(p + i);
      mv.store(m + i);
    }
  } else {
    using RVec = at::vec::Vectorized<scalar_t>;
    static_assert(RVec::size() == 2 * Vec::size());
    for (; i + RVec::size() <= n; i += RVec::size()) {
      auto [p0, p1] = at::vec::convert_to_float<scalar_t>(RVec::loadu(p + i));
      auto [g0, g1] = at::vec::convert_to_float<scalar_t>(RVec::loadu(g + i));
      Vec m0 = Vec::loadu(m + i);
      Vec m1 = Vec::loadu(m + i + Vec::size());
      lion_update(p0, g0, m0, kv);
      lion_update(p1, g1, m1, kv);
      at::vec::convert_from_float<scalar_t>(p0, p1).store(p + i);
      m0.store(m + i);
      m1.store(m + i + Vec::size());
    }
  }
  for (; i < n; ++i) {
    float pf = static_cast<float>(p[i]);
    float mf = m[i];
    lion_update(pf, static_cast<float>(g[i]), mf, k);
    p[i] = static_cast<scalar_t>(pf);
    m[i] = mf;
  }
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
      lion_32bit_span<scalar_t>(p.data_ptr<scalar_t>() + begin,
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
