"""The `torch.ops.lion` operators on their own: opcheck over every dtype and device, parity
with the fp64 reference on awkward sizes, and refusal of bad input without side effects."""

import pytest
import torch
from torch.library import opcheck

import lion_ops
from reference import lion_reference_step
from op_args import TensorHyperparameters, as_op_args
from scalar_loops import put_special_values, raw_bits, run_with_scalar_loops

op = TensorHyperparameters(torch.ops.lion.lion_update_32bit.default)

# Awkward sizes: empty, one element, no multiple of any vector width, several CPU chunks
# (32768 elements) and several CUDA blocks (2048 elements) with a ragged tail.
SHAPES = [(0,), (1,), (3,), (31, 3), (1000,), (4097,), (65, 1009), (2 * 32768 + 5,)]


def _lists(shapes, dtype, device, transposed=()):
    params, grads, momenta = [], [], []
    for i, shape in enumerate(shapes):
        p = torch.randn(shape, dtype=dtype, device=device)
        g = torch.randn(shape, dtype=dtype, device=device)
        m = torch.randn(shape, dtype=torch.float32, device=device) * 0.1
        if i in transposed:  # a non-contiguous param with a differently laid out grad
            p = torch.randn(shape[::-1], dtype=dtype, device=device).t()
        params.append(p)
        grads.append(g)
        momenta.append(m)
    return params, grads, momenta


def _assert_matches_reference(before, after, lr, beta1, beta2, wd):
    (params0, grads, momenta0), (params1, momenta1) = before, after
    for i, (p0, g, m0, p1, m1) in enumerate(zip(params0, grads, momenta0, params1, momenta1)):
        p_ref, m_ref, c_ref = lion_reference_step(p0, g, m0, lr, beta1, beta2, wd)
        # Where c is within fp32 rounding of zero, its sign may honestly differ.
        scale = beta1 * m0.double().abs() + (1 - beta1) * g.double().abs()
        decided = c_ref.abs() > 1e-5 * scale
        assert decided.float().mean() > 0.99 or p0.numel() < 100
        torch.testing.assert_close(m1.double(), m_ref, rtol=1e-6, atol=1e-7, msg=f"momenta[{i}]")
        # fp32 arithmetic (two roundings: decay, step) rounded once more to a 16-bit param
        # dtype: within two fp32 ulps or one 16-bit ulp of the fp64 result, plus lr's own
        # fp32 rounding and the spacing of subnormals (absolute).
        info = torch.finfo(p1.dtype)
        rtol = info.eps * (2 if p1.dtype == torch.float32 else 1)
        atol = max(lr * torch.finfo(torch.float32).eps, info.tiny * info.eps)
        torch.testing.assert_close(p1.double()[decided], p_ref[decided], rtol=rtol, atol=atol,
                                   msg=f"params[{i}]")


def test_contiguous_tensors_whose_size_one_dims_have_other_strides(device):
    """Contiguous tensors whose size-1 dimensions have arbitrary strides are used in place
    (their memory order is their logical order), by the 32-bit and the 8-bit update alike, and
    give exactly what standard strides give."""
    torch.manual_seed(0)
    shape = (1, 700, 1)

    def odd_strides(t, strides):
        out = torch.empty_strided(shape, strides, dtype=t.dtype, device=device)
        out.copy_(t)
        assert out.is_contiguous() and out.stride() != t.stride()
        return out

    p, g, m = (torch.randn(shape, device=device) for _ in range(3))
    codes, absmax = lion_ops.ops.quantize_blockwise(m, lion_ops.quantization.dynamic_map().to(device))
    lr = torch.tensor(1e-2)
    odd = [odd_strides(p, (1, 1, 5)), odd_strides(g, (9, 1, 3)), odd_strides(m, (2, 1, 7))]
    standard = [p.clone(), g.clone(), m.clone()]
    for args in (odd, standard):
        op(args[0:1], args[1:2], args[2:3], lr, 0.9, 0.99, 0.1)
    for a, b in zip(odd, standard):
        assert torch.equal(a, b)
    qmap = lion_ops.quantization.dynamic_map().to(device)
    results = []
    for strides in (((1, 1, 5), (9, 1, 3), (3, 1, 2)), None):
        q, grad = p.clone(), g.clone()
        c, a = codes.clone(), absmax.clone()
        if strides:
            q, grad, c = odd_strides(q, strides[0]), odd_strides(grad, strides[1]), odd_strides(
                c, strides[2])
        torch.ops.lion.lion_update_8bit_blockwise([q], [grad], [c], [a], qmap, lr,
                                                  torch.tensor(0.9), torch.tensor(0.99),
                                                  torch.tensor(0.1))
        results.append((q, c, a))
    for x, y in zip(*results):
        assert torch.equal(x, y)


@pytest.mark.parametrize("lr_on_device", [False, True], ids=["lr_cpu", "lr_device"])
def test_update_matches_fp64_reference(device, dtype, lr_on_device):
    lr, beta1, beta2, wd = 3e-3, 0.9, 0.99, 0.1
    params, grads, momenta = _lists(SHAPES, dtype, device, transposed={3, 6})
    before = ([p.clone() for p in params], grads, [m.clone() for m in momenta])
    lr_tensor = torch.tensor(lr, device=device if lr_on_device else "cpu")
    op(params, grads, momenta, lr_tensor, beta1, beta2, wd)
    _assert_matches_reference(before, (params, momenta), lr, beta1, beta2, wd)
    # Every element was written: with weight decay and a nonzero step, all params move.
    for p0, p1 in zip(before[0], params):
        if dtype == torch.float32:
            assert not torch.eq(p0, p1).any()


def test_mixed_dtypes_and_many_tensors_in_one_call(device):
    # More tensors than one CUDA launch holds (384), of all three dtypes interleaved.
    shapes = [((i * 37) % 300 + 1,) for i in range(900)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    params = [torch.randn(s, dtype=dtypes[i % 3], device=device) for i, s in enumerate(shapes)]
    grads = [torch.randn_like(p) for p in params]
    momenta = [torch.randn(p.shape, device=device) for p in params]
    before = ([p.clone() for p in params], grads, [m.clone() for m in momenta])
    op(params, grads, momenta, torch.tensor(1e-2), 0.95, 0.98, 0.0)
    _assert_matches_reference(before, (params, momenta), 1e-2, 0.95, 0.98, 0.0)


def test_lr_dtype_and_empty_list(device):
    params, grads, momenta = _lists([(10,)], torch.float32, device)
    before = ([p.clone() for p in params], grads, [m.clone() for m in momenta])
    op(params, grads, momenta, torch.tensor(0.5, dtype=torch.float64), 0.9, 0.99, 0.0)
    _assert_matches_reference(before, (params, momenta), 0.5, 0.9, 0.99, 0.0)
    op([], [], [], torch.tensor(0.5), 0.9, 0.99, 0.0)  # nothing to do, no error


@pytest.mark.parametrize("hyper_dtype", [torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_hyperparameter_tensors_of_any_floating_dtype_are_read_as_their_value(device,
                                                                             hyper_dtype):
    """CPU hyperparameter tensors of every floating dtype are read on the host as the float32
    of their value: values exact in every dtype step exactly as float32 tensors of them."""
    values = (0.0625, 0.875, 0.9375, 0.25)  # lr, beta1, beta2, weight_decay
    params, grads, momenta = _lists([(100,)], torch.float32, device)
    expected = [p.clone() for p in params], [m.clone() for m in momenta]
    op(expected[0], grads, expected[1], *(torch.tensor(v) for v in values))
    op(params, grads, momenta, *(torch.tensor(v, dtype=hyper_dtype) for v in values))
    assert torch.equal(params[0], expected[0][0]) and torch.equal(momenta[0], expected[1][0])


def test_nan_gradient_propagates_to_the_param(device):
    p = torch.ones(4, device=device)
    g = torch.tensor([float("nan"), 1.0, -1.0, 0.0], device=device)
    m = torch.zeros(4, device=device)
    op([p], [g], [m], torch.tensor(0.1), 0.9, 0.99, 0.0)
    assert torch.isnan(p[0]) and torch.isnan(m[0])
    torch.testing.assert_close(p[1:].cpu(), torch.tensor([0.9, 1.1, 1.0]))


_SCALAR_LOOP_SCRIPT = """
import sys, torch, lion_ops
inputs = torch.load(sys.argv[1])
lr, b1, b2, wd = inputs["hyperparameters"]
lion_ops.ops.lion_update_32bit(*inputs["tensors"], torch.tensor(lr), b1, b2, wd)
torch.save(inputs, sys.argv[1])
"""


def test_vectorized_cpu_loop_equals_scalar_loop(tmp_path, dtype):
    """The AVX2 loop that float16 params take (where the CPU has AVX2) gives the scalar loop's
    bits, the ones CUDA gives (float32 and bfloat16 take the compiler's loop either way)."""
    # The large tensor makes rounding ties of the 16-bit conversions (1 in 2^16 results) occur;
    # a decay of 0.7 spreads the fp32 results' low bits evenly, so that ties are met.
    params, grads, momenta = _lists(SHAPES + [((1 << 21) + 3,)], dtype, "cpu", transposed={3})
    put_special_values(params, grads)
    lr, b1, b2, wd = 0.3, 0.9, 0.99, 1.0
    inputs = {"tensors": [params, grads, momenta], "hyperparameters": (lr, b1, b2, wd)}
    scalar = run_with_scalar_loops(tmp_path, _SCALAR_LOOP_SCRIPT, inputs)
    op(params, grads, momenta, torch.tensor(lr), b1, b2, wd)
    for ours, theirs in zip(params + momenta, scalar["tensors"][0] + scalar["tensors"][2]):
        assert torch.equal(raw_bits(ours), raw_bits(theirs))
    assert any(torch.isnan(p).any() for p in params)  # the special values went through


@pytest.mark.cuda
def test_cuda_matches_cpu_bit_for_bit(dtype):
    # Both kernels share lion_math.h and neither fuses multiply-adds.
    params, grads, momenta = _lists(SHAPES, dtype, "cpu", transposed={3})
    cuda = [[t.cuda() for t in ts] for ts in (params, grads, momenta)]
    op(params, grads, momenta, torch.tensor(1e-3), 0.9, 0.99, 0.05)
    op(*cuda, torch.tensor(1e-3, device="cuda"), 0.9, 0.99, 0.05)
    for a, b in zip(params + momenta, cuda[0] + cuda[2]):
        assert torch.equal(a, b.cpu())


@pytest.mark.cuda
def test_cuda_more_than_2_pow_31_elements():
    n = 2**31 + 77
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * 4 * n + (4 << 30):
        pytest.skip("needs about 30 GB of free GPU memory")
    p = torch.ones(n, device="cuda")
    g = torch.full((n,), -1.0, device="cuda")
    g[-5:] = 1.0
    m = torch.zeros(n, device="cuda")
    op([p], [g], [m], torch.tensor(0.25), 0.9, 0.99, 0.0)
    assert torch.equal(p[-5:].cpu(), torch.full((5,), 0.75))
    assert torch.equal(p[-10:-5].cpu(), torch.full((5,), 1.25))
    assert torch.equal(p[:5].cpu(), torch.full((5,), 1.25))
    assert bool((p[: n - 5] == 1.25).all())
    del p, g, m
    torch.cuda.empty_cache()


# ---- opcheck ----------------------------------------------------------------------------------

def _opcheck_samples(dtype, device):
    params, grads, momenta = _lists([(3,), (17, 5), (0,), (1,)], dtype, device, transposed={1})
    yield (params, grads, momenta, torch.tensor(1e-3), 0.9, 0.99, 0.1)
    yield ([], [], [], torch.tensor(1e-3), 0.9, 0.99, 0.0)
    params, grads, momenta = _lists([(5000,)], dtype, device)
    yield (params, grads, momenta, torch.tensor(1e-2, device=device), 0.0, 0.0, 0.0)
    # Every hyperparameter on the params' device, of other floating dtypes.
    params, grads, momenta = _lists([(300,), (7,)], dtype, device)
    yield (params, grads, momenta, torch.tensor(1e-2, device=device, dtype=torch.float64),
           torch.tensor(0.9, device=device, dtype=torch.bfloat16),
           torch.tensor(0.99, device=device), torch.tensor(0.1, device=device, dtype=torch.half))


def test_opcheck(device, dtype):
    for args in _opcheck_samples(dtype, device):
        opcheck(op.overload, as_op_args(args))


# ---- bad input: a clear error naming the argument, and nothing modified ------------------------

def _bad_calls(device):
    def make():
        return _lists([(4,), (6,)], torch.float32, device)

    p, g, m = make()
    yield "same length", (p, g[:1], m, torch.tensor(0.1), 0.9, 0.99, 0.0)
    p, g, m = make()
    yield r"grads\[1\] has shape", (p, [g[0], g[1][:5]], m, torch.tensor(0.1), 0.9, 0.99, 0.0)
    p, g, m = make()
    yield r"momenta\[0\] has shape", (p, g, [m[0][:3], m[1]], torch.tensor(0.1), 0.9, 0.99, 0.0)
    p, g, m = make()
    yield r"grads\[0\] must have its param's dtype", (
        p, [g[0].half(), g[1]], m, torch.tensor(0.1), 0.9, 0.99, 0.0)
    p, g, m = make()
    yield r"momenta\[1\] must be float32", (
        p, g, [m[0], m[1].double()], torch.tensor(0.1), 0.9, 0.99, 0.0)
    p, g, m = make()
    yield r"params\[0\] must be float32, bfloat16 or float16", (
        [p[0].double(), p[1]], [g[0].double(), g[1]], m, torch.tensor(0.1), 0.9, 0.99, 0.0)
    p, g, m = make()
    yield "beta1 must be in", (p, g, m, torch.tensor(0.1), 1.0, 0.99, 0.0)
    p, g, m = make()
    yield "beta2 must be in", (p, g, m, torch.tensor(0.1), 0.9, -0.1, 0.0)
    p, g, m = make()
    yield "weight_decay must be", (p, g, m, torch.tensor(0.1), 0.9, 0.99, -1.0)
    # An infinite weight decay passes ">= 0"; it would make every param -inf or NaN.
    p, g, m = make()
    yield "weight_decay must be finite and >= 0, got inf", (p, g, m, torch.tensor(0.1), 0.9,
                                                            0.99, float("inf"))
    p, g, m = make()
    yield "lr must be a 0-dim tensor", (p, g, m, torch.tensor([0.1, 0.2]), 0.9, 0.99, 0.0)
    p, g, m = make()  # one element, but not 0-dim: the optimizers reshape theirs
    yield "lr must be a 0-dim tensor", (p, g, m, torch.tensor([0.1]), 0.9, 0.99, 0.0)
    p, g, m = make()
    yield "lr must be finite and >= 0", (p, g, m, torch.tensor(-0.1), 0.9, 0.99, 0.0)
    # A CPU lr is read on the host: an infinite one passes ">= 0" (NaN fails it anyway).
    p, g, m = make()
    yield "lr must be finite and >= 0, got inf", (p, g, m, torch.tensor(float("inf")), 0.9,
                                                  0.99, 0.0)
    p, g, m = make()
    yield "lr must be finite and >= 0, got nan", (p, g, m, torch.tensor(float("nan")), 0.9,
                                                  0.99, 0.0)
    p, g, m = make()
    yield "lr must be a floating-point tensor", (p, g, m, torch.tensor(1), 0.9, 0.99, 0.0)
    p, g, m = make()
    yield "beta2 must be a 0-dim tensor", (p, g, m, torch.tensor(0.1), 0.9,
                                           torch.tensor([0.99]), 0.0)
    p, g, m = make()
    yield "weight_decay must be a floating-point tensor", (p, g, m, torch.tensor(0.1), 0.9, 0.99,
                                                           torch.tensor(0))
    p, g, m = make()  # dispatched to the fake, which did nothing
    yield "beta1 must be on the CPU or on", (p, g, m, torch.tensor(0.1),
                                             torch.tensor(0.9, device="meta"), 0.99, 0.0)
    p, g, m = make()  # read as the float32 the kernels use: 1 - 1e-9 rounds to 1
    yield "beta1 must be in", (p, g, m, torch.tensor(0.1),
                               torch.tensor(1 - 1e-9, dtype=torch.float64), 0.99, 0.0)
    p, g, m = make()
    sparse = torch.zeros(6, device=device).to_sparse()
    yield "sparse gradients are not supported", (p, [g[0], sparse], m, torch.tensor(0.1), 0.9,
                                                  0.99, 0.0)
    # Every other element of a buffer: the kernels read grad_scales through its data pointer,
    # so a strided one would give param 1 the buffer's element 1 (7.0), not its own 0.5.
    p, g, m = make()
    strided = torch.tensor([0.5, 7.0, 0.5, 7.0], device=device)[::2]
    yield "grad_scales must be a contiguous 1-D tensor with one scale per param", (
        p, g, m, torch.tensor(0.1), 0.9, 0.99, 0.0, strided)


@pytest.mark.parametrize("case", range(22))
def test_bad_input_is_refused_and_nothing_changes(device, case):
    message, args = list(_bad_calls(device))[case]
    snapshot = [[t.clone() for t in arg] for arg in args[:3]]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        op(*args)
    for originals, copies in zip(args[:3], snapshot):
        for t, c in zip(originals, copies):
            if t.layout == torch.strided:
                assert torch.equal(t, c)


def _calls_writing_one_tensor_twice(device):
    """(operator, args, message, what the call writes): every writing operator, with one
    tensor it writes passed twice."""
    def f32(*shape):
        return torch.randn(shape, device=device)

    lr, qmap = torch.tensor(0.1), lion_ops.quantization.dynamic_map().to(device)
    p, g = f32(600), f32(600)
    m = f32(600)
    yield (torch.ops.lion.lion_update_32bit.default, ([p, p], [g, g], [m, f32(600)], lr, 0.9,
                                                       0.99, 0.0),
           r"params\[0\] and params\[1\] are the same memory", [p, m])
    p, m = f32(600), f32(600)
    yield (torch.ops.lion.lion_update_32bit.default, ([p], [g], [p], lr, 0.9, 0.99, 0.0),
           r"params\[0\] and momenta\[0\]", [p])
    p, q = f32(600), f32(600)
    codes, absmax = torch.randint(0, 256, (600,), dtype=torch.uint8, device=device), f32(3).abs()
    yield (torch.ops.lion.lion_update_8bit_blockwise.default,
           ([p, q], [g, g], [codes, codes], [absmax, f32(3).abs()], qmap, lr, 0.9, 0.99, 0.0),
           r"codes\[0\] and codes\[1\]", [p, q, codes, absmax])
    p, q, max1 = f32(600), f32(600), f32(1).abs()
    yield (torch.ops.lion.lion_update_8bit_static.default,
           ([p, q], [g, g], [codes, codes.clone()], [max1, f32(1)], [f32(1), max1], qmap, lr, 0.9,
            0.99, 0.0), r"max1s\[0\] and new_max1s\[1\]", [p, q, codes, max1])
    vec = f32(100).abs()
    yield (torch.ops.lion.percentile_clipping.default,
           ([g, g], [vec, vec], [torch.ones((), device=device)] * 2, 5),
           r"gnorm_vecs\[0\] and gnorm_vecs\[1\]", [vec])
    step = torch.ones((), device=device)
    yield (torch.ops.lion.increment_steps.default, ([step, torch.ones((), device=device), step],),
           r"steps\[0\] and steps\[2\]", [step])
    base, m = f32(3), f32(4, 3)
    yield (torch.ops.lion.lion_update_32bit.default,
           ([base.expand(4, 3)], [f32(4, 3)], [m], lr, 0.9, 0.99, 0.0),
           r"params\[0\] has elements that share memory", [base, m])


@pytest.mark.parametrize("case", range(7))
def test_a_tensor_written_twice_in_one_call_is_refused_and_nothing_changes(device, case):
    """Two entries that are one tensor, or a tensor whose elements share memory (an expanded
    view), would be read and written by two threads (or CUDA blocks) at once: a race, so the
    call is refused before it writes anything. (An expanded param used to be updated and then
    refused, when its contiguous copy was copied back.)"""
    operator, args, message, written = list(_calls_writing_one_tensor_twice(device))[case]
    snapshot = [t.clone() for t in written]
    with pytest.raises(ValueError, match=message if "memory" in message
                       else message + " are the same memory"):
        operator(*as_op_args(args))
    for t, s in zip(written, snapshot):
        assert torch.equal(t, s)


def test_operators_bump_the_version_of_what_they_write(device):
    """As torch's in-place ops: autograd then refuses a backward through a param that a step
    changed after the forward used it (it computed the gradient from the new values), and a
    tensor that requires grad is not written with grad mode on."""
    for cls, kwargs in ((lion_ops.Lion, {}), (lion_ops.Lion8bit, {"min_8bit_size": 256}),
                        (lion_ops.Lion, {"percentile_clipping": 50})):
        w = torch.nn.Parameter(torch.randn(64, 64, device=device))
        opt = cls([w], lr=0.1, **kwargs)
        x = torch.randn(4, 64, device=device, requires_grad=True)  # (so w is saved for x.grad)
        y = (x @ w).sum()
        w.grad = torch.randn_like(w)
        opt.step()
        state = opt.state[w]
        written = [w, state["step"], state["state1"]] + [state[k] for k in ("absmax1", "gnorm_vec")
                                                         if k in state]
        assert all(t._version > 0 for t in written)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
    p, g, m = _lists([(5,)], torch.float32, device)
    leaf = torch.nn.Parameter(p[0])
    with pytest.raises(RuntimeError, match=r"params\[0\] requires grad, and the operator writes it"):
        op([leaf], g, m, torch.tensor(0.1), 0.9, 0.99, 0.0)
    assert torch.equal(leaf, p[0]) and m[0]._version == 0
    with torch.no_grad():
        op([leaf], g, m, torch.tensor(0.1), 0.9, 0.99, 0.0)
    assert leaf._version == 1 and m[0]._version == 1
    # Inference mode skips autograd but, as for torch's in-place ops, not the counters.
    y = (leaf ** 2).sum()
    with torch.inference_mode():
        op([leaf], g, m, torch.tensor(0.1), 0.9, 0.99, 0.0)
    assert leaf._version == 2
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("written", ["params", "momenta", "steps"])
def test_inference_tensors_are_not_written_outside_inference_mode(device, written):
    """An inference tensor has no version counter; torch refuses writing one outside inference
    mode, but only as the counter is bumped, after the kernel. The operators refuse first."""
    p, g, m = _lists([(300,), (7,)], torch.float32, device)
    steps = [torch.ones((), device=device), torch.ones((), device=device)]
    with torch.inference_mode():
        lists = {"params": p, "momenta": m, "steps": steps}
        lists[written] = [lists[written][0], lists[written][1].clone()]
    p, m, steps = lists["params"], lists["momenta"], lists["steps"]
    before = [t.clone() for t in p + m + steps]
    with pytest.raises(RuntimeError, match=rf"{written}\[1\] is an inference tensor .* nothing "
                                           "was written"):
        if written == "steps":
            torch.ops.lion.increment_steps(steps)
        else:
            op(p, g, m, torch.tensor(0.1), 0.9, 0.99, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(p + m + steps, before))
    with torch.inference_mode():  # where it may be written
        op(p, g, m, torch.tensor(0.1), 0.9, 0.99, 0.0)
        torch.ops.lion.increment_steps(steps)
    assert not torch.equal(p[1], before[1]) and steps[1].item() == 2.0


def test_distinct_views_of_one_buffer_are_updated(device):
    """Params that are views of one flat buffer (as some frameworks lay them out) are distinct
    memory: the call updates each once, as it would separate tensors."""
    flat, flat_grads, flat_momenta = (torch.randn(1000, device=device) for _ in range(3))
    views = [flat[:300], flat[300:301], flat[301:]]
    grads = [flat_grads[:300], flat_grads[300:301], flat_grads[301:]]
    momenta = [flat_momenta[:300], flat_momenta[300:301], flat_momenta[301:]]
    expected = flat.clone(), flat_momenta.clone()
    op([expected[0]], [flat_grads], [expected[1]], torch.tensor(0.1), 0.9, 0.99, 0.1)
    op(views, grads, momenta, torch.tensor(0.1), 0.9, 0.99, 0.1)
    assert torch.equal(flat, expected[0]) and torch.equal(flat_momenta, expected[1])


@pytest.mark.cuda
def test_tensors_on_two_devices_are_refused():
    p = [torch.randn(4, device="cuda"), torch.randn(4)]
    g = [torch.randn(4, device="cuda"), torch.randn(4)]
    m = [torch.zeros(4, device="cuda"), torch.zeros(4)]
    with pytest.raises(ValueError, match="one call takes tensors of one device"):
        op(p, g, m, torch.tensor(0.1), 0.9, 0.99, 0.0)


def test_fake_checks_shapes_under_tracing():
    p = torch.randn(4)
    # Dynamo wraps the fake's ValueError; the message is what matters.
    with pytest.raises(Exception, match=r"grads\[0\] has shape \[5\] but params\[0\] has shape \[4\]"):
        torch.compile(lambda: op([p], [torch.randn(5)], [torch.zeros(4)], torch.tensor(0.1),
                                 0.9, 0.99, 0.0), backend="aot_eager", fullgraph=True)()


def test_python_wrapper_calls_the_operator():
    p, g, m = _lists([(9,)], torch.float32, "cpu")
    expected = [t.clone() for t in p], [t.clone() for t in m]
    op(expected[0], g, expected[1], torch.tensor(0.1), 0.9, 0.99, 0.1)
    lion_ops.ops.lion_update_32bit(p, g, m, torch.tensor(0.1), 0.9, 0.99, 0.1)
    assert torch.equal(p[0], expected[0][0]) and torch.equal(m[0], expected[1][0])


# ---- increment_steps ------------------------------------------------------------------------------

def test_increment_steps(device):
    steps = [torch.tensor(float(i), device=device) for i in range(500)]  # > one CUDA launch
    torch.ops.lion.increment_steps.default(steps)
    assert [float(s) for s in steps] == [float(i + 1) for i in range(500)]
    opcheck(torch.ops.lion.increment_steps.default, ([torch.zeros((), device=device),
                                                      torch.ones(1, device=device)],))
    lion_ops.ops.increment_steps([])  # the wrapper accepts an empty list (no dispatch key)


def test_increment_steps_refuses_bad_counters_and_changes_nothing(device):
    good = torch.zeros((), device=device)
    with pytest.raises(TypeError, match=r"steps\[1\] must be float32, got"):
        torch.ops.lion.increment_steps.default([good, torch.zeros((), dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"steps\[1\] must have one element"):
        torch.ops.lion.increment_steps.default([good, torch.zeros(2, device=device)])
    assert float(good) == 0.0


def test_percentile_clipping_refuses_a_step_counter_of_two_elements_and_writes_nothing(device):
    # The kernels read one float per counter: a second element would be silently ignored.
    vecs = [torch.rand(100, device=device) for _ in range(2)]
    before = [v.clone() for v in vecs]
    with pytest.raises(ValueError, match=r"steps\[1\] must be a one-element float32 tensor"):
        torch.ops.lion.percentile_clipping.default(
            [torch.randn(4, device=device), torch.randn(3, device=device)], vecs,
            [torch.full((), 2.0, device=device), torch.full((2,), 2.0, device=device)], 5)
    for v, b in zip(vecs, before):
        assert torch.equal(v, b)


# ---- the fakes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["percentile 100", "percentile -1", "gnorm_vec length",
                                  "list lengths", "grads dtype", "steps dtype",
                                  "gnorm_vec strided"])
def test_percentile_clipping_fake_refuses_what_the_kernel_refuses(case):
    """On meta tensors an operator runs its fake (register_fake serves the Meta key): the code
    torch.compile and torch.export trace with. It must refuse what the kernel refuses, so that
    a bad call fails where it is traced, not later when the graph runs."""
    grads = [torch.randn(10, device="meta"), torch.randn(3, device="meta")]
    vecs = [torch.zeros(100, device="meta"), torch.zeros(100, device="meta")]
    steps = [torch.ones((), device="meta"), torch.ones((), device="meta")]
    percentile = 5
    message = {"percentile 100": "percentile must be in 0..99, got 100",
               "percentile -1": "percentile must be in 0..99, got -1",
               "gnorm_vec length": r"gnorm_vecs\[1\] must be a contiguous float32 tensor of 100",
               "gnorm_vec strided": r"gnorm_vecs\[1\] must be a contiguous float32 tensor of 100",
               "grads dtype": r"grads\[1\] must be float32, bfloat16 or float16, got "
                              r"float64",
               "steps dtype": r"steps\[0\] must be a one-element float32 tensor",
               "list lengths": "must have the same length"}[case]
    if case == "percentile 100":
        percentile = 100
    elif case == "percentile -1":
        percentile = -1
    elif case == "gnorm_vec length":
        vecs[1] = torch.zeros(99, device="meta")
    elif case == "gnorm_vec strided":
        vecs[1] = torch.zeros(200, device="meta")[::2]
    elif case == "grads dtype":
        grads[1] = grads[1].double()
    elif case == "steps dtype":
        steps[0] = torch.ones((), dtype=torch.int64, device="meta")
    else:
        steps = steps[:1]
    with pytest.raises((ValueError, TypeError), match=message):
        torch.ops.lion.percentile_clipping.default(grads, vecs, steps, percentile)
    # And the same call with good arguments gives the kernel's result shape.
    grads = [torch.randn(10, device="meta"), torch.randn(3, device="meta")]
    scales = torch.ops.lion.percentile_clipping.default(
        grads, [torch.zeros(100, device="meta") for _ in grads],
        [torch.ones((), device="meta") for _ in grads], 99)
    assert scales.device.type == "meta" and scales.shape == (2,) and scales.dtype == torch.float32


def _update_args(operator, device, lr, beta1, beta2, weight_decay):
    """Arguments of an update operator for two params on `device` with these hyperparameters."""
    params = [torch.zeros(600, device=device), torch.zeros(7, device=device)]
    grads = [torch.zeros_like(p) for p in params]
    qmap = torch.zeros(256, device=device)
    hyper = (lr, beta1, beta2, weight_decay)
    if operator == "lion_update_32bit":
        return params, grads, [torch.zeros_like(p) for p in params], *hyper
    codes = [torch.zeros(p.shape, dtype=torch.uint8, device=device) for p in params]
    if operator == "lion_update_8bit_blockwise":
        absmaxes = [torch.zeros(3, device=device), torch.zeros(1, device=device)]
        return params, grads, codes, absmaxes, qmap, *hyper
    scales = [torch.zeros(1, device=device) for _ in params]
    return params, grads, codes, scales, [s.clone() for s in scales], qmap, *hyper


UPDATE_OPERATORS = ["lion_update_32bit", "lion_update_8bit_blockwise", "lion_update_8bit_static"]


@pytest.mark.parametrize("operator", UPDATE_OPERATORS)
@pytest.mark.parametrize("name, bad, error, message", [
    ("lr", torch.tensor([0.1]), ValueError, r"lr must be a 0-dim tensor, got shape \[1\]"),
    ("beta1", torch.tensor(1), TypeError,
     "beta1 must be a floating-point tensor, got int64"),
    ("beta2", torch.tensor(0.99, device="meta"), ValueError,
     "beta2 must be on the CPU or on cpu, got meta"),
    ("weight_decay", torch.tensor(0.1).to_sparse(), ValueError,
     "weight_decay must be a dense tensor, got layout Sparse"),
])
def test_update_fakes_refuse_the_hyperparameter_tensors_the_kernels_refuse(
        operator, name, bad, error, message):
    """torch.compile and torch.export trace the update operators with their fakes, under
    FakeTensorMode: a hyperparameter tensor the kernels would refuse is refused there, when
    the call is traced, with the kernels' message."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    hyper = {"lr": torch.tensor(0.1), "beta1": torch.tensor(0.9), "beta2": torch.tensor(0.99),
             "weight_decay": torch.tensor(0.0)}
    hyper[name] = bad
    with FakeTensorMode() as mode:
        args = _update_args(operator, "cpu", *(mode.from_tensor(hyper[k]) for k in
                                               ("lr", "beta1", "beta2", "weight_decay")))
        with pytest.raises(error, match=f"^{operator}: {message}"):
            getattr(torch.ops.lion, operator).default(*args)


@pytest.mark.parametrize("operator", UPDATE_OPERATORS)
def test_update_fakes_take_cpu_hyperparameters_with_params_elsewhere(operator):
    """0-dim CPU hyperparameter tensors go with params on any device (the kernels read them on
    the host): as under torch.compile with CUDA params, meta params here."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        hyper = [mode.from_tensor(torch.tensor(v)) for v in (0.1, 0.9, 0.99, 0.0)]
        args = _update_args(operator, "meta", *hyper)
        assert getattr(torch.ops.lion, operator).default(*args) is None


def test_number_hyperparameters_are_cpu_tensors_whatever_the_default_device():
    """The Python wrappers take numbers and make them 0-dim float32 CPU tensors (read on the
    host), not tensors on torch's default device (meta here, a stand-in for "cuda" with CPU
    params), which the operators would refuse."""
    p, g, m = _lists([(9,)], torch.float32, "cpu")
    expected = [t.clone() for t in p], [t.clone() for t in m]
    op(expected[0], g, expected[1], torch.tensor(0.0625), 0.875, 0.96875, 0.125)
    assert lion_ops.ops.hyperparameter(0.875).device.type == "cpu"
    torch.set_default_device("meta")
    try:
        assert lion_ops.ops.hyperparameter(0.875).device.type == "cpu"
        lion_ops.ops.lion_update_32bit(p, g, m, 0.0625, 0.875, 0.96875, 0.125)
    finally:
        torch.set_default_device(None)
    assert torch.equal(p[0], expected[0][0]) and torch.equal(m[0], expected[1][0])


# empty tensors between others.
@pytest.mark.parametrize("threads", [1, 2])
def test_empty_tensors_between_others_leave_every_tensor_updated(threads):
    torch.manual_seed(0)
    shapes = [(5,), (0,), (5,), (70000,), (0,), (0,), (3,)]
    params = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    momenta = [torch.randn(s) for s in shapes]
    expected = [p.clone() for p in params], [m.clone() for m in momenta]
    for i in range(len(shapes)):  # one call per tensor: no neighbours
        op([expected[0][i]], [grads[i]], [expected[1][i]], torch.tensor(0.1), 0.9, 0.99, 0.1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        op(params, grads, momenta, torch.tensor(0.1), 0.9, 0.99, 0.1)
        vecs = [torch.zeros(100) for _ in shapes]
        steps = [torch.full((), 2.0) for _ in shapes]
        lion_ops.ops.percentile_clipping(grads, vecs, steps, 5)
    finally:
        torch.set_num_threads(before)
    for i in range(len(shapes)):
        assert torch.equal(params[i], expected[0][i]) and torch.equal(momenta[i], expected[1][i]), i
        torch.testing.assert_close(vecs[i][2].double(), grads[i].double().pow(2).sum(), rtol=1e-6, atol=0)


# A non-dense view (MemOverlap::TooHard)
# is distinct memory and must be updated, through a contiguous copy written back.
def test_a_non_dense_param_and_momentum_are_updated_in_place():
    torch.manual_seed(0)
    base, mbase = torch.randn(8, 10), torch.randn(8, 10)
    p, m = base[:, ::2], mbase[:, ::2]  # neither is dense
    g = torch.randn(8, 5)
    expected_p, expected_m = p.clone(), m.clone()
    op([expected_p], [g], [expected_m], torch.tensor(0.1), 0.9, 0.99, 0.1)
    others, m_others = base[:, 1::2].clone(), mbase[:, 1::2].clone()
    op([p], [g], [m], torch.tensor(0.1), 0.9, 0.99, 0.1)
    assert torch.equal(p, expected_p) and torch.equal(m, expected_m)
    assert torch.equal(base[:, 1::2], others) and torch.equal(mbase[:, 1::2], m_others)


# Only written operands are copied back; a
# read-only grad (here an expanded one, which cannot be written) is left alone.
def test_an_expanded_grad_of_a_non_dense_param_is_only_read():
    base = torch.randn(8, 10)
    p, m = base[:, ::2], torch.zeros(8, 5)
    g = torch.full((), 0.5).expand(8, 5)
    expected_p, expected_m = p.clone(), m.clone()
    op([expected_p], [g.contiguous()], [expected_m], torch.tensor(0.1), 0.9, 0.99, 0.1)
    op([p], [g], [m], torch.tensor(0.1), 0.9, 0.99, 0.1)
    assert torch.equal(p, expected_p) and torch.equal(m, expected_m)


# A refused call changes nothing, its
# tensors' version counters included (else autograd later reports an in-place change that
# never happened).
def test_a_refused_call_leaves_version_counters_alone():
    p, m = torch.randn(4), torch.zeros(4)
    with pytest.raises(ValueError, match=r"grads\[0\] has shape"):
        op([p], [torch.randn(5)], [m], torch.tensor(0.1), 0.9, 0.99, 0.0)
    assert p._version == 0 and m._version == 0
    op([p], [torch.randn(4)], [m], torch.tensor(0.1), 0.9, 0.99, 0.0)
    assert p._version == 1 and m._version == 1


# The static 8-bit op bumps versions and
# refuses to write a tensor that requires grad.
def test_static_8bit_step_bumps_versions_and_refuses_grad_mode_writes():
    w = torch.nn.Parameter(torch.randn(64, 64))
    opt = lion_ops.Lion8bit([w], lr=0.1, min_8bit_size=256, block_wise=False)
    x = torch.randn(4, 64, requires_grad=True)
    y = (x @ w).sum()
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    assert all(state[k]._version > 0 for k in ("state1", "max1", "new_max1")) and w._version > 0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
    leaf = torch.nn.Parameter(torch.randn(300))
    codes = torch.full((300,), 127, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=r"params\[0\] requires grad, and the operator writes it"):
        lion_ops.ops.lion_update_8bit_static([leaf], [torch.randn(300)], [codes], [torch.ones(1)],
                                             [torch.zeros(1)], lion_ops.quantization.dynamic_map(),
                                             torch.tensor(0.1), 0.9, 0.99, 0.0)


def _bad_operator_calls():
    """(name, operator, CPU args) of calls every kernel refuses on metadata alone: one mistake
    each, for every operator and every argument the checks look at."""
    def f32(*shape):
        return torch.randn(shape)

    def codes_of(*shape):
        return torch.randint(0, 256, shape, dtype=torch.uint8)

    lion = torch.ops.lion
    qmap = lion_ops.quantization.dynamic_map()
    hyper = (torch.tensor(0.1), torch.tensor(0.9), torch.tensor(0.99), torch.tensor(0.0))

    def update32(p=None, g=None, m=None, scales=None, hyperparameters=hyper):
        p = p if p is not None else [f32(600), f32(7)]
        g = g if g is not None else [torch.randn_like(t) for t in p]
        m = m if m is not None else [f32(*t.shape) for t in p]
        return lion.lion_update_32bit.default, (p, g, m, *hyperparameters, scales)

    def blockwise(codes=None, absmaxes=None, q=qmap, p=None):
        p = p if p is not None else [f32(600), f32(7)]
        codes = codes if codes is not None else [codes_of(600), codes_of(7)]
        absmaxes = absmaxes if absmaxes is not None else [f32(3).abs(), f32(1).abs()]
        return lion.lion_update_8bit_blockwise.default, (
            p, [torch.randn_like(t) for t in p], codes, absmaxes, q, *hyper, None)

    def static(max1s=None, new_max1s=None, p=None):
        p = p if p is not None else [f32(600), f32(7)]
        return lion.lion_update_8bit_static.default, (
            p, [torch.randn_like(t) for t in p], [codes_of(600), codes_of(7)],
            max1s if max1s is not None else [f32(1).abs(), f32(1).abs()],
            new_max1s if new_max1s is not None else [f32(1), f32(1)], qmap, *hyper, None)

    def clipping(grads=None, vecs=None, steps=None, percentile=5):
        grads = grads if grads is not None else [f32(10), f32(3)]
        vecs = vecs if vecs is not None else [f32(100).abs(), f32(100).abs()]
        steps = steps if steps is not None else [torch.ones(()), torch.ones(())]
        return lion.percentile_clipping.default, (grads, vecs, steps, percentile)

    base = f32(1000)
    param = f32(600)
    shared = f32(100)
    yield "32-bit: grads length", *update32(g=[f32(600)])
    yield "32-bit: param dtype", *update32(p=[f32(600).double(), f32(7).double()])
    yield "32-bit: grad dtype", *update32(g=[f32(600).half(), f32(7)])
    yield "32-bit: grad shape", *update32(g=[f32(600), f32(8)])
    yield "32-bit: sparse grad", *update32(g=[f32(600).to_sparse(), f32(7)])
    yield "32-bit: hyperparameter shape", *update32(
        hyperparameters=(torch.tensor([0.1]),) + hyper[1:])
    yield "32-bit: momentum dtype", *update32(m=[f32(600), f32(7).half()])
    yield "32-bit: momentum shape", *update32(m=[f32(600), f32(6)])
    yield "32-bit: sparse momentum", *update32(m=[f32(600), f32(7).to_sparse()])
    yield "32-bit: a param twice", *update32(p=[param, param])
    yield "32-bit: overlapping params", *update32(p=[base[:600], base[400:]])
    yield "32-bit: momentum inside its param", *update32(p=[param], m=[param[:600]])
    yield "32-bit: expanded param", *update32(p=[f32(1, 600).expand(3, 600)])
    yield "32-bit: grad_scales dtype", *update32(scales=torch.ones(2, dtype=torch.float64))
    yield "32-bit: grad_scales length", *update32(scales=torch.ones(3))
    yield "32-bit: grad_scales strided", *update32(scales=torch.ones(4)[::2])
    yield "blockwise: codes dtype", *blockwise(codes=[codes_of(600), f32(7)])
    yield "blockwise: codes shape", *blockwise(codes=[codes_of(600), codes_of(8)])
    yield "blockwise: absmax length", *blockwise(absmaxes=[f32(3), f32(2)])
    yield "blockwise: absmax 2-D", *blockwise(absmaxes=[f32(3, 1), f32(1)])
    yield "blockwise: absmax strided", *blockwise(absmaxes=[f32(6)[::2], f32(1)])
    yield "blockwise: qmap dtype", *blockwise(q=qmap.double())
    yield "blockwise: qmap length", *blockwise(q=qmap[:255])
    yield "blockwise: qmap strided", *blockwise(q=torch.repeat_interleave(qmap, 2)[::2])
    yield "blockwise: codes over the param's bytes", *blockwise(
        p=[param], codes=[param.view(torch.uint8)[1:601]], absmaxes=[f32(3)])
    yield "blockwise: an absmax twice", *blockwise(absmaxes=[shared[:3], shared[:1]])
    yield "static: max1 size", *static(max1s=[f32(2), f32(1)])
    yield "static: new_max1 dtype", *static(new_max1s=[f32(1), f32(1).half()])
    yield "static: max1 inside a param", *static(p=[param, f32(7)], max1s=[param[5:6], f32(1)])
    yield "clipping: percentile", *clipping(percentile=100)
    yield "clipping: lengths", *clipping(steps=[torch.ones(())])
    yield "clipping: grad dtype", *clipping(grads=[f32(10), f32(3).double()])
    yield "clipping: sparse grad", *clipping(grads=[f32(10).to_sparse(), f32(3)])
    yield "clipping: history length", *clipping(vecs=[f32(100), f32(99)])
    yield "clipping: history strided", *clipping(vecs=[f32(100), f32(200)[::2]])
    yield "clipping: step dtype", *clipping(steps=[torch.ones((), dtype=torch.int64),
                                                   torch.ones(())])
    yield "clipping: a history twice", *clipping(vecs=[shared, shared])
    yield "steps: dtype", lion.increment_steps.default, ([torch.ones(()).double()],)
    yield "steps: size", lion.increment_steps.default, ([torch.ones(2)],)
    yield "steps: sparse", lion.increment_steps.default, ([torch.ones(1).to_sparse()],)
    yield "steps: one twice", lion.increment_steps.default, ([shared[:1], shared[:1]],)
    yield "quantize: blocksize", lion.quantize_blockwise.default, (f32(300), qmap, 0)
    yield "quantize: dtype", lion.quantize_blockwise.default, (f32(300).double(), qmap, 256)
    yield "quantize: sparse", lion.quantize_blockwise.default, (f32(300).to_sparse(), qmap, 256)
    yield "quantize: qmap", lion.quantize_blockwise.default, (f32(300), qmap.half(), 256)
    yield "dequantize: blocksize", lion.dequantize_blockwise.default, (
        codes_of(300), f32(2), qmap, -1)
    yield "dequantize: codes dtype", lion.dequantize_blockwise.default, (
        f32(300), f32(2), qmap, 256)
    yield "dequantize: absmax dtype", lion.dequantize_blockwise.default, (
        codes_of(300), f32(2).half(), qmap, 256)
    yield "dequantize: absmax length", lion.dequantize_blockwise.default, (
        codes_of(300), f32(3), qmap, 256)
    yield "dequantize: sparse absmax", lion.dequantize_blockwise.default, (
        codes_of(300), f32(2).to_sparse(), qmap, 256)


BAD_OPERATOR_CALLS = [name for name, *_ in _bad_operator_calls()]


def _error_of(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 (the error is what the test compares)
        return type(error), str(error).splitlines()[0]
    return None


@pytest.mark.parametrize("case", BAD_OPERATOR_CALLS)
def test_fakes_raise_the_kernels_errors(case):
    """torch.compile and torch.export trace with the fakes: each refuses what its kernel
    refuses, with the same exception type and message, so that a bad call fails where it is
    traced. The kernel writes nothing before refusing."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    _, operator, args = next(c for c in _bad_operator_calls() if c[0] == case)
    tensors = [t for arg in args for t in (arg if isinstance(arg, list) else [arg])
               if isinstance(t, torch.Tensor)]
    before = [t.clone() for t in tensors]
    kernel_error = _error_of(lambda: operator(*args))
    assert kernel_error is not None
    assert all(torch.equal(t.to_dense(), b.to_dense()) for t, b in zip(tensors, before))
    with FakeTensorMode() as mode:
        def fake(arg):
            if isinstance(arg, list):
                return [fake(t) for t in arg]
            return mode.from_tensor(arg) if isinstance(arg, torch.Tensor) else arg
        # (views keep sharing their base's storage: from_tensor memoizes storages)
        fake_args = [fake(arg) for arg in args]
        assert _error_of(lambda: operator(*fake_args)) == kernel_error


def test_fakes_refuse_tensors_of_other_devices():
    """The kernels' device checks, made by the fakes (CPU and meta tensors in one call used to
    dispatch to the fake, which took them and did nothing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    meta = torch.device("meta")
    with FakeTensorMode() as mode:
        def cpu(*shape):
            return mode.from_tensor(torch.zeros(shape))
        hyper = [cpu() for _ in range(4)]
        lion = torch.ops.lion
        calls = {
            r"grads\[0\] must be on meta, got cpu": lambda: lion.lion_update_32bit.default(
                [torch.zeros(5, device=meta)], [cpu(5)], [torch.zeros(5, device=meta)], *hyper),
            r"momenta\[0\] must be on meta, got cpu": lambda: lion.lion_update_32bit.default(
                [torch.zeros(5, device=meta)], [torch.zeros(5, device=meta)], [cpu(5)], *hyper),
            r"params\[1\] is on meta but params\[0\] is on cpu":
                lambda: lion.lion_update_32bit.default(
                    [cpu(5), torch.zeros(5, device=meta)], [cpu(5), torch.zeros(5, device=meta)],
                    [cpu(5), torch.zeros(5, device=meta)], *hyper),
            r"qmap must be on meta, got cpu": lambda: lion.quantize_blockwise.default(
                torch.zeros(5, device=meta), cpu(256), 256),
            r"absmax must be on meta, got cpu": lambda: lion.dequantize_blockwise.default(
                torch.zeros(5, dtype=torch.uint8, device=meta), cpu(1), cpu(256), 256),
            r"steps\[1\] is on meta but steps\[0\] is on cpu":
                lambda: lion.increment_steps.default([cpu(1), torch.zeros(1, device=meta)]),
        }
        for message, call in calls.items():
            with pytest.raises(ValueError, match=message):
                call()
    # Eagerly, a CPU and a meta tensor in one call reach the fake: refused, not ignored.
    with pytest.raises(ValueError, match=r"grads\[0\] must be on meta, got cpu"):
        lion_ops.ops.lion_update_32bit([torch.zeros(5, device=meta)], [torch.zeros(5)],
                                       [torch.zeros(5, device=meta)], 0.1, 0.9, 0.99, 0.0)


def test_columns_of_one_matrix_are_distinct_params():
    """Views that interleave without sharing an element (the column blocks of one matrix)
    are updated, each as if it were a tensor of its own; views that share elements are refused
    (test_fakes_raise_the_kernels_errors)."""
    weight = torch.randn(64, 96)
    grads = [torch.randn(64, 32) for _ in range(3)]
    expected = [weight[:, i * 32:(i + 1) * 32].clone() for i in range(3)]
    momenta, expected_momenta = [torch.randn(64, 32) for _ in range(3)], None
    expected_momenta = [m.clone() for m in momenta]
    op(expected, grads, expected_momenta, torch.tensor(0.1), 0.9, 0.99, 0.1)
    op([weight[:, i * 32:(i + 1) * 32] for i in range(3)], grads, momenta, torch.tensor(0.1),
       0.9, 0.99, 0.1)
    assert torch.equal(weight, torch.cat(expected, dim=1))
    assert all(map(torch.equal, momenta, expected_momenta))


@pytest.mark.parametrize("kind", ["32-bit", "8-bit blockwise", "8-bit static"])
def test_copy_on_write_tensors_are_updated_and_their_originals_kept(kind):
    """A copy-on-write tensor (torch._lazy_clone) is copied when first written: before the
    parallel region, where torch refuses it (the call then failed after writing others)."""
    if not hasattr(torch, "_lazy_clone"):
        pytest.skip("this torch has no copy-on-write tensors")
    n = 70000  # several parallel chunks
    original = torch.randn(n)
    kept = original.clone()
    params = [torch.randn(n), torch._lazy_clone(original)]
    expected = [p.clone() for p in params]
    grads = [torch.randn(n) for _ in params]
    qmap = lion_ops.quantization.dynamic_map()
    hyper = (torch.tensor(0.1), 0.9, 0.99, 0.1)
    if kind == "32-bit":
        momenta = [torch.randn(n), torch._lazy_clone(torch.randn(n))]
        expected_momenta = [m.clone() for m in momenta]
        lion_ops.ops.lion_update_32bit(expected, grads, expected_momenta, *hyper)
        lion_ops.ops.lion_update_32bit(params, grads, momenta, *hyper)
        assert all(map(torch.equal, momenta, expected_momenta))
    else:
        codes = [torch.randint(0, 256, (n,), dtype=torch.uint8) for _ in params]
        scales = ([torch.rand(lion_ops.ops.blockwise_absmax_count(n)) for _ in params]
                  if kind == "8-bit blockwise" else [torch.rand(1) for _ in params])
        states = [[t.clone() for t in codes], [t.clone() for t in scales]]
        cow = [[torch._lazy_clone(t) for t in codes], [torch._lazy_clone(t) for t in scales]]
        if kind == "8-bit blockwise":
            lion_ops.ops.lion_update_8bit_blockwise(expected, grads, *states, qmap, *hyper)
            lion_ops.ops.lion_update_8bit_blockwise(params, grads, *cow, qmap, *hyper)
        else:
            new = [[torch.zeros(1) for _ in params], [torch.zeros(1) for _ in params]]
            lion_ops.ops.lion_update_8bit_static(expected, grads, *states, new[0], qmap, *hyper)
            lion_ops.ops.lion_update_8bit_static(params, grads, *cow, new[1], qmap, *hyper)
        assert all(map(torch.equal, cow[0] + cow[1], states[0] + states[1]))
    assert all(map(torch.equal, params, expected))
    assert torch.equal(original, kept) and not torch.equal(params[1], original)
