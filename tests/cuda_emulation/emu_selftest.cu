// Kernels that check the emulation itself (tests only): a correct warp and block reduction,
// and kernels that misuse barriers, which must fail loudly, or race, which must give results
// that depend on the schedule. CUDA source: build.py rewrites it like lion_kernels.cu.
#include <stdexcept>

namespace lion_emu_selftest {
namespace {

constexpr int kThreads = 128;

__device__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// out[0] = sum of (thread index + 1) over the block, through shuffles and shared memory.
__global__ void block_sum_kernel(float* out) {
  __shared__ float partial[kThreads / 32];
  const float total = warp_sum(static_cast<float>(threadIdx.x + 1));
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) sum += partial[w];
    out[blockIdx.x] = sum;
  }
}

// Lane 31 returns before the warp's shuffle.
__global__ void shuffle_after_exit_kernel(float* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = warp_sum(1.f);
}

// Thread 5 returns before the block's barrier.
__global__ void syncthreads_after_exit_kernel(float* out) {
  __shared__ float value[1];
  if (threadIdx.x == 5) return;
  if (threadIdx.x == 0) value[0] = 1.f;
  __syncthreads();
  out[threadIdx.x] = value[0];
}

// Half of warp 0 shuffles while the other half waits at __syncthreads.
__global__ void mixed_barriers_kernel(float* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  } else {
    __syncthreads();
  }
}

// Missing barrier: after the barrier, thread 0 overwrites shared memory that the last thread
// reads with no barrier in between: 42 or 7, by schedule.
__global__ void racy_kernel(float* out) {
  __shared__ float value[1];
  if (threadIdx.x == 0) value[0] = 42.f;
  __syncthreads();
  if (threadIdx.x == 0) value[0] = 7.f;
  if (threadIdx.x == kThreads - 1) out[0] = value[0];
}

// Reads shared memory nobody wrote: NaN under the emulation's poisoning.
__global__ void uninitialized_shared_kernel(float* out) {
  __shared__ float never_written[kThreads];
  __syncthreads();
  out[threadIdx.x] = never_written[threadIdx.x];
}

}  // namespace

// Runs self-test `which` with `blocks` blocks, writing into out (at least
// max(blocks, kThreads) floats).
void run(int which, float* out, int blocks) {
  switch (which) {
    case 0: block_sum_kernel<<<blocks, kThreads>>>(out); break;
    case 1: shuffle_after_exit_kernel<<<blocks, kThreads>>>(out); break;
    case 2: syncthreads_after_exit_kernel<<<blocks, kThreads>>>(out); break;
    case 3: mixed_barriers_kernel<<<blocks, kThreads>>>(out); break;
    case 4: racy_kernel<<<blocks, kThreads>>>(out); break;
    case 5: uninitialized_shared_kernel<<<blocks, kThreads>>>(out); break;
    default: throw std::invalid_argument("no such self-test");
  }
}

}  // namespace lion_emu_selftest
