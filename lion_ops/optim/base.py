"""What every lion_ops optimizer shares: hyperparameter and input checks, state
initialization, grouping params into operator calls, and the bitsandbytes-compatible
state_dict layout.

A step checks everything first and only then modifies anything, so a bad gradient or a bad
hyperparameter leaves params and state exactly as they were.
"""

from __future__ import annotations

import functools
import math
import numbers
import struct
import sys
import warnings
import weakref
from collections import defaultdict, deque
from copy import deepcopy
from itertools import chain, repeat
from operator import attrgetter, is_
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

from .. import ops
from ..quantization import dynamic_map
from .bitsandbytes_api import BitsandbytesOptimizerAPI
from .manager import GlobalOptimManager

# bitsandbytes 0.50 nests these per-param state entries under one key in its state_dict (so
# that FSDP does not try to gather them); we write and read the same layout.
QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
QUANT_STATE_ENTRIES = frozenset(
    {"qmap1", "max1", "new_max1", "state1", "gnorm_vec", "absmax1", "unorm_vec"}
)

# Like bitsandbytes, a paged optimizer pages the momentum (or codes) of params with at least
# this many elements; smaller state, absmax and the map stay in ordinary device memory.
PAGED_MIN_NUMEL = 100_000


def _describe(group: dict, group_index: int, param_index: int, param: Tensor) -> str:
    names = group.get("param_names")
    name = f"'{names[param_index]}' " if names is not None else ""
    return (f"parameter {name}(group {group_index}, index {param_index}, "
            f"shape {tuple(param.shape)}, {param.dtype} on {param.device})")


def _is_dtensor(t: Any) -> bool:
    # torch.distributed.tensor is imported by whoever made a DTensor; not importing it here
    # keeps `import lion_ops` light.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (the operators update shards in place), else t. Read
    from the private attribute, as FSDP2 itself does: DTensor.to_local() is an autograd
    function (3 us against 60 ns here), and a step reads it for every param and grad."""
    return t._local_tensor if _is_dtensor(t) else t


def _dtensor_problem(p: Tensor, g: Tensor | None, percentile: int) -> str:
    """Why a step cannot update DTensor param p (with grad g), or ""."""
    if g is not None and (not _is_dtensor(g) or g.device_mesh != p.device_mesh
                          or g.placements != p.placements):
        return ("is a DTensor whose gradient is not a DTensor with the same mesh and "
                f"placements ({getattr(g, 'placements', 'a plain tensor')} vs {p.placements})")
    if any(placement.is_partial() for placement in p.placements):
        return f"is a DTensor with partial placements {p.placements}"
    if percentile < 100:
        return ("is a DTensor (FSDP2 or tensor parallelism) with percentile_clipping, which "
                "needs the gradient norm over all shards and is not supported yet")
    return ""


def _blockwise_rows(p: Tensor) -> tuple[int, int] | None:
    """For a DTensor param whose shards hold whole quantization blocks (sharded only along
    dim 0, or replicated, with rows of a multiple of 256 elements): the shape (rows, blocks
    per row) of its absmax, sharded as the param is. Its blocks are then those of the whole
    tensor, so the state means the same whatever the sharding (and can be resharded)."""
    if p.dim() < 2 or p.shape[0] == 0:
        return None
    row = p.numel() // p.shape[0]
    if row % ops.QUANT_BLOCK_SIZE != 0 or not all(
            placement.is_replicate() or placement.is_shard(0) for placement in p.placements):
        return None
    return p.shape[0], row // ops.QUANT_BLOCK_SIZE


def _sharded_as(p: Tensor, local: Tensor, shape, stride) -> Tensor:
    """Per-rank state `local` as a DTensor of global `shape` and `stride`, sharded as DTensor
    param p is, so that checkpoints (torch.distributed.checkpoint) save and reshard it as they
    do params."""
    return type(p).from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape,
                              stride=stride)


def _in_param_layout(value: Tensor, p: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A loaded state tensor for DTensor param p, as a DTensor of `shape` sharded as p is:
    from a full tensor (present on every rank) or from another sharding."""
    from torch.distributed.tensor import distribute_tensor
    if _is_dtensor(value):
        if tuple(value.shape) == tuple(shape):
            return value.redistribute(p.device_mesh, p.placements)
        value = value.full_tensor()
    return distribute_tensor(value.to(p.device).reshape(shape), p.device_mesh, p.placements)


def _unsupported_param(p: Tensor) -> str:
    """Why lion_ops cannot optimize p, or "" if it can."""
    if p.dtype not in ops.PARAM_DTYPES:
        return ("is not float32, bfloat16 or float16"
                + (" (complex params are not supported)" if p.is_complex() else ""))
    return ""


def check_hyperparameters(lr: Any, betas: Any, weight_decay: Any, where: str) -> None:
    """Refuses out-of-range hyperparameters with an error naming them. Any real number will do
    (NumPy scalars too, as torch's optimizers and bitsandbytes take them), or a 1-element
    floating-point tensor (as torch's optimizers take them: a compiled step then reads it as
    a graph input). A tensor's value is read here only if it is on the CPU: one on a GPU is
    read by the kernel (reading it here would synchronize the device)."""
    if not _is_pair(betas):
        raise ValueError(f"{where}: betas must be a pair (beta1, beta2), got {betas!r}")
    for name, value in (("lr", lr), ("beta1", betas[0]), ("beta2", betas[1]),
                        ("weight_decay", weight_decay)):
        _check_hyperparameter(name, value, where)


def _check_hyperparameter(name: str, value: Any, where: str) -> None:
    """check_hyperparameters' check of one of them (name: lr, beta1, beta2, weight_decay)."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or not value.is_floating_point():
            raise ValueError(f"{where}: a tensor {name} must be a 1-element floating-point "
                             f"tensor, got shape {tuple(value.shape)} and dtype {value.dtype}")
        if value.layout != torch.strided or value.device.type == "meta":
            raise ValueError(f"{where}: a tensor {name} must be a dense tensor holding a "
                             f"value, got layout {value.layout} on {value.device}")
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            # Checked here, before a step changes anything, rather than by the operator
            # after earlier groups have stepped.
            _check_hyperparameter_value(name, value, where)
    elif not isinstance(value, numbers.Real):
        raise ValueError(f"{where}: {_range_error(name, value)}")
    else:
        _check_hyperparameter_value(name, value, where)


# Python numbers, which cannot change in place: a planned step does not check again one it
# checked in an earlier step (by identity).
_IMMUTABLE_NUMBER_TYPES = (float, int)


def _check_group_hyperparameters(group: dict, last: tuple | None, where: str) -> tuple | None:
    """check_hyperparameters of a group in a planned step, given what the previous step
    checked (`last`), skipping the values that are the very objects checked then and cannot
    have changed since (Python floats and ints in a tuple of betas; not tensors, whose values
    may change in place): with an LR schedule, the lr alone. Returns what the next step can
    take as checked."""
    lr, betas, weight_decay = group["lr"], group["betas"], group["weight_decay"]
    if last is not None and betas is last[1] and weight_decay is last[2]:
        if lr is not last[0] or type(lr) not in _IMMUTABLE_NUMBER_TYPES:
            _check_hyperparameter("lr", lr, where)
    else:
        check_hyperparameters(lr, betas, weight_decay, where)
    if type(betas) is tuple and type(weight_decay) in _IMMUTABLE_NUMBER_TYPES \
            and all(type(beta) in _IMMUTABLE_NUMBER_TYPES for beta in betas):
        return lr, betas, weight_decay
    return None


def _plain_number(value: Any) -> Any:
    """A NumPy scalar (or 0-d array) as the Python number it holds, anything else as it is:
    torch.compile traces NumPy values as arrays, which a compiled step could not take."""
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return value.item()
    return value


def _plain_hyperparameters(group: dict) -> None:
    """A param group's NumPy hyperparameters as Python numbers, and its betas as a tuple."""
    for key in ("lr", "weight_decay"):
        if key in group:
            group[key] = _plain_number(group[key])
    if "betas" in group:
        group["betas"] = tuple(_plain_number(beta) for beta in group["betas"])


def _is_pair(betas: Any) -> bool:
    """Whether betas is a sequence of two values: a tuple or list, or any other indexable
    sequence that torch's optimizers and bitsandbytes take (an omegaconf ListConfig from a
    Hydra config, a NumPy array, a 1-d tensor), which is stored as a tuple."""
    if isinstance(betas, (tuple, list)):
        return len(betas) == 2
    if isinstance(betas, (str, bytes, dict)) or not hasattr(type(betas), "__getitem__"):
        return False
    try:
        return len(betas) == 2
    except TypeError:  # a 0-dim tensor or array
        return False


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the kernels take lr in float32


def _range_error(name: str, value: Any) -> str:
    if name == "lr":
        return (f"invalid learning rate lr={value!r}: must be a number >= 0, finite in "
                "float32")
    if name == "weight_decay":
        return (f"invalid weight_decay value: {value!r}: must be a number >= 0, finite in "
                "float32")
    return (f"invalid beta parameter at index {int(name[-1]) - 1}: {value!r}: must be in "
            "[0, 1) in float32, as the kernels take it")


def _as_float32(number: float) -> float:
    """number rounded to float32, as the kernels take it (inf beyond float32's range)."""
    try:
        return struct.unpack("f", struct.pack("f", number))[0]
    except OverflowError:
        return math.copysign(math.inf, number)


def _check_hyperparameter_value(name: str, value: Any, where: str) -> None:
    # A host read of a tensor: at construction, add_param_group and overrides, and in step()
    # for CPU tensors only. The value is checked as the kernels use it, rounded to float32
    # (a beta of 1 - 1e-9 is 1.0 there, which they refuse), except for a float that is a
    # symbolic input of a compiled step, which only the comparisons below can look at (each
    # a guard).
    number = float(value)
    if not torch.compiler.is_compiling():
        number = _as_float32(number)
    if name in ("lr", "weight_decay"):
        ok = 0.0 <= number <= _FLOAT32_MAX
    else:
        ok = 0.0 <= number < 1.0
    if not ok:
        raise ValueError(f"{where}: {_range_error(name, number if isinstance(value, Tensor) else value)}")


def _check_tensor_values(where: str, lr: Any = None, betas: Any = (), weight_decay: Any = None
                         ) -> None:
    """The values of tensor hyperparameters on any device (a host read: for construction,
    add_param_group and overrides, not for steps)."""
    for name, value in (("lr", lr), ("beta1", betas[0] if len(betas) else None),
                        ("beta2", betas[1] if len(betas) else None),
                        ("weight_decay", weight_decay)):
        if isinstance(value, Tensor):
            _check_hyperparameter_value(name, value, where)


# As torch keeps its optimizers' zero_grad out of compiled graphs (run eagerly when a compiled
# function calls it).
_keep_out_of_compiled_graphs = getattr(torch, "_disable_dynamo", lambda function: function)

# Whether a profiler is recording (None if this torch has no such query: torch's own step
# wrapper and zero_grad then always run).
_profiler_enabled = getattr(torch._C._autograd, "_profiler_enabled", None)


def _outside_inference_mode(make_state):
    """State is made as ordinary tensors even under torch.inference_mode (a first step or a
    load_state_dict there): an inference tensor could never be written by a later step outside
    inference mode."""
    @functools.wraps(make_state)
    def made_outside_inference_mode(*args, **kwargs):
        if torch.compiler.is_compiling() or not torch.is_inference_mode_enabled():
            return make_state(*args, **kwargs)
        with torch.inference_mode(False):
            return make_state(*args, **kwargs)
    return made_outside_inference_mode


# Whether the library has CUDA kernels (it is loaded by now: `ops` loads it).
_CUDA_KERNELS_BUILT = ops._native.cuda_kernels_built()


def _device_problem(device: torch.device) -> str:
    """Why params on `device` cannot step, or "": CUDA params with a library built without
    CUDA kernels (no nvcc at build time), which would otherwise fail in the first operator
    with torch's generic "Could not run 'lion::...' with arguments from the 'CUDA' backend"."""
    if device.type == "cuda" and not _CUDA_KERNELS_BUILT:
        return (f"a param is on {device}, but this lion_ops was built without CUDA kernels (no "
                "nvcc, or a CPU build of torch, when it was built); rebuild it with "
                "LION_OPS_CUDA=ON: `LION_OPS_CUDA=ON pip install --no-build-isolation .`")
    return ""


def _hooked_step(step):
    """`step` with what torch.optim.Optimizer wraps every optimizer's step in (its step pre-
    and post-hooks, global and per optimizer, a profiler range "Optimizer.step#<class>.step",
    and the profiler's `_optimizer_step_code` entry point), torch's own wrapper doing it
    whenever there is anything for it to do, and only the entry point otherwise: torch's
    wrapper enters a profiler range even when no profiler runs, which costs as much host time
    per step as the rest of a planned step over 20 params. Marked `hooked`, so that torch
    does not wrap it again. A subclass that overrides `step` gets its override wrapped by
    torch, and this one, called from it, then runs the step alone (the hooks run once)."""
    wrapped_by_torch = torch.optim.Optimizer.profile_hook_step(step)
    global_hooks = _torch_global_step_hooks()
    # (Either missing means a torch whose internals moved: its own wrapper then runs always.)
    torchs_wrapper_always = global_hooks is None or _profiler_enabled is None

    @functools.wraps(step)
    def hooked_step(self, *args, **kwargs):
        if type(self).step is not hooked_step:
            return step(self, *args, **kwargs)
        if torchs_wrapper_always or torch.compiler.is_compiling() or global_hooks[0] \
                or global_hooks[1] or self._optimizer_step_pre_hooks \
                or self._optimizer_step_post_hooks or _profiler_enabled():
            return wrapped_by_torch(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()
        return out

    hooked_step.hooked = True
    return hooked_step


def _torch_global_step_hooks() -> tuple[dict, dict] | None:
    """torch.optim's registries of global step pre- and post-hooks (module attributes of
    torch.optim.optimizer), or None if this torch keeps them elsewhere."""
    module = sys.modules.get("torch.optim.optimizer")
    pre = getattr(module, "_global_optimizer_pre_hooks", None)
    post = getattr(module, "_global_optimizer_post_hooks", None)
    return (pre, post) if isinstance(pre, dict) and isinstance(post, dict) else None


class LionOptimizerBase(BitsandbytesOptimizerAPI, torch.optim.Optimizer):
    """Base of the Lion classes. Subclasses only fix the constructor signature."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 is_paged=False):
        where = type(self).__name__
        check_hyperparameters(lr, betas, weight_decay, where)
        _check_tensor_values(where, lr, betas, weight_decay)
        if args is not None:
            # As in bitsandbytes, an args object replaces the keyword configuration wholesale.
            optim_bits, min_8bit_size, percentile_clipping, block_wise = _read_args(args, where)
        if optim_bits not in (8, 32):
            raise ValueError(f"{where}: optim_bits must be 8 or 32, got {optim_bits!r}")
        if isinstance(percentile_clipping, bool) \
                or not isinstance(percentile_clipping, numbers.Integral) \
                or not 1 <= percentile_clipping <= 100:
            # bitsandbytes 0.50 dropped percentile_clipping and block_wise, so positional
            # calls written for it pass is_paged here.
            hint = (" (bitsandbytes 0.50 takes is_paged in this position; this signature is "
                    "0.49's: pass is_paged=... by keyword)"
                    if isinstance(percentile_clipping, bool) else "")
            raise ValueError(f"{where}: percentile_clipping must be an int in 1..100, got "
                             f"{percentile_clipping!r}{hint}")
        if not isinstance(is_paged, (bool, int)) or is_paged not in (0, 1):
            raise ValueError(f"{where}: is_paged must be a bool, got {is_paged!r}")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, numbers.Integral) \
                or min_8bit_size < 0:
            raise ValueError(f"{where}: min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        if not isinstance(block_wise, bool):
            raise ValueError(f"{where}: block_wise must be a bool, got {block_wise!r}")

        # eps is unused by Lion, but bitsandbytes reads it from every param group, so it is
        # kept for checkpoints that load into bitsandbytes.
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=0.0)
        _plain_hyperparameters(defaults)
        super().__init__(params, defaults)
        self.optim_bits = int(optim_bits)
        self.min_8bit_size = int(min_8bit_size)
        self.percentile_clipping = int(percentile_clipping)
        self.block_wise = block_wise
        self.is_paged = bool(is_paged)
        # What paging each params' device supports (ops.PAGING_*), asked once per device here,
        # outside any compiled region; always PAGING_NONE for an unpaged optimizer.
        self._paging: dict[torch.device, int] = {}
        self._note_paging_devices(self.param_groups)
        # The 8-bit map, built here (eagerly: building it does not trace) and copied to each
        # device on first use. Real even when the optimizer is made under a FakeTensorMode
        # (to estimate memory), where reading values, as building it does, is not possible.
        with _disable_current_modes():
            self._qmaps: dict[torch.device, Tensor] = {torch.device("cpu"): dynamic_map("cpu")}
        # Per-param overrides from GlobalOptimManager, resolved eagerly: (group index, param
        # index) -> (config id, config). Params with equal overrides share a config id, so they
        # still share operator calls.
        self._overrides: dict[tuple[int, int], tuple[int, dict]] = {}
        self._manager = GlobalOptimManager.get_instance()
        self._manager.attach(self)
        self._resolve_overrides()
        self._warn_about_32bit_dtensor_state()

    def _warn_about_32bit_dtensor_state(self) -> None:
        """Says, once, which DTensor params keep 32-bit state where 8-bit was asked for (see
        _state_kind): the update is the same, the memory is not what the user expects."""
        kept = []
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                config = self._config(gi, pi)
                if self._state_kind(p, config) != self._asked_state_kind(p, config):
                    kept.append(_describe(group, gi, pi, p))
        if kept:
            warnings.warn(
                f"{type(self).__name__}: {len(kept)} DTensor param(s) keep 32-bit state, as 8-bit "
                "state of DTensor params needs shards of whole 256-element blocks (sharded "
                "along dim 0 or replicated, rows of a multiple of 256 elements) and "
                f"block_wise=True: {'; '.join(kept[:3])}" + (" ..." if len(kept) > 3 else ""),
                UserWarning, stacklevel=3)

    # Besides torch's (defaults, state, param_groups), what a copy needs to step as the
    # original does; the overrides are resolved again from GlobalOptimManager.
    _PICKLED_ATTRIBUTES = ("optim_bits", "min_8bit_size", "percentile_clipping", "block_wise",
                           "is_paged", "_paging", "_qmaps")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update((name, self.__dict__[name]) for name in self._PICKLED_ATTRIBUTES)
        # A copy's params are new objects, which the manager's per-param and per-module
        # overrides do not name: the copy takes its overrides along, by position.
        state["_copied_overrides"] = {position: config
                                      for position, (_, config) in self._overrides.items()}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        copied_overrides = state.pop("_copied_overrides", None)
        super().__setstate__(state)
        self._step_plan = None
        if "_manager" not in self.__dict__:  # a copy (pickled or deep-copied), not a load
            self._overrides = {}
            self._manager = GlobalOptimManager.get_instance()
            self._manager.attach(self)
            for (gi, pi), config in (copied_overrides or {}).items():
                # (registered for the copy's own params, so they hold whatever the manager
                # does later, as the original's do)
                self._manager.override_config(self.param_groups[gi]["params"][pi],
                                              key_value_dict=config)
            self._resolve_overrides()

    def _note_paging_devices(self, groups) -> None:
        """Records what paging the devices of `groups` support; warns, once per call, about
        devices where a paged optimizer has to keep ordinary state."""
        unpageable = []
        for group in groups:
            for p in group["params"]:
                if p.device in self._paging:
                    continue
                problem = _device_problem(p.device)
                if problem:
                    raise RuntimeError(f"{type(self).__name__}: {problem}")
                support = ops.paging_support(p.device) if self.is_paged else ops.PAGING_NONE
                self._paging[p.device] = support
                if self.is_paged and support == ops.PAGING_NONE:
                    unpageable.append(str(p.device))
        if unpageable:
            warnings.warn(
                f"{type(self).__name__}: paged state needs CUDA managed memory, which "
                f"{', '.join(unpageable)} does not have; the state of params there is kept in "
                "ordinary memory, exactly as by the unpaged optimizer", UserWarning, stacklevel=3)

    def _pages(self, p: Tensor) -> bool:
        """Whether the momentum (or 8-bit codes) of param p lives in paged memory: as in
        bitsandbytes, on a paged optimizer, for params of PAGED_MIN_NUMEL elements or more."""
        if p.device not in self._paging:  # a param moved to a new device after construction
            self._note_paging_devices([{"params": [p]}])
        return self._paging[p.device] != ops.PAGING_NONE and p.numel() >= PAGED_MIN_NUMEL

    def _resolve_overrides(self) -> None:
        """Each param's overrides, by its position now. An entry whose config is unchanged
        keeps its dict, and an unchanged whole keeps its dict too: a compiled step guards on
        their identity, so a manager change elsewhere (another optimizer's param, or the same
        value set again) retraced it, up to the recompile limit."""
        old = getattr(self, "_overrides", {})
        overrides, ids = {}, {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                config = self._manager.config_for(gi, pi, p)
                if config:
                    key = _override_config_key(config)
                    previous = old.get((gi, pi))
                    if previous is not None and _override_config_key(previous[1]) == key:
                        config = previous[1]
                    overrides[(gi, pi)] = (ids.setdefault(key, len(ids)), config)
        unchanged = overrides.keys() == old.keys() and all(
            entry[0] == old[position][0] and entry[1] is old[position][1]
            for position, entry in overrides.items())
        self._overrides = old if unchanged else overrides
        # What the positions were resolved for: a step after params were inserted, removed or
        # moved in param_groups (torch allows editing them) resolves them again. By id, as an
        # optimizer keeps no param alive that param_groups no longer hold; an id can be a new
        # param's once the first is freed, so overridden positions also keep a weak reference
        # to their param (the manager keeps one too: swap_tensors refuses such params either way).
        self._overrides_resolved_for = [list(map(id, group["params"]))
                                        for group in self.param_groups]
        self._overridden_params = [(gi, pi, weakref.ref(self.param_groups[gi]["params"][pi]))
                                   for gi, pi in self._overrides]

    def _resolve_overrides_if_params_moved(self) -> None:
        resolved = getattr(self, "_overrides_resolved_for", None)
        groups = self.param_groups
        if resolved is None or len(resolved) != len(groups) or not all(
                list(map(id, group["params"])) == ids for ids, group in zip(resolved, groups)) \
                or not all(groups[gi]["params"][pi] is param()
                           for gi, pi, param in self._overridden_params):
            self._resolve_overrides()

    def _config(self, gi: int, pi: int) -> dict:
        """The overrides of param pi of group gi ({} when none)."""
        entry = self._overrides.get((gi, pi))
        return entry[1] if entry is not None else {}

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
                _check_tensor_values(where, **{key: value})
        with warnings.catch_warnings():
            # torch only warns about a param listed twice in a group; it is refused below.
            warnings.filterwarnings("ignore", message=".*duplicate parameters")
            super().add_param_group(param_group)
        group = self.param_groups[-1]
        first_index: dict[int, int] = {}
        for index, p in enumerate(group["params"]):
            first = first_index.setdefault(id(p), index)
            if first != index:
                self.param_groups.pop()
                raise ValueError(
                    f"{where}: {_describe(group, len(self.param_groups), index, p)} is the "
                    f"param at index {first} of the same group again (a tied weight listed "
                    "twice?); a step would update it twice. List each param once "
                    "(module.parameters() does)")
            # Only params that can get a gradient: a frozen param of another dtype (int8
            # quantized weights, a float64 constant) is skipped by every step, as in torch and
            # bitsandbytes; should it get a gradient later, the step refuses it.
            problem = _unsupported_param(p) if p.requires_grad else ""
            if problem:
                self.param_groups.pop()  # refused as a whole: the optimizer stays as it was
                raise TypeError(f"{where}: {_describe(group, len(self.param_groups), index, p)} "
                                f"{problem}")
        _plain_hyperparameters(group)
        if hasattr(self, "_manager"):  # groups added after construction
            try:
                self._note_paging_devices([group])
            except RuntimeError:
                self.param_groups.pop()  # refused as a whole: the optimizer stays as it was
                raise
            self._resolve_overrides()

    # ---- step -------------------------------------------------------------------------------
    def _check_step_inputs(self, only: tuple[int, int] | None = None
                           ) -> list[tuple[int, dict, list[tuple]]]:
        """Everything a step would use, checked before anything is modified. Per group, per
        param with a gradient: (index, param, state, state kind or None if no state yet,
        device, dtype); with `only` (group index, param index), that param alone. This loop
        runs every step over every param, so it reads each tensor attribute once and builds
        descriptions only for errors."""
        where = f"{type(self).__name__}.step"
        work = []
        adopted: dict[Tensor, dict] = {}  # states put in self.state in the saved layout
        strided, param_dtypes = torch.strided, ops.PARAM_DTYPES
        # Outside inference mode an inference tensor cannot be written (see registration.cpp).
        refuse_inference_tensors = not torch.compiler.is_compiling() \
            and not torch.is_inference_mode_enabled()
        self._check_override_tensors(where)
        for group_index, group in enumerate(self.param_groups):
            if only is not None and group_index != only[0]:
                continue
            check_hyperparameters(group["lr"], group["betas"], group["weight_decay"],
                                  f"{where} (param group {group_index})")
            with_grad = []
            for index, p in enumerate(group["params"]):
                g = p.grad
                if g is None or (only is not None and index != only[1]):
                    continue
                if g.layout != strided:
                    raise RuntimeError(f"{where}: {_describe(group, group_index, index, p)} has "
                                       "a sparse gradient; Lion does not support sparse gradients")
                dtype, shape, device = p.dtype, p.shape, p.device
                if dtype not in param_dtypes:
                    raise TypeError(f"{where}: {_describe(group, group_index, index, p)} must be "
                                    "float32, bfloat16 or float16")
                if g.dtype != dtype or g.shape != shape or g.device != device:
                    raise ValueError(f"{where}: {_describe(group, group_index, index, p)} has a "
                                     f"gradient of shape {tuple(g.shape)}, {g.dtype} on "
                                     f"{g.device}; it must match the parameter")
                state = self.state.get(p)  # looked up once per step: tensor hashing costs
                kind = None
                if state:
                    kind = _quick_state_kind(p, shape, device, state)
                    if (kind is None or not isinstance(state.get("step"), Tensor)) \
                            and _in_saved_layout(state):
                        # Put there directly, as a state_dict entry, by someone other than
                        # load_state_dict (ZeroRedundancyOptimizer.load_state_dict does that):
                        # checked and laid out as load_state_dict would, and kept once the
                        # whole step has passed its checks.
                        flat = dict(state)
                        flat.update(flat.pop(QUANT_STATE_KEY, {}))
                        state = adopted[p] = self._load_param_state(
                            p, flat, f"{where}: {_describe(group, group_index, index, p)}: its "
                            "state, set in optimizer.state in the state_dict layout",
                            self._config(group_index, index))
                        kind = _kind_of_state(state)
                    if kind is None:
                        kind = _kind_of_state(state)
                        problem = _state_problem(p, state, kind)
                        if problem:
                            raise RuntimeError(
                                f"{type(self).__name__}: the state of "
                                f"{_describe(group, group_index, index, p)} does not fit it "
                                f"({problem}); was the param replaced after the first step?")
                if not _CUDA_KERNELS_BUILT and device.type == "cuda" \
                        and _get_current_dispatch_mode() is None:
                    raise RuntimeError(f"{where}: {_describe(group, group_index, index, p)}: "
                                       f"{_device_problem(device)}")
                # (params and momenta: the optimizer makes the rest of the state, ordinary)
                momentum = state.get("state1") if state else None
                if refuse_inference_tensors and (p.is_inference() or (
                        isinstance(momentum, Tensor) and momentum.is_inference())):
                    raise RuntimeError(
                        f"{where}: {_describe(group, group_index, index, p)} or its state is an "
                        "inference tensor (made under torch.inference_mode), which a step "
                        "outside inference mode cannot update; use a clone made outside it")
                if _is_dtensor(p):
                    problem = _dtensor_problem(p, g, self._config(group_index, index).get(
                        "percentile_clipping", self.percentile_clipping))
                    if problem:
                        raise NotImplementedError(
                            f"{where}: {_describe(group, group_index, index, p)} {problem}")
                with_grad.append((index, p, state, kind, device, dtype))
            work.append((group_index, group, with_grad))
        # Fake tensors (compiling, or under a FakeTensorMode) have no addresses.
        if not torch.compiler.is_compiling() and _get_current_dispatch_mode() is None:
            self._check_memory_written_once(work, adopted, where)
        self.state.update(adopted)
        return work

    def _check_memory_written_once(self, work: list, adopted: dict, where: str) -> None:
        """Refuses memory a step would update twice (or race on): two params or two momenta
        that share memory (distinct Parameter objects over the same memory, as `b.data =
        a.data` makes; overlapping views of one tensor; state shared between params), or a
        param or momentum whose elements overlap (an expanded tensor). The operators refuse
        these too, but only within one call, after earlier calls of the step have run. Checked
        on the full path only (the first step, and any step after params, grads or state
        changed), not on every planned step. As in the operators, views that interleave
        without filling their byte ranges (columns of one matrix) are compared by their first
        element only."""
        spans: dict[torch.device, list[tuple]] = defaultdict(list)
        for group_index, group, with_grad in work:
            for index, p, state, _, device, _ in with_grad:
                state = adopted.get(p, state)
                momentum = state.get("state1") if state else None
                for what, tensor in (("the param", p), ("its state 'state1'", momentum)):
                    if not isinstance(tensor, Tensor):
                        continue
                    local = _local(tensor)
                    if local.numel() == 0 or local.device.type == "meta":  # (no addresses)
                        continue
                    if not local.is_contiguous() \
                            and torch._debug_has_internal_overlap(local) == 1:
                        raise RuntimeError(
                            f"{where}: {what} of {_describe(group, group_index, index, p)} has "
                            "elements that share memory (an expanded tensor?); a step would "
                            "update them more than once")
                    spans[device].append((*ops.byte_span(local, local.data_ptr()),
                                          group_index, index, what))
        for device_spans in spans.values():
            shared = ops.first_shared_memory(device_spans)
            if shared is None:
                continue
            (begin, _, _, gi, pi, other_what), (other_begin, _, _, group_index, index, what) = \
                shared
            group, first = self.param_groups[group_index], self.param_groups[gi]
            how = "starts at the same memory as" if begin == other_begin \
                else "shares part of its memory with"
            raise RuntimeError(
                f"{where}: {what} of "
                f"{_describe(group, group_index, index, group['params'][index])} {how} "
                f"{other_what} of {_describe(first, gi, pi, first['params'][pi])}; a step would "
                "update that memory twice (tie weights by sharing one Parameter)")

    def _check_override_tensors(self, where: str) -> None:
        """A GlobalOptimManager override's CPU tensor hyperparameters, checked as a group's
        are: they may have been changed in place since the override was made."""
        if torch.compiler.is_compiling():
            return
        for (group_index, index), (_, config) in self._overrides.items():
            betas = config.get("betas", ())
            for name, value in (("lr", config.get("lr")),
                                ("beta1", betas[0] if betas else None),
                                ("beta2", betas[1] if betas else None),
                                ("weight_decay", config.get("weight_decay"))):
                if isinstance(value, Tensor) and value.device.type == "cpu":
                    _check_hyperparameter_value(
                        name, value, f"{where} (override of param {index} of param group "
                                     f"{group_index})")

    def _asked_state_kind(self, p: Tensor, config: dict) -> str:
        """The state the options ask for: 8-bit blockwise/static for large enough params."""
        if config.get("optim_bits", self.optim_bits) == 8 \
                and p.numel() >= config.get("min_8bit_size", self.min_8bit_size):
            return BLOCKWISE if config.get("block_wise", self.block_wise) else STATIC
        return FP32

    def _state_kind(self, p: Tensor, config: dict) -> str:
        """Which state a param gets: the one asked for, except that a DTensor param gets
        8-bit state only where its shards hold whole blocks (see _blockwise_rows), so that the
        state means the same whatever the sharding; otherwise, and for per-tensor (static)
        8-bit state, whose scale is a max over all shards, it keeps 32-bit state: the same
        update, more memory."""
        kind = self._asked_state_kind(p, config)
        if kind != FP32 and _is_dtensor(p) and (kind == STATIC or _blockwise_rows(p) is None):
            return FP32
        return kind

    def _qmap(self, device: torch.device) -> Tensor:
        mode = None if torch.compiler.is_compiling() else _get_current_dispatch_mode()
        if isinstance(mode, torch._subclasses.fake_tensor.FakeTensorMode):
            # Steps under a FakeTensorMode take fake tensors only; none is kept.
            return mode.from_tensor(self._qmaps[torch.device("cpu")]).to(device)
        qmap = self._qmaps.get(device)
        if qmap is None:
            qmap = self._qmaps[device] = self._qmaps[torch.device("cpu")].to(device)
        return qmap

    @_outside_inference_mode
    def _init_state(self, p: Tensor, config: dict) -> None:
        state = self.state[p]
        state.clear()  # (init_state on a param that has state: none of the old kind is kept)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        if config.get("percentile_clipping", self.percentile_clipping) < 100:
            state["gnorm_vec"] = _fresh_gnorm_history(p.device)
        kind = self._state_kind(p, config)
        state["state1"] = self._new_momentum(p, kind)
        if kind == FP32:
            return
        state["qmap1"] = self._qmap(p.device)
        if kind == BLOCKWISE and _is_dtensor(p):
            shape = _blockwise_rows(p)
            local = torch.zeros((_local(p).shape[0], shape[1]), dtype=torch.float32,
                                device=p.device)
            state["absmax1"] = _sharded_as(p, local, shape, (shape[1], 1))
        elif kind == BLOCKWISE:
            state["absmax1"] = torch.zeros(ops.blockwise_absmax_count(p.numel()),
                                           dtype=torch.float32, device=p.device)
        else:
            state["max1"] = torch.zeros(1, dtype=torch.float32, device=p.device)
            state["new_max1"] = torch.zeros(1, dtype=torch.float32, device=p.device)

    def _new_momentum(self, p: Tensor, kind: str) -> Tensor:
        """Zeroed momentum (float32, laid out like p) or 8-bit codes for p, paged or not."""
        return self._state_buffer(p, torch.float32 if kind == FP32 else torch.uint8)

    def _state_buffer(self, p: Tensor, dtype: torch.dtype) -> Tensor:
        # Codes are always contiguous: their 256-element blocks follow the param's logical
        # order, as in bitsandbytes, whatever the param's layout.
        layout = torch.contiguous_format if dtype == torch.uint8 else torch.preserve_format
        shard = _local(p)
        if self._pages(p):
            momentum = ops.zeros_paged_like(shard, dtype=dtype, memory_format=layout)
        else:
            momentum = torch.zeros_like(shard, dtype=dtype, memory_format=layout)
        return momentum if shard is p else _sharded_as(p, momentum, p.shape, p.stride())

    @_hooked_step
    def step(self, closure=None):
        """Performs one optimization step; returns the closure's loss, if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            with torch.no_grad():
                self._checked_step(compiling=True)
            return loss
        # Grad mode is switched directly: torch.no_grad() as a decorator or a context builds
        # three context objects, as much host time per step as the plan's checks of 50 params.
        grad_was_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            plan = getattr(self, "_step_plan", None)
            if plan is None or not plan.run(self):
                self._checked_step(compiling=False)
        finally:
            torch._C._set_grad_enabled(grad_was_enabled)
        return loss

    def _checked_step(self, compiling: bool, only: tuple[int, int] | None = None) -> None:
        """A step without a plan: every input checked, the calls grouped anew (and, in eager
        mode, kept as the plan of the next step). With `only` (group index, param index), a
        step of that param alone (update_step), kept as no plan."""
        if not compiling and not self.__dict__.get("_checked_bitsandbytes_overrides"):
            self._checked_bitsandbytes_overrides = True
            _warn_about_bitsandbytes_overrides(self)
        if not compiling:
            # (Not while compiling: Dynamo before torch 2.12 refuses setattr on an optimizer,
            # and a plan checks itself against what a compiled step changed.)
            self._step_plan = None
            self._resolve_overrides_if_params_moved()
        work = self._check_step_inputs(only)
        plans = [(group, self._group_calls(group_index, group, params) if params else [])
                 for group_index, group, params in work]
        self._check_clipping_counters(plans)
        for group, calls in plans:
            self._run_group(group, calls, [[p.grad for p in call.params] for call in calls])
        if not compiling and only is None:
            self._step_plan = _StepPlan(self, plans)

    def _group_calls(self, group_index: int, group: dict, params: list[tuple]) -> list[_Call]:
        """The operator calls of a group's step, one per (device, dtype, state kind, override
        config), initializing the state of params on their first step."""
        buckets: dict[tuple, list[tuple[int, Tensor, dict]]] = defaultdict(list)
        overrides = self._overrides
        for index, p, state, kind, device, dtype in params:
            if kind is None:  # first step of this param
                self._init_state(p, self._config(group_index, index))
                state = self.state[p]
                kind = _kind_of_state(state)
            entry = overrides.get((group_index, index)) if overrides else None
            config_id = entry[0] if entry is not None else -1
            buckets[(device, dtype, kind, config_id)].append((index, p, state))
        return [_Call(self, kind, device, self._config(group_index, members[0][0]), config_id,
                      members)
                for (device, _, kind, config_id), members in buckets.items()]

    def _run_group(self, group: dict, calls: list[_Call], grads: list[list[Tensor]],
                   first_call_checks_its_grads: bool = False) -> None:
        """Issues a group's calls (grads[i]: the grads of calls[i]'s params), reading the
        hyperparameters that may change between steps (lr, betas, weight_decay,
        percentile_clipping) now. With first_call_checks_its_grads (a planned step), the first
        call's params and grads were not checked in Python: its operator, which checks every
        input before writing anything, is the first thing to modify anything, and a refusal
        is explained by the full check."""
        percentiles = [call.config.get("percentile_clipping", self.percentile_clipping)
                       for call in calls]
        # Percentile clipping reads the step counters (the history slot), so they are counted
        # first; otherwise after the updates, so that the first kernel is launched as early as
        # possible and a refused update leaves the counters as they were.
        clipping = any(percentile < 100 for percentile in percentiles)
        if clipping:
            self._increment_steps(calls)
        # One set of hyperparameter tensors per (device, source) for all the calls.
        hyperparameters: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        for index, (call, call_grads, percentile) in enumerate(zip(calls, grads, percentiles)):
            config, device, states = call.config, call.device, call.states
            params, momenta, paged = call.params, call.momenta, call.paged
            scales = call.scales
            if call.sharded:
                params, call_grads, momenta = ([_local(t) for t in tensors]
                                               for tensors in (params, call_grads, momenta))
                paged = [_local(t) for t in paged] if paged else paged
                if scales is not None:  # a DTensor param's absmax is (rows, blocks per row)
                    scales = [_local(t).view(-1) for t in scales]
            # Keyed by where the values come from, never by the values: under torch.compile a
            # float that has changed is symbolic, and hashing it would guard on its value (a
            # recompile for every new value, as a schedule written into param_groups makes).
            # (By the config's number, not its id(): Dynamo before torch 2.12 cannot trace
            # id() of a dict.)
            source = call.config_id if any(k in config for k in _HYPERPARAMETER_KEYS) else None
            hyper = hyperparameters.get((device, source))
            if hyper is None:
                beta1, beta2 = config.get("betas", group["betas"])
                hyper = hyperparameters[(device, source)] = tuple(
                    _hyperparameter_tensor(value, device)
                    for value in (config.get("lr", group["lr"]), beta1, beta2,
                                  config.get("weight_decay", group["weight_decay"])))
            lr, beta1, beta2, wd = hyper
            grad_scales = None
            if percentile < 100:
                if any("gnorm_vec" not in s for s in states):
                    for s in states:  # clipping turned on by an override after state was made
                        s.setdefault("gnorm_vec", _fresh_gnorm_history(device))
                grad_scales = ops.percentile_clipping(
                    call_grads, [s["gnorm_vec"] for s in states], call.steps, percentile)
            if paged:  # back from host memory, if the driver paged any of it out
                ops.prefetch_paged(paged)
            try:
                _update(call, params, call_grads, momenta, scales, lr, beta1, beta2, wd,
                        grad_scales)
            except Exception:
                if index == 0 and first_call_checks_its_grads:
                    self._explain_refused_update()
                raise
        if not clipping:
            self._increment_steps(calls)

    def _check_clipping_counters(self, plans: list[tuple[dict, list[_Call]]]) -> None:
        """The step counters that percentile clipping will read on the CPU, checked before
        anything is counted or updated (percentile_clipping refuses a counter that is no
        count, but only after increment_steps has counted it). Only state changed in place
        gets here: loading checks counters. One host read per param, beside clipping's pass
        over every grad; on a GPU it would synchronize, and the kernel records such a counter
        at slot 0."""
        if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
            return  # (fake counters have no values)
        for group_index, (group, calls) in enumerate(plans):
            for call in calls:
                if call.device.type != "cpu" or call.config.get(
                        "percentile_clipping", self.percentile_clipping) >= 100:
                    continue
                for p, step in zip(call.params, call.steps):
                    count = float(step)
                    if 0 <= count <= _FLOAT32_MAX:
                        continue
                    index = next(i for i, q in enumerate(group["params"]) if q is p)
                    raise ValueError(
                        f"{type(self).__name__}.step: the step counter of "
                        f"{_describe(group, group_index, index, p)} is {count}; it must be a "
                        "finite count >= 0 (was optimizer.state changed in place?)")

    def _explain_refused_update(self) -> None:
        """After a planned step's first operator refused its inputs (nothing has been
        modified): the full check's error naming the param at fault, the one a step without a
        plan raises, if it finds one."""
        self._step_plan = None
        try:
            self._check_step_inputs()
        except Exception as error:
            raise error from None

    @staticmethod
    def _increment_steps(calls: list[_Call]) -> None:
        """Every step counter of the calls' params, one call (one launch) per device."""
        steps_by_device: dict[torch.device, list[Tensor]] = defaultdict(list)
        for call in calls:
            steps_by_device[call.device].extend(call.steps)
        for steps in steps_by_device.values():
            ops.increment_steps(steps)

    @_keep_out_of_compiled_graphs
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim.Optimizer.zero_grad. With set_to_none (the default) and no profiler
        running, one attribute write per param: torch's version also reads each grad first
        and enters a profiler range, about three times the host time over 146 params."""
        if not set_to_none or _profiler_enabled is None or _profiler_enabled():
            return super().zero_grad(set_to_none)
        for group in self.param_groups:
            deque(map(setattr, group["params"], repeat("grad"), repeat(None)), maxlen=0)  # in C
        return None

    # ---- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The optimizer state in bitsandbytes' layout: per param an int `step`, with the
        momentum nested as `state1` under "__bnb_optimizer_quant_state__". Post-hooks
        (register_state_dict_post_hook) see that layout, the one returned."""
        post_hooks = self._optimizer_state_dict_post_hooks
        self._optimizer_state_dict_post_hooks = type(post_hooks)()
        try:
            state_dict = super().state_dict()
        finally:
            self._optimizer_state_dict_post_hooks = post_hooks
        steps = _read_step_counters(param_state.get("step")
                                    for param_state in state_dict["state"].values())
        for key, step in zip(state_dict["state"], steps):
            # (NaN, infinite or negative: optimizer.state changed in place; never loadable)
            if step is not None and not 0 <= step < math.inf:
                raise ValueError(f"{type(self).__name__}.state_dict: the step counter of param "
                                 f"{key} is {step}, not a count")
        packed = {}
        for (key, param_state), step in zip(state_dict["state"].items(), steps):
            entry, nested = {}, {}
            for name, value in param_state.items():
                if name == "step" and step is not None:
                    value = step
                (nested if name in QUANT_STATE_ENTRIES else entry)[name] = value
            if nested:
                entry[QUANT_STATE_KEY] = nested
            packed[key] = entry
        state_dict["state"] = packed
        for hook in post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: dict, move_to_device: bool = True) -> None:
        """Loads a state_dict saved by this class or by bitsandbytes (nested or flat layout).
        Everything is checked before the optimizer is changed.

        move_to_device is bitsandbytes' argument, taken so that calls written for it work:
        the state always goes to its param's device, the only place a step can use it (in
        bitsandbytes, state left elsewhere by move_to_device=False is moved there by the first
        step after construction, and fails a later step)."""
        if isinstance(state_dict, dict):
            state_dict = dict(state_dict)  # pre-hooks get a shallow copy, as in torch
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        where = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, dict) or "state" not in state_dict \
                or "param_groups" not in state_dict:
            raise ValueError(f"{where}: expected a dict with 'state' and 'param_groups'")
        saved_state, saved_groups = state_dict["state"], state_dict["param_groups"]
        bad_entries = [] if not isinstance(saved_state, dict) else [
            (key, entry) for key, entry in saved_state.items() if not isinstance(entry, dict)]
        if not isinstance(saved_state, dict) or bad_entries:
            got = (f"a {type(saved_state).__name__}" if not isinstance(saved_state, dict) else
                   f"{type(bad_entries[0][1]).__name__} for param {bad_entries[0][0]!r}")
            raise ValueError(f"{where}: 'state' must be a dict of per-param dicts, got {got}")
        if not isinstance(saved_groups, (list, tuple)) or not all(
                isinstance(group, dict) and isinstance(group.get("params"), (list, tuple))
                for group in saved_groups):
            raise ValueError(f"{where}: 'param_groups' must be a list of dicts, each with a list "
                             "of 'params'")
        # Not a deep copy of the whole dict: each state tensor is copied once, into the
        # optimizer's own layout, as it is loaded (a deep copy first would hold a second copy
        # of all the state at once). The caller's dict is never modified.
        state_dict = dict(state_dict, param_groups=deepcopy(state_dict["param_groups"]))
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
            _check_tensor_values(f"{where} (param group {i})", saved.get("lr"),
                                 saved.get("betas"), saved.get("weight_decay"))
        id_to_param = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                               chain.from_iterable(g["params"] for g in groups)))
        param_to_where = {id(p): (gi, pi, g) for gi, g in enumerate(groups)
                          for pi, p in enumerate(g["params"])}

        new_state: defaultdict = defaultdict(dict)
        # An empty entry is a param without state yet (reading optimizer.state[p], a
        # defaultdict, makes one), skipped as torch and bitsandbytes skip it; but empty
        # entries under parameter names (not state_dict()'s indices) and nothing else are what
        # torch.distributed.checkpoint's flattened layout gives a fresh optimizer, refused (by
        # _load_param_state, saying why) rather than loaded as no state at all.
        entries = state_dict["state"]
        skip_empty = not all(entry == {} for entry in entries.values()) or all(
            isinstance(key, int) for key in entries)
        for key, saved_state in entries.items():
            if key not in id_to_param:
                raise ValueError(f"{where}: the state dict has state for param id {key!r}, "
                                 "which is in none of its param groups")
            if skip_empty and saved_state == {}:
                continue
            p = id_to_param[key]
            gi, pi, group = param_to_where[id(p)]
            what = _describe(group, gi, pi, p)
            flat = dict(saved_state)
            flat.update(flat.pop(QUANT_STATE_KEY, {}))
            # A param whose state is live keeps the kind it steps with (an override that
            # changed optim_bits since then applies to new state only, as in bitsandbytes), so
            # an optimizer reloads its own state_dict.
            live = self.state.get(p)
            live_kind = None if not live or _in_saved_layout(live) else _kind_of_state(live)
            new_state[p] = self._load_param_state(p, flat, f"{where}: {what}",
                                                  self._config(gi, pi), live_kind)

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
        self._resolve_overrides()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    @_outside_inference_mode
    def _load_param_state(self, p: Tensor, saved: dict, what: str, config: dict,
                          live_kind: str | None = None) -> dict:
        expected, found = live_kind or self._state_kind(p, config), _kind_of_state(saved)
        if found is None:
            # torch's _unflatten_optim_state_dict rebuilds entries from the live state's keys
            # (flat here; none before a first step) and fills those it cannot find with {}.
            raise ValueError(
                f"{what}: the saved state has no momentum tensor 'state1' (got "
                f"{type(saved.get('state1')).__name__}). A state dict loaded through "
                "torch.distributed.checkpoint with StateDictOptions("
                "flatten_optimizer_state_dict=True) arrives so: that option loses the nested "
                "layout of bitsandbytes' state_dict (bitsandbytes cannot load it either); save "
                "and load with flatten_optimizer_state_dict=False")
        if found != expected:
            options = ", ".join(f"{name}={config.get(name, getattr(self, name))}"
                                for name in ("optim_bits", "min_8bit_size", "block_wise"))
            raise ValueError(
                f"{what}: the saved state is {_KIND_NAMES[found]}, but this optimizer keeps "
                f"{_KIND_NAMES[expected]} state for this param ({options}"
                + (", after GlobalOptimManager overrides)" if config else ")"))
        problem = _state_problem(p, saved, found, loading=True)
        if problem:
            raise ValueError(f"{what}: {problem}")
        if found == FP32 and _holds_only_codes(saved["state1"]):
            raise ValueError(
                f"{what}: the saved 32-bit momentum 'state1' holds nothing but whole numbers in "
                "0..255, as 8-bit codes do: 8-bit state cast to float32? "
                "torch.distributed.checkpoint loads a checkpoint into the receiving optimizer's "
                "own state tensors, casting it, so 8-bit state saved where this optimizer keeps "
                "32-bit state arrives so (another class or options, or a sharding under which "
                "the param keeps 32-bit state). Resume with the class, options and sharding "
                "that saved it")
        step = saved.get("step", 0)
        if isinstance(step, Tensor):
            if step.numel() != 1:
                raise ValueError(f"{what}: the saved 'step' must be a number")
            step = float(step)
        if isinstance(step, bool) or not isinstance(step, numbers.Real) \
                or not 0 <= step <= _FLOAT32_MAX:  # the counter is float32
            beyond_float32 = isinstance(step, numbers.Real) and not isinstance(step, bool) \
                and _FLOAT32_MAX < step < math.inf
            raise ValueError(f"{what}: the saved 'step' must be a finite number >= 0, got "
                             f"{step!r}" + (" (infinite in float32, the counter's type)"
                                            if beyond_float32 else ""))

        state = {k: deepcopy(v) for k, v in saved.items()
                 if k not in _STATE_TENSOR_KEYS and k != "step"}
        state["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device)
        if config.get("percentile_clipping", self.percentile_clipping) < 100:
            # A checkpoint without history (clipping was off) starts a fresh one.
            gnorm = saved.get("gnorm_vec")
            state["gnorm_vec"] = (_fresh_gnorm_history(p.device) if gnorm is None else
                                  gnorm.to(device=p.device, dtype=torch.float32,
                                           copy=True).reshape(-1))
        # Laid out (and paged) as a freshly initialized momentum would be.
        state["state1"] = self._new_momentum(p, found)
        momentum = saved["state1"]
        if _is_dtensor(p):  # from a full tensor (on every rank) or another sharding
            momentum = _in_param_layout(momentum, p, tuple(p.shape))
        state["state1"].copy_(momentum)
        if found == FP32:
            return state
        state["qmap1"] = self._qmap(p.device)
        for key in ("absmax1", "max1", "new_max1"):
            if key in saved:
                value = saved[key]
                if _is_dtensor(p) and key == "absmax1" and _blockwise_rows(p) is not None:
                    # (a copy: redistributing to the same sharding may return the saved tensor)
                    state[key] = _in_param_layout(value.float(), p, _blockwise_rows(p)).clone()
                    continue
                state[key] = value.to(device=p.device, dtype=torch.float32,
                                      memory_format=torch.contiguous_format,
                                      copy=True).reshape(-1)
        return state


def _holds_only_codes(momentum: Tensor) -> bool:
    """Whether a loaded 32-bit momentum looks like 8-bit codes cast to float: whole numbers in
    0..255, at least one of them 2 or more (an exponential average of gradients is that only
    by contrivance; an all-zero momentum, a fresh one, is not refused). Read on the host, once
    per param, at load time. A DTensor is judged by its local shard."""
    local = _local(momentum).detach()
    if local.numel() == 0 or not local.is_floating_point():
        return False
    low, high = torch.aminmax(local.float())
    if not (bool(low >= 0) and 2 <= float(high) <= 255):
        return False
    return bool((local == local.round()).all())


def to_bitsandbytes_layout(state_dict: dict) -> dict:
    """A copy of an optimizer state_dict with every 8-bit `absmax1` flat, as bitsandbytes'
    blockwise state is. lion_ops keeps a DTensor param's absmax1 as (rows, blocks per row), so
    a full state dict gathered from FSDP2 (get_optimizer_state_dict with full_state_dict=True)
    holds 2-D ones, which bitsandbytes' step refuses; lion_ops loads either shape. Tensors
    are shared with the input, not copied."""
    converted = dict(state_dict)
    states = {}
    for key, entry in state_dict.get("state", {}).items():
        entry = dict(entry)
        nested = entry.get(QUANT_STATE_KEY)
        holder = entry if nested is None else dict(nested)
        absmax = holder.get("absmax1")
        if isinstance(absmax, Tensor) and absmax.dim() != 1:
            holder["absmax1"] = absmax.reshape(-1)
        if nested is not None:
            entry[QUANT_STATE_KEY] = holder
        states[key] = entry
    converted["state"] = states
    return converted


_HYPERPARAMETER_KEYS = ("lr", "betas", "weight_decay")


def _override_config_key(config: dict) -> str:
    """What decides whether two override configs are the same (see _override_key)."""
    return repr(sorted((k, _override_key(v)) for k, v in config.items()))


def _override_key(value: Any) -> Any:
    """An override's value as part of the key that decides which params share a config: a
    tensor (lr, or one inside betas) by identity, since two tensors may print alike."""
    if isinstance(value, Tensor):
        return ("tensor", id(value))
    if isinstance(value, (tuple, list)):
        return tuple(_override_key(v) for v in value)
    return value


def _hyperparameter_tensor(value, device: torch.device) -> Tensor:
    """A hyperparameter as the operators take it: a 0-dim tensor on the CPU (read on the host,
    no sync) or on the params' device (read by the kernel)."""
    if isinstance(value, Tensor):
        if value.dim() != 0:
            value = value.reshape(())
        # Anything on another device is moved, asynchronously, to the params' device.
        return value if value.device.type == "cpu" or value.device == device else value.to(device)
    if torch.compiler.is_compiling():
        return ops.hyperparameter(value, device)  # a changed float stays a graph input
    number = float(value)
    if _get_current_dispatch_mode() is not None:  # e.g. FakeTensorMode: no real tensor to keep
        return torch.tensor(number, dtype=torch.float32, device="cpu")
    tensor = _NUMBER_TENSORS.get(number)
    if tensor is None:
        # Numbers that do not change (betas, weight decay) cost a dict lookup per step; a
        # schedule's lr makes a new tensor each time.
        if len(_NUMBER_TENSORS) >= 64:
            _NUMBER_TENSORS.clear()
        tensor = _NUMBER_TENSORS[number] = torch.tensor(number, dtype=torch.float32, device="cpu")
    return tensor


# Float32 CPU tensors of recent hyperparameter values. Only ever read (by the operators, on
# the host), never handed out.
_NUMBER_TENSORS: dict[float, Tensor] = {}


def _fresh_gnorm_history(device: torch.device) -> Tensor:
    """A percentile-clipping history that has recorded nothing: its first record fills every
    slot (lion_math.h, records_in_every_slot), as at step 1, whatever the step counter says."""
    if not torch.compiler.is_compiling() and torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return _fresh_gnorm_history(device)
    return torch.full((ops.GNORM_HISTORY,), -1.0, dtype=torch.float32, device=device)


def _read_step_counters(counters) -> list[int | float | None]:
    """The ints of the one-element step counters among `counters` (None for anything else; a
    float for NaN or an infinity), read with one host synchronization per device rather than
    one per counter. Not in a step: a host read is fine here."""
    counters = list(counters)
    values: list[int | float | None] = [None] * len(counters)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, counter in enumerate(counters):
        if isinstance(counter, Tensor) and counter.numel() == 1:
            by_device[counter.device].append(i)
    for indices in by_device.values():
        read = torch.stack([counters[i].detach().reshape(()).float() for i in indices]).tolist()
        for i, value in zip(indices, read):
            values[i] = int(value) if math.isfinite(value) else value
    return values


def _update(call: _Call, params, grads, momenta, scales, lr, beta1, beta2, wd,
            grad_scales) -> None:
    """The update operator of the call's state kind."""
    if call.kind == FP32:
        ops.lion_update_32bit(params, grads, momenta, lr, beta1, beta2, wd, grad_scales)
    elif call.kind == BLOCKWISE:
        ops.lion_update_8bit_blockwise(params, grads, momenta, scales, call.qmap, lr, beta1,
                                       beta2, wd, grad_scales)
    else:
        ops.lion_update_8bit_static(params, grads, momenta, scales, call.new_scales, call.qmap,
                                    lr, beta1, beta2, wd, grad_scales)


class _Call:
    """One operator call of a step: the params of one (device, dtype, state kind, override
    config) bucket of a param group, and their state tensors."""

    __slots__ = ("kind", "device", "config", "config_id", "params", "states", "steps",
                 "momenta", "scales", "new_scales", "qmap", "paged", "sharded")

    def __init__(self, optimizer: LionOptimizerBase, kind: str, device: torch.device,
                 config: dict, config_id: int, members: list[tuple[int, Tensor, dict]]):
        # config_id: the override config's number in optimizer._overrides (-1: none); equal
        # numbers, equal configs.
        self.kind, self.device, self.config, self.config_id = kind, device, config, config_id
        self.params = [p for _, p, _ in members]
        self.states = [state for _, _, state in members]
        self.steps = [s["step"] for s in self.states]
        self.momenta = [s["state1"] for s in self.states]
        self.scales = self.new_scales = self.qmap = None
        if kind == BLOCKWISE:
            self.scales = [s["absmax1"] for s in self.states]
        elif kind == STATIC:
            self.scales = [s["max1"] for s in self.states]
            self.new_scales = [s["new_max1"] for s in self.states]
        if kind != FP32:
            self.qmap = optimizer._qmap(device)
        self.paged = None
        if optimizer._paging.get(device) == ops.PAGING_WITH_PREFETCH:
            self.paged = [m for p, m in zip(self.params, self.momenta) if optimizer._pages(p)]
        # DTensor params (FSDP2, tensor parallelism) and their DTensor state: the operators
        # update each rank's shards, read on every step.
        self.sharded = any(_is_dtensor(p) for p in self.params)


class _StepPlan:
    """What the last step did, for the next one to redo when nothing it depends on has
    changed: the same params, with grads on the same params, every param and grad with the
    dtype, shape, device and (param) address the state was checked against, the same state
    dicts holding the same state tensors and the same overrides. That is checked on every
    step, a few attribute reads per param (mapped over each call's lists, so that the
    interpreter's loop does not cost more than the reads), and anything else sends the step to
    the full check (which raises the error naming the param, if there is one). Eager mode
    only: a compiled step is traced from the full path.

    A plan holds no param, state dict or state tensor: it finds them where they are (by
    position in param_groups and in `optimizer.state`) and compares them with what it saw by
    id. So whatever the user drops between steps (`optimizer.state.clear()`, state moved to
    the CPU to free a GPU, a param taken out of param_groups) is freed at once, as with
    torch's optimizers. An id can be another object's once the first is freed: the plan
    watches its state tensors through weak references, and the death of any ends the plan,
    so an id it compares is the object it saw. (Not its params, which torch.utils.swap_tensors,
    as Module.to uses on DTensor params, refuses to swap while a weak reference exists; a
    param with state is a key of `optimizer.state`, which keeps it alive. A state dict
    replaced by another that holds the same tensors is the same state.)

    That every param still has the state dict it had is checked once for the whole
    optimizer: `optimizer.state` must hold the same keys and values in the same order. (A
    lookup per param would hash each one through the Python-level `Tensor.__hash__`, several
    times the cost of the comparison.)

    One call's params and grads are checked by its operator instead: the call with the most
    params among groups without percentile clipping runs first, so that nothing is modified
    before its operator has checked every param and grad against the others and the state
    (layout, dtype, shape, device), and a refusal sends the step to the full check for its
    error. Where the operator takes what the Python check would not (a param moved to
    another supported dtype through `.data`, with a grad of that dtype: a list may mix
    dtypes), it computes what the full path's calls would.
    """

    __slots__ = ("state_id", "state_key_ids", "state_value_ids", "overrides", "groups", "order",
                 "first_call_checks_its_grads", "inference_mode", "clips_on_cpu", "alive",
                 "watches", "checked_hyperparameters")

    def __init__(self, optimizer: LionOptimizerBase, plans: list[tuple]):
        state = optimizer.state
        # Cleared when a watched state tensor dies (the callback holds no plan).
        self.alive = alive = [True]

        def died(_):
            alive[0] = False

        self.watches = watches = []

        def watch(tensors):
            watches.extend(weakref.ref(t, died) for t in tensors)
        self.state_id, self.overrides = id(state), optimizer._overrides
        # Checked with inference mode on, inference tensors were allowed (the full check).
        self.inference_mode = torch.is_inference_mode_enabled()
        self.state_key_ids, self.state_value_ids = list(map(id, state)), list(
            map(id, state.values()))
        state_position = {id(p): i for i, p in enumerate(state)}
        self.groups = []
        self.clips_on_cpu = False
        largest = None  # (param count, group position, call index) of the operator-checked call
        for position, (group, calls) in enumerate(plans):
            params = group["params"]
            param_position = {id(p): i for i, p in enumerate(params)}
            with_grad = {id(p) for call in calls for p in call.params}
            without_grad = [i for i, p in enumerate(params) if id(p) not in with_grad]
            checks = [_PlannedCall(optimizer, call, param_position, state_position, watch)
                      for call in calls]
            clipping = any(call.config.get("percentile_clipping", optimizer.percentile_clipping)
                           < 100 for call in calls)
            self.clips_on_cpu = self.clips_on_cpu or clipping and any(
                call.device.type == "cpu" for call in calls)
            for i, call in enumerate(calls):
                if not clipping and not call.sharded and (
                        largest is None or len(call.params) > largest[0]):
                    largest = (len(call.params), position, i)
            self.groups.append((id(group), list(map(id, params)), without_grad, checks))
        self.order = list(range(len(self.groups)))
        # Per group, the (lr, betas, weight_decay) the last planned step checked, if they
        # cannot change in place (see _check_group_hyperparameters); None: check them all.
        self.checked_hyperparameters = [None] * len(self.groups)
        self.first_call_checks_its_grads = largest is not None
        if largest is not None:  # its group first, and it first in its group
            _, position, i = largest
            group_id, param_ids, without_grad, checks = self.groups[position]
            checks = [checks[i]] + checks[:i] + checks[i + 1:]
            checks[0].checked_by_operator = True
            # Its operator refuses memory shared within the call; another call's params could
            # share its params' memory only after a .data swap, which moves their addresses.
            checks[0].compares_addresses = checks[0].addresses is not None and sum(
                len(g[3]) for g in self.groups) > 1
            self.groups[position] = (group_id, param_ids, without_grad, checks)
            self.order.remove(position)
            self.order.insert(0, position)

    def run(self, optimizer: LionOptimizerBase) -> bool:
        """Runs the step if the plan still holds; False (nothing done) if it does not."""
        state = optimizer.state
        if not self.alive[0] or id(state) != self.state_id \
                or optimizer._overrides is not self.overrides \
                or torch.is_inference_mode_enabled() is not self.inference_mode \
                or len(optimizer.param_groups) != len(self.groups) \
                or list(map(id, state)) != self.state_key_ids \
                or list(map(id, state.values())) != self.state_value_ids:
            return False
        where = f"{type(optimizer).__name__}.step"
        if self.overrides:
            optimizer._check_override_tensors(where)
        state_values = list(state.values())
        work = []
        for group_index, ((group_id, param_ids, without_grad, checks), group) in enumerate(
                zip(self.groups, optimizer.param_groups)):
            if id(group) != group_id:
                return False
            self.checked_hyperparameters[group_index] = _check_group_hyperparameters(
                group, self.checked_hyperparameters[group_index],
                f"{where} (param group {group_index})")
            params = group["params"]
            if list(map(id, params)) != param_ids:
                return False
            if without_grad and not all(map(is_, map(_grad_of, map(params.__getitem__,
                                                                    without_grad)),
                                            repeat(None))):
                return False
            calls, grads = [], []
            for check in checks:
                planned = check.call(params, state_values)
                if planned is None:
                    return False
                calls.append(planned[0])
                grads.append(planned[1])
            work.append((group, calls, grads))
        if self.clips_on_cpu:
            optimizer._check_clipping_counters([(group, calls) for group, calls, _ in work])
        first = self.first_call_checks_its_grads
        for position in self.order:
            group, calls, grads = work[position]
            optimizer._run_group(group, calls, grads, first)
            first = False
        return True


_grad_of = attrgetter("grad")
_param_metadata = attrgetter("dtype", "device", "shape")
_grad_metadata = attrgetter("dtype", "device", "layout", "shape")
def _addresses(params: list) -> list[int] | None:
    """The params' addresses (data_ptr), or None where they have none (fake tensors)."""
    try:
        return list(map(Tensor.data_ptr, params))
    except (RuntimeError, NotImplementedError):
        return None


class _PlannedCall:
    """What a planned step keeps of one call, and checks: where its params are (positions in
    their group and in optimizer.state's order), the ids of their state tensors, the params'
    addresses (where the step has more than one call), and unless its operator checks them,
    the params' dtype, shape and device and their grads' dtype, shape, device and layout. A
    param given other memory through `.data` may now overlap another call's param or be an
    inference tensor: its moved address sends the step to the full check, which refuses
    either before anything is modified. What keeps a param's address, or a state tensor's
    identity (a state tensor's own `.data` replaced, a param's strides changed in place), is
    left to the operators, each of which refuses bad input before it writes, but after the
    step's earlier calls."""

    __slots__ = ("kind", "device", "config", "config_id", "qmap", "sharded", "positions",
                 "state_positions", "held", "param_metadata", "grad_metadata", "addresses",
                 "shardings", "paged", "checked_by_operator", "compares_addresses")

    def __init__(self, optimizer: LionOptimizerBase, call: _Call, param_position: dict,
                 state_position: dict, watch):
        self.kind, self.device, self.config = call.kind, call.device, call.config
        self.config_id, self.qmap, self.sharded = call.config_id, call.qmap, call.sharded
        self.positions = [param_position[id(p)] for p in call.params]
        self.state_positions = [state_position[id(p)] for p in call.params]
        # Per state entry any of the call's states holds: the id of each state's tensor (of
        # None where a state has no such entry), each watched.
        self.held = []
        for key in _PLAN_STATE_KEYS:
            tensors = [state.get(key) for state in call.states]
            if any(t is not None for t in tensors):
                self.held.append((key, list(map(id, tensors))))
                watch([t for t in tensors if t is not None])
        # A call's params share one dtype and one device (the call's bucket).
        dtype, device = call.params[0].dtype, call.device
        self.param_metadata = [(dtype, device, p.shape) for p in call.params]
        self.grad_metadata = [(dtype, device, torch.strided, p.shape) for p in call.params]
        # (none for fake tensors, under a FakeTensorMode: they have no addresses)
        self.addresses = None if call.sharded or _get_current_dispatch_mode() is not None \
            else _addresses(call.params)
        # DTensor params: their grads must keep being sharded as they are.
        self.shardings = [(p.device_mesh, p.placements) for p in call.params] \
            if call.sharded else None
        self.paged = None if call.paged is None else [
            i for i, p in enumerate(call.params) if optimizer._pages(p)]
        self.checked_by_operator = False
        self.compares_addresses = self.addresses is not None

    def call(self, group_params: list, state_values: list) -> tuple[_Call, list] | None:
        """The call as this step makes it, with its grads, if the plan holds for it (given
        that every param has the state dict it had, which _StepPlan.run checks for all calls
        at once); None if it does not."""
        params = list(map(group_params.__getitem__, self.positions))
        grads = list(map(_grad_of, params))
        if any(map(is_, grads, repeat(None))):
            return None
        states = list(map(state_values.__getitem__, self.state_positions))
        tensors = {}
        for key, ids in self.held:
            current = tensors[key] = list(map(dict.get, states, repeat(key)))
            if list(map(id, current)) != ids:
                return None
        if self.compares_addresses and _addresses(params) != self.addresses:
            return None
        if not self.checked_by_operator:
            # Lists of tuples compared in C: equal dtypes and layouts are the same objects.
            if list(map(_grad_metadata, grads)) != self.grad_metadata \
                    or list(map(_param_metadata, params)) != self.param_metadata:
                return None
            if self.shardings is not None:
                for g, sharding in zip(grads, self.shardings):
                    if not _is_dtensor(g) or (g.device_mesh, g.placements) != sharding:
                        return None
        call = _Call.__new__(_Call)
        call.kind, call.device, call.config, call.qmap = self.kind, self.device, self.config, \
            self.qmap
        call.config_id = self.config_id
        call.params, call.states, call.sharded = params, states, self.sharded
        call.steps, call.momenta = tensors["step"], tensors["state1"]
        call.scales = tensors.get("absmax1" if self.kind == BLOCKWISE else "max1")
        call.new_scales = tensors.get("new_max1")
        call.paged = None if self.paged is None else list(map(call.momenta.__getitem__,
                                                              self.paged))
        return call, grads


# The state entries a plan's calls hold: replacing or removing any of them sends the step to
# the full check.
_PLAN_STATE_KEYS = ("step", "state1", "absmax1", "max1", "new_max1", "gnorm_vec")


def _warn_about_bitsandbytes_overrides(optimizer: LionOptimizerBase) -> None:
    """Warns, at an optimizer's first step, when bitsandbytes' own GlobalOptimManager holds
    overrides for its params: code switched from bitsandbytes by changing only the optimizer's
    import would lose them silently (embeddings kept 32-bit, say), as lion_ops reads only
    lion_ops.optim.GlobalOptimManager. Reads bitsandbytes only if it was imported."""
    module = sys.modules.get("bitsandbytes.optim.optimizer")
    manager = getattr(getattr(module, "GlobalOptimManager", None), "_instance", None)
    if manager is None:
        return
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    overridden = set(getattr(manager, "pid2config", None) or ()) & ids
    for owner, name, _ in getattr(manager, "module_weight_config_triple", None) or ():
        if id(getattr(owner, name, None)) in ids:
            overridden.add(id(getattr(owner, name)))
    if overridden:
        warnings.warn(
            f"{type(optimizer).__name__}: bitsandbytes.optim.GlobalOptimManager holds overrides "
            f"for {len(overridden)} of this optimizer's params, which lion_ops does not read; "
            "register them with lion_ops.optim.GlobalOptimManager.get_instance() instead",
            UserWarning, stacklevel=5)  # the caller of step(), past torch's wrappers


def _read_args(args, where: str) -> tuple:
    """(optim_bits, min_8bit_size, percentile_clipping, block_wise) from a bitsandbytes-style
    args object; options Lion does not support are refused."""
    values = {}
    for name, default in (("optim_bits", None), ("min_8bit_size", None),
                          ("percentile_clipping", 100), ("block_wise", True),
                          ("max_unorm", 0.0), ("skip_zeros", False)):
        if not hasattr(args, name) and default is None:
            raise ValueError(f"{where}: args has no attribute {name!r} (args replaces the "
                             "keyword options, as in bitsandbytes)")
        values[name] = getattr(args, name, default)
    if values["max_unorm"]:
        raise NotImplementedError(f"{where}: args.max_unorm={values['max_unorm']!r}: update-norm "
                                  "clipping is not supported for Lion; use 0")
    if values["skip_zeros"]:
        raise NotImplementedError(f"{where}: args.skip_zeros=True is not supported; use False")
    return (values["optim_bits"], values["min_8bit_size"], values["percentile_clipping"],
            values["block_wise"])


FP32, BLOCKWISE, STATIC = "32-bit", "8-bit blockwise", "8-bit static"
_KIND_NAMES = {FP32: "32-bit", BLOCKWISE: "8-bit blockwise", STATIC: "8-bit static (block_wise=False)"}
_STATE_TENSOR_KEYS = frozenset({"state1", "qmap1", "absmax1", "max1", "new_max1", "gnorm_vec"})


def _in_saved_layout(state: dict) -> bool:
    """Whether a param's state is a state_dict entry (momentum nested under QUANT_STATE_KEY, or
    `step` a number) rather than the optimizer's live state."""
    return QUANT_STATE_KEY in state or ("step" in state and not isinstance(state["step"], Tensor))


def _kind_of_state(state: dict) -> str | None:
    codes = state.get("state1")
    if not isinstance(codes, Tensor):
        return None
    if codes.dtype != torch.uint8:
        return FP32
    return STATIC if "max1" in state else BLOCKWISE


def _quick_state_kind(p: Tensor, shape, device, state: dict) -> str | None:
    """The per-step check of a param's state, kept cheap (a few attribute reads): its kind
    when the momentum (or codes) and its scales match the param's shape and device, else None,
    which sends the state to the full check of _state_problem, which names what is wrong."""
    momentum = state.get("state1")
    if not isinstance(momentum, Tensor) or momentum.shape != shape or momentum.device != device:
        return None
    step = state.get("step")
    if not isinstance(step, Tensor) or step.dtype != torch.float32 or step.numel() != 1 \
            or step.device != device:
        return None
    gnorm = state.get("gnorm_vec")
    if gnorm is not None and (not isinstance(gnorm, Tensor) or gnorm.dtype != torch.float32
                              or gnorm.device != device or gnorm.numel() != ops.GNORM_HISTORY
                              or not gnorm.is_contiguous()):
        return None
    dtype = momentum.dtype
    if dtype == torch.float32:
        return FP32
    if dtype != torch.uint8:
        return None
    if "max1" not in state:  # blockwise (as _kind_of_state decides)
        absmax = state.get("absmax1")
        fits = (isinstance(absmax, Tensor) and absmax.dtype == torch.float32
                and absmax.device == device and _local(absmax).is_contiguous()
                and absmax.numel() == ops.blockwise_absmax_count(p.numel()))
        return BLOCKWISE if fits else None
    fits = all(isinstance(scale, Tensor) and scale.dtype == torch.float32
               and scale.device == device and scale.numel() == 1 and scale.is_contiguous()
               for scale in (state["max1"], state.get("new_max1")))
    return STATIC if fits else None


def _state_problem(p: Tensor, state: dict, kind: str | None, loading: bool = False) -> str:
    """What is wrong with a param's state, or "" if it fits the param. Metadata only, except
    that a loaded qmap1 is compared with the dynamic map (a host read, fine outside a step)."""
    where_ok = loading or all(isinstance(v, Tensor) and v.device == p.device
                              for k, v in state.items() if k in _STATE_TENSOR_KEYS)
    if kind is None:
        return "it has no momentum tensor 'state1'"
    gnorm = state.get("gnorm_vec")
    if gnorm is not None and (not isinstance(gnorm, Tensor) or gnorm.numel() != ops.GNORM_HISTORY
                              or not gnorm.is_floating_point()
                              or (not loading and (gnorm.dtype != torch.float32
                                                   or not gnorm.is_contiguous()))):
        return f"'gnorm_vec' must be a contiguous float32 tensor of {ops.GNORM_HISTORY} elements"
    if not where_ok:
        return f"its tensors must be on {p.device}"
    step = state.get("step")
    if not loading and (not isinstance(step, Tensor) or step.dtype != torch.float32
                        or step.numel() != 1):
        got = f"{step.dtype} of shape {tuple(step.shape)}" if isinstance(step, Tensor) \
            else type(step).__name__
        return f"the counter 'step' must be a one-element float32 tensor, got {got}"
    state1 = state["state1"]
    if kind == FP32:
        if state1.shape != p.shape or not state1.is_floating_point() \
                or (not loading and state1.dtype != torch.float32):
            return (f"the momentum 'state1' has shape {tuple(state1.shape)} and dtype "
                    f"{state1.dtype}; expected a {'floating-point' if loading else 'float32'} "
                    f"tensor of shape {tuple(p.shape)}")
        return ""
    if state1.shape != p.shape:
        return (f"the 8-bit codes 'state1' have shape {tuple(state1.shape)}; expected "
                f"{tuple(p.shape)}")
    qmap = state.get("qmap1")
    if not isinstance(qmap, Tensor) or qmap.shape != (ops.QUANT_MAP_SIZE,):
        return "'qmap1' must be the 256-entry quantization map"
    if loading and not torch.equal(qmap.detach().float().cpu(), dynamic_map("cpu")):
        return "'qmap1' is not the signed dynamic map that lion_ops and bitsandbytes use"
    keys = {"absmax1": (ops.blockwise_absmax_count(p.numel()),)} if kind == BLOCKWISE \
        else {"max1": (1,), "new_max1": (1,)}
    for key, shape in keys.items():
        value = state.get(key)
        if not isinstance(value, Tensor) or value.numel() != shape[0] \
                or not value.is_floating_point() or (not loading and (
                    value.dtype != torch.float32 or not _local(value).is_contiguous())):
            got = (f"{value.dtype} of shape {tuple(value.shape)}"
                   + ("" if loading or _local(value).is_contiguous() else ", not contiguous")
                   if isinstance(value, Tensor) else type(value).__name__)
            return (f"'{key}' must be a contiguous float32 tensor of {shape[0]} element(s) for a "
                    f"param of {p.numel()} elements, got {got}")
        if loading and not _is_dtensor(value) and not bool((value >= 0).all()):
            # A scale is a largest magnitude: +inf can come from bitsandbytes after an infinite
            # gradient (and its zero codes still decode to 0 here), NaN or < 0 from nothing sane;
            # loaded, they would make params NaN. Read on the host: loading is not a step.
            return f"'{key}' holds NaN or negative scales"
    return ""
