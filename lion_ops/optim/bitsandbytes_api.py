"""The public attributes and per-param methods of bitsandbytes' optimizer classes
(Optimizer8bit, Optimizer1State in bitsandbytes 0.50), for code written against them: reading
`optimizer.args` or `optimizer.get_config(...)`, or a subclass stepping param by param with
`init_state` and `update_step`, as bitsandbytes' own step does. lion_ops' step does not use
them: it updates every param of a (device, dtype, state kind) in one operator call.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import ops


@dataclass(frozen=True)
class OptimizerArgs:
    """What bitsandbytes keeps as `optimizer.args`: the options given to the constructor (or
    read from its `args` object). Read-only: the optimizer reads its own attributes
    (optimizer.optim_bits, min_8bit_size, percentile_clipping, block_wise), and per-param
    changes go through GlobalOptimManager."""

    optim_bits: int
    min_8bit_size: int
    percentile_clipping: int
    block_wise: bool
    max_unorm: float = 0.0
    skip_zeros: bool = False


# The state entries that load_state_dict copies as they are rather than casting them to the
# param's dtype (bitsandbytes' set, which names the entries of its two-state optimizers too).
NON_CASTABLE_TENSOR_KEYS = frozenset({
    "qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1", "state2", "gnorm_vec",
    "absmax1", "absmax2", "unorm_vec"})


class BitsandbytesOptimizerAPI:
    """Mixed into LionOptimizerBase; see the module's docstring."""

    optimizer_name = "lion"
    non_castable_tensor_keys = NON_CASTABLE_TENSOR_KEYS

    @property
    def args(self) -> OptimizerArgs:
        return OptimizerArgs(self.optim_bits, self.min_8bit_size, self.percentile_clipping,
                             self.block_wise)

    @property
    def mng(self):
        """The GlobalOptimManager (lion_ops') whose overrides this optimizer reads."""
        return self._manager

    @property
    def initialized(self) -> bool:
        """Whether any param has state yet (bitsandbytes: whether step() has run)."""
        return len(self.state) > 0

    @property
    def name2qmap(self) -> types.MappingProxyType:
        """The quantization maps by bitsandbytes' name: "dynamic", the signed map of 8-bit
        momenta (Lion has no second state, so there is no unsigned "udynamic")."""
        return types.MappingProxyType({"dynamic": self._qmaps[torch.device("cpu")]})

    def fill_qmap(self) -> None:
        """Nothing to do: the map is built when the optimizer is made."""

    def get_config(self, gindex: int, pindex: int, group: dict) -> dict[str, Any]:
        """The options param `pindex` of group `gindex` is updated with: the group's
        hyperparameters and the optimizer's options, with its GlobalOptimManager overrides
        applied, under bitsandbytes' keys (plus percentile_clipping and block_wise)."""
        p = self.param_groups[gindex]["params"][pindex]
        config = {
            "betas": group["betas"], "eps": group.get("eps", 0.0),
            "weight_decay": group["weight_decay"], "lr": group["lr"],
            "alpha": group.get("alpha", 0.0), "t_alpha": group.get("t_alpha"),
            "t_beta3": group.get("t_beta3"), "optim_bits": self.optim_bits,
            "min_8bit_size": self.min_8bit_size, "percentile_clipping": self.percentile_clipping,
            "block_wise": self.block_wise, "max_unorm": 0.0, "skip_zeros": False,
        }
        config.update(self._manager.config_for(gindex, pindex, p))
        return config

    def check_overrides(self) -> None:
        """Resolves the GlobalOptimManager overrides for the params where they are now (every
        step does this itself when params moved in param_groups)."""
        self._resolve_overrides()

    def to_gpu(self) -> None:
        """Moves each param's state tensors to that param's device where they are elsewhere
        (where the state is not where a step can use it: loaded by hand, say), as
        bitsandbytes' first step does."""
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if p.device.type == "cpu" or not state:
                    continue
                for key, value in list(state.items()):
                    if not isinstance(value, Tensor) or value.device == p.device:
                        continue
                    if key == "state1":  # (paged memory where the optimizer pages p's state)
                        state[key] = self._state_buffer(p, value.dtype).copy_(value)
                    else:
                        state[key] = value.to(p.device)
        self._step_plan = None

    def get_state_buffer(self, p: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Zeros for one state tensor of p: laid out like p (8-bit codes contiguous), in
        paged memory where this optimizer pages p's state."""
        return self._state_buffer(p, dtype)

    def prefetch_state(self, p: Tensor) -> None:
        """Prefetches p's paged state to its GPU on the current stream (a step does this for
        all of its params); nothing for state that is not paged."""
        momentum = self.state.get(p, {}).get("state1")
        if isinstance(momentum, Tensor) and self._pages(p):
            ops.prefetch_paged([momentum])  # (leaves tensors outside managed memory alone)

    @torch.no_grad()
    def init_state(self, group: dict, p: Tensor, gindex: int, pindex: int) -> None:
        """Makes the state of param `pindex` of group `gindex` (p), as its first step would."""
        self._check_position(group, p, gindex, pindex, "init_state")
        self._resolve_overrides_if_params_moved()
        self._step_plan = None
        self._init_state(p, self._config(gindex, pindex))

    @torch.no_grad()
    def update_step(self, group: dict, p: Tensor, gindex: int, pindex: int) -> None:
        """One step of param `pindex` of group `gindex` (p) alone, with every check a step
        makes (bitsandbytes' step calls this for each param with a gradient; lion_ops' step
        updates them all in one call per device, dtype and kind of state)."""
        self._check_position(group, p, gindex, pindex, "update_step")
        if p.grad is None:
            raise ValueError(f"{type(self).__name__}.update_step: param {pindex} of param group "
                             f"{gindex} has no gradient")
        self._checked_step(compiling=False, only=(gindex, pindex))

    def _check_position(self, group: dict, p: Tensor, gindex: int, pindex: int,
                        where: str) -> None:
        groups = self.param_groups
        if not (0 <= gindex < len(groups) and groups[gindex] is group
                and 0 <= pindex < len(group["params"]) and group["params"][pindex] is p):
            raise ValueError(f"{type(self).__name__}.{where}: p must be "
                             f"optimizer.param_groups[gindex]['params'][pindex] and group "
                             f"optimizer.param_groups[gindex] (gindex={gindex}, "
                             f"pindex={pindex})")
