// CUDA kernels of the lion operators. One launch updates every tensor of a batch: each
// block finds its tensor by binary search over first_block and updates one span of it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

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

__device__ __forceinline__ float read_hyperparameter(const DeviceOrHostFloat& h) {
  return h.on_device != nullptr ? *h.on_device : h.value;
}

__device__ __forceinline__ LionCoefficients coefficients_of(const Hyperparameters& h) {
  return make_lion_coefficients(read_hyperparameter(h.lr), read_hyperparameter(h.beta1),
                                read_hyperparameter(h.beta2), read_hyperparameter(h.weight_decay));
}

// The folded table inside the buffer that launch_build_encode_table fills.
__device__ __forceinline__ const uint32_t* folded_of(const uint8_t* tables) {
  return reinterpret_cast<const uint32_t*>(tables + kFoldedTableOffset);
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

// How the 32-bit kernel walks memory: elements per thread block, packs each thread loads
// before it computes (more loads in flight per thread), and whether its accesses carry the
// streaming cache hint (evict first: every byte is touched once per step). The library uses
// Production32bitShape; tools/kernel_shapes.cu instantiates others to time them against it.
enum class Caching : int { kDefault = 0, kStreaming = 1 };

template <int64_t Span, int Unroll, Caching C>
struct Shape32bit {
  static constexpr int64_t kSpan = Span;
  static constexpr int kUnroll = Unroll;
  static constexpr Caching kCaching = C;
  static_assert(Span % (kThreads * kVec * Unroll) == 0,
                "a block's span is whole rounds of Unroll packs per thread");
};
using Production32bitShape = Shape32bit<kElementsPer32bitBlock, 2, Caching::kStreaming>;

// A Pack<T> as the vector word the streaming intrinsics take (16 bytes for fp32, 8 for 16-bit).
template <typename T>
using PackWord = std::conditional_t<sizeof(Pack<T>) == 16, uint4, uint2>;

template <typename T, Caching C>
__device__ __forceinline__ void load_pack_as(const T* __restrict__ src, float (&out)[kVec]) {
  if constexpr (C == Caching::kStreaming) {
    static_assert(sizeof(PackWord<T>) == sizeof(Pack<T>));
    const PackWord<T> word = __ldcs(reinterpret_cast<const PackWord<T>*>(src));
    Pack<T> pack;
    memcpy(&pack, &word, sizeof(pack));
#pragma unroll
    for (int j = 0; j < kVec; ++j) out[j] = to_float(pack.v[j]);
  } else {
    load_pack(src, out);
  }
}

template <typename T, Caching C>
__device__ __forceinline__ void store_pack_as(T* __restrict__ dst, const float (&in)[kVec]) {
  if constexpr (C == Caching::kStreaming) {
    Pack<T> pack;
#pragma unroll
    for (int j = 0; j < kVec; ++j) pack.v[j] = from_float<T>(in[j]);
    PackWord<T> word;
    memcpy(&word, &pack, sizeof(word));
    __stcs(reinterpret_cast<PackWord<T>*>(dst), word);
  } else {
    store_pack(dst, in);
  }
}

template <typename T>
__device__ __forceinline__ void update_scalar(T* __restrict__ p, const T* __restrict__ g,
                                              float* __restrict__ m, int64_t e,
                                              const LionCoefficients& k) {
  float pf = to_float(p[e]), mf = m[e];
  lion_update(pf, to_float(g[e]), mf, k);
  p[e] = from_float<T>(pf);
  m[e] = mf;
}

template <typename T, typename Shape = Production32bitShape>
__global__ void __launch_bounds__(kThreads)
lion_32bit_kernel(const __grid_constant__ Lion32bitBatch batch) {
  constexpr int kUnroll = Shape::kUnroll;
  constexpr Caching kCaching = Shape::kCaching;
  const int t = tensor_of_block(batch.first_block, batch.num_tensors, blockIdx.x);
  const int64_t n = batch.numels[t];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - batch.first_block[t]) * Shape::kSpan;
  const int64_t end = min(n, begin + Shape::kSpan);
  T* __restrict__ p = static_cast<T*>(batch.params[t]);
  const T* __restrict__ g = static_cast<const T*>(batch.grads[t]);
  float* __restrict__ m = batch.momenta[t];

  auto k = coefficients_of(batch.hyper);
  if (batch.grad_scale[t] != nullptr) k.grad_scale = *batch.grad_scale[t];

  const bool aligned =
      (reinterpret_cast<uintptr_t>(p) | reinterpret_cast<uintptr_t>(g)) % sizeof(Pack<T>) == 0 &&
      reinterpret_cast<uintptr_t>(m) % sizeof(Pack<float>) == 0;
  if (aligned) {
    // begin is a multiple of kVec, so every full pack below is aligned. A thread's packs
    // are kStride elements apart, so each of its loads is coalesced across the block.
    constexpr int64_t kStride = kThreads * kVec;
    int64_t i = begin + threadIdx.x * kVec;
    if constexpr (kUnroll > 1) {
      // Rounds of kUnroll whole packs: every load of a round issued before any arithmetic.
      for (; i + (kUnroll - 1) * kStride + kVec <= end; i += kUnroll * kStride) {
        float pv[kUnroll][kVec], gv[kUnroll][kVec], mv[kUnroll][kVec];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          load_pack_as<T, kCaching>(p + i + u * kStride, pv[u]);
          load_pack_as<T, kCaching>(g + i + u * kStride, gv[u]);
          load_pack_as<float, kCaching>(m + i + u * kStride, mv[u]);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int j = 0; j < kVec; ++j) lion_update(pv[u][j], gv[u][j], mv[u][j], k);
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          store_pack_as<T, kCaching>(p + i + u * kStride, pv[u]);
          store_pack_as<float, kCaching>(m + i + u * kStride, mv[u]);
        }
      }
    }
    // One pack at a time: every pack when kUnroll is 1, else what a tensor's last block
    // leaves after its whole rounds; a tensor's ragged end element by element.
    for (; i < end; i += kStride) {
      if (i + kVec <= end) {
        float pv[kVec], gv[kVec], mv[kVec];
        load_pack_as<T, kCaching>(p + i, pv);
        load_pack_as<T, kCaching>(g + i, gv);
        load_pack_as<float, kCaching>(m + i, mv);
#pragma unroll
        for (int j = 0; j < kVec; ++j) lion_update(pv[j], gv[j], mv[j], k);
        store_pack_as<T, kCaching>(p + i, pv);
        store_pack_as<float, kCaching>(m + i, mv);
      } else {
        for (int64_t e = i; e < end; ++e) update_scalar(p, g, m, e, k);
      }
    }
  } else {
    for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) update_scalar(p, g, m, e, k);
  }
}

constexpr int kWarpSize = 32;
constexpr int kWarpsPer8bitBlock = kThreads / kWarpSize;
static_assert(kElements8bitPerBlock == kWarpsPer8bitBlock * kQuantBlocksPerWarp * kQuantBlockSize);
constexpr int kPerLane = kQuantBlockSize / kWarpSize;  // elements of a quant block per lane
static_assert(kPerLane == 2 * kVec, "a lane's elements are two packs and one 8-byte code word");

template <typename T>
__device__ __forceinline__ void load_lane(const T* __restrict__ src, float (&out)[kPerLane]) {
  float lo[kVec], hi[kVec];
  load_pack(src, lo);
  load_pack(src + kVec, hi);
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    out[j] = lo[j];
    out[kVec + j] = hi[j];
  }
}

template <typename T>
__device__ __forceinline__ void store_lane(T* __restrict__ dst, const float (&in)[kPerLane]) {
  float lo[kVec], hi[kVec];
#pragma unroll
  for (int j = 0; j < kVec; ++j) {
    lo[j] = in[j];
    hi[j] = in[kVec + j];
  }
  store_pack(dst, lo);
  store_pack(dst + kVec, hi);
}

// A lane's 8 codes as one 8-byte word; the byte at the lowest address is the lowest byte.
__device__ __forceinline__ uint8_t code_byte(uint2 word, int j) {
  return static_cast<uint8_t>((j < 4 ? word.x >> (8 * j) : word.y >> (8 * (j - 4))) & 0xffu);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

// Non-negative floats order like their bit patterns, so atomicMax on the bits is a float max.
__device__ __forceinline__ void atomic_max_nonnegative(float* address, float value) {
  atomicMax(reinterpret_cast<int*>(address), __float_as_int(value));
}

enum class Pass : int { kUpdate = 0, kReduceOnly = 1 };

// How the 8-bit kernels encode: the compact table per element (encode_compact: a bucket
// lookup, a search past the midpoints inside the bucket, a read of the entry's sign), the
// folded table per element (encode_with_tables: one lookup and one compare where the bucket
// folds), or the folded table a lane at a time (encode_lane below: its eight lookups issued
// together). MinBlocks > 0 asks the compiler for that many resident thread blocks per SM
// (fewer registers). The library uses Production8bitShape; tools/kernel_shapes.cu times others.
enum class Encoder : int { kCompact = 0, kFolded = 1, kFoldedLane = 2 };

template <Encoder E, int MinBlocks>
struct Shape8bit {
  static constexpr Encoder kEncoder = E;
  static constexpr int kMinBlocks = MinBlocks;  // 0: no constraint
};
using Production8bitShape = Shape8bit<Encoder::kFoldedLane, 0>;

template <Encoder E>
__device__ __forceinline__ uint8_t encode_one(const uint8_t* tables, const float* midpoints,
                                              const float* qmap, float x) {
  if constexpr (E == Encoder::kCompact) return encode_compact(tables, midpoints, qmap, x);
  return encode_with_tables(folded_of(tables), tables, midpoints, qmap, x);
}

// One 256-element quantization block that is a tensor's ragged tail or not aligned for
// vector accesses, one warp: one element per lane per step, strided across the warp. Each
// element gets the arithmetic of update_whole_quant_blocks below, and a block's max does not
// depend on the order, so both give the same bits.
template <typename T, Scaling S, Pass P, Encoder E>
__device__ __forceinline__ void update_partial_quant_block(const Lion8bitBatch& batch, int t,
                                                           int64_t n, int64_t quant_block,
                                                           const LionCoefficients& k,
                                                           const float* qmap,
                                                           const float* midpoints,
                                                           const uint8_t* table) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t begin = quant_block * kQuantBlockSize;
  T* __restrict__ p = static_cast<T*>(batch.params[t]);
  const T* __restrict__ g = static_cast<const T*>(batch.grads[t]);
  uint8_t* __restrict__ codes = batch.codes[t];
  float* scale_slot = S == Scaling::kBlockwise ? batch.scales[t] + quant_block : batch.scales[t];
  const float scale = *scale_slot;
  float m[kPerLane];
  float max_abs = 0.f;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    const int64_t e = begin + j * kWarpSize + lane;  // coalesced across the warp
    m[j] = 0.f;
    if (e < n) {
      float pf = P == Pass::kUpdate ? to_float(p[e]) : 0.f;
      m[j] = decode_momentum(qmap, codes[e], scale);
      lion_update(pf, to_float(g[e]), m[j], k);
      if (P == Pass::kUpdate) p[e] = from_float<T>(pf);
      max_abs = fmaxf(max_abs, finite_magnitude(m[j]));
    }
  }
  max_abs = warp_max(max_abs);
  if constexpr (P == Pass::kReduceOnly) {
    if (lane == 0) atomic_max_nonnegative(batch.new_scales[t], max_abs);
  } else {
    float new_scale;
    if (S == Scaling::kBlockwise) {
      new_scale = max_abs;
      if (lane == 0) *scale_slot = new_scale;  // every lane has read the old scale above
    } else {
      new_scale = *batch.new_scales[t];
    }
    const float inverse = inverse_scale(new_scale);
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      const int64_t e = begin + j * kWarpSize + lane;
      if (e < n) {
        codes[e] = encode_one<E>(table, midpoints, qmap, scaled_for_encoding(m[j], inverse));
      }
    }
  }
}

// A lane's kPerLane codes as one 8-byte word (the lowest byte first), encoded against one
// inverse scale: every folded-table read issued before any is used, then the folded encoding.
// Where some x is NaN (a NaN momentum, or the inverse of a zero or infinite scale, which
// scaled_for_encoding handles) or some bucket does not fold (a map other than the dynamic
// one), every element of the lane takes scaled_for_encoding and encode_with_tables instead.
// No branch per element, so the reads overlap.
__device__ __forceinline__ uint2 encode_lane(const float (&m)[kPerLane], float inverse,
                                             const uint8_t* tables, const float* midpoints,
                                             const float* qmap) {
  const uint32_t* folded = folded_of(tables);
  float x[kPerLane];
  uint32_t entry[kPerLane];
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    x[j] = m[j] * inverse;  // scaled_for_encoding(m[j], inverse) unless x[j] is NaN
    entry[j] = folded[compact_bucket(x[j])];
  }
  bool common = true;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) common &= entry[j] != kUnfoldable && x[j] == x[j];
  uint32_t code[kPerLane];
  if (common) {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) code[j] = encode_folded(entry[j], x[j]);
  } else {
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      code[j] = encode_with_tables(folded, tables, midpoints, qmap,
                                   scaled_for_encoding(m[j], inverse));
    }
  }
  uint2 word = make_uint2(0u, 0u);
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) {
    if (j < 4) word.x |= code[j] << (8 * j); else word.y |= code[j] << (8 * (j - 4));
  }
  return word;
}

// Q whole, aligned quantization blocks starting at `first`, one warp: every load of all Q
// is issued before any arithmetic, so a warp keeps Q blocks of traffic in flight.
template <typename T, Scaling S, Pass P, int Q, Encoder E>
__device__ __forceinline__ void update_whole_quant_blocks(const Lion8bitBatch& batch, int t,
                                                          int64_t first, const LionCoefficients& k,
                                                          const float* qmap, const float* midpoints,
                                                          const uint8_t* table) {
  const int lane = threadIdx.x % kWarpSize;
  T* __restrict__ p = static_cast<T*>(batch.params[t]);
  const T* __restrict__ g = static_cast<const T*>(batch.grads[t]);
  uint8_t* __restrict__ codes = batch.codes[t];
  float pv[Q][kPerLane], gv[Q][kPerLane], scale[Q];
  uint2 words[Q];
#pragma unroll
  for (int r = 0; r < Q; ++r) {
    const int64_t base = (first + r) * kQuantBlockSize + lane * kPerLane;
    scale[r] = S == Scaling::kBlockwise ? batch.scales[t][first + r] : *batch.scales[t];
    if (P == Pass::kUpdate) {
      load_lane(p + base, pv[r]);
    } else {
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) pv[r][j] = 0.f;
    }
    load_lane(g + base, gv[r]);
    words[r] = *reinterpret_cast<const uint2*>(codes + base);
  }
  float m[Q][kPerLane], max_abs[Q];
#pragma unroll
  for (int r = 0; r < Q; ++r) {
    max_abs[r] = 0.f;
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) {
      m[r][j] = decode_momentum(qmap, code_byte(words[r], j), scale[r]);
      lion_update(pv[r][j], gv[r][j], m[r][j], k);
      max_abs[r] = fmaxf(max_abs[r], finite_magnitude(m[r][j]));
    }
    if (P == Pass::kUpdate) store_lane(p + (first + r) * kQuantBlockSize + lane * kPerLane, pv[r]);
  }
  if constexpr (P == Pass::kReduceOnly) {
    float all = 0.f;
#pragma unroll
    for (int r = 0; r < Q; ++r) all = fmaxf(all, max_abs[r]);
    all = warp_max(all);
    if (lane == 0) atomic_max_nonnegative(batch.new_scales[t], all);
  } else {
#pragma unroll
    for (int r = 0; r < Q; ++r) {
      float new_scale;
      if (S == Scaling::kBlockwise) {
        new_scale = warp_max(max_abs[r]);
        if (lane == 0) batch.scales[t][first + r] = new_scale;  // all lanes read it above
      } else {
        new_scale = *batch.new_scales[t];
      }
      const float inverse = inverse_scale(new_scale);
      uint2 word = make_uint2(0u, 0u);
      if constexpr (E == Encoder::kFoldedLane) {
        word = encode_lane(m[r], inverse, table, midpoints, qmap);
      } else {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const uint32_t code =
              encode_one<E>(table, midpoints, qmap, scaled_for_encoding(m[r][j], inverse));
          if (j < 4) word.x |= code << (8 * j); else word.y |= code << (8 * (j - 4));
        }
      }
      *reinterpret_cast<uint2*>(codes + (first + r) * kQuantBlockSize + lane * kPerLane) = word;
    }
  }
}

// Virtual block `block` (kWarpsPer8bitBlock * Q quantization blocks of one tensor): warp w
// takes Q consecutive ones. kUpdate decodes, updates p, and encodes the new momentum against
// its new scale (blockwise: the block's max; static: new_scales[t], computed by a kReduceOnly
// pass); kReduceOnly only computes the new momentum's max. Whole, aligned blocks (all but a
// tensor's ragged tail, in practice) take vector accesses; the condition is the same for the
// whole warp, as the shuffles need.
template <typename T, Scaling S, Pass P, int Q, Encoder E>
__device__ __forceinline__ void update_virtual_block(const Lion8bitBatch& batch, int32_t block,
                                                     LionCoefficients k, const float* qmap,
                                                     const float* midpoints, const uint8_t* table) {
  const int t = tensor_of_block(batch.first_block, batch.num_tensors, block);
  const int64_t n = batch.numels[t];
  const int warp = threadIdx.x / kWarpSize;
  const int64_t first =
      (static_cast<int64_t>(block - batch.first_block[t]) * kWarpsPer8bitBlock + warp) * Q;
  if (first * kQuantBlockSize >= n) return;
  if (batch.grad_scale[t] != nullptr) k.grad_scale = *batch.grad_scale[t];
  const bool aligned =
      (reinterpret_cast<uintptr_t>(batch.params[t]) | reinterpret_cast<uintptr_t>(batch.grads[t])) %
              sizeof(Pack<T>) == 0 &&
      reinterpret_cast<uintptr_t>(batch.codes[t]) % sizeof(uint2) == 0;
  if (aligned && (first + Q) * kQuantBlockSize <= n) {
    update_whole_quant_blocks<T, S, P, Q, E>(batch, t, first, k, qmap, midpoints, table);
    return;
  }
#pragma unroll
  for (int r = 0; r < Q; ++r) {
    const int64_t begin = (first + r) * kQuantBlockSize;
    if (begin >= n) return;
    if (aligned && begin + kQuantBlockSize <= n) {
      update_whole_quant_blocks<T, S, P, 1, E>(batch, t, first + r, k, qmap, midpoints, table);
    } else {
      update_partial_quant_block<T, S, P, E>(batch, t, n, first + r, k, qmap, midpoints, table);
    }
  }
}

// The map and its midpoints go to shared memory; the compact encode table (6.4 KB) is read
// through the L1 cache. Measured on an H200 (bench_results/h200/3dd623a-8bit-variants.txt)
// against the table copied to shared memory, a grid of resident blocks looping over the work,
// and one or four quantization blocks per warp: on the blockwise path this shape was the
// fastest in that run (by 3-6% on the 1.24 G-parameter set, 1-2% on gpt2); on the static path
// it was the fastest on gpt2 and 8% behind the best (four blocks per warp, table in shared
// memory) on the 1.24 G set. Blockwise is the default and what bitsandbytes 0.50 has.
template <typename T, Scaling S, Pass P, typename Shape = Production8bitShape>
__global__ void __launch_bounds__(kThreads, Shape::kMinBlocks)
lion_8bit_kernel(const __grid_constant__ Lion8bitBatch batch) {
  __shared__ float qmap[kQuantMapSize];
  __shared__ float midpoints[kQuantMapSize];
  qmap[threadIdx.x] = batch.qmap[threadIdx.x];  // kThreads == kQuantMapSize
  __syncthreads();
  if (P == Pass::kUpdate) {
    midpoints[threadIdx.x] =
        threadIdx.x + 1 < kQuantMapSize ? map_midpoint(qmap, threadIdx.x) : 0.f;
    __syncthreads();
  }
  const auto k = coefficients_of(batch.hyper);
  update_virtual_block<T, S, P, kQuantBlocksPerWarp, Shape::kEncoder>(
      batch, blockIdx.x, k, qmap, midpoints, batch.encode_table);
}

enum class ScaleOp : int { kZeroNew = 0, kCommitNew = 1 };

__global__ void static_scales_kernel(const __grid_constant__ Lion8bitBatch batch, ScaleOp op) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= batch.num_tensors) return;
  if (op == ScaleOp::kZeroNew) *batch.new_scales[t] = 0.f;
  else *batch.scales[t] = *batch.new_scales[t];
}

template <typename T, typename Shape = Production8bitShape>
void launch_8bit_typed(const Lion8bitBatch& batch, Scaling scaling, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(batch.first_block[batch.num_tensors]);
  if (blocks == 0) return;
  if (scaling == Scaling::kBlockwise) {
    lion_8bit_kernel<T, Scaling::kBlockwise, Pass::kUpdate, Shape>
        <<<blocks, kThreads, 0, stream>>>(batch);
    return;
  }
  const unsigned scale_blocks = (batch.num_tensors + kThreads - 1) / kThreads;
  static_scales_kernel<<<scale_blocks, kThreads, 0, stream>>>(batch, ScaleOp::kZeroNew);
  lion_8bit_kernel<T, Scaling::kStatic, Pass::kReduceOnly, Shape>
      <<<blocks, kThreads, 0, stream>>>(batch);
  lion_8bit_kernel<T, Scaling::kStatic, Pass::kUpdate, Shape>
      <<<blocks, kThreads, 0, stream>>>(batch);
  static_scales_kernel<<<scale_blocks, kThreads, 0, stream>>>(batch, ScaleOp::kCommitNew);
}

// Block sum of one value per thread, in a fixed order.
template <typename Acc>
__device__ Acc block_sum(Acc value, Acc* scratch /* kThreads / kWarpSize */) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  }
  if (threadIdx.x % kWarpSize == 0) scratch[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  Acc total = 0;
#pragma unroll
  for (int w = 0; w < kThreads / kWarpSize; ++w) total += scratch[w];
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
grad_norm_partials_kernel(const __grid_constant__ GradNormBatch batch) {
  __shared__ double scratch[kThreads / kWarpSize];
  const int t = tensor_of_block(batch.first_block, batch.num_tensors, blockIdx.x);
  const int64_t n = batch.numels[t];
  const int64_t begin = static_cast<int64_t>(blockIdx.x - batch.first_block[t]) * kElementsPerBlock;
  const int64_t end = min(n, begin + kElementsPerBlock);
  const T* g = static_cast<const T*>(batch.grads[t]);
  // In float64, as on the CPU: squares of floats are exact there (in float32 those below
  // about 1e-23 vanish), so only the additions round, and the norms agree with the CPU's.
  double sum = 0.0;
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    const double x = to_float(g[e]);
    sum += x * x;
  }
  const double total = block_sum(sum, scratch);
  if (threadIdx.x == 0) batch.partial_sums[blockIdx.x] = total;
}

// One block per tensor: its squared norm, the history update, and its scale.
__global__ void __launch_bounds__(kThreads)
percentile_scales_kernel(const __grid_constant__ GradNormBatch batch) {
  __shared__ double scratch[kThreads / kWarpSize];
  __shared__ float history[kGnormHistory];
  const int t = blockIdx.x;
  double sum = 0.0;
  for (int b = batch.first_block[t] + threadIdx.x; b < batch.first_block[t + 1]; b += kThreads) {
    sum += batch.partial_sums[b];
  }
  float* gnorm = batch.gnorm_vecs[t];
  const float step = *batch.steps[t];
  // Read by every thread before any writes below (block_sum ends with a barrier).
  const bool every_slot = records_in_every_slot(step, gnorm[0]);
  const float squared = static_cast<float>(block_sum(sum, scratch));
  if (threadIdx.x < kGnormHistory) {
    const bool write = every_slot || threadIdx.x == gnorm_slot(step);
    if (write) gnorm[threadIdx.x] = squared;
    history[threadIdx.x] = write ? squared : gnorm[threadIdx.x];
  }
  __syncthreads();
  if (threadIdx.x < kGnormHistory) {
    // The value whose rank (in gnorm_sorts_before's order, ties broken by position) is the
    // percentile: sorted[percentile]. The ranks are a permutation, so one thread writes.
    const float mine = history[threadIdx.x];
    int rank = 0;
    for (int j = 0; j < kGnormHistory; ++j) {
      const float other = history[j];
      rank += gnorm_sorts_before(other, mine) ||
              (!gnorm_sorts_before(mine, other) && j < static_cast<int>(threadIdx.x));
    }
    if (rank == batch.percentile) *batch.scale_of[t] = gnorm_scale(squared, mine);
  }
}

__global__ void increment_steps_kernel(const __grid_constant__ StepCounters counters) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t < counters.count) *counters.steps[t] += 1.f;
}

// The compact table (bytes [0, kCompactTableBytes)) and the folded one (kCompactTableSize
// 32-bit entries from kFoldedTableOffset) of qmap: one thread per compact bucket.
__global__ void build_encode_table_kernel(const float* __restrict__ qmap_global,
                                         uint8_t* __restrict__ tables) {
  __shared__ float qmap[kQuantMapSize];
  __shared__ float midpoints[kQuantMapSize];
  __shared__ int map_folds;
  qmap[threadIdx.x] = qmap_global[threadIdx.x];  // kThreads == kQuantMapSize
  if (threadIdx.x == 0) map_folds = 1;
  __syncthreads();
  midpoints[threadIdx.x] = threadIdx.x + 1 < kQuantMapSize ? map_midpoint(qmap, threadIdx.x) : 0.f;
  if (!map_entry_allows_folding(qmap, threadIdx.x)) map_folds = 0;  // every writer writes 0
  __syncthreads();
  const int bucket = blockIdx.x * kThreads + threadIdx.x;
  if (bucket < kCompactTableBytes) {
    tables[bucket] = bucket < kCompactTableSize ? compact_table_entry(qmap, bucket) : 0;
  }
  if (bucket < kCompactTableSize) {
    reinterpret_cast<uint32_t*>(tables + kFoldedTableOffset)[bucket] =
        folded_table_entry(qmap, midpoints, bucket, map_folds != 0);
  }
}

__global__ void quantize_blockwise_kernel(const float* __restrict__ input,
                                          const uint8_t* __restrict__ table,
                                          const float* __restrict__ qmap_global, int64_t n,
                                          int64_t blocksize, uint8_t* __restrict__ codes,
                                          float* __restrict__ absmax) {
  __shared__ float qmap[kQuantMapSize];
  __shared__ float midpoints[kQuantMapSize];
  __shared__ float warp_maxima[kThreads / kWarpSize];
  qmap[threadIdx.x] = qmap_global[threadIdx.x];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * blocksize;
  const int64_t end = min(n, begin + blocksize);
  float max_abs = 0.f;
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    max_abs = fmaxf(max_abs, finite_magnitude(input[e]));
  }
  max_abs = warp_max(max_abs);
  if (threadIdx.x % kWarpSize == 0) warp_maxima[threadIdx.x / kWarpSize] = max_abs;
  __syncthreads();
  float scale = 0.f;
#pragma unroll
  for (int w = 0; w < kThreads / kWarpSize; ++w) scale = fmaxf(scale, warp_maxima[w]);
  if (threadIdx.x == 0) absmax[blockIdx.x] = scale;
  midpoints[threadIdx.x] = threadIdx.x + 1 < kQuantMapSize ? map_midpoint(qmap, threadIdx.x) : 0.f;
  __syncthreads();
  const float inverse = inverse_scale(scale);
  for (int64_t e = begin + threadIdx.x; e < end; e += kThreads) {
    codes[e] = encode_with_tables(folded_of(table), table, midpoints, qmap,
                                  scaled_for_encoding(input[e], inverse));
  }
}

__global__ void dequantize_blockwise_kernel(const uint8_t* __restrict__ codes,
                                            const float* __restrict__ absmax,
                                            const float* __restrict__ qmap, int64_t n,
                                            int64_t blocksize, float* __restrict__ out) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    out[e] = decode_momentum(qmap, codes[e], absmax[e / blocksize]);
  }
}

// The 32-bit launch for a batch whose first_block counts blocks of Shape::kSpan elements.
template <typename Shape>
void launch_32bit_shaped(const Lion32bitBatch& batch, ParamType type, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(batch.first_block[batch.num_tensors]);
  if (blocks == 0) return;
  switch (type) {
    case ParamType::kFloat32:
      lion_32bit_kernel<float, Shape><<<blocks, kThreads, 0, stream>>>(batch);
      break;
    case ParamType::kBFloat16:
      lion_32bit_kernel<__nv_bfloat16, Shape><<<blocks, kThreads, 0, stream>>>(batch);
      break;
    case ParamType::kFloat16:
      lion_32bit_kernel<__half, Shape><<<blocks, kThreads, 0, stream>>>(batch);
      break;
  }
}

}  // namespace

void launch_lion_32bit(const Lion32bitBatch& batch, ParamType type, cudaStream_t stream) {
  launch_32bit_shaped<Production32bitShape>(batch, type, stream);
}

void launch_lion_8bit(const Lion8bitBatch& batch, ParamType type, Scaling scaling,
                      cudaStream_t stream) {
  switch (type) {
    case ParamType::kFloat32: launch_8bit_typed<float>(batch, scaling, stream); break;
    case ParamType::kBFloat16: launch_8bit_typed<__nv_bfloat16>(batch, scaling, stream); break;
    case ParamType::kFloat16: launch_8bit_typed<__half>(batch, scaling, stream); break;
  }
}

void launch_percentile_clipping(const GradNormBatch& batch, ParamType type, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>(batch.first_block[batch.num_tensors]);
  if (batch.num_tensors == 0) return;
  if (blocks > 0) {
    switch (type) {
      case ParamType::kFloat32:
        grad_norm_partials_kernel<float><<<blocks, kThreads, 0, stream>>>(batch);
        break;
      case ParamType::kBFloat16:
        grad_norm_partials_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(batch);
        break;
      case ParamType::kFloat16:
        grad_norm_partials_kernel<__half><<<blocks, kThreads, 0, stream>>>(batch);
        break;
    }
  }
  percentile_scales_kernel<<<batch.num_tensors, kThreads, 0, stream>>>(batch);
}

void launch_increment_steps(const StepCounters& counters, cudaStream_t stream) {
  if (counters.count == 0) return;
  increment_steps_kernel<<<(counters.count + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      counters);
}

void launch_build_encode_table(const float* qmap, uint8_t* table, cudaStream_t stream) {
  build_encode_table_kernel<<<(kCompactTableBytes + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
      qmap, table);
}

void launch_quantize_blockwise(const float* input, const uint8_t* encode_table,
                               const float* qmap, int64_t n, int64_t blocksize, uint8_t* codes,
                               float* absmax, cudaStream_t stream) {
  const int64_t blocks = count_blocks(n, blocksize);
  if (blocks == 0) return;
  quantize_blockwise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      input, encode_table, qmap, n, blocksize, codes, absmax);
}

void launch_dequantize_blockwise(const uint8_t* codes, const float* absmax, const float* qmap,
                                 int64_t n, int64_t blocksize, float* out, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8);
  dequantize_blockwise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      codes, absmax, qmap, n, blocksize, out);
}

}  // namespace lion::cuda
