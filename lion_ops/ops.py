"""Typed Python wrappers of the `torch.ops.lion` operators, each beside its fake.

The fakes (meta implementations) let torch.compile and torch.export trace the operators
without running them: they check what can be checked from shapes and dtypes, and allocate
nothing, since every operator here works in place. The schemas live in
native/registration.cpp; the kernels in native/cpu and native/cuda.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _native

_native.load()

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_lion_update_32bit(
    params: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor], lr: Tensor
) -> None:
    # The same checks as the kernels (native/lion_batch.cpp), on metadata only.
    if not (len(params) == len(grads) == len(momenta)):
        raise ValueError(
            "lion_update_32bit: params, grads and momenta must have the same length, got "
            f"{len(params)}, {len(grads)} and {len(momenta)}"
        )
    if lr.dim() != 0:
        raise ValueError(f"lion_update_32bit: lr must be a 0-dim tensor, got shape {tuple(lr.shape)}")
    for i, (p, g, m) in enumerate(zip(params, grads, momenta)):
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"lion_update_32bit: params[{i}] must be float32, bfloat16 or float16, got {p.dtype}")
        if g.dtype != p.dtype:
            raise TypeError(f"lion_update_32bit: grads[{i}] must have its param's dtype {p.dtype}, got {g.dtype}")
        if m.dtype != torch.float32:
            raise TypeError(f"lion_update_32bit: momenta[{i}] must be float32, got {m.dtype}")
        if g.shape != p.shape or m.shape != p.shape:
            raise ValueError(
                f"lion_update_32bit: grads[{i}] and momenta[{i}] must have params[{i}]'s shape "
                f"{tuple(p.shape)}, got {tuple(g.shape)} and {tuple(m.shape)}"
            )


def lion_update_32bit(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    lr: Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> None:
    """One Lion step, in place, for lists of params with fp32 momentum (one call, one launch).

    For each i, with all arithmetic in fp32:
        params[i] *= 1 - lr * weight_decay
        params[i] -= lr * sign(beta1 * momenta[i] + (1 - beta1) * grads[i])
        momenta[i] = beta2 * momenta[i] + (1 - beta2) * grads[i]

    params: float32, bfloat16 or float16 tensors, all on one device; grads: same shapes and
    dtypes; momenta: float32, same shapes. lr: a 0-dim tensor, on the CPU or on the params'
    device (then the kernel reads it there, so a changing lr needs no host synchronization).
    """
    torch.ops.lion.lion_update_32bit.default(
        list(params), list(grads), list(momenta), lr, float(beta1), float(beta2), float(weight_decay)
    )


@torch.library.register_fake("lion::lion_update_32bit")
def _lion_update_32bit_fake(params, grads, momenta, lr, beta1, beta2, weight_decay) -> None:
    _check_lion_update_32bit(params, grads, momenta, lr)
    return None
