#include "lion_batch.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty_strided.h>
#include <c10/util/Exception.h>
#include <c10/util/strides.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

#include "lion_math.h"

namespace lion {
namespace {

bool is_supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

// Torch's Python names, so messages read like the Python API ("float32", not "Float").
const char* dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kDouble: return "float64";
    case at::kBFloat16: return "bfloat16";
    case at::kHalf: return "float16";
    case at::kByte: return "uint8";
    case at::kChar: return "int8";
    case at::kShort: return "int16";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    case at::kBool: return "bool";
    case at::kComplexHalf: return "complex32";
    case at::kComplexFloat: return "complex64";
    case at::kComplexDouble: return "complex128";
    default: return c10::toString(t);
  }
}

// A CPU hyperparameter tensor's value, as the float32 the kernels use, range-checked.
float host_hyperparameter(const char* op, const char* name, const at::Tensor& t, bool is_beta) {
  float value = 0.f;
  switch (t.scalar_type()) {  // a 0-dim CPU tensor: a plain read, no dispatch, no sync
    case at::kFloat: value = *t.const_data_ptr<float>(); break;
    case at::kDouble: value = static_cast<float>(*t.const_data_ptr<double>()); break;
    case at::kBFloat16: value = static_cast<float>(*t.const_data_ptr<at::BFloat16>()); break;
    case at::kHalf: value = static_cast<float>(*t.const_data_ptr<at::Half>()); break;
    default: value = t.item<float>(); break;
  }
  if (is_beta) {
    TORCH_CHECK_VALUE(value >= 0.f && value < 1.f, op, ": ", name, " must be in [0, 1), got ",
                      value);
  } else {
    TORCH_CHECK_VALUE(value >= 0.f && std::isfinite(value), op, ": ", name,
                      " must be finite and >= 0, got ", value);
  }
  return value;
}

}  // namespace

HostHyperparameters check_update_args(const char* op, at::TensorList params,
                                      at::TensorList grads, const at::Tensor& lr,
                                      const at::Tensor& beta1, const at::Tensor& beta2,
                                      const at::Tensor& weight_decay) {
  TORCH_CHECK_VALUE(grads.size() == params.size(), op, ": params and grads must have the same ",
                    "length, got ", params.size(), " and ", grads.size());
  HostHyperparameters host;
  const std::pair<const char*, const at::Tensor*> hyperparameters[] = {
      {"lr", &lr}, {"beta1", &beta1}, {"beta2", &beta2}, {"weight_decay", &weight_decay}};
  float* host_values[] = {&host.lr, &host.beta1, &host.beta2, &host.weight_decay};
  for (int h = 0; h < 4; ++h) {
    const auto& [name, t] = hyperparameters[h];
    TORCH_CHECK_VALUE(t->dim() == 0, op, ": ", name, " must be a 0-dim tensor, got shape ",
                      t->sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), op, ": ", name,
                     " must be a floating-point tensor, got ", dtype_name(t->scalar_type()));
    TORCH_CHECK_VALUE(t->layout() == at::kStrided, op, ": ", name,
                      " must be a dense tensor, got layout ", t->layout());
    if (!params.empty()) {
      TORCH_CHECK_VALUE(t->device().is_cpu() || t->device() == params[0].device(), op, ": ",
                        name, " must be on the CPU or on ", params[0].device(), ", got ",
                        t->device());
    }
    if (t->device().is_cpu()) *host_values[h] = host_hyperparameter(op, name, *t, h == 1 || h == 2);
  }
  if (params.empty()) return host;

  const at::Device device = params[0].device();
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    TORCH_CHECK_TYPE(p.layout() == at::kStrided, op, ": params[", i,
                     "] must be a dense (strided) tensor, got layout ", p.layout());
    TORCH_CHECK_TYPE(g.layout() == at::kStrided, op, ": grads[", i,
                     "] must be a dense (strided) tensor, got layout ", g.layout(),
                     "; sparse gradients are not supported");
    TORCH_CHECK_TYPE(is_supported_param_dtype(p.scalar_type()), op, ": params[", i,
                     "] must be float32, bfloat16 or float16, got ", dtype_name(p.scalar_type()));
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), op, ": grads[", i,
                     "] must have its param's dtype ", dtype_name(p.scalar_type()), ", got ",
                     dtype_name(g.scalar_type()));
    TORCH_CHECK_VALUE(p.device() == device, op, ": params[", i, "] is on ", p.device(),
                      " but params[0] is on ", device, "; one call takes tensors of one device");
    TORCH_CHECK_VALUE(g.device() == device, op, ": grads[", i, "] must be on ", device,
                      ", got ", g.device());
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ", g.sizes(),
                      " but params[", i, "] has shape ", p.sizes());
  }
  return host;
}

void check_state_list(const char* op, const char* name, at::TensorList params,
                      at::TensorList states, at::ScalarType dtype, StateShape shape) {
  TORCH_CHECK_VALUE(states.size() == params.size(), op, ": params and ", name,
                    " must have the same length, got ", params.size(), " and ", states.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& s = states[i];
    TORCH_CHECK_TYPE(s.layout() == at::kStrided, op, ": ", name, "[", i,
                     "] must be a dense (strided) tensor");
    TORCH_CHECK_TYPE(s.scalar_type() == dtype, op, ": ", name, "[", i, "] must be ",
                     dtype_name(dtype), ", got ", dtype_name(s.scalar_type()));
    TORCH_CHECK_VALUE(s.device() == p.device(), op, ": ", name, "[", i, "] must be on ",
                      p.device(), ", got ", s.device());
    switch (shape) {
      case StateShape::kLikeParam:
        TORCH_CHECK_VALUE(s.sizes() == p.sizes(), op, ": ", name, "[", i, "] has shape ",
                          s.sizes(), " but params[", i, "] has shape ", p.sizes());
        break;
      case StateShape::kOnePerBlock: {
        const int64_t blocks = (p.numel() + kQuantBlockSize - 1) / kQuantBlockSize;
        TORCH_CHECK_VALUE(s.dim() == 1 && s.numel() == blocks && s.is_contiguous(), op, ": ",
                          name, "[", i, "] must be a contiguous 1-D tensor of ", blocks,
                          " elements (one per ", kQuantBlockSize, " of params[", i, "]'s ",
                          p.numel(), "), got shape ", s.sizes());
        break;
      }
      case StateShape::kOneElement:
        TORCH_CHECK_VALUE(s.numel() == 1, op, ": ", name, "[", i,
                          "] must have exactly one element, got shape ", s.sizes());
        break;
    }
  }
}

void check_distinct_outputs(const char* op,
                            std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  struct Entry {
    uintptr_t begin, end;  // the bytes [begin, end) its elements lie in
    bool dense;            // its elements fill [begin, end)
    uint32_t list;         // position in `lists`
    uint32_t index;
  };
  size_t total = 0;
  for (const auto& named : lists) total += named.second.size();
  std::vector<Entry> entries;
  entries.reserve(total);
  uint32_t list_number = 0;
  for (const auto& [name, list] : lists) {
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      if (t.numel() == 0) continue;
      // An expanded view writes one element from several places: the update would race, or
      // fail only after writing (copying back the contiguous copy the kernels update). A
      // contiguous tensor (a cached flag) cannot overlap itself; others take the full test.
      const bool contiguous = t.is_contiguous();
      TORCH_CHECK_VALUE(contiguous || at::has_internal_overlap(t) != at::MemOverlap::Yes,
                        op, ": ", name, "[", i, "] has elements that share memory (an expanded "
                        "view?); a tensor the call updates must not");
      int64_t last = 0;  // offset of the last element (strides of a strided tensor are >= 0)
      for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
      const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
      entries.push_back({begin, begin + static_cast<uintptr_t>((last + 1) * t.element_size()),
                         contiguous || t.is_non_overlapping_and_dense(), list_number,
                         static_cast<uint32_t>(i)});
    }
    ++list_number;
  }
  // Sorted by address, then by position, so that a duplicate is reported after its first
  // occurrence (std::sort with that key: stable_sort's buffer cost more than the comparisons).
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.list, a.index) < std::tie(b.begin, b.list, b.index);
  });
  const auto name_of = [&lists](uint32_t list) { return (lists.begin() + list)->first; };
  // Two tensors share memory if they start at one address, or if their byte ranges meet and
  // both are dense (fill their ranges). Tensors with gaps whose ranges interleave (columns
  // of one matrix) are not compared further, as torch's own overlap checks do not.
  std::vector<size_t> open;  // entries whose ranges reach past the current one's start
  for (size_t k = 0; k < entries.size(); ++k) {
    const Entry& second = entries[k];
    open.erase(std::remove_if(open.begin(), open.end(),
                              [&](size_t j) { return entries[j].end <= second.begin; }),
               open.end());
    for (const size_t j : open) {
      const Entry& first = entries[j];
      if (C10_LIKELY(first.begin != second.begin && !(first.dense && second.dense))) continue;
      TORCH_CHECK_VALUE(false, op, ": ", name_of(first.list), "[", first.index, "] and ",
                        name_of(second.list), "[", second.index, "] ",
                        first.begin == second.begin
                            ? "are the same memory (one tensor passed twice?)"
                            : "share part of their memory (overlapping views of one tensor?)",
                        "; every tensor the call updates must have memory of its own");
    }
    open.push_back(k);
  }
}

void check_qmap(const char* op, const at::Tensor& qmap, at::Device device) {
  TORCH_CHECK_TYPE(qmap.layout() == at::kStrided, op, ": qmap must be a dense (strided) tensor, "
                   "got layout ", qmap.layout());
  TORCH_CHECK_TYPE(qmap.scalar_type() == at::kFloat, op, ": qmap must be float32, got ",
                   dtype_name(qmap.scalar_type()));
  TORCH_CHECK_VALUE(qmap.dim() == 1 && qmap.numel() == 256 && qmap.is_contiguous(), op,
                    ": qmap must be a contiguous 1-D tensor of 256 values, got shape ",
                    qmap.sizes());
  TORCH_CHECK_VALUE(qmap.device() == device, op, ": qmap must be on ", device, ", got ",
                    qmap.device());
  if (device.is_cpu()) {  // read on the host for free; on a GPU that would synchronize
    const float* map = qmap.const_data_ptr<float>();
    for (int j = 0; j + 1 < 256; ++j) {
      // (NaN entries pass: they compare false both ways, and their encoding is defined)
      TORCH_CHECK_VALUE(!(map[j] > map[j + 1]), op, ": qmap must be sorted ascending, but "
                        "qmap[", j, "] = ", map[j], " > qmap[", j + 1, "] = ", map[j + 1]);
    }
  }
}

const float* grad_scales_data(const char* op, const std::optional<at::Tensor>& grad_scales,
                              at::TensorList params) {
  if (!grad_scales.has_value()) return nullptr;
  const at::Tensor& s = *grad_scales;
  TORCH_CHECK_TYPE(s.layout() == at::kStrided, op, ": grad_scales must be a dense (strided) "
                   "tensor, got layout ", s.layout());
  TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, op, ": grad_scales must be float32, got ",
                   dtype_name(s.scalar_type()));
  TORCH_CHECK_VALUE(s.dim() == 1 && s.numel() == static_cast<int64_t>(params.size()) &&
                        s.is_contiguous(),
                    op, ": grad_scales must be a contiguous 1-D tensor with one scale per param (",
                    params.size(), "), got shape ", s.sizes());
  if (!params.empty()) {
    TORCH_CHECK_VALUE(s.device() == params[0].device(), op, ": grad_scales must be on ",
                      params[0].device(), ", got ", s.device());
  }
  return s.const_data_ptr<float>();
}

CheckedUpdate check_lion_update_32bit_args(at::TensorList params, at::TensorList grads,
                                           at::TensorList momenta, const at::Tensor& lr,
                                           const at::Tensor& beta1, const at::Tensor& beta2,
                                           const at::Tensor& weight_decay,
                                           const std::optional<at::Tensor>& grad_scales) {
  constexpr const char* op = "lion_update_32bit";
  CheckedUpdate checked;
  checked.host = check_update_args(op, params, grads, lr, beta1, beta2, weight_decay);
  check_state_list(op, "momenta", params, momenta, at::kFloat, StateShape::kLikeParam);
  check_distinct_outputs(op, {{"params", params}, {"momenta", momenta}});
  checked.grad_scales = grad_scales_data(op, grad_scales, params);
  return checked;
}

CheckedUpdate check_lion_update_8bit_blockwise_args(
    at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList absmaxes,
    const at::Tensor& qmap, const at::Tensor& lr, const at::Tensor& beta1,
    const at::Tensor& beta2, const at::Tensor& weight_decay,
    const std::optional<at::Tensor>& grad_scales) {
  constexpr const char* op = "lion_update_8bit_blockwise";
  CheckedUpdate checked;
  checked.host = check_update_args(op, params, grads, lr, beta1, beta2, weight_decay);
  check_state_list(op, "codes", params, codes, at::kByte, StateShape::kLikeParam);
  check_state_list(op, "absmaxes", params, absmaxes, at::kFloat, StateShape::kOnePerBlock);
  if (!params.empty()) check_qmap(op, qmap, params[0].device());
  check_distinct_outputs(op, {{"params", params}, {"codes", codes}, {"absmaxes", absmaxes}});
  checked.grad_scales = grad_scales_data(op, grad_scales, params);
  return checked;
}

CheckedUpdate check_lion_update_8bit_static_args(
    at::TensorList params, at::TensorList grads, at::TensorList codes, at::TensorList max1s,
    at::TensorList new_max1s, const at::Tensor& qmap, const at::Tensor& lr,
    const at::Tensor& beta1, const at::Tensor& beta2, const at::Tensor& weight_decay,
    const std::optional<at::Tensor>& grad_scales) {
  constexpr const char* op = "lion_update_8bit_static";
  CheckedUpdate checked;
  checked.host = check_update_args(op, params, grads, lr, beta1, beta2, weight_decay);
  check_state_list(op, "codes", params, codes, at::kByte, StateShape::kLikeParam);
  check_state_list(op, "max1s", params, max1s, at::kFloat, StateShape::kOneElement);
  check_state_list(op, "new_max1s", params, new_max1s, at::kFloat, StateShape::kOneElement);
  if (!params.empty()) check_qmap(op, qmap, params[0].device());
  check_distinct_outputs(op, {{"params", params}, {"codes", codes}, {"max1s", max1s},
                              {"new_max1s", new_max1s}});
  checked.grad_scales = grad_scales_data(op, grad_scales, params);
  return checked;
}

void check_quantize_blockwise_args(const at::Tensor& input, const at::Tensor& qmap,
                                   int64_t blocksize) {
  constexpr const char* op = "quantize_blockwise";
  TORCH_CHECK_VALUE(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK_TYPE(input.layout() == at::kStrided, op, ": input must be a dense (strided) "
                   "tensor, got layout ", input.layout());
  TORCH_CHECK_TYPE(is_supported_param_dtype(input.scalar_type()), op,
                   ": input must be float32, bfloat16 or float16, got ",
                   dtype_name(input.scalar_type()));
  check_qmap(op, qmap, input.device());
}

void check_dequantize_blockwise_args(const at::Tensor& codes, const at::Tensor& absmax,
                                     const at::Tensor& qmap, int64_t blocksize) {
  constexpr const char* op = "dequantize_blockwise";
  TORCH_CHECK_VALUE(blocksize > 0, op, ": blocksize must be positive, got ", blocksize);
  TORCH_CHECK_TYPE(codes.layout() == at::kStrided && absmax.layout() == at::kStrided, op,
                   ": codes and absmax must be dense (strided) tensors, got layouts ",
                   codes.layout(), " and ", absmax.layout());
  TORCH_CHECK_TYPE(codes.scalar_type() == at::kByte, op, ": codes must be uint8, got ",
                   dtype_name(codes.scalar_type()));
  TORCH_CHECK_TYPE(absmax.scalar_type() == at::kFloat, op, ": absmax must be float32, got ",
                   dtype_name(absmax.scalar_type()));
  const int64_t blocks = count_blocks(codes.numel(), blocksize);
  TORCH_CHECK_VALUE(absmax.numel() == blocks, op, ": absmax must have ", blocks,
                    " elements (one per ", blocksize, " codes), got ", absmax.numel());
  TORCH_CHECK_VALUE(absmax.device() == codes.device(), op, ": absmax must be on ",
                    codes.device(), ", got ", absmax.device());
  check_qmap(op, qmap, codes.device());
}

std::vector<int64_t> paged_like_strides(const at::Tensor& like,
                                        std::optional<at::MemoryFormat> memory_format) {
  constexpr const char* op = "zeros_paged_like";
  TORCH_CHECK_TYPE(like.layout() == at::kStrided, op, ": like must be a dense (strided) tensor, ",
                   "got layout ", like.layout());
  const at::MemoryFormat format = memory_format.value_or(at::MemoryFormat::Preserve);
  TORCH_CHECK_VALUE(format == at::MemoryFormat::Preserve || format == at::MemoryFormat::Contiguous,
                    op, ": memory_format must be torch.preserve_format or ",
                    "torch.contiguous_format, got ", format);
  if (format == at::MemoryFormat::Preserve && like.is_non_overlapping_and_dense()) {
    return like.strides().vec();
  }
  const c10::DimVector strides = c10::contiguous_strides(like.sizes());
  return std::vector<int64_t>(strides.begin(), strides.end());
}

at::Device check_prefetch_paged_args(at::TensorList tensors) {
  constexpr const char* op = "prefetch_paged";
  if (tensors.empty()) return at::Device(at::kCPU);
  const at::Device device = tensors[0].device();
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK_TYPE(tensors[i].layout() == at::kStrided, op, ": tensors[", i,
                     "] must be a dense (strided) tensor, got layout ", tensors[i].layout());
    TORCH_CHECK_VALUE(tensors[i].device() == device, op, ": all tensors must be on one device; ",
                      "tensors[0] is on ", device, ", tensors[", i, "] on ", tensors[i].device());
  }
  return device;
}

void check_percentile_clipping_args(at::TensorList grads, at::TensorList gnorm_vecs,
                                    at::TensorList steps, int64_t percentile) {
  constexpr const char* op = "percentile_clipping";
  TORCH_CHECK_VALUE(percentile >= 0 && percentile < kGnormHistory, op,
                    ": percentile must be in 0..", kGnormHistory - 1, ", got ", percentile);
  TORCH_CHECK_VALUE(gnorm_vecs.size() == grads.size() && steps.size() == grads.size(), op,
                    ": grads, gnorm_vecs and steps must have the same length, got ", grads.size(),
                    ", ", gnorm_vecs.size(), " and ", steps.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_TYPE(g.layout() == at::kStrided, op, ": grads[", i,
                     "] must be dense; sparse gradients are not supported");
    TORCH_CHECK_TYPE(g.scalar_type() == at::kFloat || g.scalar_type() == at::kBFloat16 ||
                         g.scalar_type() == at::kHalf,
                     op, ": grads[", i, "] must be float32, bfloat16 or float16, got ",
                     dtype_name(g.scalar_type()));
    TORCH_CHECK_VALUE(g.device() == grads[0].device(), op, ": grads[", i, "] is on ", g.device(),
                      " but grads[0] is on ", grads[0].device());
    const at::Tensor& v = gnorm_vecs[i];
    const at::Tensor& s = steps[i];
    TORCH_CHECK_TYPE(v.layout() == at::kStrided && s.layout() == at::kStrided, op,
                     ": gnorm_vecs[", i, "] and steps[", i, "] must be dense (strided) tensors");
    TORCH_CHECK_VALUE(v.scalar_type() == at::kFloat && v.numel() == kGnormHistory &&
                          v.is_contiguous() && v.device() == g.device(),
                      op, ": gnorm_vecs[", i, "] must be a contiguous float32 tensor of ",
                      kGnormHistory, " elements on ", g.device());
    TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.numel() == 1 && s.device() == g.device(),
                      op, ": steps[", i, "] must be a one-element float32 tensor on ", g.device());
    if (s.device().is_cpu()) {  // read on the host for free; on a GPU that would synchronize
      const float step = *s.const_data_ptr<float>();
      TORCH_CHECK_VALUE(step >= 0.f && step <= std::numeric_limits<float>::max(), op,
                        ": steps[", i, "] must be a finite count >= 0, got ", step);
    }
  }
  check_distinct_outputs(op, {{"gnorm_vecs", gnorm_vecs}});
}

void check_step_counters(at::TensorList steps) {
  for (size_t i = 0; i < steps.size(); ++i) {
    const at::Tensor& s = steps[i];
    TORCH_CHECK_TYPE(s.layout() == at::kStrided, "increment_steps: steps[", i,
                     "] must be a dense (strided) tensor, got layout ", s.layout());
    TORCH_CHECK_TYPE(s.scalar_type() == at::kFloat, "increment_steps: steps[", i,
                     "] must be float32, got ", dtype_name(s.scalar_type()));
    TORCH_CHECK_VALUE(s.numel() == 1, "increment_steps: steps[", i,
                      "] must have one element, got shape ", s.sizes());
    TORCH_CHECK_VALUE(s.device() == steps[0].device(), "increment_steps: steps[", i, "] is on ",
                      s.device(), " but steps[0] is on ", steps[0].device());
  }
  check_distinct_outputs("increment_steps", {{"steps", steps}});
}

FlatOperands::FlatOperands(std::vector<at::TensorList> lists, std::vector<bool> mutated,
                           ElementOrder order) {
  TORCH_INTERNAL_ASSERT(lists.size() == mutated.size() && !lists.empty());
  const size_t count = lists[0].size();
  flat_.resize(lists.size());
  for (auto& f : flat_) f.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    // All contiguous (the common case; cached flags): logical order is memory order for each,
    // whatever strides their size-1 dimensions have, so all are used in place.
    bool all_contiguous = true;
    for (size_t l = 0; l < lists.size() && all_contiguous; ++l) {
      all_contiguous = lists[l][i].is_contiguous();
    }
    if (all_contiguous) {
      for (size_t l = 0; l < lists.size(); ++l) flat_[l].push_back(&lists[l][i]);
      continue;
    }
    // The tensors written decide the element order: their memory order when the first is
    // dense and every written one shares its strides, else the logical order (contiguous
    // copies, written back). A read-only operand laid out otherwise is copied into that
    // order, so that, for instance, blockwise 8-bit state gets the same blocks whatever the
    // grad's layout.
    const at::Tensor& first = lists[0][i];
    bool in_place = order == ElementOrder::kAny && first.is_non_overlapping_and_dense();
    for (size_t l = 1; l < lists.size() && in_place; ++l) {
      in_place = !mutated[l] || lists[l][i].strides() == first.strides();
    }
    for (size_t l = 0; l < lists.size(); ++l) {
      const at::Tensor& t = lists[l][i];
      if (in_place ? t.strides() == first.strides() : t.is_contiguous()) {
        flat_[l].push_back(&t);
      } else if (in_place) {  // read-only: a copy in the first one's layout
        flat_[l].push_back(&copies_.emplace_back(
            at::empty_strided(first.sizes(), first.strides(), t.options()).copy_(t)));
      } else {
        const at::Tensor* copy = &copies_.emplace_back(t.contiguous());
        if (mutated[l]) pending_.emplace_back(&t, copy);
        flat_[l].push_back(copy);
      }
    }
  }
}

void FlatOperands::write_back() {
  for (auto& [original, copy] : pending_) original->copy_(*copy);
  pending_.clear();
}

}  // namespace lion
