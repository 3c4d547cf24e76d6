"""percentile_clipping with bitsandbytes 0.49's semantics, on the device and inside compiled
graphs, against a reference written in plain PyTorch."""

import copy
import io

import pytest
import torch
from torch.library import opcheck

import lion_ops
from lion_ops import Lion, Lion8bit
from reference import lion_reference_step
from op_args import as_op_args
from resources import free_memory_bytes
from scalar_loops import run_with_scalar_loops


def reference_clip(grad, gnorm_vec, step, percentile):
    """bitsandbytes 0.49: record ||g||^2 (every slot at step 1, else slot step % 100), then
    scale = clip / current if current > clip, with clip = sqrt(sorted(history)[percentile])."""
    squared = grad.double().pow(2).sum()
    if step == 1 or gnorm_vec[0] < 0:  # (a fresh history, -1: see the test below)
        gnorm_vec[:] = squared
    else:
        gnorm_vec[step % 100] = squared
    current = squared.sqrt()
    clip = torch.sort(gnorm_vec.double()).values[percentile].sqrt()
    return float(clip / current) if current > clip else 1.0


@pytest.mark.parametrize("percentile", [0, 5, 50, 99])
def test_operator_matches_reference(device, dtype, percentile):
    torch.manual_seed(percentile)
    sizes = [1, 7, 4097, 30000, 0]  # (30000: several CUDA blocks)
    if device.type == "cpu":
        sizes.append(2 * 32768 + 5)  # several CPU chunks
    clipped = 0
    vecs = [torch.zeros(100, device=device) for _ in sizes]
    ref_vecs = [torch.zeros(100, dtype=torch.float64) for _ in sizes]
    steps = [torch.zeros((), device=device) for _ in sizes]
    for step in range(1, 130):
        # Growing, noisy gradient norms, so that clipping engages sometimes.
        grads = [torch.randn(n, device=device, dtype=dtype) * (1 + step % 7) for n in sizes]
        lion_ops.ops.increment_steps(steps)
        scales = lion_ops.ops.percentile_clipping(grads, vecs, steps, percentile)
        expected = [reference_clip(g.cpu(), v, step, percentile) for g, v in zip(grads, ref_vecs)]
        torch.testing.assert_close(scales.cpu().double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=2e-6, atol=0)
        for v, r in zip(vecs, ref_vecs):
            torch.testing.assert_close(v.cpu().double(), r, rtol=2e-6, atol=0)
        clipped += sum(s < 1 for s in expected)
    # Not vacuous: below the 99th percentile, clipping engaged often (330 to 500 times).
    assert percentile == 99 or clipped > 100, clipped


@pytest.mark.parametrize("percentile", [0, 1, 50, 97, 98, 99])
def test_nan_norms_in_the_history_rank_last(device, percentile):
    """A NaN gradient leaves a NaN in the norm history for 100 steps (in every slot, at step
    1). The history is ranked as torch.sort sorts (NaN last), so exactly one value is the
    percentile (with plain < every NaN ranked 0 and higher ranks went unwritten, leaving the
    scale uninitialized on CUDA); a NaN clip or current norm gives a scale of 1."""
    sizes = [5, 300, 40]
    vecs = [torch.zeros(100, device=device) for _ in sizes]
    ref_vecs = [torch.zeros(100, dtype=torch.float64) for _ in sizes]
    steps = [torch.zeros((), device=device) for _ in sizes]
    generator = torch.Generator().manual_seed(percentile)
    for step in range(1, 8):
        grads = [torch.randn(n, generator=generator) * (1 + step % 3) for n in sizes]
        if step == 1:
            grads[0][2] = float("nan")  # every slot of tensor 0's history becomes NaN
        if step in (2, 3):
            grads[1][7] = float("nan")  # two NaN slots in tensor 1's
        lion_ops.ops.increment_steps(steps)
        scales = lion_ops.ops.percentile_clipping([g.to(device) for g in grads], vecs, steps,
                                                  percentile)
        expected = [reference_clip(g, v, step, percentile) for g, v in zip(grads, ref_vecs)]
        torch.testing.assert_close(scales.cpu().double(), torch.tensor(expected, dtype=torch.float64),
                                   rtol=2e-6, atol=0)
        for v, r in zip(vecs, ref_vecs):
            torch.testing.assert_close(v.cpu().double(), r, rtol=2e-6, atol=0, equal_nan=True)
    # Tensor 0's history holds 6 finite norms (steps 2 to 7) and 94 NaNs: from the 7th rank
    # on, the clip is NaN.
    assert (expected[0] == 1.0) == (percentile >= 6) and torch.isnan(ref_vecs[1]).sum() == 2


@pytest.mark.parametrize("how", ["checkpoint without history", "override"])
def test_clipping_started_on_existing_state_fills_a_fresh_history(how):
    """Clipping that starts on a param that already has state (a checkpoint saved with
    clipping off, as bitsandbytes 0.50 saves them, or an override) gets a fresh history, whose
    first record fills every slot as at step 1. (It got a history of zeros, so the clip was 0
    and every gradient was scaled to 0 for the next 94 steps.)"""
    from lion_ops.optim import GlobalOptimManager
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(1000))
    opt = Lion([p], lr=1e-3)
    for _ in range(10):
        p.grad = torch.randn(1000)
        opt.step()
    if how == "override":
        GlobalOptimManager.get_instance().override_config(p, "percentile_clipping", 5)
        clipped = opt
    else:
        clipped = Lion([p], lr=1e-3, percentile_clipping=5)
        clipped.load_state_dict(opt.state_dict())
    try:
        history = None
        for step in range(12):
            momentum = clipped.state[p]["state1"].clone()
            g = torch.randn(1000) * (3 if step == 5 else 1)
            p.grad = g.clone()
            clipped.step()
            history = clipped.state[p]["gnorm_vec"]
            scale = ((clipped.state[p]["state1"] - 0.99 * momentum) / (0.01 * g)).median()
            if step == 0:
                assert torch.all(history == g.double().pow(2).sum().float())  # every slot
                assert scale == pytest.approx(1.0, rel=1e-3)  # not clipped to 0
            if step == 5:  # a gradient 3x the others': clipped to the 5th percentile's norm
                assert 0.2 < scale < 0.5
        assert (history > 0).all()
    finally:
        GlobalOptimManager.get_instance().initialize()


def _reference_lion_with_clipping(params, grads_per_step, lr, betas, wd, percentile):
    params = [p.detach().double().clone() for p in params]
    momenta = [torch.zeros_like(p) for p in params]
    vecs = [torch.zeros(100, dtype=torch.float64) for _ in params]
    for step, grads in enumerate(grads_per_step, start=1):
        for i, g in enumerate(grads):
            scale = reference_clip(g, vecs[i], step, percentile)
            params[i], momenta[i], _ = lion_reference_step(params[i], g.double() * scale,
                                                           momenta[i], lr, *betas, wd)
    return params


def _grads(shapes, steps, generator):
    return [[torch.randn(s, generator=generator) * (1 + (k * 37) % 5) for s in shapes]
            for k in range(steps)]


def test_lion_with_percentile_clipping_matches_reference():
    shapes = [(33, 17), (1000,), (5,)]
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    grads = _grads(shapes, 30, generator)
    expected = _reference_lion_with_clipping(params, grads, 1e-2, (0.9, 0.99), 0.1, 10)
    opt = Lion(params, lr=1e-2, weight_decay=0.1, percentile_clipping=10)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-5)
    nested = opt.state_dict()["state"][0]["__bnb_optimizer_quant_state__"]
    assert nested["gnorm_vec"].shape == (100,)


@pytest.mark.parametrize("cls, kwargs", [(Lion, {}), (Lion8bit, {}),
                                         (Lion8bit, {"block_wise": False})])
def test_clipping_checkpoint_resume_is_exact(cls, kwargs):
    shapes = [(70, 70), (9,)]
    generator = torch.Generator().manual_seed(1)
    start = [torch.randn(s, generator=generator) for s in shapes]
    grads = _grads(shapes, 8, generator)

    def run(params, opt, step_grads):
        for gs in step_grads:
            for p, g in zip(params, gs):
                p.grad = g.clone()
            opt.step()

    a = [torch.nn.Parameter(t.clone()) for t in start]
    run(a, cls(a, lr=1e-2, percentile_clipping=20, **kwargs), grads)
    b = [torch.nn.Parameter(t.clone()) for t in start]
    opt_b = cls(b, lr=1e-2, percentile_clipping=20, **kwargs)
    run(b, opt_b, grads[:4])
    buffer = io.BytesIO()
    torch.save(opt_b.state_dict(), buffer)
    buffer.seek(0)
    c = [torch.nn.Parameter(p.detach().clone()) for p in b]
    opt_c = cls(c, lr=1e-2, percentile_clipping=20, **kwargs)
    opt_c.load_state_dict(torch.load(buffer, weights_only=True))
    run(c, opt_c, grads[4:])
    for x, y in zip(a, c):
        assert torch.equal(x, y)


_SCALAR_CLIPPING_SCRIPT = """
import sys, torch, lion_ops
grads, vecs, steps = inputs = torch.load(sys.argv[1])
lion_ops.ops.percentile_clipping(grads, vecs, steps, 5)
torch.save(inputs, sys.argv[1])
"""


def _norm_order_grads(dtype):
    """Gradients whose float32 squared norm depends on the order of the additions: squares
    s^2, s^2 2^-24 (together a float32 rounding tie) and 256 of s^2 2^-60. Added one by one
    to the running sum, the small ones vanish (the tie rounds to even: s^2); added among
    themselves first (2^-52 s^2) they break the tie (s^2 (1 + 2^-23), the correctly rounded
    sum). The first tensor has them in one CPU chunk, the small ones in lane 4 of the 8 lanes;
    the second has the small ones two chunks after the others."""
    s = 2.0**8 if dtype == torch.float16 else 1.0  # keeps s 2^-30 within float16's range
    chunk = 32768
    within, across = torch.zeros(chunk + 3), torch.zeros(4 * chunk + 3)
    for g, first_small in ((within, 12), (across, 2 * chunk + 4)):
        g[0], g[1] = s, s * 2.0**-12
        g[first_small:first_small + 8 * 256:8] = s * 2.0**-30
    expected = torch.tensor(s * s * (1 + 2.0**-23), dtype=torch.float32)
    return [within.to(dtype), across.to(dtype)], expected


def test_cpu_norms_are_added_in_one_order(tmp_path, dtype):
    """The squared norms are added in one fixed order (lanes within chunks, then chunks in
    order): the same bits with 1 or 2 threads and with the scalar loops (LION_OPS_NO_AVX2=1)
    as with the AVX2 loop, on gradients where another order would round differently."""
    grads, expected = _norm_order_grads(dtype)
    decades = 3 if dtype == torch.float16 else 15  # and a wide spread of magnitudes
    grads += [(torch.randn(n) * torch.logspace(-decades, decades, n)).to(dtype)
              for n in (3, 1001, 5 * 32768 + 7)]
    steps = [torch.full((), 7.0) for _ in grads]

    def norms(num_threads):
        vecs = [torch.ones(100) for _ in grads]
        before = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            lion_ops.ops.percentile_clipping(grads, vecs, steps, 5)
        finally:
            torch.set_num_threads(before)
        return torch.stack([v[7] for v in vecs])

    one, two = norms(1), norms(2)
    assert torch.equal(one, two)
    assert torch.equal(one[:2], expected.expand(2))
    vecs = [torch.ones(100) for _ in grads]
    scalar_vecs = run_with_scalar_loops(tmp_path, _SCALAR_CLIPPING_SCRIPT, (grads, vecs, steps))[1]
    assert torch.equal(torch.stack([v[7] for v in scalar_vecs]), one)
    exact = torch.stack([g.double().pow(2).sum() for g in grads[2:]])
    torch.testing.assert_close(one[2:].double(), exact, rtol=2e-7, atol=0)


def test_norm_of_more_than_2_pow_31_elements(device):
    """A gradient of 2^31 + 300 ones has the squared norm 2^31 + 300, as float32 2^31 + 256:
    no element count wraps at 32 bits."""
    n = 2**31 + 300
    if free_memory_bytes(device) < 2 * n + (2 << 30):
        pytest.skip(f"needs about {2 * n / 2**30:.0f} GiB of free memory on {device}")
    grads = [torch.ones(n, dtype=torch.bfloat16, device=device)]
    vecs = [torch.zeros(100, device=device)]
    lion_ops.ops.percentile_clipping(grads, vecs, [torch.full((), 2.0, device=device)], 5)
    # The CPU adds in float64 (exact here); CUDA adds float32 partials, which may round.
    torch.testing.assert_close(vecs[0][2].cpu(), torch.tensor(float(n)),
                               rtol=0 if device.type == "cpu" else 1e-6, atol=0)
    del grads
    if device.type == "cuda":
        torch.cuda.empty_cache()


def test_grad_scales_scale_the_gradient_everywhere(device):
    """A scale s on g must act exactly like passing s*g (decay, sign input and momentum)."""
    p = torch.randn(300, device=device)
    g = torch.randn(300, device=device)
    m = torch.randn(300, device=device)
    p2, m2 = p.clone(), m.clone()
    scale = torch.tensor([0.25], device=device)
    lion_ops.ops.lion_update_32bit([p], [g], [m], torch.tensor(0.1), 0.9, 0.99, 0.1, scale)
    lion_ops.ops.lion_update_32bit([p2], [g * 0.25], [m2], torch.tensor(0.1), 0.9, 0.99, 0.1)
    assert torch.equal(p, p2) and torch.equal(m, m2)


def test_opcheck_percentile_and_scaled_updates(device, dtype):
    grads = [torch.randn(n, device=device, dtype=dtype) for n in (5, 3000)]
    vecs = [torch.rand(100, device=device) for _ in grads]
    steps = [torch.full((), 7.0, device=device) for _ in grads]
    opcheck(torch.ops.lion.percentile_clipping.default, (grads, vecs, steps, 5))
    params = [torch.randn_like(g) for g in grads]
    momenta = [torch.zeros(g.shape, device=device) for g in grads]
    scales = torch.tensor([0.5, 1.0], device=device)
    opcheck(torch.ops.lion.lion_update_32bit.default,
            as_op_args((params, grads, momenta, torch.tensor(0.1), 0.9, 0.99, 0.0, scales)))


def test_bad_percentile_arguments_are_refused():
    g = [torch.randn(4)]
    with pytest.raises(ValueError, match="percentile must be in 0..99"):
        lion_ops.ops.percentile_clipping(g, [torch.zeros(100)], [torch.ones(())], 100)
    for not_an_int in (5.7, "5", True):  # (int() would have made 5, 5 and 1 of them)
        with pytest.raises(TypeError, match=f"percentile must be an int, got {not_an_int!r}"):
            lion_ops.ops.percentile_clipping(g, [torch.zeros(100)], [torch.ones(())], not_an_int)
    vec = torch.zeros(50)
    with pytest.raises(ValueError, match=r"gnorm_vecs\[0\] must be a contiguous float32 tensor of 100"):
        lion_ops.ops.percentile_clipping(g, [vec], [torch.ones(())], 5)
    strided = torch.zeros(200)[::2]  # written through its data pointer: the wrong elements
    with pytest.raises(ValueError, match=r"gnorm_vecs\[0\] must be a contiguous float32 tensor of 100"):
        lion_ops.ops.percentile_clipping(g, [strided], [torch.full((), 3.0)], 5)
    with pytest.raises(ValueError, match="grad_scales must be a contiguous 1-D tensor"):
        lion_ops.ops.lion_update_32bit(g, [torch.randn(4)], [torch.zeros(4)], torch.tensor(0.1),
                                       0.9, 0.99, 0.0, torch.ones(2))


@pytest.mark.parametrize("step", [-5.0, float("nan"), float("inf"), -float("inf")])
def test_a_step_counter_that_is_no_count_is_refused_and_nothing_is_written(step):
    # It was cast to an integer slot: a write before the history's first element (NaN and inf
    # gave slot -8), which crashed the process after a few steps.
    memory = torch.randn(120)
    history = memory[10:110]
    before = memory.clone()
    with pytest.raises(ValueError, match=r"steps\[1\] must be a finite count >= 0, got"):
        lion_ops.ops.percentile_clipping([torch.randn(4), torch.randn(3)],
                                         [torch.randn(100), history],
                                         [torch.tensor(2.0), torch.tensor(step)], 5)
    assert torch.equal(memory, before)


def test_a_zero_norm_in_the_first_slot_is_a_record_not_a_fresh_history():
    # Only a negative first slot marks a history that has recorded nothing; a zero gradient
    # recorded at slot 0 (step 100) is a record like any other.
    history = torch.arange(100, dtype=torch.float32) + 1
    history[0] = 0.0
    grad = torch.full((4,), 0.5)  # squared norm 1.0
    lion_ops.ops.percentile_clipping([grad], [history], [torch.tensor(101.0)], 5)
    expected = torch.arange(100, dtype=torch.float32) + 1
    expected[0], expected[1] = 0.0, 1.0
    assert torch.equal(history, expected)


def test_no_grads_give_no_scales():
    scales = lion_ops.ops.percentile_clipping([], [], [], 5)
    assert scales.shape == (0,) and scales.dtype == torch.float32


def test_compile_and_export_with_clipping_on(device):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = torch.nn.Linear(64, 64).to(device)
    reference = copy.deepcopy(model)
    opt = Lion(model.parameters(), lr=torch.tensor(1e-2), percentile_clipping=5)
    ref_opt = Lion(reference.parameters(), lr=torch.tensor(1e-2), percentile_clipping=5)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for i in range(6):
        x = torch.randn(8, 64, device=device) * (1 + i % 3)
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
        step()
        ref_opt.step()
        for o in (opt, ref_opt):
            o.param_groups[0]["lr"].fill_(1e-2 / (i + 2))
    assert counter.frame_count == 2
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)
    torch._dynamo.reset()

    class Clip(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("gnorm", torch.zeros(100))
            self.register_buffer("step", torch.zeros(()))

        def forward(self, grad):
            lion_ops.ops.increment_steps([self.step])
            return lion_ops.ops.percentile_clipping([grad], [self.gnorm], [self.step], 5)

    module = Clip()
    eager = copy.deepcopy(module)
    grad = torch.randn(50)
    program = torch.export.export(module, (grad,))
    assert "lion.percentile_clipping" in program.graph_module.code
    assert torch.equal(program.module()(grad), eager(grad))


def _train_one(opt, p, steps, seed):
    torch.manual_seed(seed)
    for _ in range(steps):
        p.grad = torch.randn_like(p)
        opt.step()


# A saved gnorm_vec of another float dtype loads as float32.
def test_a_float64_gnorm_vec_loads_as_float32_and_steps():
    p = torch.nn.Parameter(torch.randn(300))
    opt = Lion([p], lr=0.01, percentile_clipping=50)
    _train_one(opt, p, 3, 0)
    saved = opt.state_dict()
    nested = saved["state"][0]["__bnb_optimizer_quant_state__"]
    nested["gnorm_vec"] = nested["gnorm_vec"].double()
    q = torch.nn.Parameter(p.detach().clone())
    fresh = Lion([q], lr=0.01, percentile_clipping=50)
    fresh.load_state_dict(saved)
    assert fresh.state[q]["gnorm_vec"].dtype == torch.float32
    _train_one(opt, p, 2, 1)
    _train_one(fresh, q, 2, 1)
    assert torch.equal(p, q)
