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

# Whether the loaded library has CUDA kernels (it has when it was built with nvcc 12.1+ and a
# CUDA build of torch): cuda_kernels_built() -> bool.
cuda_kernels_built = _native.cuda_kernels_built

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
            raise ValueError(f"{op}: {name} must be a 0-dim tensor, got shape {list(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got "
                            f"{_dtype_name(value.dtype)}")
        if value.layout != torch.strided:
            raise ValueError(f"{op}: {name} must be a dense tensor, got layout "
                             f"{_layout_name(value.layout)}")
        if params and value.device.type != "cpu" and value.device != params[0].device:
            raise ValueError(f"{op}: {name} must be on the CPU or on {params[0].device}, got "
                             f"{value.device}")


# The fakes make the kernels' checks (native/lion_batch.cpp), in the same order, with the same
# exception types, on metadata only: what depends on values (hyperparameter ranges, a sorted
# qmap, step counts) is checked by the kernels alone.
def _dtype_name(dtype: torch.dtype) -> str:
    """A dtype as the kernels' messages name it (float32, not torch.float32)."""
    return str(dtype).removeprefix("torch.")


_LAYOUT_NAMES = {torch.strided: "Strided", torch.sparse_coo: "Sparse",
                 torch.sparse_csr: "SparseCsr", torch.sparse_csc: "SparseCsc",
                 torch.sparse_bsr: "SparseBsr", torch.sparse_bsc: "SparseBsc",
                 torch._mkldnn: "Mkldnn", torch.jagged: "Jagged"}


def _layout_name(layout: torch.layout) -> str:
    """A layout as the kernels' messages name it."""
    return _LAYOUT_NAMES.get(layout, str(layout))


def _check_update_args(op: str, params, grads, lr, beta1, beta2, weight_decay) -> None:
    if len(grads) != len(params):
        raise ValueError(f"{op}: params and grads must have the same length, got {len(params)} "
                         f"and {len(grads)}")
    _check_hyperparameters(op, params, lr, beta1, beta2, weight_decay)
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.layout != torch.strided:
            raise TypeError(f"{op}: params[{i}] must be a dense (strided) tensor, got layout "
                            f"{_layout_name(p.layout)}")
        if g.layout != torch.strided:
            raise TypeError(f"{op}: grads[{i}] must be a dense (strided) tensor, got layout "
                            f"{_layout_name(g.layout)}; sparse gradients are not supported")
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: params[{i}] must be float32, bfloat16 or float16, got "
                            f"{_dtype_name(p.dtype)}")
        if g.dtype != p.dtype:
            raise TypeError(f"{op}: grads[{i}] must have its param's dtype "
                            f"{_dtype_name(p.dtype)}, got {_dtype_name(g.dtype)}")
        if p.device != params[0].device:
            raise ValueError(f"{op}: params[{i}] is on {p.device} but params[0] is on "
                             f"{params[0].device}; one call takes tensors of one device")
        if g.device != p.device:
            raise ValueError(f"{op}: grads[{i}] must be on {p.device}, got {g.device}")
        if g.shape != p.shape:
            raise ValueError(f"{op}: grads[{i}] has shape {list(g.shape)} but params[{i}] has "
                             f"shape {list(p.shape)}")


LIKE_PARAM, ONE_PER_BLOCK, ONE_ELEMENT = "like param", "one per block", "one element"


def _check_state_list(op: str, name: str, params, states, dtype, shape: str) -> None:
    if len(states) != len(params):
        raise ValueError(f"{op}: params and {name} must have the same length, got {len(params)} "
                         f"and {len(states)}")
    for i, (p, s) in enumerate(zip(params, states)):
        if s.layout != torch.strided:
            raise TypeError(f"{op}: {name}[{i}] must be a dense (strided) tensor")
        if s.dtype != dtype:
            raise TypeError(f"{op}: {name}[{i}] must be {_dtype_name(dtype)}, got "
                            f"{_dtype_name(s.dtype)}")
        if s.device != p.device:
            raise ValueError(f"{op}: {name}[{i}] must be on {p.device}, got {s.device}")
        if shape == LIKE_PARAM and s.shape != p.shape:
            raise ValueError(f"{op}: {name}[{i}] has shape {list(s.shape)} but params[{i}] has "
                             f"shape {list(p.shape)}")
        if shape == ONE_PER_BLOCK:
            blocks = blockwise_absmax_count(p.numel())
            if s.dim() != 1 or s.numel() != blocks or not s.is_contiguous():
                raise ValueError(f"{op}: {name}[{i}] must be a contiguous 1-D tensor of {blocks} "
                                 f"elements (one per {QUANT_BLOCK_SIZE} of params[{i}]'s "
                                 f"{p.numel()}), got shape {list(s.shape)}")
        if shape == ONE_ELEMENT and s.numel() != 1:
            raise ValueError(f"{op}: {name}[{i}] must have exactly one element, got shape "
                             f"{list(s.shape)}")


def _check_qmap(op: str, qmap: Tensor, device: torch.device) -> None:
    if qmap.layout != torch.strided:
        raise TypeError(f"{op}: qmap must be a dense (strided) tensor, got layout "
                        f"{_layout_name(qmap.layout)}")
    if qmap.dtype != torch.float32:
        raise TypeError(f"{op}: qmap must be float32, got {_dtype_name(qmap.dtype)}")
    if qmap.dim() != 1 or qmap.numel() != QUANT_MAP_SIZE or not qmap.is_contiguous():
        raise ValueError(f"{op}: qmap must be a contiguous 1-D tensor of {QUANT_MAP_SIZE} values, "
                         f"got shape {list(qmap.shape)}")
    if qmap.device != device:
        raise ValueError(f"{op}: qmap must be on {device}, got {qmap.device}")


def _check_grad_scales(op: str, grad_scales, params) -> None:
    if grad_scales is None:
        return
    if grad_scales.layout != torch.strided:
        raise TypeError(f"{op}: grad_scales must be a dense (strided) tensor, got layout "
                        f"{_layout_name(grad_scales.layout)}")
    if grad_scales.dtype != torch.float32:
        raise TypeError(f"{op}: grad_scales must be float32, got {_dtype_name(grad_scales.dtype)}")
    if grad_scales.dim() != 1 or grad_scales.numel() != len(params) \
            or not grad_scales.is_contiguous():
        raise ValueError(f"{op}: grad_scales must be a contiguous 1-D tensor with one scale per "
                         f"param ({len(params)}), got shape {list(grad_scales.shape)}")
    if params and grad_scales.device != params[0].device:
        raise ValueError(f"{op}: grad_scales must be on {params[0].device}, got "
                         f"{grad_scales.device}")


def byte_span(t: Tensor, begin: int) -> tuple[int, int, bool]:
    """(begin, end, dense) of the bytes a tensor's elements lie in, given where its first
    element is: dense when its elements fill them (in any order)."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    dense = t.is_contiguous() or _prims_common.is_non_overlapping_and_dense_or_false(t)
    return begin, begin + (last + 1) * t.element_size(), dense


def first_shared_memory(spans: list[tuple]) -> tuple[tuple, tuple] | None:
    """The first two of `spans` ((begin, end, dense, ...), in one address space) that share
    memory as the kernels judge it (native/lion_batch.cpp, check_distinct_outputs): they start
    at one place, or their ranges meet and both fill them. Views with gaps whose ranges
    interleave (columns of one matrix) are compared by their first element only, as torch's
    own overlap checks do. In order of their starts, then of `spans`."""
    reach = []  # spans whose ends lie past the current one's start
    for span in sorted(spans, key=lambda span: span[0]):
        reach = [other for other in reach if other[1] > span[0]]
        for other in reach:
            if other[0] == span[0] or (other[2] and span[2]):
                return other, span
        reach.append(span)
    return None


def _check_distinct_outputs(op: str, *named_lists: tuple[str, Sequence[Tensor]]) -> None:
    """The kernels' check that no memory is written twice, where a fake can tell: tensors of
    one storage (their offsets in it stand for addresses)."""
    by_storage: dict = {}
    for name, tensors in named_lists:
        for i, t in enumerate(tensors):
            if t.numel() == 0:
                continue
            if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
                raise ValueError(f"{op}: {name}[{i}] has elements that share memory (an expanded "
                                 "view?); a tensor the call updates must not")
            try:
                storage = t.untyped_storage()._cdata  # (the storage's address, fake or not)
            except (NotImplementedError, RuntimeError):  # (a tensor subclass without storage)
                continue
            span = byte_span(t, t.storage_offset() * t.element_size())
            by_storage.setdefault(storage, []).append((*span, f"{name}[{i}]"))
    for spans in by_storage.values():
        shared = first_shared_memory(spans) if len(spans) > 1 else None
        if shared is not None:
            first, second = shared
            what = ("are the same memory (one tensor passed twice?)" if first[0] == second[0]
                    else "share part of their memory (overlapping views of one tensor?)")
            raise ValueError(f"{op}: {first[3]} and {second[3]} {what}; every tensor the call "
                             "updates must have memory of its own")


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


@torch.library.register_fake("lion::lion_update_32bit")
def _lion_update_32bit_fake(params, grads, momenta, lr, beta1, beta2, weight_decay,
                            grad_scales=None) -> None:
    op = "lion_update_32bit"
    _check_update_args(op, params, grads, lr, beta1, beta2, weight_decay)
    _check_state_list(op, "momenta", params, momenta, torch.float32, LIKE_PARAM)
    _check_distinct_outputs(op, ("params", params), ("momenta", momenta))
    _check_grad_scales(op, grad_scales, params)
    return None


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
    _check_update_args(op, params, grads, lr, beta1, beta2, weight_decay)
    _check_state_list(op, "codes", params, codes, torch.uint8, LIKE_PARAM)
    _check_state_list(op, "absmaxes", params, absmaxes, torch.float32, ONE_PER_BLOCK)
    if params:
        _check_qmap(op, qmap, params[0].device)
    _check_distinct_outputs(op, ("params", params), ("codes", codes), ("absmaxes", absmaxes))
    _check_grad_scales(op, grad_scales, params)
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
    _check_update_args(op, params, grads, lr, beta1, beta2, weight_decay)
    _check_state_list(op, "codes", params, codes, torch.uint8, LIKE_PARAM)
    _check_state_list(op, "max1s", params, max1s, torch.float32, ONE_ELEMENT)
    _check_state_list(op, "new_max1s", params, new_max1s, torch.float32, ONE_ELEMENT)
    if params:
        _check_qmap(op, qmap, params[0].device)
    _check_distinct_outputs(op, ("params", params), ("codes", codes), ("max1s", max1s),
                            ("new_max1s", new_max1s))
    _check_grad_scales(op, grad_scales, params)
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
    op = "percentile_clipping"
    if not 0 <= percentile < GNORM_HISTORY:
        raise ValueError(f"{op}: percentile must be in 0..{GNORM_HISTORY - 1}, got {percentile}")
    if not (len(grads) == len(gnorm_vecs) == len(steps)):
        raise ValueError(f"{op}: grads, gnorm_vecs and steps must have the same length, got "
                         f"{len(grads)}, {len(gnorm_vecs)} and {len(steps)}")
    for i, (g, v, s) in enumerate(zip(grads, gnorm_vecs, steps)):
        if g.layout != torch.strided:
            raise TypeError(f"{op}: grads[{i}] must be dense; sparse gradients are not supported")
        if g.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: grads[{i}] must be float32, bfloat16 or float16, got "
                            f"{_dtype_name(g.dtype)}")
        if g.device != grads[0].device:
            raise ValueError(f"{op}: grads[{i}] is on {g.device} but grads[0] is on "
                             f"{grads[0].device}")
        if v.layout != torch.strided or s.layout != torch.strided:
            raise TypeError(f"{op}: gnorm_vecs[{i}] and steps[{i}] must be dense (strided) "
                            "tensors")
        if v.dtype != torch.float32 or v.numel() != GNORM_HISTORY or not v.is_contiguous() \
                or v.device != g.device:
            raise ValueError(f"{op}: gnorm_vecs[{i}] must be a contiguous float32 tensor of "
                             f"{GNORM_HISTORY} elements on {g.device}")
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != g.device:
            raise ValueError(f"{op}: steps[{i}] must be a one-element float32 tensor on "
                             f"{g.device}")
    _check_distinct_outputs(op, ("gnorm_vecs", gnorm_vecs))
    device = grads[0].device if grads else torch.device("cpu")
    return torch.empty((len(grads),), dtype=torch.float32, device=device)


def increment_steps(steps: Sequence[Tensor]) -> None:
    """Adds 1 to each one-element float32 step counter, in place (one call, one launch)."""
    if steps:  # an empty list has no device to dispatch on
        torch.ops.lion.increment_steps.default(list(steps))


@torch.library.register_fake("lion::increment_steps")
def _increment_steps_fake(steps) -> None:
    for i, s in enumerate(steps):
        if s.layout != torch.strided:
            raise TypeError(f"increment_steps: steps[{i}] must be a dense (strided) tensor, got "
                            f"layout {_layout_name(s.layout)}")
        if s.dtype != torch.float32:
            raise TypeError(f"increment_steps: steps[{i}] must be float32, got "
                            f"{_dtype_name(s.dtype)}")
        if s.numel() != 1:
            raise ValueError(f"increment_steps: steps[{i}] must have one element, got shape "
                             f"{list(s.shape)}")
        if s.device != steps[0].device:
            raise ValueError(f"increment_steps: steps[{i}] is on {s.device} but steps[0] is on "
                             f"{steps[0].device}")
    _check_distinct_outputs("increment_steps", ("steps", steps))
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
    op = "quantize_blockwise"
    if blocksize <= 0:
        raise ValueError(f"{op}: blocksize must be positive, got {blocksize}")
    if input.layout != torch.strided:
        raise TypeError(f"{op}: input must be a dense (strided) tensor, got layout "
                        f"{_layout_name(input.layout)}")
    if input.dtype not in PARAM_DTYPES:
        raise TypeError(f"{op}: input must be float32, bfloat16 or float16, got "
                        f"{_dtype_name(input.dtype)}")
    _check_qmap(op, qmap, input.device)
    codes = input.new_empty(input.shape, dtype=torch.uint8)
    absmax = input.new_empty(((input.numel() + blocksize - 1) // blocksize,), dtype=torch.float32)
    return codes, absmax


def dequantize_blockwise(codes: Tensor, absmax: Tensor, qmap: Tensor,
                         blocksize: int = QUANT_BLOCK_SIZE) -> Tensor:
    """The float32 values of blockwise 8-bit state: qmap[codes] * absmax[block]."""
    return torch.ops.lion.dequantize_blockwise.default(codes, absmax, qmap, blocksize)


@torch.library.register_fake("lion::dequantize_blockwise")
def _dequantize_blockwise_fake(codes, absmax, qmap, blocksize=QUANT_BLOCK_SIZE):
    op = "dequantize_blockwise"
    if blocksize <= 0:
        raise ValueError(f"{op}: blocksize must be positive, got {blocksize}")
    if codes.layout != torch.strided or absmax.layout != torch.strided:
        raise TypeError(f"{op}: codes and absmax must be dense (strided) tensors, got layouts "
                        f"{_layout_name(codes.layout)} and {_layout_name(absmax.layout)}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"{op}: codes must be uint8, got {_dtype_name(codes.dtype)}")
    if absmax.dtype != torch.float32:
        raise TypeError(f"{op}: absmax must be float32, got {_dtype_name(absmax.dtype)}")
    blocks = (codes.numel() + blocksize - 1) // blocksize
    torch._check_value(absmax.numel() == blocks, lambda: (
        f"{op}: absmax must have {blocks} elements (one per {blocksize} codes), got "
        f"{absmax.numel()}"))
    if absmax.device != codes.device:
        raise ValueError(f"{op}: absmax must be on {codes.device}, got {absmax.device}")
    _check_qmap(op, qmap, codes.device)
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
                        f"{_layout_name(like.layout)}")
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


@torch.compiler.assume_constant_result
def paging_support(device: torch.device | str) -> int:
    """What paging `device` supports: PAGING_NONE (the CPU, or a GPU without managed memory),
    PAGING_WITHOUT_PREFETCH (managed memory without concurrent managed access: the driver
    migrates pages around kernel launches itself) or PAGING_WITH_PREFETCH.

    It asks the CUDA driver. In a compiled region (torch.compile, torch.export) the answer is
    taken when the region is traced, as a constant: it cannot change for a device.
    """
    return int(torch.ops.lion.paging_support.default(torch.device(device)))
