// CPU emulation shim (tests/cuda_emulation) for c10/cuda/CUDAStream.h: the current stream is
// a dummy handle that the emulated launches check for.
#pragma once

#include <c10/core/Device.h>
#include <cuda_runtime_api.h>

#include "../../../emu_runtime.h"

namespace c10::cuda {

struct CUDAStream {
  cudaStream_t stream() const { return ::lion_emu::dummy_stream(); }
  operator cudaStream_t() const { return stream(); }
};

inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }

}  // namespace c10::cuda
