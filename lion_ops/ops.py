"""Typed Python wrappers of the `torch.ops.lion` operators, each beside its fake.

The fakes (meta implementations) let torch.compile and torch.export trace the operators
without running them: they check what can be checked from shapes and dtypes, and allocate
nothing, since every operator here works in place. The schemas live in
native/registration.cpp; the kernels in native/cpu and native/cuda.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor, _prims_common

from . import _native

_native.load()

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def hyperparameter(value: float | Tensor, device: torch.device | str = "cpu") -> Tensor:
    """A hyperparameter (lr, beta1, beta2, weight_decay) as the update operators take it: a
    tensor as it is, a number as a 0-dim float32 CPU tensor (read on the host); under
    torch.compile, one on `device` (the params' device: a graph with CPU tensors in it is not
    captured in a CUDA graph by mode="reduce-overhead")."""
    if isinstance(value, Tensor):
        return value
    if torch.compiler.is_compiling():
        # A float that has changed between compiled calls is a symbolic graph input, and
        # torch.tensor() of it would specialize the graph on its value (a recompile for each
        # new value); an addition keeps it an input. The same float32 rounding as below.
        return torch.zeros((), dtype=torch.float32, device=device) + value
    return torch.tensor(float(value), dtype=torch.float32, device="cpu")


def _hyperparameters(params, *values) -> list[Tensor]:
    device = params[0].device if len(params) else "cpu"
    return [hyperparameter(value, device) for value in values]


def _check_hyperparameters(op: str, params, lr: Tensor, beta1: Tensor, beta2: Tensor,
                           weight_decay: Tensor) -> None:
    for name, value in (("lr", lr), ("beta1", beta1), ("beta2", beta2),
                        ("weight_decay", weight_decay)):
        if value.dim() != 0:
            raise ValueError(f"{op}: {name} must be a 0-dim tensor, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {value.dtype}")
        if value.layout != torch.strided:
            raise ValueError(f"{op}: {name} must be a dense tensor, got layout {value.layout}")
        if params and value.device.type != "cpu" and value.device != params[0].device:
            raise ValueError(f"{op}: {name} must be on the CPU or on {params[0].device}, got "
                             f"{value.device}")


def _check_lion_update_32bit(
    params: Sequence[Tensor], grads: Sequence[Tensor], momenta: Sequence[Tensor]
) -> None:
    # The same checks as the kernels (native/lion_batch.cpp), on metadata only.
    if not (len(params) == len(grads) == len(momenta)):
        raise ValueError(
            "lion_update_32bit: params, grads and momenta must have the same length, got "
            f"{len(params)}, {len(grads)} and {len(momenta)}"
        )
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
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    weight_decay: float | Tensor,
    grad_scales: Tensor | None = None,
) -> None:
    """One Lion step, in place, for lists of params with fp32 momentum (on CUDA one kernel
    launch per param dtype present, per 384 tensors).

    For each i, with all arithmetic in fp32:
        params[i] *= 1 - lr * weight_decay
        params[i] -= lr * sign(beta1 * momenta[i] + (1 - beta1) * grads[i])
        momenta[i] = beta2 * momenta[i] + (1 - beta2) * grads[i]

    params: float32, bfloat16 or float16 tensors, all on one device; grads: same shapes and
    dtypes; momenta: float32, same shapes. lr, beta1, beta2, weight_decay: numbers, or 0-dim
    floating-point tensors on the CPU (read on the host) or on the params' device (read there
    by the kernel: changing one needs no host synchronization, and a compiled graph takes it
    as an input).
    grad_scales: optional float32 tensor with one factor per param that multiplies its grad
    wherever the grad appears (percentile clipping's scales; see percentile_clipping).
    """
    torch.ops.lion.lion_update_32bit.default(
        list(params), list(grads), list(momenta), *_hyperparameters(params, lr, beta1, beta2,
                                                                    weight_decay), grad_scales)


def _check_grad_scales(op: str, grad_scales, params) -> None:
    if grad_scales is not None and (grad_scales.dtype != torch.float32
                                    or grad_scales.shape != (len(params),)):
        raise ValueError(f"{op}: grad_scales must be a float32 tensor of shape ({len(params)},), "
                         f"got {grad_scales.dtype} {tuple(grad_scales.shape)}")


@torch.library.register_fake("lion::lion_update_32bit")
def _lion_update_32bit_fake(params, grads, momenta, lr, beta1, beta2, weight_decay,
                            grad_scales=None) -> None:
    _check_hyperparameters("lion_update_32bit", params, lr, beta1, beta2, weight_decay)
    _check_lion_update_32bit(params, grads, momenta)
    _check_grad_scales("lion_update_32bit", grad_scales, params)
    return None


def _check_state_list(op: str, name: str, params, states, dtype, numel_of) -> None:
    if len(states) != len(params):
        raise ValueError(f"{op}: params and {name} must have the same length, got {len(params)} "
                         f"and {len(states)}")
    for i, (p, s) in enumerate(zip(params, states)):
        if s.dtype != dtype:
            raise TypeError(f"{op}: {name}[{i}] must be {dtype}, got {s.dtype}")
        expected = numel_of(p)
        if (expected is None and s.shape != p.shape) or (expected is not None and s.numel() != expected):
            raise ValueError(f"{op}: {name}[{i}] has shape {tuple(s.shape)}, which does not fit "
                             f"params[{i}] of shape {tuple(p.shape)}")


def _check_param_grad_lists(op: str, params, grads) -> None:
    if len(params) != len(grads):
        raise ValueError(f"{op}: params and grads must have the same length, got {len(params)} "
                         f"and {len(grads)}")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: params[{i}] must be float32, bfloat16 or float16, got {p.dtype}")
        if g.dtype != p.dtype or g.shape != p.shape:
            raise ValueError(f"{op}: grads[{i}] must have params[{i}]'s shape and dtype")


def _dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the kernels' messages name it (float32, not torch.float32)."""
    return str(dtype).removeprefix("torch.")


def _check_qmap(op: str, qmap: Tensor) -> None:
    if qmap.dtype != torch.float32 or qmap.shape != (QUANT_MAP_SIZE,):
        raise ValueError(f"{op}: qmap must be a float32 tensor of shape ({QUANT_MAP_SIZE},), got "
                         f"{qmap.dtype} {tuple(qmap.shape)}")


QUANT_BLOCK_SIZE = 256  # elements per absmax in blockwise 8-bit state
QUANT_MAP_SIZE = 256


def blockwise_absmax_count(numel: int) -> int:
    """Number of absmax entries of blockwise 8-bit state for a tensor of `numel` elements."""
    return (numel + QUANT_BLOCK_SIZE - 1) // QUANT_BLOCK_SIZE


def lion_update_8bit_blockwise(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    codes: Sequence[Tensor],
    absmaxes: Sequence[Tensor],
    qmap: Tensor,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    weight_decay: float | Tensor,
    grad_scales: Tensor | None = None,
) -> None:
    """One Lion step, in place, with blockwise 8-bit momentum (on CUDA one kernel launch per
    param dtype present, per 384 tensors).

    The momentum of params[i] is qmap[codes[i]] * absmaxes[i][block], one float32 absmax per
    256 consecutive elements. Each step decodes it, applies the 32-bit update math, and
    re-encodes it against the new block maxima: codes are the nearest qmap entries, moved one
    step toward the momentum's sign where the nearest entry has the other sign.
    codes: uint8 of the params' shapes; absmaxes: float32 of ceil(numel / 256); qmap: 256
    sorted float32 values (lion_ops.quantization.dynamic_map()).
    """
    torch.ops.lion.lion_update_8bit_blockwise.default(
        list(params), list(grads), list(codes), list(absmaxes), qmap,
        *_hyperparameters(params, lr, beta1, beta2, weight_decay), grad_scales)


@torch.library.register_fake("lion::lion_update_8bit_blockwise")
def _lion_update_8bit_blockwise_fake(params, grads, codes, absmaxes, qmap, lr, beta1, beta2,
                                     weight_decay, grad_scales=None) -> None:
    op = "lion_update_8bit_blockwise"
    _check_grad_scales(op, grad_scales, params)
    _check_hyperparameters(op, params, lr, beta1, beta2, weight_decay)
    _check_param_grad_lists(op, params, grads)
    _check_state_list(op, "codes", params, codes, torch.uint8, lambda p: None)
    _check_state_list(op, "absmaxes", params, absmaxes, torch.float32,
                      lambda p: blockwise_absmax_count(p.numel()))
    for i, absmax in enumerate(absmaxes):
        if absmax.dim() != 1:
            raise ValueError(f"{op}: absmaxes[{i}] must be a contiguous 1-D tensor, got shape "
                             f"{tuple(absmax.shape)}")
    _check_qmap(op, qmap)
    return None


def lion_update_8bit_static(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    codes: Sequence[Tensor],
    max1s: Sequence[Tensor],
    new_max1s: Sequence[Tensor],
    qmap: Tensor,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    weight_decay: float | Tensor,
    grad_scales: Tensor | None = None,
) -> None:
    """One Lion step, in place, with per-tensor ("static", block_wise=False) 8-bit momentum.

    The momentum of params[i] is qmap[codes[i]] * max1s[i]. The new scale is the exact
    largest magnitude of the new momentum, found by a reduction on the device in the same
    step (two passes, no host synchronization); afterwards max1s[i] and new_max1s[i] both
    hold it. max1s, new_max1s: one-element float32 tensors.
    """
    torch.ops.lion.lion_update_8bit_static.default(
        list(params), list(grads), list(codes), list(max1s), list(new_max1s), qmap,
        *_hyperparameters(params, lr, beta1, beta2, weight_decay), grad_scales)


@torch.library.register_fake("lion::lion_update_8bit_static")
def _lion_update_8bit_static_fake(params, grads, codes, max1s, new_max1s, qmap, lr, beta1, beta2,
                                  weight_decay, grad_scales=None) -> None:
    op = "lion_update_8bit_static"
    _check_grad_scales(op, grad_scales, params)
    _check_hyperparameters(op, params, lr, beta1, beta2, weight_decay)
    _check_param_grad_lists(op, params, grads)
    _check_state_list(op, "codes", params, codes, torch.uint8, lambda p: None)
    _check_state_list(op, "max1s", params, max1s, torch.float32, lambda p: 1)
    _check_state_list(op, "new_max1s", params, new_max1s, torch.float32, lambda p: 1)
    _check_qmap(op, qmap)
    return None


GNORM_HISTORY = 100  # squared gradient norms each param keeps for percentile clipping


def percentile_clipping(grads: Sequence[Tensor], gnorm_vecs: Sequence[Tensor],
                        steps: Sequence[Tensor], percentile: int) -> Tensor:
    """bitsandbytes 0.49's percentile clipping, for a list of grads, on their device.

    For each grad: ||g||^2 is recorded in its 100-entry gnorm_vec at slot step % 100 (in every
    slot at step 1, or when gnorm_vec[0] < 0, which marks a history that has recorded nothing;
    steps are the counters after this step's increment); with current = ||g|| and
    clip = sqrt(sorted(gnorm_vec)[percentile]) (NaN sorted last), its scale is
    clip / current if current > clip, else 1. Returns the scales (float32, one per grad), to
    pass as grad_scales to the update operators. No host synchronization.
    """
    if not grads and not gnorm_vecs and not steps:  # no tensor to dispatch on: as the fake
        return torch.empty((0,), dtype=torch.float32)
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Integral):
        raise TypeError(f"percentile_clipping: percentile must be an int, got {percentile!r}")
    return torch.ops.lion.percentile_clipping.default(list(grads), list(gnorm_vecs), list(steps),
                                                      int(percentile))


@torch.library.register_fake("lion::percentile_clipping")
def _percentile_clipping_fake(grads, gnorm_vecs, steps, percentile):
    if not (len(grads) == len(gnorm_vecs) == len(steps)):
        raise ValueError("percentile_clipping: grads, gnorm_vecs and steps must have the same "
                         "length")
    if not 0 <= percentile < GNORM_HISTORY:
        raise ValueError(f"percentile_clipping: percentile must be in 0..{GNORM_HISTORY - 1}, "
                         f"got {percentile}")
    for i, (g, v, s) in enumerate(zip(grads, gnorm_vecs, steps)):
        if g.dtype not in PARAM_DTYPES:
            raise TypeError(f"percentile_clipping: grads[{i}] must be float32, bfloat16 or "
                            f"float16, got {_dtype_name(g.dtype)}")
        if v.dtype != torch.float32 or v.numel() != GNORM_HISTORY or not v.is_contiguous():
            raise ValueError(f"percentile_clipping: gnorm_vecs[{i}] must be a contiguous float32 "
                             f"tensor of {GNORM_HISTORY} elements")
        if s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(f"percentile_clipping: steps[{i}] must be a one-element float32 "
                             "tensor")
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((len(grads),), dtype=torch.float32, device=device)


def increment_steps(steps: Sequence[Tensor]) -> None:
    """Adds 1 to each one-element float32 step counter, in place (one call, one launch)."""
    if steps:  # an empty list has no device to dispatch on
        torch.ops.lion.increment_steps.default(list(steps))


@torch.library.register_fake("lion::increment_steps")
def _increment_steps_fake(steps) -> None:
    for i, s in enumerate(steps):
        if s.dtype != torch.float32 or s.numel() != 1:
            raise ValueError(f"increment_steps: steps[{i}] must be a one-element float32 tensor")
    return None


def quantize_blockwise(input: Tensor, qmap: Tensor, blocksize: int = QUANT_BLOCK_SIZE
                       ) -> tuple[Tensor, Tensor]:
    """Quantizes `input` blockwise as the 8-bit optimizers store momentum.

    Returns (codes, absmax): uint8 codes of input's shape, and one float32 absmax per
    `blocksize` consecutive elements (in row-major order).
    """
    return torch.ops.lion.quantize_blockwise.default(input, qmap, blocksize)


@torch.library.register_fake("lion::quantize_blockwise")
def _quantize_blockwise_fake(input, qmap, blocksize=QUANT_BLOCK_SIZE):
    _check_qmap("quantize_blockwise", qmap)
    torch._check(blocksize > 0, lambda: "quantize_blockwise: blocksize must be positive")
    if input.dtype not in PARAM_DTYPES:
        raise TypeError(f"quantize_blockwise: input must be float32, bfloat16 or float16, got "
                        f"{_dtype_name(input.dtype)}")
    codes = input.new_empty(input.shape, dtype=torch.uint8)
    absmax = input.new_empty(((input.numel() + blocksize - 1) // blocksize,), dtype=torch.float32)
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor,
                         blocksize: int = QUANT_BLOCK_SIZE) -> Tensor:
    """The float32 values of blockwise 8-bit state: qmap[codes] * absmax[block]."""
    return torch.ops.lion.dequantize_blockwise.default(codes, absmax, qmap, blocksize)


@torch.library.register_fake("lion::dequantize_blockwise")
def _dequantize_blockwise_fake(codes, absmax, qmap, blocksize=QUANT_BLOCK_SIZE):
    _check_qmap("dequantize_blockwise", qmap)
    torch._check(blocksize > 0, lambda: "dequantize_blockwise: blocksize must be positive")
    if codes.dtype != torch.uint8:
        raise TypeError(f"dequantize_blockwise: codes must be uint8, got "
                        f"{_dtype_name(codes.dtype)}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"dequantize_blockwise: absmax must be float32, got "
                        f"{_dtype_name(absmax.dtype)}")
    blocks = (codes.numel() + blocksize - 1) // blocksize
    torch._check_value(absmax.numel() == blocks, lambda: (
        f"dequantize_blockwise: absmax must have {blocks} elements (one per {blocksize} codes), "
        f"got {absmax.numel()}"))
    return codes.new_empty(codes.shape, dtype=torch.float32)


# ---- paged state -------------------------------------------------------------------------------

PAGING_NONE, PAGING_WITHOUT_PREFETCH, PAGING_WITH_PREFETCH = 0, 1, 2


def zeros_paged_like(like: Tensor, *, dtype: torch.dtype | None = None,
                     memory_format: torch.memory_format | None = None) -> Tensor:
    """Zeros shaped like `like`, in CUDA managed memory on like's GPU: memory the driver may
    move to host memory when the GPU runs short, and back when a kernel touches it.

    The result has like's strides when like is dense and non-overlapping (and memory_format
    is None or torch.preserve_format), else it is contiguous; dtype defaults to like's. Its
    memory is not counted by torch's caching allocator and is freed when the tensor dies. On
    the CPU, where there is no managed memory, it is an ordinary zero tensor. Raises on a GPU
    without managed memory (see paging_support).
    """
    return torch.ops.lion.zeros_paged_like.default(like, dtype=dtype, memory_format=memory_format)


def _paged_like_strides(like: Tensor, memory_format) -> tuple:
    # The same rule as native/lion_batch.cpp's paged_like_strides.
    if memory_format not in (None, torch.preserve_format, torch.contiguous_format):
        raise ValueError("zeros_paged_like: memory_format must be torch.preserve_format or "
                         f"torch.contiguous_format, got {memory_format}")
    if memory_format is not torch.contiguous_format \
            and _prims_common.is_non_overlapping_and_dense_or_false(like):
        return like.stride()
    return _prims_common.make_contiguous_strides_for(like.shape)


@torch.library.register_fake("lion::zeros_paged_like")
def _zeros_paged_like_fake(like, *, dtype=None, memory_format=None):
    if like.layout != torch.strided:
        raise TypeError(f"zeros_paged_like: like must be a dense (strided) tensor, got layout "
                        f"{like.layout}")
    return torch.empty_strided(like.shape, _paged_like_strides(like, memory_format),
                               dtype=dtype if dtype is not None else like.dtype,
                               device=like.device)


def prefetch_paged(tensors: Sequence[Tensor], to_host: bool = False) -> None:
    """Prefetches the tensors in managed memory (zeros_paged_like's) to their GPU, or to host
    memory with to_host=True, asynchronously on the current stream. Values never change.

    Tensors in ordinary memory are left alone, and so is everything on a device without
    concurrent managed access (paging_support() == PAGING_WITHOUT_PREFETCH), where the driver
    refuses prefetches. All tensors must be on one device; on the CPU this does nothing.
    """
    if tensors:  # an empty list has no device to dispatch on
        torch.ops.lion.prefetch_paged.default(list(tensors), bool(to_host))


@torch.library.register_fake("lion::prefetch_paged")
def _prefetch_paged_fake(tensors, to_host=False) -> None:
    for i, t in enumerate(tensors):
        if t.device != tensors[0].device:
            raise ValueError(f"prefetch_paged: all tensors must be on one device; tensors[0] is "
                             f"on {tensors[0].device}, tensors[{i}] on {t.device}")
    return None


def paging_support(device: torch.device | str) -> int:
    """What paging `device` supports: PAGING_NONE (the CPU, or a GPU without managed memory),
    PAGING_WITHOUT_PREFETCH (managed memory without concurrent managed access: the driver
    migrates pages around kernel launches itself) or PAGING_WITH_PREFETCH.

    It asks the CUDA driver, so call it outside compiled regions (the optimizers ask once,
    when they are built).
    """
    return int(torch.ops.lion.paging_support.default(torch.device(device)))
