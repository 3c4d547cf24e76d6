// Fiber scheduler of the CPU emulation of CUDA kernel launches (see emu_runtime.h).
#include "emu_runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <exception>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace lion_emu {

uint3 g_thread_idx;
uint3 g_block_idx;
dim3 g_block_dim;
dim3 g_grid_dim;

namespace {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;  // a kernel parameter block alone is ~20 KiB
constexpr unsigned kMaxThreadsPerBlock = 1024;

// ---- context switching -----------------------------------------------------------------------
#if defined(__x86_64__)
// Saves the callee-saved registers, mxcsr and the x87 control word on the current stack,
// stores the stack pointer in *save and continues on the stack `next` (a stack saved here
// earlier, or a fresh one prepared by prepare_stack). No system call, unlike swapcontext.
extern "C" void lion_emu_switch(void** save, void* next);
asm(R"(
  .text
  .p2align 4
  .type lion_emu_switch, @function
lion_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lion_emu_switch, .-lion_emu_switch
)");

struct Context {
  void* sp = nullptr;
};

void prepare_stack(Context& context, char* stack, size_t bytes, void (*entry)()) {
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t{15};
  auto* slot = reinterpret_cast<uint64_t*>(top);
  *--slot = 0;                                   // entry's (never used) return address
  *--slot = reinterpret_cast<uint64_t>(entry);   // where lion_emu_switch's ret goes
  for (int r = 0; r < 6; ++r) *--slot = 0;       // rbp rbx r12 r13 r14 r15
  *--slot = 0;                                   // mxcsr | x87 control word << 32
  uint32_t mxcsr;
  uint16_t fpu_cw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpu_cw));
  std::memcpy(reinterpret_cast<char*>(slot), &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(slot) + 4, &fpu_cw, 2);
  context.sp = slot;
}

void switch_context(Context& from, Context& to) { lion_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};

void prepare_stack(Context& context, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = nullptr;
  makecontext(&context.uc, entry, 0);
}

void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// ---- fibers and the block scheduler -------------------------------------------------------------
enum class State { kRunnable, kSyncthreads, kShuffle, kSyncwarp, kDone };

const char* state_name(State s) {
  switch (s) {
    case State::kRunnable: return "running";
    case State::kSyncthreads: return "at __syncthreads";
    case State::kShuffle: return "at __shfl_xor_sync";
    case State::kSyncwarp: return "at __syncwarp";
    case State::kDone: return "exited";
  }
  return "?";
}

struct Fiber {
  Context context;
  char* stack = nullptr;  // kStackBytes usable, a guard page below
  State state = State::kRunnable;
  uint3 index{};
  uint32_t mask = 0;       // of the warp barrier it waits at
  uint32_t bits_in = 0;    // shuffle: its value
  int source_lane = 0;     // shuffle: the lane it reads
  uint32_t bits_out = 0;   // shuffle: the value read
};

struct Scheduler {
  std::mutex mutex;  // one launch at a time (the globals above are the running thread's)
  Schedule schedule = Schedule::kForward;
  uint64_t seed = 0;
  int64_t launches = 0;
  std::string log;
  std::vector<Fiber> fibers;
  Context main_context;
  int current = -1;
  void (*body)(void*) = nullptr;
  void* body_context = nullptr;
  std::exception_ptr error;
  std::vector<void*> shared_declared;  // in the running block
};

Scheduler& scheduler() {
  static Scheduler* s = new Scheduler();  // never destroyed: no exit-time ordering issues
  return *s;
}

char* allocate_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* memory = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) throw std::runtime_error("cuda emulation: cannot map a fiber stack");
  // A guard page below the stack: an overflow faults instead of corrupting a neighbour.
  mprotect(memory, page, PROT_NONE);
  return static_cast<char*>(memory) + page;
}

[[noreturn]] void fail(const std::string& message) {
  throw std::runtime_error("cuda emulation: " + message);
}

void fiber_entry() {
  Scheduler& s = scheduler();
  try {
    s.body(s.body_context);
  } catch (...) {
    if (!s.error) s.error = std::current_exception();
  }
  Fiber& self = s.fibers[s.current];
  self.state = State::kDone;
  switch_context(self.context, s.main_context);
  __builtin_trap();  // a finished fiber is never resumed
}

// Suspends the running fiber in `state` until the scheduler releases it.
void wait_at(State state) {
  Scheduler& s = scheduler();
  if (s.current < 0) fail("a barrier was called outside of a kernel");
  Fiber& self = s.fibers[s.current];
  self.state = state;
  asm volatile("" ::: "memory");
  switch_context(self.context, s.main_context);
  asm volatile("" ::: "memory");
}

std::string where(const Fiber& f) {
  std::ostringstream out;
  out << "thread (" << f.index.x << "," << f.index.y << "," << f.index.z << ")";
  return out.str();
}

std::string block_description(const char* name, uint3 block) {
  std::ostringstream out;
  out << name << " block (" << block.x << "," << block.y << "," << block.z << ")";
  return out.str();
}

// The order in which to visit `count` items (blocks, or the runnable threads of a round).
void order(std::vector<int>& items, Schedule schedule, std::mt19937_64& rng) {
  if (schedule == Schedule::kReverse) std::reverse(items.begin(), items.end());
  if (schedule == Schedule::kShuffle) std::shuffle(items.begin(), items.end(), rng);
}

void run_block(Scheduler& s, const char* name, uint3 block, unsigned threads,
               std::mt19937_64& rng) {
  g_block_idx = block;
  s.shared_declared.clear();
  const dim3 dim = g_block_dim;
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.state = State::kRunnable;
    f.index = make_uint3(t % dim.x, (t / dim.x) % dim.y, t / (dim.x * dim.y));
    prepare_stack(f.context, f.stack, kStackBytes, &fiber_entry);
  }
  const unsigned warps = (threads + kWarpSize - 1) / kWarpSize;
  std::vector<int> runnable;
  runnable.reserve(threads);
  for (;;) {
    runnable.clear();
    for (unsigned t = 0; t < threads; ++t) {
      if (s.fibers[t].state == State::kRunnable) runnable.push_back(static_cast<int>(t));
    }
    if (!runnable.empty()) {
      order(runnable, s.schedule, rng);
      for (int t : runnable) {
        s.current = t;
        g_thread_idx = s.fibers[t].index;
        switch_context(s.main_context, s.fibers[t].context);
        s.current = -1;
        if (s.error) return;
      }
      continue;
    }
    // Every thread waits at a barrier or has exited: release what can be released.
    bool released = false;
    bool all_done = true;
    for (unsigned w = 0; w < warps; ++w) {
      const unsigned first = w * kWarpSize;
      const unsigned last = std::min(threads, first + kWarpSize);
      int at_shuffle = 0, at_syncwarp = 0;
      for (unsigned t = first; t < last; ++t) {
        at_shuffle += s.fibers[t].state == State::kShuffle;
        at_syncwarp += s.fibers[t].state == State::kSyncwarp;
        all_done = all_done && s.fibers[t].state == State::kDone;
      }
      if (at_shuffle == 0 && at_syncwarp == 0) continue;
      const State kind = at_shuffle > 0 ? State::kShuffle : State::kSyncwarp;
      std::ostringstream problem;
      if (last - first != static_cast<unsigned>(kWarpSize)) {
        problem << "a warp barrier in a partial warp (" << last - first << " lanes)";
      }
      for (unsigned t = first; t < last && problem.str().empty(); ++t) {
        const Fiber& f = s.fibers[t];
        if (f.state != kind) {
          problem << "lane " << t - first << " (" << where(f) << ") is " << state_name(f.state)
                  << " while lane " << std::find_if(s.fibers.begin() + first,
                                                    s.fibers.begin() + last,
                                                    [&](const Fiber& g) { return g.state == kind; }) -
                                           (s.fibers.begin() + first)
                  << " waits " << state_name(kind) << " (every lane of the warp must reach it)";
        } else if (f.mask != 0xffffffffu) {
          problem << "lane " << t - first << " passed mask 0x" << std::hex << f.mask
                  << " (the emulation supports full-warp masks only)";
        }
      }
      if (!problem.str().empty()) {
        fail(block_description(name, block) + ", warp " + std::to_string(w) + ": " +
             problem.str());
      }
      if (kind == State::kShuffle) {
        for (unsigned t = first; t < last; ++t) {
          Fiber& f = s.fibers[t];
          f.bits_out = s.fibers[first + static_cast<unsigned>(f.source_lane)].bits_in;
        }
      }
      for (unsigned t = first; t < last; ++t) s.fibers[t].state = State::kRunnable;
      released = true;
    }
    if (released) continue;
    if (all_done) return;
    // Only __syncthreads waiters and exited threads remain.
    for (unsigned t = 0; t < threads; ++t) {
      if (s.fibers[t].state == State::kDone) {
        fail(block_description(name, block) + ": __syncthreads is awaited by some threads but " +
             where(s.fibers[t]) + " has exited (every thread of the block must reach it)");
      }
    }
    for (unsigned t = 0; t < threads; ++t) s.fibers[t].state = State::kRunnable;
  }
}

}  // namespace

void set_schedule(Schedule schedule, uint64_t seed) {
  Scheduler& s = scheduler();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.schedule = schedule;
  s.seed = seed;
}

int64_t launch_count() {
  Scheduler& s = scheduler();
  std::lock_guard<std::mutex> lock(s.mutex);
  return s.launches;
}

std::string take_launch_log() {
  Scheduler& s = scheduler();
  std::lock_guard<std::mutex> lock(s.mutex);
  std::string log;
  std::swap(log, s.log);
  return log;
}

cudaStream_t dummy_stream() {
  static int marker;
  return reinterpret_cast<cudaStream_t>(&marker);
}

void declare_shared(void* address, size_t bytes) {
  Scheduler& s = scheduler();
  if (s.current < 0) fail("__shared__ variable outside of a kernel");
  for (void* declared : s.shared_declared) {
    if (declared == address) return;
  }
  // Uninitialized shared memory reads as NaN (0xff bytes), never as the last block's data.
  std::memset(address, 0xff, bytes);
  s.shared_declared.push_back(address);
}

void run_launch(const char* name, void (*body)(void*), void* context, dim3 grid, dim3 block,
                size_t shared_bytes, cudaStream_t stream) {
  Scheduler& s = scheduler();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (s.current >= 0) fail(std::string("launch of ") + name + " from inside a kernel");
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  // What cudaLaunchKernel refuses (C10_CUDA_KERNEL_LAUNCH_CHECK would then throw).
  if (blocks == 0 || threads == 0 || threads > kMaxThreadsPerBlock || grid.x > 0x7fffffffu ||
      grid.y > 65535 || grid.z > 65535) {
    std::ostringstream out;
    out << "invalid launch configuration of " << name << ": grid (" << grid.x << "," << grid.y
        << "," << grid.z << "), block (" << block.x << "," << block.y << "," << block.z << ")";
    fail(out.str());
  }
  if (shared_bytes != 0) fail(std::string(name) + ": dynamic shared memory is not emulated");
  if (stream != dummy_stream() && stream != nullptr) {
    fail(std::string(name) + ": launched on a stream the emulation did not hand out");
  }
  ++s.launches;
  s.log += std::string(name) + "[" + std::to_string(blocks) + "]\n";
  while (s.fibers.size() < threads) {
    s.fibers.emplace_back();
    s.fibers.back().stack = allocate_stack();
  }
  s.body = body;
  s.body_context = context;
  s.error = nullptr;
  g_grid_dim = grid;
  g_block_dim = block;
  std::mt19937_64 rng(s.seed * 0x9e3779b97f4a7c15ull + static_cast<uint64_t>(s.launches));
  std::vector<int> order_of_blocks(static_cast<size_t>(blocks));
  std::iota(order_of_blocks.begin(), order_of_blocks.end(), 0);
  order(order_of_blocks, s.schedule, rng);
  for (int b : order_of_blocks) {
    const unsigned u = static_cast<unsigned>(b);
    const uint3 index = make_uint3(u % grid.x, (u / grid.x) % grid.y, u / (grid.x * grid.y));
    try {
      run_block(s, name, index, static_cast<unsigned>(threads), rng);
    } catch (...) {
      s.current = -1;
      throw;
    }
    if (s.error) {
      std::exception_ptr error = s.error;
      s.error = nullptr;
      std::rethrow_exception(error);
    }
  }
}

void syncthreads() { wait_at(State::kSyncthreads); }

void syncwarp(uint32_t mask) {
  Scheduler& s = scheduler();
  if (s.current >= 0) s.fibers[s.current].mask = mask;
  wait_at(State::kSyncwarp);
}

uint32_t shuffle_xor_bits(uint32_t mask, uint32_t bits, int lane_mask, int width) {
  Scheduler& s = scheduler();
  if (s.current < 0) fail("__shfl_xor_sync outside of a kernel");
  if (width != kWarpSize) fail("__shfl_xor_sync with a width other than 32 is not emulated");
  Fiber& self = s.fibers[s.current];
  const int lane = s.current % kWarpSize;
  self.mask = mask;
  self.bits_in = bits;
  self.source_lane = (lane ^ lane_mask) & (kWarpSize - 1);
  wait_at(State::kShuffle);
  return s.fibers[s.current].bits_out;
}

}  // namespace lion_emu
