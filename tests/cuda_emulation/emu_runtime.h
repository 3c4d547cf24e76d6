// Runtime of the CPU emulation of CUDA kernels (tests only; see README.md here).
//
// A launch runs its blocks one after another on the calling thread; the threads of a block
// run as cooperative fibers that switch only at barriers (__syncthreads, warp shuffles,
// __syncwarp). Everything is deterministic for a given schedule; the schedule (forward,
// reverse, seeded shuffle) picks the order in which blocks run and in which the runnable
// threads of a block run between barriers. Misused barriers throw std::runtime_error.
#pragma once

#include <cuda_runtime_api.h>  // dim3, uint3, cudaStream_t (host-usable CUDA headers)
#include <vector_functions.h>  // make_uint2, make_uint3

#include <cstddef>
#include <cstdint>
#include <string>

namespace lion_emu {

enum class Schedule : int { kForward = 0, kReverse = 1, kShuffle = 2 };

// The schedule of later launches (seed: for kShuffle).
void set_schedule(Schedule schedule, uint64_t seed);
// Launches run so far (for tests that check the emulated host code drives the kernels).
int64_t launch_count();
// The launches since the last call, one a line (name[blocks]), then cleared.
std::string take_launch_log();

// The stream the emulated c10::cuda::getCurrentCUDAStream hands out.
cudaStream_t dummy_stream();

// The thread now running, as CUDA's built-in variables (set by the scheduler).
extern uint3 g_thread_idx;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

void run_launch(const char* name, void (*body)(void*), void* context, dim3 grid, dim3 block,
                size_t shared_bytes, cudaStream_t stream);

// kernel<<<grid, block, shared_bytes, stream>>>(args) is rewritten to
// launch("kernel", [=] { kernel(args); }, grid, block, shared_bytes, stream).
template <typename F>
void launch(const char* name, F body, dim3 grid, dim3 block, size_t shared_bytes = 0,
            cudaStream_t stream = nullptr) {
  run_launch(
      name, [](void* f) { (*static_cast<F*>(f))(); }, &body, grid, block, shared_bytes, stream);
}

// Barriers, called from inside a kernel.
void syncthreads();
void syncwarp(uint32_t mask);
// The 32-bit value of lane (own lane ^ lane_mask) of the warp, once all 32 lanes are there.
uint32_t shuffle_xor_bits(uint32_t mask, uint32_t bits, int lane_mask, int width);

// Called by every thread at the declaration of a __shared__ variable: the first call of a
// block fills it with 0xff bytes.
void declare_shared(void* address, size_t bytes);

}  // namespace lion_emu
