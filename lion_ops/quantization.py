"""The 8-bit quantization map of the 8-bit optimizers, and helpers to inspect 8-bit state."""

from __future__ import annotations

import torch
from torch import Tensor

from . import ops


def dynamic_map(device: torch.device | str | None = None) -> Tensor:
    """bitsandbytes' signed dynamic quantization map (create_dynamic_map(signed=True,
    max_exponent_bits=7, total_bits=8)), built from its definition.

    For each exponent i in 0..6, the 2**i midpoints of 2**i + 1 evenly spaced points in
    [0.1, 1], scaled by 10**(i - 6), and their negatives; plus 0 and 1.0. Sorted, that is
    256 float32 values with 0.0 at index 127, 1.0 at index 255 and -0.99296875 at index 0
    (in float32, -0.9929687381).
    """
    values = [0.0, 1.0]
    for i in range(7):
        points = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32, device="cpu")
        midpoints = (points[:-1] + points[1:]) / 2.0 * (10.0 ** (i - 6))
        values += midpoints.tolist() + (-midpoints).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def dequantize_state(codes: Tensor, scale: Tensor, qmap: Tensor) -> Tensor:
    """The float32 momentum held by 8-bit state: blockwise (scale = absmax, one per 256
    elements) or static (scale = max1, one element)."""
    if scale.numel() == 1 and ops.blockwise_absmax_count(codes.numel()) != 1:
        # As the kernels decode (decode_momentum): a zero entry is 0 whatever the scale, so
        # zero codes stay 0 under a loaded scale of +inf (0 * inf would be NaN).
        entries = qmap[codes.long()]
        return torch.where(entries == 0, entries, entries * scale.reshape(()))
    return ops.dequantize_blockwise(codes, scale, qmap)
