// CPU emulation shim (tests/cuda_emulation): stands in for torch's c10/cuda/CUDAGuard.h
// when native/cuda/lion_cuda.cpp is compiled for the emulation. The guard does nothing.
#pragma once

#include <c10/core/Device.h>

namespace c10::cuda {

struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
  CUDAGuard(const CUDAGuard&) = delete;
  CUDAGuard& operator=(const CUDAGuard&) = delete;
};

struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};

}  // namespace c10::cuda
