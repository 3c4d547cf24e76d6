"""GlobalOptimManager: per-parameter overrides of the optimizer configuration, with the API of
bitsandbytes.optim.GlobalOptimManager (facts from bitsandbytes; our own code).

    mng = GlobalOptimManager.get_instance()
    mng.register_parameters(model.parameters())     # optional: index-based overrides
    mng.override_config(model.fc1.weight, "optim_bits", 32)
    mng.register_module_override(model.embed, "weight", {"optim_bits": 32})

Unlike bitsandbytes it holds no strong reference to parameters or modules, so models can be
freed. Optimizers resolve overrides eagerly, when they are made and again at the next step
after the manager changes, outside the update itself, so compiled steps never trace the
lookups.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

# What can be overridden per parameter, and how each value is checked.
OVERRIDABLE_KEYS = ("lr", "betas", "weight_decay", "optim_bits", "min_8bit_size",
                    "percentile_clipping", "block_wise")


def check_override(config: dict, where: str) -> dict:
    """Refuses unknown keys and out-of-range values; returns a copy of the config."""
    from .base import _check_tensor_values, check_hyperparameters

    if not isinstance(config, dict):
        raise TypeError(f"{where}: the override must be a dict, got {type(config).__name__}")
    unknown = sorted(set(config) - set(OVERRIDABLE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; lion_ops can override "
                         f"{list(OVERRIDABLE_KEYS)}")
    check_hyperparameters(config.get("lr", 0.0), config.get("betas", (0.0, 0.0)),
                          config.get("weight_decay", 0.0), where)
    _check_tensor_values(where, config.get("lr"), config.get("betas", ()),
                         config.get("weight_decay"))
    if "optim_bits" in config and config["optim_bits"] not in (8, 32):
        raise ValueError(f"{where}: optim_bits must be 8 or 32, got {config['optim_bits']!r}")
    if "min_8bit_size" in config and (not isinstance(config["min_8bit_size"], numbers.Integral)
                                      or isinstance(config["min_8bit_size"], bool)
                                      or config["min_8bit_size"] < 0):
        raise ValueError(f"{where}: min_8bit_size must be an int >= 0, got "
                         f"{config['min_8bit_size']!r}")
    if "percentile_clipping" in config:
        value = config["percentile_clipping"]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
                or not 1 <= value <= 100:
            raise ValueError(f"{where}: percentile_clipping must be an int in 1..100, got "
                             f"{value!r}")
    if "block_wise" in config and not isinstance(config["block_wise"], bool):
        raise ValueError(f"{where}: block_wise must be a bool, got {config['block_wise']!r}")
    out = dict(config)
    if "betas" in out:
        out["betas"] = tuple(out["betas"])
    for key in ("optim_bits", "min_8bit_size", "percentile_clipping"):
        if key in out:
            out[key] = int(out[key])
    return out


class GlobalOptimManager:
    """Per-parameter configuration overrides; one instance, from get_instance()."""

    _instance: GlobalOptimManager | None = None

    def __init__(self):
        raise RuntimeError("Call GlobalOptimManager.get_instance() instead")

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        """The one manager, made on first use (as bitsandbytes' GlobalOptimManager)."""
        if cls._instance is None:
            instance = cls.__new__(cls)
            instance.initialize()
            cls._instance = instance
        return cls._instance

    def initialize(self) -> None:
        """Forgets every override (bitsandbytes' name for a reset). Optimizers already made
        stay attached: they drop their overrides now and see the ones registered later."""
        self.pid2config = WeakIdKeyDictionary()  # param -> config; does not keep params alive
        self.index2config: dict[tuple[int, int], dict] = {}
        self.module_overrides: list[tuple[weakref.ref, str, dict]] = []
        if not hasattr(self, "_optimizers"):
            self._optimizers: weakref.WeakSet = weakref.WeakSet()
        self._notify()

    # ---- bitsandbytes' API ----------------------------------------------------------------------
    def register_parameters(self, params) -> None:
        """Records the (group index, param index) of params that already have overrides, so
        that the overrides follow those positions (bitsandbytes' behaviour)."""
        groups = list(params)
        if not groups:
            return
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for group_index, group in enumerate(groups):
            for param_index, p in enumerate(group["params"]):
                config = self.pid2config.get(p)
                if config is not None:
                    self.index2config[(group_index, param_index)] = config
        self._notify()

    def override_config(self, parameters, key: str | None = None, value: Any = None,
                        key_value_dict: dict | None = None) -> None:
        """Overrides config keys for one param or a list of params."""
        where = "GlobalOptimManager.override_config"
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        if key is not None:
            if key_value_dict is not None:
                raise ValueError(f"{where}: pass either key and value or key_value_dict")
            key_value_dict = {key: value}
        if key_value_dict is None:
            raise ValueError(f"{where}: nothing to override: pass key and value or "
                             "key_value_dict")
        config = check_override(key_value_dict, where)
        for p in parameters:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{where}: parameters must be tensors, got {type(p).__name__}")
            existing = self.pid2config.get(p)
            if existing is None:
                self.pid2config[p] = dict(config)
            else:
                # Updated in place: register_parameters' positions share this dict, so later
                # overrides of a registered param reach them too, as in bitsandbytes.
                existing.update(config)
        self._notify()

    def register_module_override(self, module: torch.nn.Module, param_name: str,
                                 config: dict) -> None:
        """Overrides the config of `module.<param_name>` (e.g. embeddings kept 32-bit)."""
        where = "GlobalOptimManager.register_module_override"
        if not isinstance(getattr(module, param_name, None), torch.Tensor):
            raise ValueError(f"{where}: {type(module).__name__} has no parameter "
                             f"{param_name!r}")
        self.module_overrides.append((weakref.ref(module), param_name,
                                      check_override(config, where)))
        self._notify()

    # ---- for the optimizers ------------------------------------------------------------------
    def attach(self, optimizer) -> None:
        self._optimizers.add(optimizer)

    def config_for(self, group_index: int, param_index: int, p: torch.Tensor) -> dict:
        """The overrides of one param: by position, then by param, then by module."""
        config = dict(self.index2config.get((group_index, param_index), {}))
        config.update(self.pid2config.get(p, {}))
        for module_ref, name, module_config in self.module_overrides:
            module = module_ref()
            if module is not None and getattr(module, name, None) is p:
                config.update(module_config)
        return config

    def _notify(self) -> None:
        for optimizer in list(self._optimizers):
            optimizer._resolve_overrides()
