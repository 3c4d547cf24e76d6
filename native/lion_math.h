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

LION_HOST_DEVICE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  return __builtin_bit_cast(uint32_t, x);
#endif
}

LION_HOST_DEVICE float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  return __builtin_bit_cast(float, bits);
#endif
}

// sign(0) = 0 and sign(NaN) = NaN (torch.sign gives 0 for NaN on the CPU): a NaN gradient
// must show up in the params rather than silently freezing them.
LION_HOST_DEVICE float sign_of(float x) {
#if defined(__CUDA_ARCH__)
  return x > 0.f ? 1.f : (x < 0.f ? -1.f : x);
#else
  // The same bits without comparisons, which host compilers turned into jumps in the scalar
  // loops (mispredicted half the time on random signs): a nonzero, non-NaN x (magnitude bits
  // in [1, those of inf]) becomes 1.0 with x's sign; +-0 and NaN stay as they are.
  const uint32_t bits = float_bits(x);
  const bool nonzero_number = (bits & 0x7fffffffu) - 1u < 0x7f800000u;
  const uint32_t signed_one = (bits & 0x80000000u) | 0x3f800000u;
  return float_from_bits(nonzero_number ? signed_one : bits);
#endif
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

// A history that has recorded nothing yet holds a negative first slot (squared norms never
// are; the optimizer fills a fresh history with -1), for instance when clipping starts on a
// param that already has state (a checkpoint saved without clipping, an override). Like the
// history of step 1, it records its first norm in every slot; a history of zeros would clip
// every gradient to 0 until 100 steps had passed.
LION_HOST_DEVICE bool records_in_every_slot(float step, float first_slot) {
  return (step >= 1.f && step < 2.f) || first_slot < 0.f;
}

// The slot of step t, t % kGnormHistory. A counter that is no count (negative, NaN, infinite:
// corrupt state the checks could not see, the CUDA kernels do not read counters on the host)
// records at slot 0: never outside the history, and no undefined float-to-int conversion.
LION_HOST_DEVICE int gnorm_slot(float step) {
  if (!(step >= 0.f && step < 0x1p62f)) return 0;
  return static_cast<int>(static_cast<int64_t>(step) % kGnormHistory);
}

// The order the history is ranked in: ascending with NaN last, as torch.sort (which
// bitsandbytes used) sorts. A NaN gradient puts a NaN in the history for 100 steps; this order
// keeps the ranks a permutation then (plain < is false both ways for NaN). A NaN clip (the
// percentile falls among NaNs) or a NaN current norm gives a scale of 1, as in bitsandbytes.
LION_HOST_DEVICE bool gnorm_sorts_before(float a, float b) {
  return a < b || (a == a && b != b);
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

// ceil(n / blocksize) for n >= 0 and blocksize > 0, without the overflow of
// (n + blocksize - 1) / blocksize for a blocksize near 2^63.
LION_HOST_DEVICE int64_t count_blocks(int64_t n, int64_t blocksize) {
  return n / blocksize + (n % blocksize != 0);
}

LION_HOST_DEVICE bool sign_bit(float x) {
#if defined(__CUDA_ARCH__)
  return signbit(x);
#else
  return std::signbit(x);
#endif
}

// A zero entry decodes to 0 whatever the scale: a block whose max is infinite (an infinite
// gradient) keeps its other elements' momentum finite (0) rather than 0 * inf = NaN, which
// would make all of their params NaN on the next step. For finite scales this is the product.
LION_HOST_DEVICE float decode_momentum(const float* qmap, uint8_t code, float scale) {
  const float q = qmap[code];
  return q == 0.f ? q : q * scale;
}

// Encoding maps x = m / scale to the nearest map entry: the number of midpoints
// (qmap[j] + qmap[j+1]) / 2 that are <= x (so ties go to the larger entry). To avoid a
// binary search per element, a table indexed by buckets of x's order-preserving key (its top
// 16 bits, with the smallest and largest magnitudes merged: the compact table below) gives
// the number of midpoints below the bucket; the few midpoints inside the bucket (at most one
// for the dynamic map) are then compared directly. The folded table below does both in one
// lookup; the CPU's AVX2 loops index its entries by the top 16 bits of the key
// (kEncodeTableSize of them).
constexpr int kEncodeTableSize = 1 << 16;

// Unsigned keys that order like the floats (-0.0 just below +0.0).
LION_HOST_DEVICE uint32_t order_key_of_bits(uint32_t bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

LION_HOST_DEVICE uint32_t order_key(float x) { return order_key_of_bits(float_bits(x)); }

LION_HOST_DEVICE float map_midpoint(const float* qmap, int j) {
  return (qmap[j] + qmap[j + 1]) * 0.5f;
}

// How many midpoints have keys below `key` (binary search: the map is sorted).
LION_HOST_DEVICE uint8_t midpoints_below_key(const float* qmap, uint32_t key) {
  int lo = 0, hi = kQuantMapSize - 1;  // answer in [0, 255]
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (order_key(map_midpoint(qmap, mid)) < key) lo = mid + 1; else hi = mid;
  }
  return static_cast<uint8_t>(lo);
}

// 1 / scale, or 0 for an all-zero block (whose momentum then encodes as 0.0). For a scale
// below 2^-128, whose inverse overflows, the largest float: an infinite inverse made 0 * inf
// = NaN of the block's zero momenta, which encoded as -1 (a param with a zero gradient then
// moved by lr every step, in blocks decayed that far). m * FLT_MAX keeps every m's sign and
// stays within [-1, 1] (|m| <= scale < 1 / FLT_MAX); the magnitudes, all below 2^-128, are
// coarser than the map's steps.
LION_HOST_DEVICE float inverse_scale(float scale) {
  if (!(scale > 0.f)) return 0.f;
  const float inverse = 1.f / scale;
  return inverse <= 3.40282347e38f ? inverse : 3.40282347e38f;
}

// The value encoded for momentum m against inverse_scale(scale): m * inverse, except that an
// infinite m where the inverse is 0 (the product is NaN, negative on x86 and positive on a
// GPU) gives its own sign's 1.0: the top or bottom code, the same on every device. The
// inverse is 0 when the scale is 0 (a block of nothing but zeros and infinities, whose scale,
// the largest finite magnitude, is 0: those momenta then decode to 0) or infinite (loaded
// state). Vector loops leave blocks of a non-finite scale to the scalar code.
LION_HOST_DEVICE float scaled_for_encoding(float m, float inverse) {
  const float x = m * inverse;
  if (x != x && m == m) return m > 0.f ? 1.f : -1.f;
  return x;
}

LION_HOST_DEVICE bool is_finite_scale(float scale) { return scale - scale == 0.f; }

// What a block's (or tensor's) scale is the max of: |m| for finite m, 0 for +-inf and NaN. An
// infinite momentum (from an infinite gradient) then does not make the scale infinite, which
// would turn every other momentum of the block into 0 or +-inf; it encodes as the top or
// bottom code instead (saturating at +-scale), keeping its sign.
LION_HOST_DEVICE float finite_magnitude(float m) {
#if defined(__CUDA_ARCH__)
  const float magnitude = fabsf(m);
#else
  const float magnitude = std::fabs(m);
#endif
  return is_finite_scale(m) ? magnitude : 0.f;
}

// ---- the compact encode table (the CUDA kernels, and the CPU's scalar loops) -------------------
// The 16-bit table is 64 KiB: too large for a GPU block's shared memory, and lookups at random
// into it in global memory bound the CUDA 8-bit kernel. A normalized momentum lies in [-1, 1],
// and the dynamic map's midpoints have magnitudes in [2^-22, 1), so only buckets of magnitudes
// in [2^-24, 2) need their own entry: per sign, one entry for all smaller magnitudes (+-0
// included), 25 exponents x 128 mantissa buckets (the same buckets as the 16-bit table), and
// one entry for magnitudes of 2 and more (inf and NaN included): 6404 bytes.
// Each entry counts the midpoints whose keys are below every key of its bucket, and the encoder
// then steps past the midpoints that are <= x, so the result is the 16-bit table's for any
// sorted map: the count only starts the search lower when midpoints lie in the merged ranges.
constexpr uint32_t kCompactLowestTop15 = 103u << 7;  // top 15 bits (after the sign) of 2^-24
constexpr int kCompactMiddleBuckets = 25 * 128;      // [2^-24, 2)
constexpr int kCompactBucketsPerSign = kCompactMiddleBuckets + 2;
constexpr int kCompactTableSize = 2 * kCompactBucketsPerSign;
constexpr int kCompactTableBytes = (kCompactTableSize + 15) / 16 * 16;  // whole 16-byte words

LION_HOST_DEVICE int compact_bucket(float x) {
  const uint32_t bits = float_bits(x);
  const int top15 = static_cast<int>((bits >> 16) & 0x7fffu);
  constexpr int kLast = kCompactBucketsPerSign - 1;
  int in_sign = top15 - static_cast<int>(kCompactLowestTop15) + 1;  // clamped to [0, kLast]
  in_sign = in_sign < 0 ? 0 : (in_sign > kLast ? kLast : in_sign);
  return static_cast<int>(bits >> 31) * kCompactBucketsPerSign + in_sign;
}

// The lowest order key of any float in compact bucket `bucket`.
LION_HOST_DEVICE uint32_t compact_bucket_lowest_key(int bucket) {
  const bool negative = bucket >= kCompactBucketsPerSign;
  const int in_sign = negative ? bucket - kCompactBucketsPerSign : bucket;
  if (!negative) {
    if (in_sign == 0) return order_key_of_bits(0u);  // +0
    // The smallest magnitude of the bucket; for the last one, 2.0.
    return order_key_of_bits((kCompactLowestTop15 + static_cast<uint32_t>(in_sign - 1)) << 16);
  }
  if (in_sign == kCompactBucketsPerSign - 1) return 0u;  // -NaN has the lowest keys
  // The largest magnitude of the bucket: the magnitudes below 2^-24 for entry 0.
  const uint32_t top15 = kCompactLowestTop15 + static_cast<uint32_t>(in_sign) - 1u;
  return order_key_of_bits(0x80000000u | top15 << 16 | 0xffffu);
}

LION_HOST_DEVICE uint8_t compact_table_entry(const float* qmap, int bucket) {
  return midpoints_below_key(qmap, compact_bucket_lowest_key(bucket));
}

// The code of x from its compact bucket's entry (the number of midpoints below the bucket);
// midpoints[j] = map_midpoint(qmap, j) for j < 255. A positive NaN steps to the top (its key
// is above every midpoint's, as in the 16-bit table), a negative one stays at 0. Then a code
// whose entry has the wrong sign bit is moved one step toward x's sign, as bitsandbytes' CUDA
// kernels do, so quantization never flips the momentum's sign; never past either end of the
// map (a map without negative entries, say, keeps a negative x at code 0, where the step
// wrapped around to 255).
LION_HOST_DEVICE uint8_t encode_from_entry(int entry, const float* midpoints, const float* qmap,
                                           float x) {
  int code = entry;
  const bool positive_nan = x != x && !sign_bit(x);
  while (code < kQuantMapSize - 1 && (midpoints[code] <= x || positive_nan)) ++code;
  const int wrong_sign = sign_bit(qmap[code]) != sign_bit(x);
  const int moved = code + wrong_sign * (x > 0.f ? 1 : -1);
  return static_cast<uint8_t>(moved >= 0 && moved < kQuantMapSize ? moved : code);
}

// The code of x = m * inverse_scale(scale) through the compact table.
LION_HOST_DEVICE uint8_t encode_compact(const uint8_t* table, const float* midpoints,
                                        const float* qmap, float x) {
  return encode_from_entry(table[compact_bucket(x)], midpoints, qmap, x);
}

// ---- the folded compact table (the CUDA kernels, and the CPU's scalar loops) ------------------
// encode_compact costs a bucket lookup, a search past the midpoints inside the bucket (a loop
// and a shared-memory read per step on a GPU) and a read of the chosen entry's sign. Where a
// bucket holds at most one midpoint, all of that is a function of x's key that changes at most
// once inside the bucket, so one 32-bit entry per bucket holds it: the final code (sign rule
// applied) for keys below the midpoint inside (bits 0-7), the final code at or above it (bits
// 8-15), and the low 16 bits of that midpoint's key (bits 16-31; 0 when no midpoint lies
// inside, or it is the bucket's first key, and then only the second code counts). Buckets
// where this does not hold (two midpoints inside; a midpoint inside a merged bucket of the
// smallest or largest magnitudes; any bucket of a map with a NaN, or a midpoint of +-0, where
// the key order of -0.0 and +0.0 differs from the float order) get kUnfoldable, and their x
// take encode_compact. For the dynamic map every bucket folds.
// Never a folded entry: equal codes have bits 16-31 clear.
constexpr uint32_t kUnfoldable = 0xffffffffu;
// The tables of one map on a GPU, in one buffer: the compact table, then the folded one.
constexpr int kFoldedTableOffset = kCompactTableBytes;  // a multiple of 16
constexpr int kEncodeTablesBytes = kFoldedTableOffset + 4 * kCompactTableSize;

// The float whose order key is `key` (order_key's inverse).
LION_HOST_DEVICE float float_of_key(uint32_t key) {
  return float_from_bits((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// The highest order key of any float in compact bucket `bucket`.
LION_HOST_DEVICE uint32_t compact_bucket_highest_key(int bucket) {
  const bool negative = bucket >= kCompactBucketsPerSign;
  const int in_sign = negative ? bucket - kCompactBucketsPerSign : bucket;
  if (!negative) {
    if (in_sign == kCompactBucketsPerSign - 1) return 0xffffffffu;  // the largest +NaN
    return compact_bucket_lowest_key(bucket + 1) - 1u;
  }
  if (in_sign == 0) return order_key_of_bits(0x80000000u);  // -0.0
  return compact_bucket_lowest_key(bucket - 1) - 1u;  // keys fall as negative buckets grow
}

// Whether a map's buckets may fold at all: no NaN entry, no midpoint that is NaN or +-0.
LION_HOST_DEVICE bool map_entry_allows_folding(const float* qmap, int j) {
  if (qmap[j] != qmap[j]) return false;
  if (j + 1 < kQuantMapSize) {
    const float midpoint = map_midpoint(qmap, j);
    if (midpoint != midpoint || midpoint == 0.f) return false;
  }
  return true;
}

// Bucket `bucket`'s folded entry, or kUnfoldable; map_folds: map_entry_allows_folding holds for
// every entry. Built from encode_from_entry itself at the ends of the (at most two) key ranges
// of the bucket: within each, the number of midpoints <= x cannot change (no midpoint lies
// inside), nor x's sign bit (one sign per bucket), and x > 0 (the sign rule's direction) and
// x's being a positive NaN each change at most once, at +0 (a bucket's first key) and past
// +inf (where the NaNs start), so equal codes at both ends mean one code across the range.
LION_HOST_DEVICE uint32_t folded_table_entry(const float* qmap, const float* midpoints,
                                             int bucket, bool map_folds) {
  if (!map_folds) return kUnfoldable;
  const int entry = compact_table_entry(qmap, bucket);
  const uint32_t lowest = compact_bucket_lowest_key(bucket);
  const uint32_t highest = compact_bucket_highest_key(bucket);
  const auto code_at = [&](uint32_t key) {
    return static_cast<uint32_t>(encode_from_entry(entry, midpoints, qmap, float_of_key(key)));
  };
  uint32_t threshold = lowest;  // the first key "at or above" the midpoint inside, if any
  if (entry < kQuantMapSize - 1) {
    const uint32_t key = order_key(midpoints[entry]);
    if (key <= highest) {  // midpoint `entry` lies inside (none below it does: entry counts them)
      if (entry + 1 < kQuantMapSize - 1 && order_key(midpoints[entry + 1]) <= highest) {
        return kUnfoldable;
      }
      if ((key >> 16) != (lowest >> 16) || (highest >> 16) != (lowest >> 16)) return kUnfoldable;
      threshold = key;
    }
  }
  const uint32_t above = code_at(threshold);
  if (code_at(highest) != above) return kUnfoldable;
  uint32_t below = above;
  if (threshold != lowest) {
    below = code_at(lowest);
    if (code_at(threshold - 1u) != below) return kUnfoldable;
  }
  const uint32_t low16 = below == above ? 0u : (threshold & 0xffffu);
  return below | above << 8 | low16 << 16;
}

// The code of x through a folded entry (not kUnfoldable).
LION_HOST_DEVICE uint8_t encode_folded(uint32_t folded, float x) {
  // The low 16 bits of order_key(x): x's bits, inverted for a negative x.
  const uint32_t bits = float_bits(x);
  const uint32_t low16 = (bits ^ static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31)) & 0xffffu;
  const bool at_or_above = low16 >= (folded >> 16);
  return static_cast<uint8_t>(at_or_above ? folded >> 8 : folded);
}

// The code of x through both tables: the folded entry where its bucket has one.
LION_HOST_DEVICE uint8_t encode_with_tables(const uint32_t* folded, const uint8_t* compact,
                                            const float* midpoints, const float* qmap, float x) {
  const int bucket = compact_bucket(x);
  const uint32_t entry = folded[bucket];
  if (entry != kUnfoldable) return encode_folded(entry, x);
  return encode_from_entry(compact[bucket], midpoints, qmap, x);
}

}  // namespace lion
