// Every schema of the `lion` operator library, one line of comment each. Kernels are
// registered per backend in cpu/ and cuda/; fake (meta) implementations are in
// lion_ops/ops.py, which set_python_module names so torch can point users to it.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <string>
#include <vector>

TORCH_LIBRARY(lion, m) {
  m.set_python_module("lion_ops.ops");

  // Every update op: lr, beta1, beta2, weight_decay are 0-dim floating tensors on the CPU (read
  // on the host) or on the params' device (read by the kernel); grad_scales (optional):
  // float32 [len(params)], multiplies each grad. qmap (8-bit ops): 256 float32 values sorted
  // ascending (checked on the CPU; read only by the kernel on a GPU).
  // Lion step with fp32 momentum, in place, for lists of same-shaped params/grads/momenta on one device.
  m.def(
      "lion_update_32bit(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momenta, Tensor lr, "
      "Tensor beta1, Tensor beta2, Tensor weight_decay, Tensor? grad_scales=None) -> ()");

  // Lion step with blockwise 8-bit momentum: uint8 codes into qmap, one absmax per 256 elements.
  m.def(
      "lion_update_8bit_blockwise(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] codes, "
      "Tensor(c!)[] absmaxes, Tensor qmap, Tensor lr, Tensor beta1, Tensor beta2, "
      "Tensor weight_decay, Tensor? grad_scales=None) -> ()");

  // Lion step with per-tensor ("static") 8-bit momentum: max1 is the codes' scale, new_max1 scratch.
  m.def(
      "lion_update_8bit_static(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] codes, "
      "Tensor(c!)[] max1s, Tensor(d!)[] new_max1s, Tensor qmap, Tensor lr, Tensor beta1, "
      "Tensor beta2, Tensor weight_decay, Tensor? grad_scales=None) -> ()");

  // Percentile clipping (bitsandbytes 0.49): records ||g||^2 in each gnorm_vec at slot step % 100
  // (every slot at step 1 or while gnorm_vec[0] < 0) and returns the gradient scales, on the device.
  m.def(
      "percentile_clipping(Tensor[] grads, Tensor(a!)[] gnorm_vecs, Tensor[] steps, "
      "int percentile) -> Tensor");

  // Adds 1 to each one-element float32 step counter (all on one device), in place.
  m.def("increment_steps(Tensor(a!)[] steps) -> ()");

  // Blockwise 8-bit quantization against qmap (same encoding as the optimizer): (codes, absmax).
  m.def("quantize_blockwise(Tensor input, Tensor qmap, int blocksize=256) -> (Tensor, Tensor)");

  // Inverse of quantize_blockwise: float32 values of the input's shape.
  m.def(
      "dequantize_blockwise(Tensor codes, Tensor absmax, Tensor qmap, int blocksize=256) "
      "-> Tensor");

  // Paged state (CUDA managed memory, which the driver can move to host memory under pressure).
  // Zeros laid out like `like` (its strides if dense, else contiguous; contiguous on request) in
  // managed memory on like's CUDA device, freed when the tensor dies; ordinary memory elsewhere.
  m.def(
      "zeros_paged_like(Tensor like, *, ScalarType? dtype=None, MemoryFormat? memory_format=None) "
      "-> Tensor");

  // Prefetches the managed-memory tensors among `tensors` to their GPU (or to the host) on the
  // current stream; others are left alone, as is everything without concurrent managed access.
  m.def("prefetch_paged(Tensor(a!)[] tensors, bool to_host=False) -> ()");

  // What paging `device` supports: 0 none (CPU, or no managed memory), 1 managed memory without
  // prefetch (no concurrent managed access), 2 managed memory with prefetch.
  m.def("paging_support(Device device) -> int");
}

// The in-place operators bump the version counter of every tensor they write, as torch's own
// in-place ops do (inference mode included), so that autograd refuses a backward through a
// param that a step changed after the forward used it (rather than computing its gradient
// from the new values). They have no derivative: with grad mode on, writing a tensor that
// requires grad is refused, as torch refuses an in-place op on a leaf that requires grad.
// (torch's fallback for custom operators skips both for ops that return no alias.)
namespace {

constexpr const char* kInPlaceOperators[] = {"lion_update_32bit", "lion_update_8bit_blockwise",
                                             "lion_update_8bit_static", "percentile_clipping",
                                             "increment_steps"};

// The arguments the schema marks as written (Tensor(a!) and Tensor(a!)[]), as IValues: a
// list is kept by one reference to it, not by a copy of each of its tensors.
std::vector<c10::IValue> written_arguments(const c10::OperatorHandle& op,
                                           const torch::jit::Stack& stack) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack.size() - arguments.size();
  std::vector<c10::IValue> written;
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias != nullptr && alias->isWrite()) written.push_back(stack[first + i]);
  }
  return written;
}

template <typename Visit>
void for_each_tensor(const std::vector<c10::IValue>& values, const Visit& visit) {
  for (const c10::IValue& value : values) {
    if (value.isTensor()) {
      visit(value.toTensor());
    } else if (value.isTensorList()) {
      for (const c10::IValue& element : value.toListRef()) visit(element.toTensor());
    }
  }
}

// Calls visit(tensor, name) for each tensor among the arguments the schema marks as written,
// with the argument's name ("params[3]", "tensor").
template <typename Visit>
void for_each_written_tensor(const c10::OperatorHandle& op, const torch::jit::Stack& stack,
                             const Visit& visit) {
  const auto& arguments = op.schema().arguments();
  const size_t first = stack.size() - arguments.size();
  for (size_t i = 0; i < arguments.size(); ++i) {
    const auto* alias = arguments[i].alias_info();
    if (alias == nullptr || !alias->isWrite()) continue;
    const c10::IValue& value = stack[first + i];
    if (value.isTensor()) {
      visit(value.toTensor(), [&] { return arguments[i].name(); });
    } else if (value.isTensorList()) {
      const auto& list = value.toListRef();
      for (size_t j = 0; j < list.size(); ++j) {
        visit(list[j].toTensor(),
              [&] { return arguments[i].name() + "[" + std::to_string(j) + "]"; });
      }
    }
  }
}

void refuse_writing_tensors_that_require_grad(const c10::OperatorHandle& op,
                                              c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    for_each_written_tensor(op, *stack, [&](const at::Tensor& t, const auto& name) {
      TORCH_CHECK(!t.requires_grad(), op.schema().name(), ": ", name(), " requires grad, and "
                  "the operator writes it and has no derivative; call it under "
                  "torch.no_grad(), as an optimizer step does");
    });
  }
  at::AutoDispatchBelowAutograd below;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// An inference tensor (made under torch.inference_mode) has no version counter, and outside
// inference mode torch refuses to write one when it bumps the counter, which comes after the
// kernel: refused here first, so that a refused call has written nothing.
void refuse_writing_inference_tensors(const c10::OperatorHandle& op,
                                      const torch::jit::Stack& stack) {
  if (c10::InferenceMode::is_enabled()) return;
  for_each_written_tensor(op, stack, [&](const at::Tensor& t, const auto& name) {
    TORCH_CHECK(!(t.defined() && t.is_inference()), op.schema().name(), ": ", name(),
                " is an inference tensor (made under torch.inference_mode), which cannot be "
                "written outside inference mode; nothing was written. Use a clone made outside "
                "inference mode, or call under torch.inference_mode()");
  });
}

void bump_written_versions(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                           torch::jit::Stack* stack) {
  refuse_writing_inference_tensors(op, *stack);
  const std::vector<c10::IValue> written = written_arguments(op, *stack);
  {
    at::AutoDispatchBelowADInplaceOrView below;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  for_each_tensor(written, [](const at::Tensor& t) { torch::autograd::impl::bump_version(t); });
}

// quantize_blockwise and dequantize_blockwise have no derivative (codes are integers, and
// rounding to the map has a zero gradient almost everywhere): their outputs never require
// grad, so a backward through them fails saying so. (torch's fallback made them require grad
// and a backward then left the input's grad None, with only a deprecation warning.)
// prefetch_paged moves pages, not values: its schema marks its tensors written so that
// compiled graphs keep it in order, but it bumps no version (a backward that saved a
// prefetched tensor still runs) and takes tensors that require grad.
constexpr const char* kNonDifferentiableOperators[] = {"quantize_blockwise",
                                                       "dequantize_blockwise", "prefetch_paged"};

void run_below_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  at::AutoDispatchBelowADInplaceOrView below;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(lion, Autograd, m) {
  for (const char* name : kInPlaceOperators) {
    m.impl(name,
           torch::CppFunction::makeFromBoxedFunction<&refuse_writing_tensors_that_require_grad>());
  }
  for (const char* name : kNonDifferentiableOperators) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&run_below_autograd>());
  }
}

TORCH_LIBRARY_IMPL(lion, ADInplaceOrView, m) {
  for (const char* name : kInPlaceOperators) {
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&bump_written_versions>());
  }
}
