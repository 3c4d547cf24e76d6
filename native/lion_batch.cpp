#include "lion_batch.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace lion {
namespace {

bool is_supported_param_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_beta(double beta, const char* name) {
  TORCH_CHECK_VALUE(beta >= 0.0 && beta < 1.0,
                    "lion_update_32bit: ", name, " must be in [0, 1), got ", beta);
}

}  // namespace

void check_lion_update_32bit_args(
    at::TensorList params, at::TensorList grads, at::TensorList momenta, const at::Tensor& lr,
    double beta1, double beta2, double weight_decay) {
  TORCH_CHECK_VALUE(grads.size() == params.size() && momenta.size() == params.size(),
                    "lion_update_32bit: params, grads and momenta must have the same length, got ",
                    params.size(), ", ", grads.size(), " and ", momenta.size());
  check_beta(beta1, "beta1");
  check_beta(beta2, "beta2");
  TORCH_CHECK_VALUE(weight_decay >= 0.0 && std::isfinite(weight_decay),
                    "lion_update_32bit: weight_decay must be finite and >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(lr.numel() == 1 && lr.dim() == 0,
                    "lion_update_32bit: lr must be a 0-dim tensor, got shape ", lr.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(lr.scalar_type()),
                   "lion_update_32bit: lr must be a floating-point tensor, got ", lr.scalar_type());
  if (params.empty()) return;

  const at::Device device = params[0].device();
  TORCH_CHECK_VALUE(lr.device().is_cpu() || lr.device() == device,
                    "lion_update_32bit: lr must be on the CPU or on ", device, ", got ", lr.device());
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    const at::Tensor& g = grads[i];
    const at::Tensor& m = momenta[i];
    TORCH_CHECK_TYPE(p.layout() == at::kStrided, "lion_update_32bit: params[", i,
                     "] must be a dense (strided) tensor, got layout ", p.layout());
    TORCH_CHECK_TYPE(g.layout() == at::kStrided, "lion_update_32bit: grads[", i,
                     "] must be a dense (strided) tensor, got layout ", g.layout(),
                     "; sparse gradients are not supported");
    TORCH_CHECK_TYPE(is_supported_param_dtype(p.scalar_type()), "lion_update_32bit: params[", i,
                     "] must be float32, bfloat16 or float16, got ", p.scalar_type());
    TORCH_CHECK_TYPE(g.scalar_type() == p.scalar_type(), "lion_update_32bit: grads[", i,
                     "] must have its param's dtype ", p.scalar_type(), ", got ", g.scalar_type());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kFloat, "lion_update_32bit: momenta[", i,
                     "] must be float32, got ", m.scalar_type());
    TORCH_CHECK_VALUE(p.device() == device, "lion_update_32bit: params[", i, "] is on ",
                      p.device(), " but params[0] is on ", device,
                      "; one call takes tensors of one device");
    TORCH_CHECK_VALUE(g.device() == device && m.device() == device, "lion_update_32bit: grads[",
                      i, "] and momenta[", i, "] must be on ", device, ", got ", g.device(),
                      " and ", m.device());
    TORCH_CHECK_VALUE(g.sizes() == p.sizes(), "lion_update_32bit: grads[", i, "] has shape ",
                      g.sizes(), " but params[", i, "] has shape ", p.sizes());
    TORCH_CHECK_VALUE(m.sizes() == p.sizes(), "lion_update_32bit: momenta[", i, "] has shape ",
                      m.sizes(), " but params[", i, "] has shape ", p.sizes());
  }
}

float host_learning_rate(const at::Tensor& lr) {
  TORCH_INTERNAL_ASSERT(lr.device().is_cpu());
  const float value = lr.item<float>();  // a CPU tensor: no device synchronization
  TORCH_CHECK_VALUE(value >= 0.f && std::isfinite(value),
                    "lion_update_32bit: lr must be finite and >= 0, got ", value);
  return value;
}

FlatOperands::FlatOperands(std::vector<at::TensorList> lists, std::vector<bool> mutated) {
  TORCH_INTERNAL_ASSERT(lists.size() == mutated.size() && !lists.empty());
  const size_t count = lists[0].size();
  flat_.resize(lists.size());
  for (auto& f : flat_) f.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    const at::Tensor& first = lists[0][i];
    bool in_place = first.is_non_overlapping_and_dense();
    for (size_t l = 1; l < lists.size() && in_place; ++l) {
      in_place = lists[l][i].strides() == first.strides();
    }
    for (size_t l = 0; l < lists.size(); ++l) {
      const at::Tensor& t = lists[l][i];
      if (in_place || t.is_contiguous()) {
        flat_[l].push_back(t);
      } else {
        at::Tensor copy = t.contiguous();
        if (mutated[l]) pending_.emplace_back(t, copy);
        flat_[l].push_back(std::move(copy));
      }
    }
  }
}

void FlatOperands::write_back() {
  for (auto& [original, copy] : pending_) original.copy_(copy);
  pending_.clear();
}

}  // namespace lion
