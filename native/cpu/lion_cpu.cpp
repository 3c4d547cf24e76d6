// CPU kernels of the lion operators: vectorized (by the compiler, or by hand with AVX2 where
// it does poorly) and parallel over fixed-size chunks of all tensors of a call at once, so
// that many small tensors still keep every thread busy and every element is read and written
// exactly once.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <functional>
#include <optional>
#include <array>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "lion_batch.h"
#include "lion_math.h"

namespace lion {
namespace {

// Elements per work item: large enough to amortize scheduling, small enough to balance a
// few large tensors over all threads.
constexpr int64_t kCpuChunkElements = 1 << 15;

// Below this many elements in all a call runs on the calling thread, as torch's elementwise
// ops do below their grain: a parallel region costs microseconds when the pool is idle and
// milliseconds when another process holds a core (its threads must all be scheduled), far
// more than the work (a step over 148 tensors of 4 elements: 7.9 ms instead of 0.3 ms with a
// core busy).
constexpr int64_t kCpuParallelMinElements = kCpuChunkElements;

// The param dtypes every kernel supports (the argument checks refuse the others).
#define LION_DISPATCH_PARAM_TYPES(TYPE, NAME, ...)            \
  AT_DISPATCH_SWITCH(TYPE, NAME,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

// The 32-bit loops are built for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and baseline x86-64,
// and the loader picks the best the CPU supports. They are plain scalar code over
// lion_math.h that the compiler vectorizes (checked with -fopt-info-vec; it needs
// -fno-trapping-math to turn the sign's comparisons into blends); float16 params take a
// hand-written AVX2 loop instead where the CPU has AVX2 (lion_32bit_update_span).
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

// Runs `body(tensor_index, begin, end)` over all elements of `numels`, cut into chunks of
// kCpuChunkElements (each tensor's chunks start at multiples of it, whatever the threads,
// so per-chunk results do not depend on them) that are spread over the intra-op thread pool
// regardless of which tensor they belong to. at::parallel_for gives each thread a range of
// work units; a unit is one chunk, or a run of consecutive chunks of small tensors of at most
// kCpuChunkElements elements in all, so that the ranges hold about equal work whatever the
// order of small and large tensors (counted in chunks, a thousand tiny tensors before a large
// one went to one thread, the large one to the other).
template <typename Body>
void parallel_over_chunks(const std::vector<int64_t>& numels, const Body& body) {
  struct Chunk {
    size_t tensor;
    int64_t begin, end;
  };
  std::vector<Chunk> chunks;
  std::vector<size_t> unit_starts;
  int64_t total_elements = 0, unit_elements = kCpuChunkElements;
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t begin = 0; begin < numels[t]; begin += kCpuChunkElements) {
      const int64_t end = std::min(numels[t], begin + kCpuChunkElements);
      if (unit_elements + (end - begin) > kCpuChunkElements) {
        unit_starts.push_back(chunks.size());
        unit_elements = 0;
      }
      unit_elements += end - begin;
      chunks.push_back({t, begin, end});
    }
    total_elements += numels[t];
  }
  const int64_t units = static_cast<int64_t>(unit_starts.size());
  unit_starts.push_back(chunks.size());
  const auto run_units = [&](int64_t first, int64_t last) {
    for (size_t c = unit_starts[first]; c < unit_starts[last]; ++c) {
      body(chunks[c].tensor, chunks[c].begin, chunks[c].end);
    }
  };
  if (total_elements < kCpuParallelMinElements) {
    run_units(0, units);
    return;
  }
  at::parallel_for(0, units, 1, run_units);
}

// Takes each written tensor's writable pointer once, before a parallel region: the first one
// of a copy-on-write tensor (torch._lazy_clone) copies its storage, which torch refuses inside
// at::parallel_for, and a refusal there would come after other chunks had been written.
void prepare_for_writing(const FlatOperands& flat, std::initializer_list<size_t> written,
                         at::TensorList also = {}) {
  for (size_t t = 0; t < flat.size(); ++t) {
    for (const size_t list : written) flat.get(list, t).data_ptr();
  }
  for (const at::Tensor& t : also) t.data_ptr();
}

const at::Tensor& check_on_cpu(const char* op, at::TensorList params) {
  TORCH_CHECK_VALUE(params[0].device().is_cpu(), op, ": CPU kernel got ", params[0].device());
  return params[0];
}

// On the CPU every hyperparameter is a CPU tensor (the checks refuse others), read by them.
LionCoefficients coefficients_from(const HostHyperparameters& h) {
  return make_lion_coefficients(h.lr, h.beta1, h.beta2, h.weight_decay);
}

std::vector<int64_t> numels_of(const FlatOperands& flat) {
  std::vector<int64_t> numels;
  numels.reserve(flat.size());
  for (size_t t = 0; t < flat.size(); ++t) numels.push_back(flat.get(0, t).numel());
  return numels;
}

// The coefficients for tensor t: the call's, with t's gradient scale.
LionCoefficients for_tensor(LionCoefficients k, const float* grad_scales, size_t t) {
  if (grad_scales != nullptr) k.grad_scale = grad_scales[t];
  return k;
}

// ---- AVX2 element code ------------------------------------------------------------------------

#if defined(__x86_64__) && defined(__GNUC__)
#define LION_HAVE_AVX2_KERNELS 1
// Hand-vectorized AVX2 element code, for the loops compilers do not vectorize well: the 8-bit
// loops (table lookups, 16-bit conversions) and the 32-bit loop of float16 params. Each
// computes exactly what the scalar code over lion_math.h computes, lane by lane, with the
// same IEEE operations in the same order (no FMA), so results are bit-identical; the tests
// compare both bit for bit, and the CUDA kernels run the scalar functions.
// LION_OPS_NO_AVX2=1 forces the scalar loops (the tests use it to compare both paths).
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                          std::getenv("LION_OPS_NO_AVX2") == nullptr;
  return has;
}

__attribute__((target("avx2,f16c"))) inline __m256 sign_of_avx2(__m256 c) {
  const __m256 zero = _mm256_setzero_ps();
  __m256 s = _mm256_blendv_ps(c, _mm256_set1_ps(-1.f), _mm256_cmp_ps(c, zero, _CMP_LT_OQ));
  return _mm256_blendv_ps(s, _mm256_set1_ps(1.f), _mm256_cmp_ps(c, zero, _CMP_GT_OQ));
}

// Eight params or grads as fp32, and back, rounding as c10's conversions do (to nearest
// even; a NaN stays a NaN). bfloat16 is the top half of a float32; float16 uses F16C.
#define LION_AVX2 __attribute__((target("avx2,f16c")))

LION_AVX2 inline __m256 load8(const float* x) { return _mm256_loadu_ps(x); }
LION_AVX2 inline __m256 load8(const c10::BFloat16* x) {
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
LION_AVX2 inline __m256 load8(const c10::Half* x) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
}

LION_AVX2 inline void store8(float* x, __m256 v) { _mm256_storeu_ps(x, v); }
LION_AVX2 inline void store8(c10::BFloat16* x, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff))), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  rounded = _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7fc0), nan);
  // Values are below 2^16, so the saturating pack is exact; it packs within 128-bit lanes.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(rounded, rounded), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(x), _mm256_castsi256_si128(packed));
}
LION_AVX2 inline void store8(c10::Half* x, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(x),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The Lion step for eight elements, lane by lane as lion_update: m is the decoded momentum,
// updated in place; returns the new params.
struct LionVectors {
  __m256 decay, beta1, one_minus_beta1, beta2, one_minus_beta2, lr, grad_scale;
  LION_AVX2 explicit LionVectors(const LionCoefficients& k)
      : decay(_mm256_set1_ps(k.decay)), beta1(_mm256_set1_ps(k.beta1)),
        one_minus_beta1(_mm256_set1_ps(k.one_minus_beta1)), beta2(_mm256_set1_ps(k.beta2)),
        one_minus_beta2(_mm256_set1_ps(k.one_minus_beta2)), lr(_mm256_set1_ps(k.lr)),
        grad_scale(_mm256_set1_ps(k.grad_scale)) {}
};

LION_AVX2 inline __m256 lion_update8(__m256 p, __m256 g_raw, __m256& m, const LionVectors& k) {
  const __m256 g = _mm256_mul_ps(g_raw, k.grad_scale);
  p = _mm256_mul_ps(p, k.decay);
  const __m256 c = _mm256_add_ps(_mm256_mul_ps(k.beta1, m), _mm256_mul_ps(k.one_minus_beta1, g));
  p = _mm256_sub_ps(p, _mm256_mul_ps(k.lr, sign_of_avx2(c)));
  m = _mm256_add_ps(_mm256_mul_ps(k.beta2, m), _mm256_mul_ps(k.one_minus_beta2, g));
  return p;
}

// The 32-bit step for a whole number of 8-element groups.
template <typename scalar_t>
LION_AVX2 void lion_32bit_avx2(scalar_t* p, const scalar_t* g, float* m, int64_t n,
                               const LionCoefficients& k) {
  const LionVectors kv(k);
  for (int64_t i = 0; i < n; i += 8) {
    __m256 momentum = _mm256_loadu_ps(m + i);
    store8(p + i, lion_update8(load8(p + i), load8(g + i), momentum, kv));
    _mm256_storeu_ps(m + i, momentum);
  }
}

// squared_sum_span's lanes for a whole number of 8-element groups, added into `lanes`.
template <typename scalar_t>
LION_AVX2 void squared_sum_avx2(const scalar_t* x, int64_t n, std::array<double, 8>& lanes) {
  __m256d low = _mm256_loadu_pd(lanes.data()), high = _mm256_loadu_pd(lanes.data() + 4);
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 v = load8(x + i);
    const __m256d v_low = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    const __m256d v_high = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    low = _mm256_add_pd(low, _mm256_mul_pd(v_low, v_low));
    high = _mm256_add_pd(high, _mm256_mul_pd(v_high, v_high));
  }
  _mm256_storeu_pd(lanes.data(), low);
  _mm256_storeu_pd(lanes.data() + 4, high);
}

#endif

// ---- 32-bit state -----------------------------------------------------------------------------

// The 32-bit step over n elements. float16 params take the AVX2 loop where the CPU has it:
// the compiler's vectorization of c10's float16 conversions leaves their loop compute-bound
// (cache-resident, 3x the float32 time per element; out of cache, 2 threads, 1.4x the time of
// bfloat16, which moves the same bytes; with the AVX2 loop, 0.8x and 1.0x). bfloat16 and
// float32 keep the compiler's loop, which is at memory bandwidth out of cache (for bfloat16 the
// AVX2 loop was faster only in cache: 0.63 against 0.87 ns per element on one thread, and no
// faster, within this machine's noise, out of cache).
template <typename scalar_t>
void lion_32bit_update_span(scalar_t* p, const scalar_t* g, float* m, int64_t n,
                            const LionCoefficients& k) {
  int64_t i = 0;
#if defined(LION_HAVE_AVX2_KERNELS)
  if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    if (cpu_has_avx2()) {
      i = n / 8 * 8;
      lion_32bit_avx2(p, g, m, i, k);
    }
  }
#endif
  if (i < n) lion_32bit_span(p + i, g + i, m + i, n - i, k);
}

void lion_update_32bit_cpu(at::TensorList params, at::TensorList grads, at::TensorList momenta,
                           const at::Tensor& lr, const at::Tensor& beta1,
                           const at::Tensor& beta2, const at::Tensor& weight_decay,
                           const std::optional<at::Tensor>& grad_scales) {
  constexpr const char* op = "lion_update_32bit";
  const CheckedUpdate checked = check_lion_update_32bit_args(
      params, grads, momenta, lr, beta1, beta2, weight_decay, grad_scales);
  const float* scales = checked.grad_scales;
  if (params.empty()) return;
  check_on_cpu(op, params);
  const auto k = coefficients_from(checked.host);
  FlatOperands flat({params, grads, momenta}, {true, false, true});
  prepare_for_writing(flat, {0, 2});

  parallel_over_chunks(numels_of(flat), [&](size_t t, int64_t begin, int64_t end) {
    const at::Tensor& p = flat.get(0, t);
    float* m = flat.get(2, t).data_ptr<float>() + begin;
    LION_DISPATCH_PARAM_TYPES(p.scalar_type(), op, [&] {
      lion_32bit_update_span(p.data_ptr<scalar_t>() + begin,
                             flat.get(1, t).data_ptr<scalar_t>() + begin, m, end - begin,
                             for_tensor(k, scales, t));
    });
  });
  flat.write_back();
}

// ---- 8-bit state ------------------------------------------------------------------------------

// The encode tables of a qmap (see lion_math.h). The scalar loops use the folded compact
// table and the compact one, as the CUDA kernels do, so the CPU tests cover the GPU's encoder.
struct EncodeTable {
  std::array<uint8_t, kCompactTableBytes> compact;
  std::array<uint32_t, kCompactTableSize> folded_compact;  // folded_table_entry per bucket
  std::array<float, kQuantMapSize> midpoints;  // midpoints[j] = map_midpoint(qmap, j), j < 255
  // The vectorized encoder's form of the folded table, valid when `folded_ok` (every compact
  // bucket folds): the same entries indexed by the top 16 bits of x's order key, so that the
  // bucket is one shift. Each 16-bit bucket lies inside one compact bucket (the middle ones
  // are the same key ranges; a merged one folds only with no midpoint inside, one code for
  // all of it), so its entry is that compact bucket's.
  std::vector<uint32_t> folded;
  bool folded_ok;
};

// Cached for the map last used: building it takes ~1 ms, and every call of a training run
// passes the same map.
std::shared_ptr<const EncodeTable> encode_table_for(const float* qmap) {
  static std::mutex mutex;
  static std::array<float, kQuantMapSize> cached_map;
  static std::shared_ptr<const EncodeTable> cached;
  std::lock_guard<std::mutex> lock(mutex);
  if (cached && std::memcmp(cached_map.data(), qmap, sizeof(cached_map)) == 0) return cached;
  auto table = std::make_shared<EncodeTable>();
  table->compact.fill(0);
  for (int bucket = 0; bucket < kCompactTableSize; ++bucket) {
    table->compact[bucket] = compact_table_entry(qmap, bucket);
  }
  table->midpoints.fill(0.f);
  for (int j = 0; j + 1 < kQuantMapSize; ++j) table->midpoints[j] = map_midpoint(qmap, j);
  bool map_folds = true;
  for (int j = 0; j < kQuantMapSize; ++j) map_folds &= map_entry_allows_folding(qmap, j);
  table->folded_ok = true;
  for (int bucket = 0; bucket < kCompactTableSize; ++bucket) {
    table->folded_compact[bucket] =
        folded_table_entry(qmap, table->midpoints.data(), bucket, map_folds);
    table->folded_ok &= table->folded_compact[bucket] != kUnfoldable;
  }
  if (table->folded_ok) {
    table->folded.resize(kEncodeTableSize);
    for (uint32_t top16 = 0; top16 < static_cast<uint32_t>(kEncodeTableSize); ++top16) {
      table->folded[top16] = table->folded_compact[compact_bucket(float_of_key(top16 << 16))];
    }
  }
  std::memcpy(cached_map.data(), qmap, sizeof(cached_map));
  cached = std::move(table);
  return cached;
}

#if defined(LION_HAVE_AVX2_KERNELS)
// Table lookups are eight scalar loads rather than a gather instruction: on the AMD Zen 3
// this was tuned on, a gather of eight costs 1.7x as much (bench_results/cpu-profile.md), and
// the lookups are most of the 8-bit step's work.
LION_AVX2 inline __m256 decode8(const uint8_t* codes, const float* qmap, __m256 scale) {
  uint64_t c;
  std::memcpy(&c, codes, sizeof(c));
  const __m128 low = _mm_setr_ps(qmap[c & 0xff], qmap[(c >> 8) & 0xff], qmap[(c >> 16) & 0xff],
                                 qmap[(c >> 24) & 0xff]);
  const __m128 high = _mm_setr_ps(qmap[(c >> 32) & 0xff], qmap[(c >> 40) & 0xff],
                                  qmap[(c >> 48) & 0xff], qmap[c >> 56]);
  return _mm256_mul_ps(_mm256_set_m128(high, low), scale);
}

// The indices leave the vector register as four 64-bit pairs rather than through a store and
// eight reloads: 8-10% faster on the cache-resident pipeline (a store and narrower reloads of it
// forward poorly), no slower out of cache.
LION_AVX2 inline __m256i lookup8(const uint32_t* table, __m256i index) {
  const __m128i low = _mm256_castsi256_si128(index), high = _mm256_extracti128_si256(index, 1);
  const uint64_t i01 = static_cast<uint64_t>(_mm_cvtsi128_si64(low));
  const uint64_t i23 = static_cast<uint64_t>(_mm_extract_epi64(low, 1));
  const uint64_t i45 = static_cast<uint64_t>(_mm_cvtsi128_si64(high));
  const uint64_t i67 = static_cast<uint64_t>(_mm_extract_epi64(high, 1));
  const auto at = [table](uint64_t pair, int half) {
    return static_cast<int>(table[static_cast<uint32_t>(pair >> (32 * half))]);
  };
  return _mm256_setr_epi32(at(i01, 0), at(i01, 1), at(i23, 0), at(i23, 1), at(i45, 0),
                           at(i45, 1), at(i67, 0), at(i67, 1));
}

// Largest lane of a vector of magnitudes (NaN-ignoring, as std::max from 0).
LION_AVX2 inline float max_lane(__m256 max_abs) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, max_abs);
  float result = 0.f;
  for (float lane : lanes) result = std::max(result, lane);
  return result;
}

// Decodes 8 elements with `scale`, updates their params, writes their new momentum to m_out
// and folds its magnitudes into max_abs (NaN-ignoring, as std::max).
template <typename scalar_t>
LION_AVX2 inline void update8(scalar_t* p, const scalar_t* g, const uint8_t* codes,
                              const float* qmap, __m256 scale, const LionVectors& k,
                              float* m_out, __m256& max_abs) {
  __m256 m = decode8(codes, qmap, scale);
  store8(p, lion_update8(load8(p), load8(g), m, k));
  _mm256_storeu_ps(m_out, m);
  max_abs = _mm256_max_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), m), max_abs);
}

// Decodes, updates and returns the new momentum's max magnitude, for a whole number of
// 8-element groups; the new momentum goes to m_out.
template <typename scalar_t>
LION_AVX2 float update_block_avx2(scalar_t* p, const scalar_t* g, const uint8_t* codes,
                                  const float* qmap, float scale, int64_t n,
                                  const LionCoefficients& k, float* m_out) {
  const LionVectors kv(k);
  const __m256 vscale = _mm256_set1_ps(scale);
  __m256 max_abs = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    update8(p + i, g + i, codes + i, qmap, vscale, kv, m_out + i, max_abs);
  }
  return max_lane(max_abs);
}

// The new momentum's max magnitude alone (static 8-bit's first pass), for a whole number of
// 8-element groups.
template <typename scalar_t>
LION_AVX2 float momentum_max_avx2(const scalar_t* g, const uint8_t* codes, const float* qmap,
                                  float scale, int64_t n, const LionCoefficients& k) {
  const LionVectors kv(k);
  const __m256 vscale = _mm256_set1_ps(scale), zero = _mm256_setzero_ps();
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 max_abs = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    __m256 m = decode8(codes + i, qmap, vscale);
    lion_update8(zero, load8(g + i), m, kv);
    max_abs = _mm256_max_ps(_mm256_and_ps(m, abs_mask), max_abs);
  }
  return max_lane(max_abs);
}

// encode_compact for 8 values, through the folded table: one lookup per element
// instead of three (table entry, midpoint, entry for the sign).
struct Encoder8 {
  const uint32_t* folded;
  __m256 inverse;
  __m256i top_bit, low_byte, low_16, byte_shift;

  LION_AVX2 Encoder8(const EncodeTable& table, float inverse_scale)
      : folded(table.folded.data()), inverse(_mm256_set1_ps(inverse_scale)),
        top_bit(_mm256_set1_epi32(static_cast<int>(0x80000000u))),
        low_byte(_mm256_set1_epi32(0xff)), low_16(_mm256_set1_epi32(0xffff)),
        byte_shift(_mm256_set1_epi32(8)) {}

  // kZeroInverse: the inverse scale is 0 (a block whose finite momenta are all 0, perhaps
  // next to infinite ones): m * 0 is NaN for an infinite m, which scaled_for_encoding turns
  // into its own sign's 1.0. A template argument rather than a test in the loop, which the
  // compiler left in it (5 of its ~125 instructions per 8 elements).
  template <bool kZeroInverse>
  LION_AVX2 void encode(const float* m, uint8_t* codes) const {
    const __m256 mv = _mm256_loadu_ps(m);
    __m256 x = _mm256_mul_ps(mv, inverse);
    if constexpr (kZeroInverse) {  // scaled_for_encoding, for 8 lanes
      const __m256 infinite_m = _mm256_and_ps(_mm256_cmp_ps(x, x, _CMP_UNORD_Q),
                                              _mm256_cmp_ps(mv, mv, _CMP_ORD_Q));
      const __m256 signed_one = _mm256_or_ps(
          _mm256_and_ps(mv, _mm256_castsi256_ps(top_bit)), _mm256_set1_ps(1.f));
      x = _mm256_blendv_ps(x, signed_one, infinite_m);
    }
    const __m256i bits = _mm256_castps_si256(x);
    const __m256i key = _mm256_xor_si256(bits, _mm256_or_si256(_mm256_srai_epi32(bits, 31), top_bit));
    const __m256i entry = lookup8(folded, _mm256_srli_epi32(key, 16));
    // Byte 1 (the code at or above the bucket's midpoint) unless the key is below it.
    const __m256i below = _mm256_cmpgt_epi32(_mm256_srli_epi32(entry, 16),
                                             _mm256_and_si256(key, low_16));
    const __m256i code = _mm256_and_si256(
        _mm256_srlv_epi32(entry, _mm256_andnot_si256(below, byte_shift)), low_byte);
    const __m128i words = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes), _mm_packus_epi16(words, words));
  }
};

template <bool kZeroInverse>
LION_AVX2 void encode_avx2(const float* m, const Encoder8& encoder, int64_t n, uint8_t* codes) {
  for (int64_t i = 0; i < n; i += 8) encoder.encode<kZeroInverse>(m + i, codes + i);
}

LION_AVX2 void encode_avx2(const float* m, const EncodeTable& table, float inverse, int64_t n,
                           uint8_t* codes) {
  const Encoder8 encoder(table, inverse);
  if (inverse == 0.f) {
    encode_avx2<true>(m, encoder, n, codes);
  } else {
    encode_avx2<false>(m, encoder, n, codes);
  }
}

// Two whole blocks in one loop: updates block `next` (decoding it with next_scale, leaving
// its new momentum in m_next, returning its max magnitude) while encoding block `current`'s
// new momentum m_current. The two are independent, so the core overlaps the encoder's table
// lookups with the update's memory traffic, which one block after the other leaves idle.
template <bool kZeroInverse, typename scalar_t>
LION_AVX2 float update_and_encode_blocks_avx2(scalar_t* p, const scalar_t* g,
                                              const uint8_t* next_codes, const float* qmap,
                                              float next_scale, const LionCoefficients& k,
                                              float* m_next, const float* m_current,
                                              const Encoder8& encoder, uint8_t* current_codes) {
  const LionVectors kv(k);
  const __m256 vscale = _mm256_set1_ps(next_scale);
  __m256 max_abs = _mm256_setzero_ps();
  for (int64_t i = 0; i < kQuantBlockSize; i += 8) {
    encoder.encode<kZeroInverse>(m_current + i, current_codes + i);
    update8(p + i, g + i, next_codes + i, qmap, vscale, kv, m_next + i, max_abs);
  }
  return max_lane(max_abs);
}

template <typename scalar_t>
LION_AVX2 float update_and_encode_blocks_avx2(scalar_t* p, const scalar_t* g,
                                              const uint8_t* next_codes, const float* qmap,
                                              float next_scale, const LionCoefficients& k,
                                              float* m_next, const float* m_current,
                                              const EncodeTable& table, float current_inverse,
                                              uint8_t* current_codes) {
  const Encoder8 encoder(table, current_inverse);
  if (current_inverse == 0.f) {
    return update_and_encode_blocks_avx2<true>(p, g, next_codes, qmap, next_scale, k, m_next,
                                               m_current, encoder, current_codes);
  }
  return update_and_encode_blocks_avx2<false>(p, g, next_codes, qmap, next_scale, k, m_next,
                                              m_current, encoder, current_codes);
}
#endif

// Encodes n momentum values against one scale.
void encode_span(const float* __restrict__ m, const EncodeTable& table,
                                         const float* __restrict__ qmap, float scale, int64_t n,
                                         uint8_t* __restrict__ codes) {
  const float inverse = inverse_scale(scale);
  int64_t i = 0;
#if defined(LION_HAVE_AVX2_KERNELS)
  if (table.folded_ok && cpu_has_avx2() && is_finite_scale(scale)) {
    i = n / 8 * 8;
    encode_avx2(m, table, inverse, i, codes);
  }
#endif
  const uint32_t* __restrict__ folded = table.folded_compact.data();
  const uint8_t* __restrict__ compact = table.compact.data();
  const float* __restrict__ midpoints = table.midpoints.data();
  for (; i < n; ++i) {
    codes[i] = encode_with_tables(folded, compact, midpoints, qmap,
                                  scaled_for_encoding(m[i], inverse));
  }
}

// Decodes, updates and writes back params for n <= kQuantBlockSize elements; leaves the new
// momentum in `m_out` and returns its largest magnitude.
template <typename scalar_t>
float lion_8bit_update_block(scalar_t* p, const scalar_t* g, const uint8_t* codes,
                             const float* qmap, float scale, int64_t n,
                             const LionCoefficients& k, float* m_out) {
  float max_abs = 0.f;
  int64_t i = 0;
#if defined(LION_HAVE_AVX2_KERNELS)
  if (cpu_has_avx2() && is_finite_scale(scale)) {  // (decode8 has no zero-entry case)
    i = n / 8 * 8;
    max_abs = update_block_avx2(p, g, codes, qmap, scale, i, k, m_out);
  }
#endif
  for (; i < n; ++i) {
    float pf = static_cast<float>(p[i]);
    float mf = decode_momentum(qmap, codes[i], scale);
    lion_update(pf, static_cast<float>(g[i]), mf, k);
    p[i] = static_cast<scalar_t>(pf);
    m_out[i] = mf;
    max_abs = std::max(max_abs, finite_magnitude(mf));
  }
  return max_abs;
}

// A block's scale from the max magnitude its vector loop found (over all of m, infinite ones
// included): that max when finite, else the max over m's finite values (finite_magnitude),
// found again in scalar code. Only blocks with an infinite momentum take that path.
inline float block_scale(float max_abs, const float* m, int64_t n) {
  if (is_finite_scale(max_abs)) return max_abs;
  float finite_max = 0.f;
  for (int64_t i = 0; i < n; ++i) finite_max = std::max(finite_max, finite_magnitude(m[i]));
  return finite_max;
}

// The 8-bit step over elements [begin, end) of one tensor, block by block: block b is
// decoded with decode_scale(b) and its new momentum encoded with encode_scale(b, its max
// magnitude), which is called once the block is updated (and may store that max). Where
// the CPU allows, the update of each block runs in one loop with the encoding of the one
// before it.
template <typename scalar_t, typename DecodeScale, typename EncodeScale>
void lion_8bit_update_span(scalar_t* p, const scalar_t* g, uint8_t* codes, int64_t begin,
                           int64_t end, const float* qmap, const EncodeTable& table,
                           const LionCoefficients& k, const DecodeScale& decode_scale,
                           const EncodeScale& encode_scale) {
  if (begin >= end) return;
  float buffers[2][kQuantBlockSize];
  float* current = buffers[0];
  float* next = buffers[1];
  int64_t current_begin = begin;
  int64_t current_n = std::min<int64_t>(kQuantBlockSize, end - begin);
  float current_scale = encode_scale(
      begin, block_scale(lion_8bit_update_block(p + begin, g + begin, codes + begin, qmap,
                                                decode_scale(begin), current_n, k, current),
                         current, current_n));
#if defined(LION_HAVE_AVX2_KERNELS)
  const bool pipelined = table.folded_ok && cpu_has_avx2();
#else
  const bool pipelined = false;
#endif
  for (int64_t b = begin + kQuantBlockSize; b < end; b += kQuantBlockSize) {
    const int64_t n = std::min<int64_t>(kQuantBlockSize, end - b);
    float next_max;
    const float scale_b = decode_scale(b);
    if (pipelined && n == kQuantBlockSize && current_n == kQuantBlockSize &&
        is_finite_scale(scale_b) && is_finite_scale(current_scale)) {
#if defined(LION_HAVE_AVX2_KERNELS)
      next_max = update_and_encode_blocks_avx2(p + b, g + b, codes + b, qmap, scale_b, k,
                                               next, current, table,
                                               inverse_scale(current_scale),
                                               codes + current_begin);
#endif
    } else {
      next_max = lion_8bit_update_block(p + b, g + b, codes + b, qmap, scale_b, n, k, next);
      encode_span(current, table, qmap, current_scale, current_n, codes + current_begin);
    }
    std::swap(current, next);
    current_begin = b;
    current_n = n;
    current_scale = encode_scale(b, block_scale(next_max, current, n));
  }
  encode_span(current, table, qmap, current_scale, current_n, codes + current_begin);
}

void lion_update_8bit_blockwise_cpu(at::TensorList params, at::TensorList grads,
                                    at::TensorList codes, at::TensorList absmaxes,
                                    const at::Tensor& qmap, const at::Tensor& lr,
                                    const at::Tensor& beta1, const at::Tensor& beta2,
                                    const at::Tensor& weight_decay,
                                    const std::optional<at::Tensor>& grad_scales) {
  constexpr const char* op = "lion_update_8bit_blockwise";
  const CheckedUpdate checked = check_lion_update_8bit_blockwise_args(
      params, grads, codes, absmaxes, qmap, lr, beta1, beta2, weight_decay, grad_scales);
  const float* scales = checked.grad_scales;
  if (params.empty()) return;
  check_on_cpu(op, params);
  const auto k = coefficients_from(checked.host);
  const float* map = qmap.const_data_ptr<float>();
  const auto table_holder = encode_table_for(map);
  const EncodeTable& table = *table_holder;
  FlatOperands flat({params, grads, codes}, {true, false, true}, ElementOrder::kLogical);
  prepare_for_writing(flat, {0, 2}, absmaxes);

  // Chunks are whole numbers of quantization blocks, so each block is one thread's.
  static_assert(kCpuChunkElements % kQuantBlockSize == 0);
  parallel_over_chunks(numels_of(flat), [&](size_t t, int64_t begin, int64_t end) {
    const at::Tensor& p = flat.get(0, t);
    uint8_t* code = flat.get(2, t).data_ptr<uint8_t>();
    float* absmax = absmaxes[t].data_ptr<float>();
    // Each block's absmax is read to decode it, then replaced by its new max to encode it.
    const auto old_absmax = [absmax](int64_t b) { return absmax[b / kQuantBlockSize]; };
    const auto new_absmax = [absmax](int64_t b, float max_abs) {
      return absmax[b / kQuantBlockSize] = max_abs;
    };
    LION_DISPATCH_PARAM_TYPES(p.scalar_type(), op, [&] {
      lion_8bit_update_span(p.data_ptr<scalar_t>(), flat.get(1, t).const_data_ptr<scalar_t>(),
                            code, begin, end, map, table, for_tensor(k, scales, t), old_absmax,
                            new_absmax);
    });
  });
  flat.write_back();
}

void lion_update_8bit_static_cpu(at::TensorList params, at::TensorList grads,
                                 at::TensorList codes, at::TensorList max1s,
                                 at::TensorList new_max1s, const at::Tensor& qmap,
                                 const at::Tensor& lr, const at::Tensor& beta1,
                                 const at::Tensor& beta2, const at::Tensor& weight_decay,
                                 const std::optional<at::Tensor>& grad_scales) {
  constexpr const char* op = "lion_update_8bit_static";
  const CheckedUpdate checked = check_lion_update_8bit_static_args(
      params, grads, codes, max1s, new_max1s, qmap, lr, beta1, beta2, weight_decay, grad_scales);
  const float* scales = checked.grad_scales;
  if (params.empty()) return;
  check_on_cpu(op, params);
  const auto k = coefficients_from(checked.host);
  const float* map = qmap.const_data_ptr<float>();
  const auto table_holder = encode_table_for(map);
  const EncodeTable& table = *table_holder;
  FlatOperands flat({params, grads, codes}, {true, false, true});
  const std::vector<int64_t> numels = numels_of(flat);

  // Pass 1: the largest magnitude of each tensor's new momentum, its new scale. Partial
  // maxima per chunk, combined per tensor afterwards (max is exact in any order).
  std::vector<int64_t> first_chunk(numels.size() + 1, 0);
  for (size_t t = 0; t < numels.size(); ++t) {
    first_chunk[t + 1] = first_chunk[t] + (numels[t] + kCpuChunkElements - 1) / kCpuChunkElements;
  }
  std::vector<float> chunk_max(first_chunk.back(), 0.f);
  parallel_over_chunks(numels, [&](size_t t, int64_t begin, int64_t end) {
    const float scale = *max1s[t].const_data_ptr<float>();
    const uint8_t* code = flat.get(2, t).const_data_ptr<uint8_t>();
    const LionCoefficients kt = for_tensor(k, scales, t);
    float max_abs = 0.f;
    LION_DISPATCH_PARAM_TYPES(flat.get(0, t).scalar_type(), op, [&] {
      const scalar_t* gp = flat.get(1, t).const_data_ptr<scalar_t>();
      int64_t i = begin;
#if defined(LION_HAVE_AVX2_KERNELS)
      if (cpu_has_avx2() && is_finite_scale(scale)) {
        const int64_t vectorized = (end - begin) / 8 * 8;
        max_abs = momentum_max_avx2(gp + begin, code + begin, map, scale, vectorized, kt);
        i += vectorized;
      }
#endif
      if (!is_finite_scale(max_abs)) {  // an infinite momentum: the finite max, in scalar code
        i = begin;
        max_abs = 0.f;
      }
      for (; i < end; ++i) {
        float unused_p = 0.f;
        float mf = decode_momentum(map, code[i], scale);
        lion_update(unused_p, static_cast<float>(gp[i]), mf, kt);
        max_abs = std::max(max_abs, finite_magnitude(mf));
      }
    });
    chunk_max[first_chunk[t] + begin / kCpuChunkElements] = max_abs;
  });
  std::vector<float> new_scale(numels.size(), 0.f);
  for (size_t t = 0; t < numels.size(); ++t) {
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) {
      new_scale[t] = std::max(new_scale[t], chunk_max[c]);
    }
    *new_max1s[t].data_ptr<float>() = new_scale[t];
  }

  // Pass 2: the update, with the momentum encoded against its exact new scale.
  prepare_for_writing(flat, {0, 2});
  parallel_over_chunks(numels, [&](size_t t, int64_t begin, int64_t end) {
    const at::Tensor& p = flat.get(0, t);
    uint8_t* code = flat.get(2, t).data_ptr<uint8_t>();
    const float scale = *max1s[t].const_data_ptr<float>();
    const float encode_with = new_scale[t];
    LION_DISPATCH_PARAM_TYPES(p.scalar_type(), op, [&] {
      lion_8bit_update_span(p.data_ptr<scalar_t>(), flat.get(1, t).const_data_ptr<scalar_t>(),
                            code, begin, end, map, table, for_tensor(k, scales, t),
                            [scale](int64_t) { return scale; },
                            [encode_with](int64_t, float) { return encode_with; });
    });
  });
  for (size_t t = 0; t < numels.size(); ++t) *max1s[t].data_ptr<float>() = new_scale[t];
  flat.write_back();
}

// The squared sum of n values in float64, in one fixed order whatever the CPU or thread
// count: element i goes to lane i % 8, and the lanes are added pairwise at the end. Squares of
// floats are exact in float64, so only the additions round.
template <typename scalar_t>
double squared_sum_span(const scalar_t* x, int64_t n) {
  std::array<double, 8> lanes{};
  int64_t i = 0;
#if defined(LION_HAVE_AVX2_KERNELS)
  if (cpu_has_avx2()) {
    i = n / 8 * 8;
    squared_sum_avx2(x, i, lanes);
  }
#endif
  for (; i < n; ++i) {
    const double v = static_cast<float>(x[i]);
    lanes[i % 8] += v * v;
  }
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
         ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

at::Tensor percentile_clipping_cpu(at::TensorList grads, at::TensorList gnorm_vecs,
                                  at::TensorList steps, int64_t percentile) {
  check_percentile_clipping_args(grads, gnorm_vecs, steps, percentile);
  at::Tensor scales = at::empty({static_cast<int64_t>(grads.size())},
                                at::TensorOptions().dtype(at::kFloat));
  float* out = scales.data_ptr<float>();
  std::vector<at::Tensor> contiguous;
  std::vector<int64_t> numels, first_chunk{0};
  for (const at::Tensor& g : grads) {
    contiguous.push_back(g.contiguous());
    numels.push_back(g.numel());
    first_chunk.push_back(first_chunk.back() + (g.numel() + kCpuChunkElements - 1) / kCpuChunkElements);
  }
  // One partial sum per chunk of each tensor, added in chunk order below, so that the result
  // does not depend on how the chunks were spread over threads.
  std::vector<double> partials(first_chunk.back(), 0.0);
  parallel_over_chunks(numels, [&](size_t t, int64_t begin, int64_t end) {
    LION_DISPATCH_PARAM_TYPES(contiguous[t].scalar_type(), "percentile_clipping", [&] {
      partials[first_chunk[t] + begin / kCpuChunkElements] =
          squared_sum_span(contiguous[t].const_data_ptr<scalar_t>() + begin, end - begin);
    });
  });
  for (size_t t = 0; t < grads.size(); ++t) {
    double sum = 0.0;  // (CUDA adds in fp64 too, in its own fixed order: nearly always the same float)
    for (int64_t c = first_chunk[t]; c < first_chunk[t + 1]; ++c) sum += partials[c];
    const float squared = static_cast<float>(sum);
    float* history = gnorm_vecs[t].data_ptr<float>();
    const float step = *steps[t].const_data_ptr<float>();
    if (records_in_every_slot(step, history[0])) {
      std::fill(history, history + kGnormHistory, squared);
    } else {
      history[gnorm_slot(step)] = squared;
    }
    std::array<float, kGnormHistory> sorted;
    std::copy(history, history + kGnormHistory, sorted.begin());
    std::nth_element(sorted.begin(), sorted.begin() + percentile, sorted.end(),
                     gnorm_sorts_before);
    out[t] = gnorm_scale(squared, sorted[percentile]);
  }
  return scales;
}

void increment_steps_cpu(at::TensorList steps) {
  check_step_counters(steps);
  for (const at::Tensor& step : steps) *step.data_ptr<float>() += 1.f;
}

// ---- blockwise quantization, for inspection -----------------------------------------------------

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& input,
                                                          const at::Tensor& qmap,
                                                          int64_t blocksize) {
  check_quantize_blockwise_args(input, qmap, blocksize);
  const at::Tensor x = input.contiguous().to(at::kFloat);
  const int64_t n = x.numel();
  const int64_t blocks = count_blocks(n, blocksize);
  at::Tensor codes = at::empty(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({blocks}, input.options().dtype(at::kFloat));
  const float* xp = x.const_data_ptr<float>();
  const float* map = qmap.const_data_ptr<float>();
  const auto table_holder = encode_table_for(map);
  const EncodeTable& table = *table_holder;
  uint8_t* cp = codes.data_ptr<uint8_t>();
  float* ap = absmax.data_ptr<float>();
  at::parallel_for(0, blocks, std::max<int64_t>(1, kCpuParallelMinElements / blocksize),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * blocksize, end = std::min(n, begin + blocksize);
      float scale = 0.f;
      for (int64_t i = begin; i < end; ++i) scale = std::max(scale, finite_magnitude(xp[i]));
      ap[b] = scale;
      encode_span(xp + begin, table, map, scale, end - begin, cp + begin);
    }
  });
  return {codes, absmax};
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& codes, const at::Tensor& absmax,
                                    const at::Tensor& qmap, int64_t blocksize) {
  check_dequantize_blockwise_args(codes, absmax, qmap, blocksize);
  const int64_t n = codes.numel();
  const int64_t blocks = count_blocks(n, blocksize);
  const at::Tensor c = codes.contiguous();
  const at::Tensor a = absmax.contiguous();
  at::Tensor out = at::empty(codes.sizes(), codes.options().dtype(at::kFloat));
  const uint8_t* cp = c.const_data_ptr<uint8_t>();
  const float* ap = a.const_data_ptr<float>();
  const float* map = qmap.const_data_ptr<float>();
  float* values = out.data_ptr<float>();
  at::parallel_for(0, blocks, std::max<int64_t>(1, kCpuChunkElements / blocksize),
                   [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float scale = ap[b];
      for (int64_t i = b * blocksize; i < std::min(n, (b + 1) * blocksize); ++i) {
        values[i] = decode_momentum(map, cp[i], scale);
      }
    }
  });
  return out;
}

}  // namespace

// The CPU has no managed memory: paged state on the CPU is ordinary memory, and prefetching
// it does nothing (the paged optimizers do not page on the CPU at all; these keep the
// operators usable, and testable, on every device).
at::Tensor zeros_paged_like_cpu(const at::Tensor& like, std::optional<at::ScalarType> dtype,
                                std::optional<at::MemoryFormat> memory_format) {
  const std::vector<int64_t> strides = paged_like_strides(like, memory_format);
  return at::empty_strided(like.sizes(), strides,
                           like.options().dtype(dtype.value_or(like.scalar_type())))
      .zero_();
}

void prefetch_paged_cpu(at::TensorList tensors, bool to_host) {
  check_prefetch_paged_args(tensors);
}

TORCH_LIBRARY_IMPL(lion, CPU, m) {
  m.impl("lion_update_32bit", &lion_update_32bit_cpu);
  m.impl("lion_update_8bit_blockwise", &lion_update_8bit_blockwise_cpu);
  m.impl("lion_update_8bit_static", &lion_update_8bit_static_cpu);
  m.impl("increment_steps", &increment_steps_cpu);
  m.impl("percentile_clipping", &percentile_clipping_cpu);
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
  m.impl("zeros_paged_like", &zeros_paged_like_cpu);
  m.impl("prefetch_paged", &prefetch_paged_cpu);
}

// A sparse tensor dispatches here; the argument checks then refuse it by name.
TORCH_LIBRARY_IMPL(lion, SparseCPU, m) {
  m.impl("lion_update_32bit", &lion_update_32bit_cpu);
  m.impl("lion_update_8bit_blockwise", &lion_update_8bit_blockwise_cpu);
  m.impl("lion_update_8bit_static", &lion_update_8bit_static_cpu);
  m.impl("increment_steps", &increment_steps_cpu);
  m.impl("percentile_clipping", &percentile_clipping_cpu);
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
  m.impl("zeros_paged_like", &zeros_paged_like_cpu);
  m.impl("prefetch_paged", &prefetch_paged_cpu);
}

}  // namespace lion
