// What a device offers for paged optimizer state (the paging_support operator).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>

namespace lion {

constexpr int64_t kNoPaging = 0;               // CPU, or a GPU without managed memory
constexpr int64_t kPagingWithoutPrefetch = 1;  // managed memory, no concurrent managed access
constexpr int64_t kPagingWithPrefetch = 2;     // managed memory that can be prefetched

#ifdef LION_OPS_WITH_CUDA
namespace cuda {
// Queries the CUDA device `index` (defined in cuda/lion_paged.cpp).
int64_t paging_support(c10::DeviceIndex index);
}  // namespace cuda
#endif

}  // namespace lion
