// Paged optimizer state on CUDA: tensors in managed (unified) memory, which the driver may
// move to host memory when the GPU runs short and back when a kernel touches it, and their
// prefetch on the current stream. Nothing here synchronizes with the device, except that
// cudaMallocManaged and cudaFree may (as cudaMalloc and cudaFree do): they run when state is
// created or dies, not in a step.
#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/from_blob.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "lion_batch.h"
#include "paging.h"
#include "prefetch_compat.h"

namespace lion {
namespace cuda {

int64_t paging_support(c10::DeviceIndex index) {
  int managed = 0;
  int concurrent = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&managed, cudaDevAttrManagedMemory, index));
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&concurrent, cudaDevAttrConcurrentManagedAccess, index));
  if (!managed) return kNoPaging;
  return concurrent ? kPagingWithPrefetch : kPagingWithoutPrefetch;
}

}  // namespace cuda

namespace {

// Frees managed memory when its tensor dies. cudaFree waits for work that may still use it.
// A deleter must not throw; at interpreter exit the runtime may already be gone, and the
// memory goes with the process anyway.
void free_managed(void* data) {
  (void)cudaFree(data);
  (void)cudaGetLastError();
}

at::Tensor zeros_paged_like_cuda(const at::Tensor& like, std::optional<at::ScalarType> dtype,
                                 std::optional<at::MemoryFormat> memory_format) {
  constexpr const char* op = "zeros_paged_like";
  const std::vector<int64_t> strides = paged_like_strides(like, memory_format);
  const at::Device device = like.device();
  c10::cuda::CUDAGuard guard(device);
  const at::TensorOptions options =
      like.options().dtype(dtype.value_or(like.scalar_type())).device(device);
  TORCH_CHECK_VALUE(cuda::paging_support(device.index()) != kNoPaging, op, ": ", device,
                    " has no managed memory (cudaDevAttrManagedMemory is 0); paged state is not "
                    "possible there");

  // Throws on overflow; 0 for an empty tensor, which needs no memory.
  const size_t bytes = at::detail::computeStorageNbytes(like.sizes(), strides,
                                                        options.dtype().itemsize());
  if (bytes == 0) return at::empty_strided(like.sizes(), strides, options);

  void* data = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&data, bytes, cudaMemAttachGlobal));
  // Zeroed on the GPU, in stream order: the pages start out resident on the device.
  const cudaError_t zeroed =
      cudaMemsetAsync(data, 0, bytes,
                      c10::cuda::getCurrentCUDAStream(device.index()).stream());
  if (zeroed != cudaSuccess) {
    free_managed(data);
    C10_CUDA_CHECK(zeroed);
  }
  return at::for_blob(data, like.sizes())
      .strides(strides)
      .deleter(&free_managed)
      .options(options)
      .target_device(device)
      .make_tensor();
}

void prefetch_paged_cuda(at::TensorList tensors, bool to_host) {
  constexpr const char* op = "prefetch_paged";
  const at::Device device = check_prefetch_paged_args(tensors);
  if (tensors.empty()) return;
  TORCH_CHECK_VALUE(device.is_cuda(), op, ": CUDA kernel got ", device);
  c10::cuda::CUDAGuard guard(device);
  // Without concurrent managed access the driver refuses prefetches (and migrates on its own
  // around kernel launches), so there is nothing to do.
  if (cuda::paging_support(device.index()) != kPagingWithPrefetch) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  for (const at::Tensor& t : tensors) {
    const c10::Storage& storage = t.storage();
    if (storage.nbytes() == 0) continue;
    cudaPointerAttributes attributes{};
    C10_CUDA_CHECK(cudaPointerGetAttributes(&attributes, storage.data()));
    if (attributes.type != cudaMemoryTypeManaged) continue;  // ordinary memory stays put
    C10_CUDA_CHECK(cuda::prefetch_managed(storage.data(), storage.nbytes(), device.index(),
                                           to_host, stream));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lion, CUDA, m) {
  m.impl("zeros_paged_like", &zeros_paged_like_cuda);
  m.impl("prefetch_paged", &prefetch_paged_cuda);
}

// A sparse tensor dispatches here; the argument checks then refuse it by name.
TORCH_LIBRARY_IMPL(lion, SparseCUDA, m) {
  m.impl("zeros_paged_like", &zeros_paged_like_cuda);
  m.impl("prefetch_paged", &prefetch_paged_cuda);
}

}  // namespace lion
