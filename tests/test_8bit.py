"""8-bit optimizer state: the dynamic map, blockwise quantization, the 8-bit update operators
(blockwise and static) against an fp64 reference of the same decode/update/encode, and
Lion8bit / optim_bits=8 as an optimizer (state layout, checkpoints, compile, export)."""

import copy
import io

import pytest
import torch
from torch.library import opcheck

import lion_ops
from lion_ops import Lion, Lion8bit
from lion_ops.quantization import dynamic_map
from op_args import as_op_args
from resources import free_memory_bytes
from scalar_loops import put_special_values, raw_bits, run_with_scalar_loops

QMAP = dynamic_map()
SIZES = [1, 255, 256, 257, 4097, 65 * 129, 100_003]


# ---- an independent reference, in float64 ---------------------------------------------------

def reference_encode(x, qmap):
    """Nearest map entry (ties to the larger), then one step toward x's sign if the entry's
    sign bit differs from x's. x: float64 values already divided by their scale."""
    q = qmap.double()
    hi = torch.searchsorted(q, x, right=True).clamp(1, 255)
    lo = hi - 1
    code = torch.where((x - q[lo]) < (q[hi] - x), lo, hi)
    code = torch.where(x <= q[0], torch.zeros_like(code), code)
    wrong_sign = torch.signbit(q[code]) != torch.signbit(x)
    return code + torch.where(wrong_sign, torch.where(x > 0, 1, -1), 0)


def near_tie(x, qmap, tolerance=None):
    """Elements whose normalized value sits within `tolerance` (default: fp32 rounding of x)
    of a midpoint between two map entries, where fp32 and fp64 may honestly round apart."""
    q = qmap.double()
    mids = (q[1:] + q[:-1]) / 2
    idx = torch.searchsorted(mids, x).clamp(0, 254)
    nearest = torch.minimum((x - mids[idx]).abs(), (x - mids[(idx - 1).clamp(min=0)]).abs())
    if tolerance is None:
        tolerance = 4 * 2**-24 * x.abs()
    return nearest <= tolerance


def reference_8bit_step(p, g, codes, scales, lr, beta1, beta2, wd, blockwise):
    """One 8-bit Lion step in float64. Returns (p, m_new, new_scales, codes)."""
    q = QMAP.double()
    n = p.numel()
    flat_codes = codes.reshape(-1).long()
    if blockwise:
        per_element = scales.double().repeat_interleave(256)[:n]
    else:
        per_element = scales.double().expand(n)
    m = q[flat_codes] * per_element
    p64 = p.double().reshape(-1) * (1 - lr * wd)
    g64 = g.double().reshape(-1)
    c = beta1 * m + (1 - beta1) * g64
    p64 = p64 - lr * torch.sign(c)
    m = beta2 * m + (1 - beta2) * g64
    if blockwise:
        padded = torch.nn.functional.pad(m.abs(), (0, (-n) % 256))
        new_scales = padded.reshape(-1, 256).amax(dim=1)
        per_element = new_scales.repeat_interleave(256)[:n]
    else:
        new_scales = m.abs().amax().reshape(1) if n else torch.zeros(1, dtype=torch.float64)
        per_element = new_scales.expand(n)
    x = torch.where(per_element > 0, m / per_element, torch.zeros_like(m))
    return p64.reshape(p.shape), m, new_scales, reference_encode(x, QMAP).reshape(p.shape), x, c


# ---- the map and blockwise quantization ------------------------------------------------------

def test_dynamic_map_values():
    assert QMAP.shape == (256,) and QMAP.dtype == torch.float32
    assert torch.all(QMAP[1:] > QMAP[:-1])
    assert QMAP[127] == 0 and QMAP[255] == 1.0
    assert QMAP[0].item() == pytest.approx(-0.99296875, abs=1e-7)
    assert not (QMAP == -1.0).any()
    assert QMAP.abs()[QMAP != 0].min().item() == pytest.approx(5.5e-7, rel=1e-6)
    torch.testing.assert_close(QMAP[1:127], -QMAP[128:254].flip(0))  # symmetric but for 1.0


def test_dynamic_map_equals_bitsandbytes():
    functional = pytest.importorskip("bitsandbytes.functional")
    assert torch.equal(QMAP, functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_quantize_blockwise_matches_reference(device, dtype, blocksize):
    x = torch.randn(3 * blocksize + 17, dtype=dtype, device=device) * 3
    x[blocksize:2 * blocksize] = 0  # an all-zero block: absmax 0, codes of 0.0
    qmap = QMAP.to(device)
    codes, absmax = lion_ops.ops.quantize_blockwise(x, qmap, blocksize)
    x64 = x.double().cpu()
    scale = torch.nn.functional.pad(x64.abs(), (0, (-x64.numel()) % blocksize)).reshape(
        -1, blocksize).amax(1)
    assert torch.equal(absmax.cpu(), scale.float())
    per = scale.repeat_interleave(blocksize)[: x64.numel()]
    normalized = torch.where(per > 0, x64 / per, torch.zeros_like(x64))
    expected = reference_encode(normalized, QMAP)
    differ = codes.cpu().long() != expected
    assert not (differ & ~near_tie(normalized, QMAP)).any()
    assert (codes[blocksize:2 * blocksize] == 127).all()
    values = lion_ops.ops.dequantize_blockwise(codes, absmax, qmap, blocksize)
    assert torch.equal(values.cpu(), (QMAP[codes.cpu().long()] * per.float()))


def test_quantization_never_flips_the_sign():
    # Tiny values are nearest to 0.0 (+0.0): positive ones may stay there (same sign bit), a
    # negative one moves to the smallest negative entry, as in bitsandbytes' CUDA kernels.
    x = torch.tensor([1e-9, -1e-9, 1.0, -3e-8, 0.0, 2.0])
    codes, absmax = lion_ops.ops.quantize_blockwise(x, QMAP)
    values = QMAP[codes.long()]
    assert (torch.sign(values) * torch.sign(x) >= 0).all()
    assert codes.tolist() == [127, 126, 191, 126, 127, 255] or codes[1] == 126
    assert values[4] == 0 and values[5] == 1.0


def _other_sorted_maps():
    """Sorted maps unlike the dynamic one: several midpoints per table bucket, a midpoint of
    exactly 0.0, midpoints below 2^-24 and above 2 (where the compact encode table merges
    buckets), so the encoders' general paths run."""
    linear = torch.linspace(-1, 1, 256)
    tiny = torch.logspace(-14, -7, 40, dtype=torch.float64).float()
    clustered = torch.cat([torch.linspace(-1, 1, 175), tiny, -tiny, torch.zeros(1)]).sort().values
    wide = torch.linspace(-3, 3, 256)
    # Maps where most buckets of the folded compact table fold and some do not (the scalar
    # encoder's two paths in one call): four dynamic-map entries squeezed into one bucket, and
    # 255 evenly spaced entries plus 3.5 (midpoints of 2 and more in the merged top bucket).
    squeezed = QMAP.clone()
    squeezed[230:234] = 0.6555 + torch.arange(4) * 1e-4
    wide_odd = torch.cat([torch.linspace(-3, 3, 255), torch.tensor([3.5])])
    # One midpoint (2.24) in the merged bucket of magnitudes of 2 and more: it cannot fold.
    top_past_2 = QMAP.clone()
    top_past_2[255] = 3.5
    return {"linear": linear, "clustered": clustered, "wide": wide, "squeezed": squeezed,
            "wide odd": wide_odd, "top past 2": top_past_2}


@pytest.mark.parametrize("name", ["linear", "clustered", "wide", "squeezed", "wide odd",
                                  "top past 2"])
def test_quantize_blockwise_other_sorted_maps(device, name):
    qmap = _other_sorted_maps()[name]
    assert qmap.numel() == 256 and (qmap[1:] >= qmap[:-1]).all()
    torch.manual_seed(1)
    x = torch.randn(40 * 256 + 3) * torch.logspace(-12, 0, 40 * 256 + 3)
    x[::7] = 0.0
    x[1::7] = -0.0
    x[2::11] *= 1e-30
    x[:256] = qmap[torch.randperm(256)]  # entries themselves, and their midpoints' neighbours
    x[256:511] = ((qmap[1:] + qmap[:-1]) / 2)
    x[300] = float("nan")
    x[301] = -float("nan")
    x[302] = float("inf")  # the scale is the largest finite magnitude: these are +-inf scaled
    x[303] = -float("inf")
    codes, absmax = lion_ops.ops.quantize_blockwise(x.to(device), qmap.to(device), 256)
    codes, absmax = codes.cpu().long(), absmax.cpu()
    per = absmax.double().repeat_interleave(256)[: x.numel()]
    x64 = x.double()
    normalized = torch.where(per > 0, x64 / per, torch.zeros_like(x64) * x64.sign())
    expected = reference_encode(normalized, qmap)
    nan = torch.isnan(x)
    checked = ~nan & ~near_tie(normalized, qmap)
    assert checked.sum() > 0.6 * x.numel()
    differ = (codes != expected) & checked
    assert not differ.any(), (x[differ][:5].tolist(), codes[differ][:5].tolist(),
                              expected[differ][:5].tolist())
    # NaN keeps the 16-bit table's order: a positive NaN sorts above every midpoint, a
    # negative one below. A GPU's multiply returns its canonical (positive) NaN whatever the
    # input's sign, so there the negative input reaches the encoder as a positive NaN.
    assert codes[300] == 255
    assert codes[301] == (0 if torch.device(device).type == "cpu" else 255)
    assert codes[302] == 255 and codes[303] == 0


# ---- the 8-bit update operators ---------------------------------------------------------------

def _state(sizes, dtype, device, blockwise):
    params = [torch.randn(n, dtype=dtype, device=device) for n in sizes]
    grads = [torch.randn_like(p) for p in params]
    codes, scales = [], []
    for p in params:
        m = torch.randn(p.shape, device=device) * 0.05
        m[: min(300, p.numel()) // 2] = 0  # includes an all-zero block for small sizes
        if blockwise:
            c, s = lion_ops.ops.quantize_blockwise(m, QMAP.to(device))
        else:
            s = m.abs().amax().reshape(1)
            c, _ = lion_ops.ops.quantize_blockwise(m / s.clamp(min=1e-30), QMAP.to(device),
                                                    max(p.numel(), 1))
        codes.append(c)
        scales.append(s.clone())
    return params, grads, codes, scales


def _run(blockwise, params, grads, codes, scales, lr, beta1, beta2, wd):
    qmap = QMAP.to(params[0].device)
    if blockwise:
        lion_ops.ops.lion_update_8bit_blockwise(params, grads, codes, scales, qmap, lr, beta1,
                                                beta2, wd)
        return None
    new_scales = [torch.full_like(s, -7.0) for s in scales]  # poisoned scratch
    lion_ops.ops.lion_update_8bit_static(params, grads, codes, scales, new_scales, qmap, lr,
                                         beta1, beta2, wd)
    return new_scales


@pytest.mark.parametrize("blockwise", [True, False], ids=["blockwise", "static"])
def test_8bit_update_matches_fp64_reference(device, dtype, blockwise):
    lr, beta1, beta2, wd = 1e-2, 0.9, 0.99, 0.1
    params, grads, codes, scales = _state(SIZES, dtype, device, blockwise)
    before = [(p.clone(), c.clone(), s.clone()) for p, c, s in zip(params, codes, scales)]
    new_scales = _run(blockwise, params, grads, codes, scales, torch.tensor(lr), beta1, beta2, wd)
    for i, ((p0, c0, s0), g) in enumerate(zip(before, grads)):
        p_ref, m_ref, s_ref, c_ref, x_ref, c_dir = reference_8bit_step(
            p0.cpu(), g.cpu(), c0.cpu(), s0.cpu(), lr, beta1, beta2, wd, blockwise)
        # fp32 rounding of m = b2*m + (1-b2)*g is relative to its terms, not to m (they can cancel).
        term_bound = s0.abs().max().item() + (1 - beta2) * g.abs().max().item()
        torch.testing.assert_close(scales[i].cpu().double(), s_ref, rtol=1e-6,
                                   atol=4 * 2**-24 * term_bound, msg=f"scales[{i}]")
        if new_scales is not None:
            assert torch.equal(new_scales[i], scales[i])
        # x = m / scale in fp32 is off by the rounding of m's terms (which can cancel).
        n = p0.numel()
        old_m = QMAP.double()[c0.cpu().reshape(-1).long()] * (
            s0.cpu().double().repeat_interleave(256)[:n] if blockwise else s0.cpu().double())
        new_scale = s_ref.repeat_interleave(256)[:n] if blockwise else s_ref.expand(n)
        g64 = g.cpu().double().reshape(-1).abs()
        terms = beta2 * old_m.abs() + (1 - beta2) * g64
        # The kernels compute 1 - beta2 in fp32 from an fp32 beta2: off by up to ~1e-6.
        one_minus_beta2_error = abs((1 - torch.tensor(beta2).item()) - (1 - beta2))
        tolerance = (4 * 2**-24 * (x_ref.abs() + terms / new_scale.clamp(min=1e-30))
                     + 2 * one_minus_beta2_error * g64 / new_scale.clamp(min=1e-30))
        differ = (codes[i].cpu().long() != c_ref).reshape(-1)
        assert not (differ & ~near_tie(x_ref, QMAP, tolerance)).any(), f"codes[{i}]"
        assert differ.float().mean() < 1e-3
        decided = c_dir.abs() > 1e-5 * (c_dir.abs() + (1 - beta1) * g.cpu().double().abs().reshape(-1))
        info = torch.finfo(dtype)
        got = params[i].cpu().double().reshape(-1)
        torch.testing.assert_close(got[decided], p_ref.reshape(-1)[decided],
                                   rtol=info.eps * 2, atol=max(lr * 1.2e-7, info.tiny * info.eps),
                                   msg=f"params[{i}]")


@pytest.mark.parametrize("block_wise", [True, False])
def test_a_block_of_only_infinite_momenta_keeps_their_signs(device, dtype, block_wise):
    """Infinite gradients on zero momentum make a block (static: a tensor) whose momenta are
    all infinite: its scale, the largest finite magnitude, is 0, and each momentum is stored
    as its own sign's extreme code. The CPU's AVX2 encoder turned m * (1 / 0 -> 0) = NaN into
    code 0 for all of them, flipping the positive ones (found by the CUDA emulation)."""
    n = 1024
    signs = torch.where(torch.rand(n) < 0.5, 1.0, -1.0)
    p = torch.randn(n, device=device).to(dtype)
    g = (signs * float("inf")).to(device=device, dtype=dtype)
    codes = torch.full((n,), 127, dtype=torch.uint8, device=device)  # zero momentum
    if block_wise:
        scales = [torch.rand(4, device=device)]
        step = lion_ops.ops.lion_update_8bit_blockwise
        g[256:] = torch.randn(n - 256, device=device).to(dtype)  # only block 0 is all infinite
        args = ([p], [g], [codes], scales)
    else:
        scales = [torch.rand(1, device=device)]
        step = lion_ops.ops.lion_update_8bit_static
        args = ([p], [g], [codes], scales, [torch.zeros(1, device=device)])
    step(*args, QMAP.to(device), torch.tensor(0.01), 0.9, 0.99, 0.0)
    expected = torch.where(signs > 0, 255, 0).to(torch.uint8)
    covered = slice(0, 256) if block_wise else slice(0, n)
    assert torch.equal(codes[covered].cpu(), expected[covered])
    assert float(scales[0][0]) == 0.0


_SCALAR_PATH_SCRIPT = """
import sys, torch, lion_ops
from lion_ops.quantization import dynamic_map
inputs = torch.load(sys.argv[1])
q = dynamic_map()
lr, b1, b2, wd = inputs["hyperparameters"]
lion_ops.ops.lion_update_8bit_blockwise(*inputs["blockwise"], q, torch.tensor(lr), b1, b2, wd)
lion_ops.ops.lion_update_8bit_static(*inputs["static"], q, torch.tensor(lr), b1, b2, wd)
torch.save(inputs, sys.argv[1])
"""


def test_8bit_vectorized_cpu_path_equals_scalar_path(tmp_path, dtype):
    """The AVX2 loops (where the CPU has AVX2) and the scalar loops give identical bits, for
    every param dtype (the AVX2 loops convert bfloat16 and float16 themselves)."""
    # The large tensor makes rounding ties of the 16-bit conversions (1 in 2^16 results) occur.
    sizes = SIZES + [(1 << 21) + 3]
    params, grads, codes, scales = _state(sizes, dtype, "cpu", True)
    sparams, sgrads, scodes, sscales = _state(sizes, dtype, "cpu", False)
    put_special_values(params, grads)
    put_special_values(sparams, sgrads)
    # A decay of 0.7 gives fp32 results with evenly spread low bits, so that the 16-bit
    # roundings meet ties (with a decay near 1 the low bits are nearly all ones).
    lr, b1, b2, wd = 0.3, 0.9, 0.99, 1.0
    inputs = {"blockwise": [params, grads, codes, scales],
              "static": [sparams, sgrads, scodes, sscales, [s.clone() for s in sscales]],
              "hyperparameters": (lr, b1, b2, wd)}
    scalar = run_with_scalar_loops(tmp_path, _SCALAR_PATH_SCRIPT, inputs)
    lion_ops.ops.lion_update_8bit_blockwise(params, grads, codes, scales, QMAP,
                                            torch.tensor(lr), b1, b2, wd)
    lion_ops.ops.lion_update_8bit_static(*inputs["static"], QMAP, torch.tensor(lr), b1, b2, wd)
    for kind in ("blockwise", "static"):
        for ours, theirs in zip(inputs[kind], scalar[kind]):
            for a, b in zip(ours, theirs):
                assert torch.equal(raw_bits(a), raw_bits(b)), kind
    assert any(torch.isnan(p).any() for p in params)  # the special values went through


_SCALAR_ENCODE_SCRIPT = """
import sys, torch, lion_ops
from lion_ops.quantization import dynamic_map
x = torch.load(sys.argv[1])
torch.save(lion_ops.ops.quantize_blockwise(x, dynamic_map(), 256)[0], sys.argv[1])
"""


def _encoder_edge_cases():
    """Normalized values where an encoder can go wrong, each block led by a 1.0 (its absmax,
    so the rest are encoded as they are): every midpoint and its float neighbours, +-0,
    denormals, NaN, values around every table bucket's first key, and random ones."""
    mids = ((QMAP[:-1].double() + QMAP[1:].double()) / 2).float()
    mids = torch.cat([mids, (QMAP[:-1] + QMAP[1:]) * 0.5])
    near = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)),
                      torch.nextafter(mids, torch.tensor(-2.0))])
    buckets = torch.arange(1 << 16, dtype=torch.int64) << 16  # keys at the buckets' starts
    keys = torch.cat([buckets, buckets - 1, buckets + 1]).clamp(0, 2**32 - 1)
    bits = torch.where(keys >= 2**31, keys - 2**31, ~keys & 0xFFFFFFFF)
    at_buckets = torch.tensor(bits.to(torch.int64).tolist(), dtype=torch.int64).to(torch.int32)
    at_buckets = at_buckets.view(torch.float32)
    at_buckets = at_buckets[at_buckets.abs() <= 1]  # |x| <= 1: the block's max is 1.0
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40, 1e-30, -1e-30, 1.0, -1.0,
                            float("nan"), -float("nan")])
    values = torch.cat([near, at_buckets, special, torch.rand(100_000) * 2 - 1])
    blocks = -(-values.numel() // 255)
    rest = torch.zeros(blocks * 255)
    rest[: values.numel()] = values
    x = torch.cat([torch.ones(blocks, 1), rest.view(blocks, 255)], dim=1)
    return x.reshape(-1)


def test_vectorized_encoder_equals_scalar_on_edge_cases(tmp_path):
    """The AVX2 encoder (one lookup in a folded table, the sign from the code) gives the scalar
    encoder's codes (lion_math.h, as on CUDA) on every bucket boundary, midpoint, tie and
    special value. (On a CPU without AVX2 both runs take the scalar path.)"""
    x = _encoder_edge_cases()
    scalar = run_with_scalar_loops(tmp_path, _SCALAR_ENCODE_SCRIPT, x)
    vectorized = lion_ops.ops.quantize_blockwise(x, QMAP, 256)[0]
    assert x.numel() > 190_000
    mismatch = (vectorized != scalar).nonzero().flatten()
    assert mismatch.numel() == 0, (x[mismatch[:5]].tolist(), vectorized[mismatch[:5]].tolist(),
                                   scalar[mismatch[:5]].tolist())
    # And the codes are the nearest entries with the sign rule, checked independently (away
    # from midpoints, where the kernels' fp32 midpoint and the exact one may round apart).
    x64 = x.double()
    checked = ~torch.isnan(x) & ~near_tie(x64, QMAP)
    assert checked.sum() > 150_000
    assert torch.equal(vectorized[checked].long(), reference_encode(x64[checked], QMAP))


@pytest.mark.parametrize("blockwise", [True, False], ids=["blockwise", "static"])
def test_8bit_more_than_2_pow_31_elements(device, blockwise):
    """Element counts past 2^31 (bitsandbytes passes them as 32-bit ints): from zero state, one
    step with g = -1 except the last 5 elements (+1) gives p = 1.25 and code 0 (-0.99296875)
    everywhere but there (p = 0.75, code 255 = 1.0), in the last, ragged block too."""
    n = 2**31 + 300  # 2^31 / 256 whole blocks, one more, and a 44-element tail
    needed = n * (2 + 2 + 1) + n // 256 * 4 + n  # bf16 p and g, codes, absmax, a bool check
    if free_memory_bytes(device) < needed + (2 << 30):
        pytest.skip(f"needs about {needed / 2**30:.0f} GiB of free memory on {device}")
    p = torch.ones(n, dtype=torch.bfloat16, device=device)
    g = torch.full((n,), -1.0, dtype=torch.bfloat16, device=device)
    g[-5:] = 1.0
    codes = torch.full((n,), 127, dtype=torch.uint8, device=device)  # zero momentum
    blocks = -(-n // 256)
    qmap = QMAP.to(device)
    lr = torch.tensor(0.25)
    if blockwise:
        absmax = torch.zeros(blocks, device=device)
        lion_ops.ops.lion_update_8bit_blockwise([p], [g], [codes], [absmax], qmap, lr, 0.9, 0.99,
                                                0.0)
        scale = absmax
    else:
        max1, new_max1 = torch.zeros(1, device=device), torch.zeros(1, device=device)
        lion_ops.ops.lion_update_8bit_static([p], [g], [codes], [max1], [new_max1], qmap, lr, 0.9,
                                             0.99, 0.0)
        scale = max1
    m = 1 - torch.tensor(0.99)  # |m| after one step: 1 - beta2, rounded as the kernels do
    assert torch.equal(scale.cpu(), m.expand(scale.numel()))
    assert torch.equal(p[-5:].cpu(), torch.full((5,), 0.75, dtype=torch.bfloat16))
    assert torch.equal(codes[-5:].cpu(), torch.full((5,), 255, dtype=torch.uint8))
    assert torch.equal(p[-300:-5].cpu(), torch.full((295,), 1.25, dtype=torch.bfloat16))
    assert torch.equal(codes[-300:-5].cpu(), torch.zeros(295, dtype=torch.uint8))
    assert bool((p[:-5] == 1.25).all()) and bool((codes[:-5] == 0).all())
    del p, g, codes, scale
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.cuda
@pytest.mark.parametrize("blockwise", [True, False], ids=["blockwise", "static"])
def test_8bit_cuda_matches_cpu_bit_for_bit(dtype, blockwise):
    cpu = _state(SIZES, dtype, "cpu", blockwise)
    cuda = [[t.cuda() for t in ts] for ts in cpu]
    _run(blockwise, *cpu, torch.tensor(1e-3), 0.9, 0.99, 0.05)
    _run(blockwise, *cuda, torch.tensor(1e-3, device="cuda"), 0.9, 0.99, 0.05)
    for a_list, b_list in zip(cpu, cuda):
        for a, b in zip(a_list, b_list):
            assert torch.equal(a, b.cpu())


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_blocks_follow_the_logical_order_whatever_the_layouts(device, layout):
    """Blockwise state takes its 256-element blocks in the tensors' logical (row-major) order,
    as quantize_blockwise and dequantize_blockwise do, whatever the layouts of the param, its
    codes and its grad (the codes once took memory-order blocks when they shared the param's
    strides, so dequantize_blockwise of what an update wrote was another momentum)."""
    torch.manual_seed(0)
    shape = (4, 16, 6, 6) if layout == "channels_last" else (48, 40)
    # Magnitudes varying along the last dim: memory-order blocks would get other scales.
    spread = torch.logspace(-3, 0, shape[-1], device=device)
    p0, g0 = torch.randn(shape, device=device), torch.randn(shape, device=device) * spread
    codes0, absmax0 = lion_ops.ops.quantize_blockwise(
        torch.randn(shape, device=device) * spread * 0.05, QMAP.to(device))

    def relaid(t):
        if layout == "channels_last":
            return t.contiguous(memory_format=torch.channels_last)
        return t.t().contiguous().t()

    results = []
    for p_layout, codes_layout, g_layout in [(False, False, False), (True, True, True),
                                             (True, True, False), (True, False, True),
                                             (False, True, False)]:
        q = relaid(p0) if p_layout else p0.clone()
        c = relaid(codes0) if codes_layout else codes0.clone()
        g = relaid(g0) if g_layout else g0.clone()
        assert q.is_contiguous() != p_layout and c.is_contiguous() != codes_layout
        a = absmax0.clone()
        lion_ops.ops.lion_update_8bit_blockwise([q], [g], [c], [a], QMAP.to(device),
                                                torch.tensor(1e-2), 0.9, 0.99, 0.1)
        results.append((q, c, a))
    for q, c, a in results[1:]:
        for x, y in zip((q, c, a), results[0]):
            assert torch.equal(x, y)
    # What the codes hold is the new momentum, block by block in logical order.
    m0 = lion_ops.ops.dequantize_blockwise(codes0, absmax0, QMAP.to(device))
    expected = 0.99 * m0.double() + 0.01 * g0.double()
    _, c, a = results[1]
    stored = lion_ops.ops.dequantize_blockwise(c, a, QMAP.to(device)).double()
    blocks = expected.reshape(-1)
    scale = torch.nn.functional.pad(blocks, (0, -blocks.numel() % 256)).reshape(-1, 256) \
        .abs().amax(1).repeat_interleave(256)[:blocks.numel()].reshape(shape)
    assert ((stored - expected).abs() <= 0.02 * scale + 1e-7).all()


def test_static_scales_of_an_empty_param_are_zeroed(device):
    """The new scale of an empty param is the max over no elements, 0, on every device (the
    CUDA launches skip empty tensors, so the host zeroes them)."""
    params = [torch.randn(0, device=device), torch.randn(300, device=device)]
    grads = [torch.randn_like(p) for p in params]
    codes = [torch.full(p.shape, 140, dtype=torch.uint8, device=device) for p in params]
    max1s = [torch.full((1,), 5.0, device=device) for _ in params]
    new_max1s = [torch.full((1,), 7.0, device=device) for _ in params]
    lion_ops.ops.lion_update_8bit_static(params, grads, codes, max1s, new_max1s,
                                         QMAP.to(device), torch.tensor(1e-3), 0.9, 0.99, 0.0)
    assert float(max1s[0]) == 0.0 and float(new_max1s[0]) == 0.0
    assert float(max1s[1]) > 0 and float(max1s[1]) == float(new_max1s[1])


def _opcheck_samples(dtype, device):
    qmap = QMAP.to(device)
    params, grads, codes, scales = _state([300, 5], dtype, device, True)
    yield torch.ops.lion.lion_update_8bit_blockwise.default, (
        params, grads, codes, scales, qmap, torch.tensor(1e-3), 0.9, 0.99, 0.1)
    params, grads, codes, scales = _state([300, 5], dtype, device, False)
    yield torch.ops.lion.lion_update_8bit_static.default, (
        params, grads, codes, scales, [s.clone() for s in scales], qmap,
        torch.tensor(1e-3, device=device), 0.9, 0.99, 0.0)
    x = torch.randn(700, dtype=dtype, device=device)
    yield torch.ops.lion.quantize_blockwise.default, (x, qmap, 256)
    c, a = lion_ops.ops.quantize_blockwise(x, qmap, 64)
    yield torch.ops.lion.dequantize_blockwise.default, (c, a, qmap, 64)


def test_opcheck_8bit_operators(device, dtype):
    for op, args in _opcheck_samples(dtype, device):
        opcheck(op, as_op_args(args))


_BAD_8BIT_INPUT = {
    "absmax length": r"absmaxes\[0\] must be a contiguous 1-D tensor of 4",
    # Strided views (every other element of a buffer, holding the right values): the kernels
    # read absmax, qmap and grad_scales through their data pointers, and write absmax, so a
    # view would be read, and written, as the buffer's first elements.
    "absmax strided": r"absmaxes\[0\] must be a contiguous 1-D tensor of 4",
    "codes dtype": r"codes\[0\] must be uint8, got",
    "qmap shape": "qmap must be a contiguous 1-D tensor of 256",
    "qmap strided": "qmap must be a contiguous 1-D tensor of 256",
    # (the encoder searches the map as sorted: the codes would not be the nearest entries)
    "qmap unsorted": r"qmap must be sorted ascending, but qmap\[127\] = 0.5 > qmap\[128\]",
    "static qmap unsorted": r"qmap must be sorted ascending, but qmap\[127\] = 0.5",
    "grad_scales strided": "grad_scales must be a contiguous 1-D tensor with one scale per param",
    "max1 size": r"max1s\[0\] must have exactly one element",
    "static qmap strided": "qmap must be a contiguous 1-D tensor of 256",
    "static grad_scales strided": "grad_scales must be a contiguous 1-D tensor with one scale",
}


@pytest.mark.parametrize("case", list(_BAD_8BIT_INPUT))
def test_bad_8bit_input_is_refused_and_nothing_changes(case):
    blockwise = case != "max1 size" and not case.startswith("static")
    params, grads, codes, scales = _state([1000, 300], torch.float32, "cpu", blockwise)
    new_scales = [torch.full_like(s, -7.0) for s in scales]  # the static op's scratch
    qmap, grad_scales = QMAP, None
    if case == "absmax length":
        scales[0] = scales[0][:-1]
    elif case == "absmax strided":
        scales[0] = torch.stack([scales[0], torch.full_like(scales[0], 9.0)], 1)[:, 0]
    elif case == "codes dtype":
        codes[0] = codes[0].to(torch.int8)
    elif case == "qmap shape":
        qmap = QMAP[:128]
    elif case.endswith("qmap strided"):
        qmap = torch.stack([QMAP, -QMAP], 1)[:, 0]
    elif case.endswith("qmap unsorted"):
        qmap = QMAP.clone()
        qmap[127] = 0.5
    elif case.endswith("grad_scales strided"):
        grad_scales = torch.tensor([0.5, 7.0, 0.5, 7.0])[::2]
    elif case == "max1 size":
        scales[0] = torch.zeros(2)
    if case.endswith("strided"):  # the right shape and values: only the layout is wrong
        view = {"absmax": scales[0], "qmap": qmap, "grad_scales": grad_scales}[case.split()[-2]]
        assert view.dim() == 1 and not view.is_contiguous()
    written = params + codes + scales + ([] if blockwise else new_scales)
    snapshot = [t.clone() for t in written]
    with pytest.raises((ValueError, TypeError), match=_BAD_8BIT_INPUT[case]):
        if blockwise:
            lion_ops.ops.lion_update_8bit_blockwise(params, grads, codes, scales, qmap,
                                                    torch.tensor(0.1), 0.9, 0.99, 0.0,
                                                    grad_scales)
        else:
            lion_ops.ops.lion_update_8bit_static(params, grads, codes, scales, new_scales, qmap,
                                                 torch.tensor(0.1), 0.9, 0.99, 0.0, grad_scales)
    for t, s in zip(written, snapshot):
        assert torch.equal(t, s)


def test_dequantize_blockwise_refuses_an_absmax_of_the_wrong_length(device):
    # 512 codes are two blocks: one absmax would read past its end, three leave one unused.
    codes = torch.full((512,), 200, dtype=torch.uint8, device=device)
    for wrong in (1, 3):
        with pytest.raises(ValueError, match=f"absmax must have 2 elements .*got {wrong}"):
            lion_ops.ops.dequantize_blockwise(codes, torch.ones(wrong, device=device),
                                              QMAP.to(device))


@pytest.mark.parametrize("name, qmap", [("unsigned", torch.linspace(0, 1, 256)),
                                         ("nonpositive", torch.linspace(-1, -1e-3, 256))])
def test_the_sign_rule_never_steps_past_the_ends_of_the_map(device, name, qmap):
    """A value whose nearest entry has the other sign moves one code toward its own sign,
    except past the first or last entry: with no negative entries a negative value stayed
    at code 0 only by wrapping... to 255, the largest entry."""
    x = torch.tensor([-0.5, -1e-3, -0.0, 0.0, 1e-3, 0.5] * 50, device=device)
    codes, absmax = lion_ops.ops.quantize_blockwise(x, qmap.to(device))
    values = qmap.to(device)[codes.long()] * absmax.repeat_interleave(256)[:x.numel()]
    nearest = (x[:, None] / absmax.repeat_interleave(256)[:x.numel(), None]
               - qmap.to(device)[None]).abs().argmin(1)
    if name == "unsigned":  # negatives at the lowest entry, 0
        assert (codes[x < 0] == 0).all() and (values[x < 0] == 0).all()
    else:  # positives at the highest entry
        assert (codes[x > 0] == 255).all()
    assert ((codes.long() - nearest).abs() <= 1).all()


def test_a_block_scale_below_2_pow_minus_128_keeps_its_zeros_and_signs(device):
    """1 / scale overflows below 2^-128: zero momenta became 0 * inf = NaN, encoded as -1, so
    a param with a zero gradient moved by lr every step in blocks that had decayed that far."""
    m = torch.zeros(512, device=device)
    m[3], m[7], m[300] = 2e-39, -1e-39, 5e-40
    qmap = QMAP.to(device)
    codes, absmax = lion_ops.ops.quantize_blockwise(m, qmap)
    assert float(absmax[0]) == pytest.approx(2e-39) and float(absmax[1]) == pytest.approx(5e-40)
    decoded = lion_ops.ops.dequantize_blockwise(codes, absmax, qmap)
    zeros = m == 0
    assert (decoded[zeros] == 0).all() and (decoded[zeros].sign() == 0).all()
    assert (decoded[~zeros].sign() == m[~zeros].sign()).all()
    assert ((decoded - m).abs() <= absmax.repeat_interleave(256)).all()
    # An update with zero gradients leaves the params of zero momentum where they are.
    p, g = torch.randn(512, device=device), torch.zeros(512, device=device)
    before = p.clone()
    lion_ops.ops.lion_update_8bit_blockwise([p], [g], [codes], [absmax], qmap,
                                            torch.tensor(1e-2), 0.9, 0.99, 0.0)
    assert torch.equal(p[zeros], before[zeros])
    assert torch.equal(p[~zeros], before[~zeros] - 1e-2 * m[~zeros].sign())


def test_quantization_refuses_an_unsorted_map_on_the_cpu():
    x = torch.randn(1000)
    for bad in (QMAP.flip(0), QMAP[torch.randperm(256)]):
        with pytest.raises(ValueError, match="quantize_blockwise: qmap must be sorted ascending"):
            lion_ops.ops.quantize_blockwise(x, bad)
    # A NaN entry compares false both ways: such a map keeps its defined encoding.
    with_nan = QMAP.clone()
    with_nan[200] = float("nan")
    codes, _ = lion_ops.ops.quantize_blockwise(x, with_nan)
    assert codes.shape == x.shape


@pytest.mark.parametrize("case, message", [
    ("quantize float64", r"quantize_blockwise: input must be float32, bfloat16 or float16, got "
                         r"float64"),
    ("quantize int32", "quantize_blockwise: input must be float32, bfloat16 or float16"),
    ("dequantize float codes", "dequantize_blockwise: codes must be uint8, got float32"),
    ("dequantize absmax dtype", "dequantize_blockwise: absmax must be float32, got float16"),
    ("dequantize absmax length", r"dequantize_blockwise: absmax must have 2 elements \(one per "
                                 r"256 codes\), got 5"),
])
def test_quantization_fakes_refuse_what_the_kernels_refuse(case, message):
    """As the update operators' fakes: a bad call fails where it is traced (meta tensors run
    the fakes), with the kernel's message (the CPU runs the kernel)."""
    for device in ("meta", "cpu"):
        qmap = QMAP.to(device)
        codes = torch.zeros(300, dtype=torch.uint8, device=device)
        absmax = torch.ones(2, device=device)
        call = {
            "quantize float64": lambda: lion_ops.ops.quantize_blockwise(
                torch.randn(300, dtype=torch.float64, device=device), qmap),
            "quantize int32": lambda: lion_ops.ops.quantize_blockwise(
                torch.ones(300, dtype=torch.int32, device=device), qmap),
            "dequantize float codes": lambda: lion_ops.ops.dequantize_blockwise(
                codes.float(), absmax, qmap),
            "dequantize absmax dtype": lambda: lion_ops.ops.dequantize_blockwise(
                codes, absmax.half(), qmap),
            "dequantize absmax length": lambda: lion_ops.ops.dequantize_blockwise(
                codes, torch.ones(5, device=device), qmap),
        }[case]
        with pytest.raises((ValueError, TypeError), match=message):
            call()
        assert lion_ops.ops.dequantize_blockwise(codes, absmax, qmap).shape == (300,)


@pytest.mark.parametrize("case", ["absmax length", "absmax dtype", "codes shape", "qmap shape",
                                  "max1 size", "grad_scales length", "absmax 2-d"])
def test_8bit_fakes_refuse_what_the_kernels_refuse(case):
    """On meta tensors the operators run their fakes (register_fake serves the Meta key): the
    code torch.compile and torch.export trace with. They must refuse what the kernels refuse,
    so that a bad call fails where it is traced, not later when the graph runs."""
    meta = torch.device("meta")
    params = [torch.randn(1000, device=meta), torch.randn(300, device=meta)]
    grads = [torch.randn_like(p) for p in params]
    codes = [torch.zeros(p.shape, dtype=torch.uint8, device=meta) for p in params]
    absmaxes = [torch.zeros(4, device=meta), torch.zeros(2, device=meta)]
    max1s = [torch.zeros(1, device=meta) for _ in params]
    qmap, grad_scales = QMAP.to(meta), None
    lr = torch.tensor(0.1)
    message = {"absmax length": r"absmaxes\[1\] must be a contiguous 1-D tensor of 2 elements",
               "absmax dtype": r"absmaxes\[0\] must be float32, got float16",
               "codes shape": r"codes\[1\] has shape \[299\] but params\[1\] has shape \[300\]",
               "qmap shape": r"qmap must be a contiguous 1-D tensor of 256 values, got shape "
                             r"\[255\]",
               "max1 size": r"max1s\[0\] must have exactly one element, got shape \[2\]",
               "grad_scales length": r"grad_scales must be a contiguous 1-D tensor with one "
                                     r"scale per param \(2\), got shape \[3\]",
               "absmax 2-d": r"absmaxes\[0\] must be a contiguous 1-D tensor of 4 elements"}[case]
    if case == "absmax length":
        absmaxes[1] = torch.zeros(3, device=meta)
    elif case == "absmax dtype":
        absmaxes[0] = absmaxes[0].half()
    elif case == "codes shape":
        codes[1] = codes[1][:299]
    elif case == "qmap shape":
        qmap = qmap[:255]
    elif case == "max1 size":
        max1s[0] = torch.zeros(2, device=meta)
    elif case == "absmax 2-d":
        absmaxes[0] = torch.zeros(2, 2, device=meta)
    else:
        grad_scales = torch.ones(3, device=meta)
    blockwise = case != "max1 size"
    with pytest.raises((ValueError, TypeError), match=message):
        if blockwise:
            lion_ops.ops.lion_update_8bit_blockwise(params, grads, codes, absmaxes, qmap, lr, 0.9,
                                                    0.99, 0.0, grad_scales)
        else:
            lion_ops.ops.lion_update_8bit_static(params, grads, codes, max1s,
                                                 [m.clone() for m in max1s], qmap, lr, 0.9, 0.99,
                                                 0.0, grad_scales)
    # The same calls with good arguments pass the fakes.
    good_absmaxes = [torch.zeros(4, device=meta), torch.zeros(2, device=meta)]
    good_codes = [torch.zeros(p.shape, dtype=torch.uint8, device=meta) for p in params]
    lion_ops.ops.lion_update_8bit_blockwise(params, grads, good_codes, good_absmaxes,
                                            QMAP.to(meta), lr, 0.9, 0.99, 0.0)
    good_max1s = [torch.zeros(1, device=meta) for _ in params]
    lion_ops.ops.lion_update_8bit_static(params, grads, good_codes, good_max1s,
                                         [m.clone() for m in good_max1s], QMAP.to(meta), lr, 0.9,
                                         0.99, 0.0)


@pytest.mark.parametrize("blockwise", [True, False], ids=["blockwise", "static"])
def test_grad_scales_act_as_scaled_grads_in_8bit_updates(device, dtype, blockwise):
    """A grad scale s on g must act exactly as passing s * g: in the param's step, in the new
    momentum, and in the new scale it is encoded against (the static op finds the new
    per-tensor scale in a first pass of its own, which must scale the grad too). Scales are
    powers of two, so that s * g is exact in every dtype and both calls must agree bit for bit."""
    sizes = [1000, 257, 3]
    params, grads, codes, scales = _state(sizes, dtype, device, blockwise)
    grad_scales = [0.25, 0.5, 0.125]
    scaled_grads = [g * s for g, s in zip(grads, grad_scales)]
    twin = [[t.clone() for t in ts] for ts in (params, codes, scales)]
    qmap, lr = QMAP.to(device), torch.tensor(1e-2)
    grad_scales = torch.tensor(grad_scales, device=device)
    if blockwise:
        lion_ops.ops.lion_update_8bit_blockwise(params, grads, codes, scales, qmap, lr, 0.9, 0.99,
                                                0.1, grad_scales)
        lion_ops.ops.lion_update_8bit_blockwise(twin[0], scaled_grads, twin[1], twin[2], qmap, lr,
                                                0.9, 0.99, 0.1)
    else:
        new_scales = [torch.full_like(s, -7.0) for s in scales]
        twin_new_scales = [torch.full_like(s, -7.0) for s in scales]
        lion_ops.ops.lion_update_8bit_static(params, grads, codes, scales, new_scales, qmap, lr,
                                             0.9, 0.99, 0.1, grad_scales)
        lion_ops.ops.lion_update_8bit_static(twin[0], scaled_grads, twin[1], twin[2],
                                             twin_new_scales, qmap, lr, 0.9, 0.99, 0.1)
        for a, b in zip(new_scales, twin_new_scales):
            assert torch.equal(a, b)
    for name, ours, theirs in zip(("params", "codes", "scales"), (params, codes, scales), twin):
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), f"{name}[{i}]"


def test_a_value_exactly_between_two_entries_encodes_as_the_larger(device):
    """Ties go to the larger entry, as in bitsandbytes: the code counts the midpoints <= x
    (lion_math.h). Each tie is a midpoint (q[j] + q[j+1]) / 2 that float32 holds exactly (the
    kernels compute it in float32), in a block whose max is 1.0, so it is encoded unscaled; it
    must give code j + 1, and the float just below it code j. Midpoints between entries of two
    signs are left out: there the sign rule moves the code (the sign test does those)."""
    mids = (QMAP[:-1] + QMAP[1:]) * 0.5
    exact = mids.double() == (QMAP[:-1].double() + QMAP[1:].double()) / 2
    one_sign = torch.signbit(QMAP[:-1]) == torch.signbit(QMAP[1:])
    j = torch.nonzero(exact & one_sign).flatten()
    assert j.numel() > 100 and (mids[j] < 0).any() and (mids[j] > 0).any()
    below = torch.nextafter(mids[j], torch.tensor(-2.0))
    blocks = torch.zeros(2, 256)
    blocks[:, 0] = 1.0  # each block's absmax: the values are encoded as they are
    blocks[0, 1:j.numel() + 1] = mids[j]
    blocks[1, 1:j.numel() + 1] = below
    codes, absmax = lion_ops.ops.quantize_blockwise(blocks.reshape(-1).to(device),
                                                    QMAP.to(device), 256)
    assert absmax.tolist() == [1.0, 1.0]
    codes = codes.cpu().long().view(2, 256)[:, 1:j.numel() + 1]
    assert torch.equal(codes[0], j + 1), (mids[j][codes[0] != j + 1].tolist())
    assert torch.equal(codes[1], j)


def test_a_zero_code_decodes_to_zero_whatever_the_scale(device):
    """Code 127 (the map's 0.0) decodes to 0 even against an infinite absmax (loaded state),
    not 0 * inf = NaN; the other codes decode to their product: +-inf there, +-0 for a zero
    absmax."""
    codes = torch.tensor([127, 0, 255, 127, 200, 3, 127, 127] * 96, dtype=torch.uint8)  # 3 blocks
    absmax = torch.tensor([float("inf"), 0.0, 3.0])
    values = lion_ops.ops.dequantize_blockwise(codes.to(device), absmax.to(device),
                                               QMAP.to(device)).cpu()
    products = QMAP[codes.long()] * absmax.repeat_interleave(256)
    expected = torch.where(codes == 127, torch.zeros(()), products)
    assert torch.equal(values, expected)
    assert torch.isinf(values[:256][codes[:256] != 127]).all()


def _infinite_scale_state(n, blockwise):
    """One param of n elements with codes of every kind (a third of them 127, the map's 0.0, and
    a whole 8-lane group of them), and a loaded infinite scale: the absmax of block 1 of 3, or
    the tensor's max1."""
    p, g = torch.randn(n), torch.randn(n)
    codes = torch.randint(0, 256, (n,), dtype=torch.uint8)
    codes[::3] = 127
    codes[256:264] = 127
    if blockwise:
        return [[p], [g], [codes], [torch.tensor([0.5, float("inf"), 0.25])]]
    return [[p], [g], [codes], [torch.tensor([float("inf")])], [torch.full((1,), -7.0)]]


def _expected_step_from_infinite_scale(before, blockwise, lr, beta1, beta2, wd):
    """(params, codes, scale) after one step, in float32 in the kernels' order of operations."""
    p, g, codes, scale = before[0][0], before[1][0], before[2][0], before[3][0]
    lr, beta1, beta2, wd = (torch.tensor(v) for v in (lr, beta1, beta2, wd))
    per_element = scale.repeat_interleave(256)[: p.numel()] if blockwise else scale.expand_as(p)
    q = QMAP[codes.long()]
    zero = codes == 127
    m = torch.where(zero, torch.zeros(()), q * per_element)  # the zero code decodes to 0
    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * wd) - lr * torch.sign(c)
    m = beta2 * m + (1 - beta2) * g
    infinite = torch.isinf(per_element)
    assert torch.isinf(m[infinite & ~zero]).all() and torch.isfinite(m[infinite & zero]).all()
    # The new scale of the infinite block (or tensor): the largest finite |m|, the zero codes'.
    new_scale = m[infinite & zero].abs().max()
    # The infinite momenta saturate at the top or bottom code, keeping their sign.
    saturated = torch.where(q > 0, 255, 0).to(torch.uint8)
    return p, infinite, zero, new_scale, saturated


def test_zero_codes_stay_zero_under_an_infinite_loaded_scale(tmp_path):
    """A step from loaded state with an infinite scale (blockwise or static): code 127 still
    decodes to 0, so those params take the step of zero momentum, p * (1 - lr*wd) -
    lr*sign((1 - beta1)*g), and stay finite (0 * inf = NaN made them NaN); the other codes
    decode to +-inf, step against their entry's sign and re-encode at the top or bottom code;
    the new scale is the largest finite momentum. Both the AVX2 loops (which must leave a
    non-finite scale to the scalar code: their decode has no zero case) and the scalar loops
    (LION_OPS_NO_AVX2=1, in a subprocess); on a CPU without AVX2 both runs take the scalar path."""
    lr, b1, b2, wd = 0.1, 0.9, 0.99, 0.5
    n = 700  # blocks [0, 256), [256, 512) (the infinite one) and a ragged [512, 700)
    inputs = {"blockwise": _infinite_scale_state(n, True),
              "static": _infinite_scale_state(n, False), "hyperparameters": (lr, b1, b2, wd)}
    before = {kind: [[t.clone() for t in ts] for ts in inputs[kind]]
              for kind in ("blockwise", "static")}
    scalar = run_with_scalar_loops(tmp_path, _SCALAR_PATH_SCRIPT, inputs)
    lion_ops.ops.lion_update_8bit_blockwise(*inputs["blockwise"], QMAP, torch.tensor(lr), b1,
                                            b2, wd)
    lion_ops.ops.lion_update_8bit_static(*inputs["static"], QMAP, torch.tensor(lr), b1, b2, wd)
    for run, results in (("vectorized", inputs), ("scalar", scalar)):
        for kind in ("blockwise", "static"):
            blockwise = kind == "blockwise"
            p_ref, infinite, zero, new_scale, saturated = _expected_step_from_infinite_scale(
                before[kind], blockwise, lr, b1, b2, wd)
            p, codes, scale = (results[kind][k][0] for k in range(0, 4) if k != 1)
            where = f"{run} {kind}"
            assert torch.isfinite(p).all(), where
            assert torch.equal(p[infinite], p_ref[infinite]), where
            assert torch.equal(p, p_ref), where
            infinite_scale = scale[1] if blockwise else scale[0]
            assert infinite_scale == new_scale, where
            assert torch.equal(codes[infinite & ~zero], saturated[infinite & ~zero]), where
            if not blockwise:
                assert torch.equal(results[kind][4][0], scale), where


# ---- the optimizer --------------------------------------------------------------------------------

def _big_params(device, dtype=torch.float32):
    torch.manual_seed(0)
    sizes = [(4095,), (4096,), (65, 129), (7,)]
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device) * 0.1) for s in sizes]


def _train(opt, params, steps, seed=1):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p)
        opt.step()


@pytest.mark.parametrize("block_wise", [True, False])
def test_state_kinds_and_layout(block_wise):
    params = _big_params("cpu")
    opt = Lion8bit(params, lr=1e-3, block_wise=block_wise)
    _train(opt, params, 2)
    small, boundary, matrix, tiny = (opt.state[p] for p in params)
    assert small["state1"].dtype == torch.float32 and "qmap1" not in small  # 4095 elements
    assert tiny["state1"].dtype == torch.float32
    for state, p in ((boundary, params[1]), (matrix, params[2])):
        assert state["state1"].dtype == torch.uint8 and state["state1"].shape == p.shape
        assert state["qmap1"] is opt.state[params[1]]["qmap1"]  # one map per device
        if block_wise:
            assert state["absmax1"].shape == ((p.numel() + 255) // 256,)
            assert "max1" not in state
        else:
            assert state["max1"].shape == (1,) and state["new_max1"].shape == (1,)
            assert "absmax1" not in state
    nested = opt.state_dict()["state"][1]["__bnb_optimizer_quant_state__"]
    assert set(nested) == ({"state1", "qmap1", "absmax1"} if block_wise
                           else {"state1", "qmap1", "max1", "new_max1"})


@pytest.mark.parametrize("block_wise", [True, False])
def test_dequantize_state_reads_the_optimizers_momentum(block_wise):
    """lion_ops.quantization.dequantize_state, the inspection helper, against decoding in fp64
    by hand, for params of no, one partial, one whole and several blocks."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in ((0,), (100,), (256,), (3, 300))]
    opt = Lion8bit(params, lr=1e-3, min_8bit_size=0, block_wise=block_wise)
    _train(opt, params, 3)
    for p in params:
        state = opt.state[p]
        scale = state["absmax1"] if block_wise else state["max1"]
        got = lion_ops.quantization.dequantize_state(state["state1"], scale, state["qmap1"])
        codes = state["state1"].reshape(-1).long()
        per_element = (scale.double().repeat_interleave(256)[: codes.numel()] if block_wise
                       else scale.double().expand(codes.numel()))
        expected = QMAP.double()[codes] * per_element
        assert got.shape == p.shape and got.dtype == torch.float32
        torch.testing.assert_close(got.double().reshape(-1), expected, rtol=1e-7, atol=0)
        if p.numel():
            assert got.abs().max() > 0  # three steps of random grads: not all zero


@pytest.mark.parametrize("block_wise", [True, False])
def test_an_infinite_gradient_saturates_its_momentum_and_spares_the_rest(device, block_wise):
    """An infinite gradient makes that momentum infinite. The scale is the max over finite
    momenta, so the infinite one encodes as the top or bottom code (its sign kept, saturating
    at the scale), and the rest of its block (or tensor) quantizes as before. (With the scale
    itself infinite, the others decoded to 0 * inf = NaN, or to -inf through the sign rule, and
    their params became NaN.) Params follow 32-bit Lion's for three steps, all but a few.""" 
    torch.manual_seed(0)
    p8 = torch.nn.Parameter(torch.randn(1024, device=device))
    p32 = torch.nn.Parameter(p8.detach().clone())
    opt8 = Lion8bit([p8], lr=0.1, min_8bit_size=256, block_wise=block_wise)
    opt32 = Lion([p32], lr=0.1)
    for step in range(3):
        g = torch.randn(1024, device=device)
        if step == 0:
            g[3], g[700] = float("inf"), -float("inf")
        p8.grad, p32.grad = g.clone(), g.clone()
        opt8.step()
        opt32.step()
        state = opt8.state[p8]
        scale = state["absmax1"] if block_wise else state["max1"]
        m = lion_ops.quantization.dequantize_state(state["state1"], scale, state["qmap1"])
        assert torch.isfinite(p8).all() and torch.isfinite(m).all() and torch.isfinite(scale).all()
        if step == 0:  # from zero momentum both take the same first step
            assert torch.equal(p8, p32)
            assert int(state["state1"][3]) == 255 and int(state["state1"][700]) == 0
            block = (lambda i: scale[i // 256]) if block_wise else (lambda i: scale[0])
            assert m[3] == block(3) and m[700] == -0.99296875 * block(700)
    # The sign of c decides each update; 8-bit rounding may flip it only where c is near 0.
    assert (p8 != p32).float().mean() < 0.05


def test_quantize_blockwise_of_infinite_values(device):
    x = torch.zeros(259, device=device)
    x[:5] = torch.tensor([float("inf"), 1.0, -2.0, -float("inf"), 0.5])
    x[256:] = float("inf")  # a block of nothing but infinities: scale 0, the top code
    codes, absmax = lion_ops.ops.quantize_blockwise(x, QMAP.to(device))
    assert absmax.tolist() == [2.0, 0.0]
    assert codes[[0, 2, 3, 256, 258]].tolist() == [255, 0, 0, 255, 255]
    values = lion_ops.ops.dequantize_blockwise(codes, absmax, QMAP.to(device))
    assert values[0] == 2.0 and values[3] == values[2] < 0 and (values[256:] == 0).all()


def test_a_blocksize_near_2_pow_63_makes_one_block(device):
    # (n + blocksize - 1) / blocksize overflowed: no absmax and unwritten codes, where the
    # fake said one block.
    x = torch.randn(10, device=device)
    blocksize = 2**63 - 1
    codes, absmax = lion_ops.ops.quantize_blockwise(x, QMAP.to(device), blocksize)
    assert absmax.shape == (1,) and absmax.item() == x.abs().max().item()
    reference_codes, _ = lion_ops.ops.quantize_blockwise(x, QMAP.to(device), 256)
    assert torch.equal(codes, reference_codes)
    with pytest.raises(ValueError, match="absmax must have 1 elements"):
        lion_ops.ops.dequantize_blockwise(codes, absmax[:0], QMAP.to(device), blocksize)
    values = lion_ops.ops.dequantize_blockwise(codes, absmax, QMAP.to(device), blocksize)
    assert torch.allclose(values, x, atol=0.02 * x.abs().max().item())


def test_quantization_operators_have_no_derivative(device):
    # Their outputs require no grad, so a backward through them fails saying so; torch's
    # fallback made them require grad, and a backward left the input's grad None.
    x = torch.randn(300, device=device, requires_grad=True)
    qmap = QMAP.to(device)
    codes, absmax = lion_ops.ops.quantize_blockwise(x, qmap)
    values = lion_ops.ops.dequantize_blockwise(codes, absmax, qmap)
    assert not (codes.requires_grad or absmax.requires_grad or values.requires_grad)
    with pytest.raises(RuntimeError, match="does not require grad"):
        absmax.sum().backward()
    opcheck(torch.ops.lion.quantize_blockwise.default, (x, qmap, 256))
    opcheck(torch.ops.lion.dequantize_blockwise.default,
            (codes, absmax.detach().requires_grad_(), qmap, 256))


def test_lion_optim_bits_8_is_lion8bit():
    a, b = _big_params("cpu"), _big_params("cpu")
    _train(Lion(a, lr=1e-3, optim_bits=8, weight_decay=0.1), a, 5)
    _train(Lion8bit(b, lr=1e-3, weight_decay=0.1), b, 5)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_state_bytes_per_parameter():
    p = torch.nn.Parameter(torch.randn(1 << 20))
    opt = Lion8bit([p])
    _train(opt, [p], 1)
    tensors = {id(t): t for t in opt.state[p].values() if isinstance(t, torch.Tensor)}
    assert sum(t.nbytes for t in tensors.values()) / p.numel() <= 1.02


@pytest.mark.parametrize("block_wise", [True, False])
def test_8bit_tracks_32bit_training(device, block_wise):
    """8-bit momentum only changes how momentum is stored: trajectories stay close."""
    a, b = _big_params(device), _big_params(device)
    _train(Lion8bit(a, lr=1e-3, block_wise=block_wise), a, 30)
    _train(Lion(b, lr=1e-3), b, 30)
    for x, y in zip(a, b):
        assert (x - y).abs().mean() < 3e-4


@pytest.mark.parametrize("block_wise", [True, False])
def test_8bit_stop_save_load_continue_equals_not_stopping(device, block_wise):
    a = _big_params(device)
    opt_a = Lion8bit(a, lr=1e-3, weight_decay=0.1, block_wise=block_wise)
    _train(opt_a, a, 6, seed=5)
    b = _big_params(device)
    opt_b = Lion8bit(b, lr=1e-3, weight_decay=0.1, block_wise=block_wise)
    _train(opt_b, b, 3, seed=5)
    buffer = io.BytesIO()
    torch.save(opt_b.state_dict(), buffer)
    buffer.seek(0)
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = Lion8bit(c, lr=0.5, block_wise=block_wise)
    opt_c.load_state_dict(torch.load(buffer, weights_only=True))
    generator = torch.Generator().manual_seed(5)
    for _ in range(3):  # the same grads opt_a saw in steps 4..6
        for p in a:
            torch.randn(p.shape, generator=generator)
    for _ in range(3):
        for p in c:
            p.grad = torch.randn(p.shape, generator=generator).to(p)
        opt_c.step()
    for x, y in zip(a, c):
        assert torch.equal(x, y)
    assert opt_c.state[c[1]]["qmap1"] is opt_c.state[c[2]]["qmap1"]


def test_8bit_state_into_32bit_optimizer_is_refused_and_nothing_changes():
    params = _big_params("cpu")
    eight = Lion8bit(params, lr=1e-3)
    _train(eight, params, 2)
    thirty_two = Lion(params, lr=1e-3)
    _train(thirty_two, params, 1)
    before = thirty_two.state_dict()
    with pytest.raises(ValueError, match="saved state is 8-bit blockwise, but this optimizer "
                                         "keeps 32-bit state"):
        thirty_two.load_state_dict(eight.state_dict())
    after = thirty_two.state_dict()
    for k in before["state"]:
        assert torch.equal(after["state"][k]["__bnb_optimizer_quant_state__"]["state1"],
                           before["state"][k]["__bnb_optimizer_quant_state__"]["state1"])
    with pytest.raises(ValueError, match="saved state is 32-bit, but this optimizer keeps 8-bit"):
        eight.load_state_dict(before)


@pytest.mark.parametrize("block_wise", [True, False], ids=["blockwise", "static"])
@pytest.mark.parametrize("corrupt", ["scale dtype", "scale length", "codes shape", "scale missing"])
def test_live_8bit_state_broken_in_place_is_refused_and_nothing_changes(block_wise, corrupt):
    """The per-step state check is a cheap one; whatever it lets through to the full check must
    still be refused, naming the param, before any param, momentum or step counter changes."""
    params = _big_params("cpu")
    opt = Lion8bit(params, lr=1e-3, block_wise=block_wise)
    _train(opt, params, 2)
    state = opt.state[params[2]]
    key = "absmax1" if block_wise else "max1"
    if corrupt == "scale dtype":
        state[key] = state[key].half()
    elif corrupt == "scale length":
        state[key] = torch.cat([state[key], state[key]])
    elif corrupt == "codes shape":
        state["state1"] = state["state1"].reshape(-1)
    else:
        del state[key]
    for p in params:
        p.grad = torch.randn_like(p)
    values = [p.detach().clone() for p in params]
    states = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    with pytest.raises(RuntimeError, match=r"index 2,.*does not fit"):
        opt.step()
    for i, p in enumerate(params):
        assert torch.equal(p, values[i])
        for k, v in states[i].items():
            assert torch.equal(opt.state[p][k], v), (i, k)


@pytest.mark.parametrize("corrupt, message", [
    (lambda n: n.__setitem__("absmax1", n["absmax1"][:-1]), "'absmax1' must be a contiguous float32 tensor of 16 "),
    (lambda n: n.__setitem__("state1", n["state1"][:100]), "8-bit codes 'state1' have shape"),
    (lambda n: n.__setitem__("qmap1", n["qmap1"] * 2), "not the signed dynamic map"),
    # Loaded, these made params NaN (an infinite scale is fine: see the infinity tests).
    (lambda n: n["absmax1"].__setitem__(3, float("nan")), "'absmax1' holds NaN or negative"),
    (lambda n: n["absmax1"].__setitem__(0, -1.0), "'absmax1' holds NaN or negative"),
])
def test_corrupt_8bit_state_dict_is_refused(corrupt, message):
    params = _big_params("cpu")
    opt = Lion8bit(params, lr=1e-3)
    _train(opt, params, 2)
    sd = opt.state_dict()
    good_codes = opt.state[params[1]]["state1"].clone()
    nested = {k: v.clone() for k, v in sd["state"][1]["__bnb_optimizer_quant_state__"].items()}
    corrupt(nested)
    sd["state"][1] = dict(sd["state"][1], __bnb_optimizer_quant_state__=nested)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(sd)
    assert torch.equal(opt.state[params[1]]["state1"], good_codes)


def test_a_saved_infinite_scale_loads_and_steps_to_finite_params():
    # bitsandbytes' absmax becomes infinite after an infinite gradient; such a checkpoint loads.
    params = _big_params("cpu")
    opt = Lion8bit(params, lr=1e-3)
    _train(opt, params, 2)
    sd = opt.state_dict()
    nested = sd["state"][1]["__bnb_optimizer_quant_state__"]
    nested["absmax1"] = nested["absmax1"].clone()
    nested["absmax1"][2] = float("inf")
    opt.load_state_dict(sd)
    assert opt.state[params[1]]["absmax1"][2] == float("inf")
    _train(opt, params, 1)
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("block_wise", [True, False])
def test_8bit_fullgraph_compile_no_recompiles(device, block_wise):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    a, b = _big_params(device), _big_params(device)
    opt_a = Lion8bit(a, lr=torch.tensor(1e-3), block_wise=block_wise)
    opt_b = Lion8bit(b, lr=torch.tensor(1e-3), block_wise=block_wise)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt_b.step, backend=counter, fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    for i in range(5):
        for x, y in zip(a, b):
            x.grad = torch.randn(x.shape, generator=generator).to(x)
            y.grad = x.grad.clone()
        opt_a.step()
        step()
        for opt in (opt_a, opt_b):
            opt.param_groups[0]["lr"].fill_(1e-3 / (i + 2))
    assert counter.frame_count == 2
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    torch._dynamo.reset()


def test_8bit_export():
    class Update(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.randn(1000))
            self.register_buffer("codes", torch.full((1000,), 127, dtype=torch.uint8))
            self.register_buffer("absmax", torch.zeros(4))
            self.register_buffer("qmap", QMAP.clone())

        def forward(self, grad, lr):
            lion_ops.ops.lion_update_8bit_blockwise([self.weight], [grad], [self.codes],
                                                    [self.absmax], self.qmap, lr, 0.9, 0.99, 0.1)
            return lion_ops.ops.dequantize_blockwise(self.codes, self.absmax, self.qmap)

    module = Update()
    eager = copy.deepcopy(module)
    grad, lr = torch.randn(1000), torch.tensor(0.01)
    program = torch.export.export(module, (grad, lr))
    code = program.graph_module.code
    assert "lion.lion_update_8bit_blockwise" in code and "lion.dequantize_blockwise" in code
    assert torch.equal(program.module()(grad, lr), eager(grad, lr))


def test_quantize_and_dequantize_compile(device):
    qmap = QMAP.to(device)

    def roundtrip(x):
        codes, absmax = lion_ops.ops.quantize_blockwise(x, qmap, 256)
        return lion_ops.ops.dequantize_blockwise(codes, absmax, qmap, 256)

    x = torch.randn(1000, device=device)
    compiled = torch.compile(roundtrip, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), roundtrip(x))


# A non-contiguous input quantizes in its
# logical order, as its contiguous copy does.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_blockwise_of_a_non_contiguous_input(dtype):
    torch.manual_seed(0)
    x = torch.randn(512, 300).to(dtype).t()  # (300, 512), transposed
    codes, absmax = lion_ops.ops.quantize_blockwise(x, QMAP, 256)
    codes2, absmax2 = lion_ops.ops.quantize_blockwise(x.contiguous(), QMAP, 256)
    assert torch.equal(codes, codes2) and torch.equal(absmax, absmax2)


# Absmax is 1-D.
def test_a_2d_absmax_is_refused():
    p, g = torch.randn(512), torch.randn(512)
    codes, absmax = lion_ops.ops.quantize_blockwise(torch.randn(512) * 0.01, QMAP)
    with pytest.raises(ValueError, match=r"absmaxes\[0\] must be a contiguous 1-D tensor of 2"):
        lion_ops.ops.lion_update_8bit_blockwise([p], [g], [codes], [absmax.reshape(2, 1)], QMAP,
                                                torch.tensor(0.1), 0.9, 0.99, 0.0)


# A zero code decodes to 0 whatever the scale, as the kernels decode it (lion_math.h
# decode_momentum), also for per-tensor (static) state, whose max1 may be +inf when loaded
# from bitsandbytes (dequantize_state gave NaN there).
@pytest.mark.parametrize("n", [200, 400], ids=["one block", "static"])
def test_dequantize_state_of_zero_codes_under_an_infinite_scale(n):
    from lion_ops.quantization import dequantize_state
    codes = torch.tensor([127, 255] * (n // 2), dtype=torch.uint8)  # qmap[127] == 0.0
    values = dequantize_state(codes, torch.tensor([float("inf")]), QMAP)
    assert torch.equal(values[::2], torch.zeros(n // 2))
    assert torch.equal(values[1::2], torch.full((n // 2,), float("inf")))


def _train_one(opt, p, steps, seed):
    torch.manual_seed(seed)
    for _ in range(steps):
        p.grad = torch.randn_like(p)
        opt.step()


# Saved 8-bit scales of another float dtype load as float32.
@pytest.mark.parametrize("block_wise", [True, False])
def test_float64_8bit_scales_load_as_float32_and_step(block_wise):
    p = torch.nn.Parameter(torch.randn(3000))
    opt = Lion8bit([p], lr=0.01, min_8bit_size=256, block_wise=block_wise)
    _train_one(opt, p, 3, 0)
    saved = opt.state_dict()
    nested = saved["state"][0]["__bnb_optimizer_quant_state__"]
    for key in ("absmax1", "max1", "new_max1"):
        if key in nested:
            nested[key] = nested[key].double()
    q = torch.nn.Parameter(p.detach().clone())
    fresh = Lion8bit([q], lr=0.01, min_8bit_size=256, block_wise=block_wise)
    fresh.load_state_dict(saved)
    for key in ("absmax1", "max1", "new_max1"):
        if key in fresh.state[q]:
            assert fresh.state[q][key].dtype == torch.float32
    _train_one(opt, p, 2, 1)
    _train_one(fresh, q, 2, 1)
    assert torch.equal(p, q)


# An absmax saved as (rows, blocks per row), as a DTensor
# param's is (gathered to a full tensor), loads into a plain param as one flat row.
def test_a_2d_absmax_loads_flat_and_steps():
    p = torch.nn.Parameter(torch.randn(6, 512))
    opt = Lion8bit([p], lr=0.01, min_8bit_size=256)
    _train_one(opt, p, 3, 0)
    saved = opt.state_dict()
    nested = saved["state"][0]["__bnb_optimizer_quant_state__"]
    nested["absmax1"] = nested["absmax1"].reshape(6, 2)
    q = torch.nn.Parameter(p.detach().clone())
    fresh = Lion8bit([q], lr=0.01, min_8bit_size=256)
    fresh.load_state_dict(saved)
    assert fresh.state[q]["absmax1"].shape == (12,)
    _train_one(opt, p, 2, 1)
    _train_one(fresh, q, 2, 1)
    assert torch.equal(p, q)
