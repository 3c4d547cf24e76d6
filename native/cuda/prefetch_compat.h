// cudaMemPrefetchAsync across CUDA versions: CUDA 13 replaced the destination device ordinal
// by a cudaMemLocation (and dropped the ordinal form); CUDA 12 has the ordinal form, with the
// host as cudaCpuDeviceId. Only the runtime API header is needed, so this compiles against
// either toolkit's headers on its own.
#pragma once

#include <cuda_runtime_api.h>

namespace lion {
namespace cuda {

inline cudaError_t prefetch_managed(const void* data, size_t bytes, int device, bool to_host,
                                    cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  cudaMemLocation location{};
  location.type = to_host ? cudaMemLocationTypeHost : cudaMemLocationTypeDevice;
  location.id = to_host ? 0 : device;
  return cudaMemPrefetchAsync(data, bytes, location, /*flags=*/0, stream);
#else
  return cudaMemPrefetchAsync(data, bytes, to_host ? cudaCpuDeviceId : device, stream);
#endif
}

}  // namespace cuda
}  // namespace lion
