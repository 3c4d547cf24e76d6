"""The Lion optimizers, with bitsandbytes' constructors and defaults (Chen et al. 2023,
"Symbolic Discovery of Optimization Algorithms")."""

from __future__ import annotations

from .base import LionOptimizerBase


class Lion(LionOptimizerBase):
    """Lion: p <- p*(1 - lr*wd) - lr*sign(b1*m + (1-b1)*g); m <- b2*m + (1-b2)*g.

    Args:
        params: the params to optimize, or dicts defining param groups.
        lr: learning rate, a float or a 0-dim tensor (a tensor lr changes without
            recompiling under torch.compile).
        betas: (beta1, beta2): beta1 interpolates the update direction, beta2 the momentum.
        weight_decay: decoupled weight decay.
        optim_bits: bits of optimizer state: 32 (float32 momentum) or 8 (uint8 codes).
        args: an object with optim_bits, min_8bit_size, percentile_clipping and block_wise
            (and max_unorm=0, skip_zeros=False) that replaces those keyword options.
        min_8bit_size: params with fewer elements keep 32-bit state when optim_bits=8.
        percentile_clipping: adaptive gradient clipping from the last 100 gradient norms:
            grads whose norm exceeds this percentile of them are scaled down (100 = off).
        block_wise: blockwise (True) or per-tensor (False) 8-bit quantization.
        is_paged: keep large state in paged (CUDA managed) memory; see PagedLion.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True,
                 is_paged=False):
        super().__init__(params, lr, betas, weight_decay, optim_bits, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged)


class Lion32bit(LionOptimizerBase):
    """Lion with 32-bit (float32) momentum; see Lion."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False):
        super().__init__(params, lr, betas, weight_decay, 32, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged)


class Lion8bit(LionOptimizerBase):
    """Lion with 8-bit momentum: uint8 codes into bitsandbytes' signed dynamic map, with one
    float32 absmax per 256 elements (block_wise=True) or one scale per tensor
    (block_wise=False). Params under min_8bit_size elements keep 32-bit state. See Lion."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False):
        super().__init__(params, lr, betas, weight_decay, 8, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged)


class PagedLion(LionOptimizerBase):
    """Lion with its state in paged (CUDA managed) memory; see Lion.

    The momentum (or 8-bit codes) of params of 100,000 elements or more lives in managed
    memory (lion_ops.ops.zeros_paged_like), which the driver moves to host memory when the
    GPU runs short and back when it is needed; each step prefetches it on the current
    stream. Smaller state, absmax and the map stay in ordinary device memory. state_dict()
    is the unpaged format; load_state_dict keeps the state paged. On the CPU, or on a GPU
    without managed memory, it warns once and behaves exactly as Lion.
    """

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, optim_bits=32,
                 args=None, min_8bit_size=4096, percentile_clipping=100, block_wise=True):
        super().__init__(params, lr, betas, weight_decay, optim_bits, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=True)


class PagedLion32bit(LionOptimizerBase):
    """Lion32bit with paged state; see PagedLion."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True):
        super().__init__(params, lr, betas, weight_decay, 32, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=True)


class PagedLion8bit(LionOptimizerBase):
    """Lion8bit with paged state; see PagedLion."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0, args=None,
                 min_8bit_size=4096, percentile_clipping=100, block_wise=True):
        super().__init__(params, lr, betas, weight_decay, 8, args, min_8bit_size,
                         percentile_clipping, block_wise, is_paged=True)
