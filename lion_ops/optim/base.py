"""What every lion_ops optimizer shares: hyperparameter and input checks, state
initialization, grouping params into operator calls, and the bitsandbytes-compatible
state_dict layout.

A step checks everything first and only then modifies anything, so a bad gradient or a bad
hyperparameter leaves params and state exactly as they were.
"""

from __future__ import annotations

import math
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from .. import ops

# bitsandbytes 0.50 nests these per-param state entries under one key in its state_dict (so
# that FSDP does not try to gather them); we write and read the same layout.
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
QUANT_STATE_ENTRIES = frozenset(
    {"qmap1", "max1", "new_max1", "state1", "gnorm_vec", "absmax1", "unorm_vec"}
)


def _describe(group: dict, group_index: int, param_index: int, param: Tensor) -> str:
    names = group.get("param_names")
    name = f"'{names[param_index]}' " if names is not None else ""
    return (f"parameter {name}(group {group_index}, index {param_index}, "
            f"shape {tuple(param.shape)}, {param.dtype} on {param.device})")


def check_hyperparameters(lr: Any, betas: Any, weight_decay: Any, where: str) -> None:
    """Refuses out-of-range hyperparameters with an error naming them."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"{where}: a tensor lr must be a 1-element floating-point tensor, "
                             f"got shape {tuple(lr.shape)} and dtype {lr.dtype}")
    elif not isinstance(lr, (int, float)) or not (0.0 <= lr < math.inf):
        raise ValueError(f"{where}: invalid learning rate lr={lr!r}: must be a finite number >= 0")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for i, beta in enumerate(betas):
        if not isinstance(beta, (int, float)) or not 0.0 <= beta < 1.0:
            raise ValueError(f"{where}: invalid beta parameter at index {i}: {beta!r}: "
                             "must be in [0, 1)")
    if not isinstance(weight_decay, (int, float)) or not (0.0 <= weight_decay < math.inf):
        raise ValueError(f"{where}: invalid weight_decay value: {weight_decay!r}: "
                         "must be a finite number >= 0")


def _check_tensor_lr_value(lr: Any, where: str) -> None:
    # Only where a host read is acceptable (construction, add_param_group), never in step().
    if isinstance(lr, Tensor) and not (0.0 <= float(lr) < math.inf):
        raise ValueError(f"{where}: invalid learning rate lr={float(lr)!r}: must be finite and >= 0")


class LionOptimizerBase(torch.optim.Optimizer):
    """Base of the Lion classes. Subclasses only fix the constructor signature."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 is_paged=False):
        where = type(self).__name__
        check_hyperparameters(lr, betas, weight_decay, where)
        _check_tensor_lr_value(lr, where)
        if args is not None:
            raise NotImplementedError(f"{where}: args is not supported yet; pass the options "
                                      "as keyword arguments")
        if optim_bits not in (8, 32):
            raise ValueError(f"{where}: optim_bits must be 8 or 32, got {optim_bits!r}")
        if optim_bits == 8:
            raise NotImplementedError(f"{where}: optim_bits=8 (8-bit state) is not implemented "
                                      "yet; use optim_bits=32")
        if isinstance(percentile_clipping, bool) or not isinstance(percentile_clipping, int) \
                or not 1 <= percentile_clipping <= 100:
            raise ValueError(f"{where}: percentile_clipping must be an int in 1..100, got "
                             f"{percentile_clipping!r}")
        if percentile_clipping < 100:
            raise NotImplementedError(f"{where}: percentile_clipping={percentile_clipping} is "
                                      "not implemented yet; use 100 (off)")
        if is_paged:
            raise NotImplementedError(f"{where}: is_paged=True (paged state) is not "
                                      "implemented yet")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) \
                or min_8bit_size < 0:
            raise ValueError(f"{where}: min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        if not isinstance(block_wise, bool):
            raise ValueError(f"{where}: block_wise must be a bool, got {block_wise!r}")

        # eps is unused by Lion, but bitsandbytes reads it from every param group, so it is
        # kept for checkpoints that load into bitsandbytes.
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=0.0)
        super().__init__(params, defaults)
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self.percentile_clipping = percentile_clipping
        self.block_wise = block_wise
        self.is_paged = is_paged

    # ---- param groups ---------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        where = f"{type(self).__name__}.add_param_group"
        for key in ("lr", "betas", "weight_decay"):
            if key in param_group:
                value = param_group[key]
                check_hyperparameters(
                    value if key == "lr" else 0.0,
                    value if key == "betas" else (0.0, 0.0),
                    value if key == "weight_decay" else 0.0, where)
                if key == "lr":
                    _check_tensor_lr_value(value, where)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = tuple(group["betas"])
        for index, p in enumerate(group["params"]):
            if p.dtype not in ops.PARAM_DTYPES:
                raise TypeError(f"{where}: {_describe(group, len(self.param_groups) - 1, index, p)}"
                                " is not float32, bfloat16 or float16"
                                + (" (complex params are not supported)" if p.is_complex() else ""))

    # ---- step -------------------------------------------------------------------------------
    def _check_step_inputs(self) -> list[tuple[dict, list[Tensor]]]:
        """Everything a step would use, checked before anything is modified."""
        where = f"{type(self).__name__}.step"
        work = []
        for group_index, group in enumerate(self.param_groups):
            check_hyperparameters(group["lr"], group["betas"], group["weight_decay"],
                                  f"{where} (param group {group_index})")
            with_grad = []
            for index, p in enumerate(group["params"]):
                g = p.grad
                if g is None:
                    continue
                what = _describe(group, group_index, index, p)
                if g.is_sparse or g.layout != torch.strided:
                    raise RuntimeError(f"{where}: {what} has a sparse gradient; Lion does not "
                                       "support sparse gradients")
                if p.dtype not in ops.PARAM_DTYPES:
                    raise TypeError(f"{where}: {what} must be float32, bfloat16 or float16")
                if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                    raise ValueError(f"{where}: {what} has a gradient of shape {tuple(g.shape)}, "
                                     f"{g.dtype} on {g.device}; it must match the parameter")
                state = self.state.get(p)
                if state:
                    self._check_state(p, state, what)
                with_grad.append(p)
            work.append((group, with_grad))
        return work

    def _check_state(self, p: Tensor, state: dict, what: str) -> None:
        momentum = state.get("state1")
        if not isinstance(momentum, Tensor) or momentum.shape != p.shape \
                or momentum.dtype != torch.float32 or momentum.device != p.device:
            raise RuntimeError(f"{type(self).__name__}: the state of {what} does not fit it "
                               "(its momentum 'state1' must be a float32 tensor of the param's "
                               "shape on its device); was the param replaced after the first "
                               "step?")

    def _init_state(self, p: Tensor) -> None:
        state = self.state[p]
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["state1"] = torch.zeros_like(p, dtype=torch.float32,
                                           memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one optimization step; returns the closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = self._check_step_inputs()
        for group, params in work:
            if not params:
                continue
            for p in params:
                if len(self.state[p]) == 0:
                    self._init_state(p)
            self._update_group(group, params)
        return loss

    def _update_group(self, group: dict, params: list[Tensor]) -> None:
        beta1, beta2 = group["betas"]
        buckets: dict[tuple, list[Tensor]] = defaultdict(list)
        for p in params:
            buckets[(p.device, p.dtype)].append(p)
        for (device, _), bucket in buckets.items():
            states = [self.state[p] for p in bucket]
            torch._foreach_add_([s["step"] for s in states], 1)
            ops.lion_update_32bit(bucket, [p.grad for p in bucket], [s["state1"] for s in states],
                                  self._lr_tensor(group["lr"], device), beta1, beta2,
                                  group["weight_decay"])

    @staticmethod
    def _lr_tensor(lr, device: torch.device) -> Tensor:
        if isinstance(lr, Tensor):
            # A CPU lr is read on the host (no sync); one on the params' device is read by the
            # kernel. Anything else is moved, asynchronously, to the params' device.
            if lr.dim() != 0:
                lr = lr.reshape(())
            return lr if lr.device.type == "cpu" or lr.device == device else lr.to(device)
        return torch.tensor(float(lr), dtype=torch.float32)

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The optimizer state in bitsandbytes' layout: per param an int `step`, with the
        momentum nested as `state1` under "__bnb_optimizer_quant_state__"."""
        state_dict = super().state_dict()
        packed = {}
        for key, param_state in state_dict["state"].items():
            entry, nested = {}, {}
            for name, value in param_state.items():
                if name == "step" and isinstance(value, Tensor):
                    value = int(value.item())  # not in a step: a host read is fine here
                (nested if name in QUANT_STATE_ENTRIES else entry)[name] = value
            if nested:
                entry[QUANT_STATE_KEY] = nested
            packed[key] = entry
        state_dict["state"] = packed
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a state_dict saved by this class or by bitsandbytes (nested or flat layout).
        Everything is checked before the optimizer is changed."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        where = f"{type(self).__name__}.load_state_dict"
        state_dict = deepcopy(state_dict)
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups'")
        groups, saved_groups = self.param_groups, state_dict["param_groups"]
        if len(groups) != len(saved_groups):
            raise ValueError(f"{where}: the state dict has {len(saved_groups)} param groups, the "
                             f"optimizer {len(groups)}")
        for i, (group, saved) in enumerate(zip(groups, saved_groups)):
            if len(group["params"]) != len(saved["params"]):
                raise ValueError(f"{where}: param group {i} has {len(group['params'])} params, "
                                 f"the state dict's {len(saved['params'])}")
            check_hyperparameters(saved.get("lr"), saved.get("betas"), saved.get("weight_decay"),
                                  f"{where} (param group {i})")
        id_to_param = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                               chain.from_iterable(g["params"] for g in groups)))
        param_to_where = {id(p): (gi, pi, g) for gi, g in enumerate(groups)
                          for pi, p in enumerate(g["params"])}

        new_state: defaultdict = defaultdict(dict)
        for key, saved_state in state_dict["state"].items():
            if key not in id_to_param:
                raise ValueError(f"{where}: the state dict has state for param id {key!r}, "
                                 "which is in none of its param groups")
            p = id_to_param[key]
            gi, pi, group = param_to_where[id(p)]
            what = _describe(group, gi, pi, p)
            flat = dict(saved_state)
            flat.update(flat.pop(QUANT_STATE_KEY, {}))
            new_state[p] = self._load_param_state(p, flat, f"{where}: {what}")

        param_groups = []
        for group, saved in zip(groups, saved_groups):
            new_group = dict(saved)
            new_group["params"] = group["params"]
            if "param_names" in group:
                new_group["param_names"] = group["param_names"]
            new_group["betas"] = tuple(new_group["betas"])
            new_group.setdefault("eps", 0.0)
            param_groups.append(new_group)
        self.__setstate__({"state": new_state, "param_groups": param_groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _load_param_state(self, p: Tensor, saved: dict, what: str) -> dict:
        momentum = saved.get("state1")
        if not isinstance(momentum, Tensor):
            raise ValueError(f"{what}: the saved state has no momentum tensor 'state1'")
        if momentum.dtype == torch.uint8 or "absmax1" in saved or "qmap1" in saved:
            raise ValueError(f"{what}: the saved state is 8-bit, but this optimizer keeps "
                             "32-bit state for this param")
        if momentum.shape != p.shape or not momentum.is_floating_point():
            raise ValueError(f"{what}: the saved momentum has shape {tuple(momentum.shape)} and "
                             f"dtype {momentum.dtype}; expected a float tensor of shape "
                             f"{tuple(p.shape)}")
        step = saved.get("step", 0)
        if isinstance(step, Tensor):
            if step.numel() != 1:
                raise ValueError(f"{what}: the saved 'step' must be a number")
            step = float(step)
        if not isinstance(step, (int, float)) or step < 0:
            raise ValueError(f"{what}: the saved 'step' must be a number >= 0, got {step!r}")
        state = {k: v for k, v in saved.items() if k not in ("step", "state1")}
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        # Laid out like the param, as a freshly initialized momentum would be.
        state["state1"] = torch.empty_like(p, dtype=torch.float32,
                                           memory_format=torch.preserve_format).copy_(momentum)
        return state
