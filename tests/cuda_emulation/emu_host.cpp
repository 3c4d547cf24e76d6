// The CUDA host code of the lion operators (native/cuda/lion_cuda.cpp), compiled unchanged for
// the CPU emulation and registered as torch.ops.lion_emu.* (tests only).
//
// How lion_cuda.cpp is made to run on CPU tensors, with nothing in it edited:
//  * Its c10/cuda includes resolve to the shims in include/c10/cuda (first on the include path):
//    a guard that does nothing, a current stream that is a dummy handle, and a launch check
//    that does nothing (an emulated launch CUDA would refuse throws at the launch).
//  * Everything it includes is included here first, so that the macros below apply to its own
//    text only.
//  * check_on_cuda tests params[0].device().is_cuda(); `is_cuda()` is redefined to test for
//    a CPU tensor, so the host code takes CPU tensors (and only those) as device tensors.
//  * set_hyperparameters reads CPU hyperparameters (lr, betas, weight decay) on the host and
//    passes any other to the kernel as a device pointer. `is_cpu()` is redefined as
//    `is_cpu() == !g_hyperparameters_on_device`, so that with the knob set
//    (lion_emu::set_hyperparameters_on_device) the CPU tensors take the device path and the
//    kernels read them through DeviceOrHostFloat::on_device.
//  * Its TORCH_LIBRARY_IMPL(lion, CUDA / SparseCUDA) blocks become unused static functions
//    (they still compile, so the registered signatures are checked), so nothing is registered
//    for the `lion` library from here. The ops are registered below as `lion_emu`.
// The library is built with -fvisibility=hidden, so its lion:: functions (the host code, the
// argument checks of native/lion_batch.cpp, the kernels) bind to its own copies, never to
// those of the lion_ops library loaded in the same process.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "emu_runtime.h"
#include "emu_schemas.h"
#include "lion_batch.h"
#include "lion_kernels.cuh"
#include "lion_math.h"

namespace lion_emu_host {
bool g_hyperparameters_on_device = false;
}

#define LION_EMU_CAT2(a, b) a##b
#define LION_EMU_CAT(a, b) LION_EMU_CAT2(a, b)
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, key, m) \
  [[maybe_unused]] static void LION_EMU_CAT(lion_emu_unregistered_impl_, __LINE__)(torch::Library & m)
#define is_cuda() type() == c10::DeviceType::CPU
#define is_cpu() is_cpu() == !::lion_emu_host::g_hyperparameters_on_device

#include "cuda/lion_cuda.cpp"

#undef is_cpu
#undef is_cuda
#undef TORCH_LIBRARY_IMPL

namespace lion_emu_selftest {
void run(int which, float* out, int blocks);
}

namespace {

// Self-test kernel `which` of emu_selftest.cu; returns what it wrote (-1 elsewhere).
at::Tensor selftest(int64_t which, int64_t blocks) {
  at::Tensor out = at::full({std::max<int64_t>(blocks, 128)}, -1.f, at::kFloat);
  lion_emu_selftest::run(static_cast<int>(which), out.data_ptr<float>(), static_cast<int>(blocks));
  return out;
}

void set_schedule(int64_t schedule, int64_t seed) {
  TORCH_CHECK_VALUE(schedule >= 0 && schedule <= 2, "set_schedule: 0 forward, 1 reverse, 2 shuffle");
  lion_emu::set_schedule(static_cast<lion_emu::Schedule>(schedule), static_cast<uint64_t>(seed));
}

void set_hyperparameters_on_device(bool on) { lion_emu_host::g_hyperparameters_on_device = on; }

int64_t launch_count() { return lion_emu::launch_count(); }

std::string take_launch_log() { return lion_emu::take_launch_log(); }

}  // namespace

// The schemas of native/registration.cpp (extracted from it by build.py into emu_schemas.h),
// for the emulated CUDA host functions.
TORCH_LIBRARY(lion_emu, m) {
  m.def(LION_EMU_SCHEMA_lion_update_32bit, &lion::lion_update_32bit_cuda);
  m.def(LION_EMU_SCHEMA_lion_update_8bit_blockwise, &lion::lion_update_8bit_blockwise_cuda);
  m.def(LION_EMU_SCHEMA_lion_update_8bit_static, &lion::lion_update_8bit_static_cuda);
  m.def(LION_EMU_SCHEMA_percentile_clipping, &lion::percentile_clipping_cuda);
  m.def(LION_EMU_SCHEMA_increment_steps, &lion::increment_steps_cuda);
  m.def(LION_EMU_SCHEMA_quantize_blockwise, &lion::quantize_blockwise_cuda);
  m.def(LION_EMU_SCHEMA_dequantize_blockwise, &lion::dequantize_blockwise_cuda);
  // Knobs of the emulation.
  m.def("set_schedule(int schedule, int seed=0) -> ()", &set_schedule);
  m.def("set_hyperparameters_on_device(bool on) -> ()", &set_hyperparameters_on_device);
  m.def("launch_count() -> int", &launch_count);
  m.def("take_launch_log() -> str", &take_launch_log);
  m.def("selftest(int which, int blocks) -> Tensor", &selftest);
}
