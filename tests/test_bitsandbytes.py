"""lion_ops against the implementations it replaces: bitsandbytes' Lion (32-bit state) and
lion-pytorch's Lion, stepped side by side on twin params with identical gradients, and
checkpoints passed both ways between lion_ops and bitsandbytes.

How close is "the same"? All three compute, in fp32 (for fp32 params),
    p *= 1 - lr*wd;  c = b1*m + (1-b1)*g;  p -= lr*sign(c);  m = b2*m + (1-b2)*g
but not with bit-identical roundings:

* Momentum. (1-b) has two legitimate fp32 values: 1 - fp32(b) computed in fp32 (what
  lion_ops does) or the double 1-b rounded to fp32 (what bitsandbytes' CPU path and
  lion-pytorch do). Their relative gap delta(b) is ~1e-6 for b=0.99, ~1.3e-5 for b=0.999.
  Each side also rounds its products and sum (at most 2u relative each, FMA or not). Both
  effects are damped by b2, so |m_ours - m_ref| stays below the worst-case bound
      delta(b2) * env + 4u * R,   env_t = b2*env + (1-b2)*|g|,
                                  R_t   = b2*R + b2*|m| + (1-b2)*|g|
  (u = 2^-24, the fp32 unit roundoff), tracked in fp64 by `Lockstep` below. The bound is
  attained up to rounding (at the first step, m = (1-b2)*g), so it gets 1% of headroom for
  the bookkeeping itself (fp64 sums, fp32-rounded betas) and nothing more. Observed: 0.86 to
  0.99 of it.
* Params. The param update is the same sequence of correctly rounded operations on the same
  inputs (lr*sign(c) is exact), so params stay *bitwise* equal -- provided the decay factor
  1 - lr*wd rounds to the same fp32 on both sides (checked by `decay_factor`) and sign(c)
  agrees. sign(c) may legitimately differ only where c is within the momentum bound plus
  rounding of zero; those elements (0 to 5 in 577k element-updates here) are excused for the
  rest of the run, and the tests assert they stay rare, so a wrong sign cannot hide there.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

import lion_ops

U32 = 2.0 ** -24  # fp32 unit roundoff
BOOKKEEPING_SLACK = 1.01  # see the module docstring

# Awkward sizes: a single element, less than one vector, odd 2-D and 3-D shapes, and many
# vectors with a ragged tail (4097: one past bitsandbytes' min_8bit_size).
SHAPES = [(1,), (7,), (33, 17), (1000,), (4097,), (3, 5, 7)]
HALF_DTYPES = (torch.bfloat16, torch.float16)
# Sign-ambiguous elements allowed, as a fraction of all element-updates compared.
MAX_EXCUSED_FRACTION = 1e-4


# ---- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture
def bnb():
    return pytest.importorskip("bitsandbytes")


def skip_unless_bnb_runs_on(device):
    """bitsandbytes runs on the CPU in plain torch, on CUDA only with its native library."""
    if device.type == "cuda":
        from bitsandbytes import cextension
        if not isinstance(getattr(cextension, "lib", None),
                          getattr(cextension, "CudaBNBNativeLibrary", ())):
            pytest.skip("bitsandbytes has no CUDA library on this machine")


@pytest.fixture
def lion_pytorch():
    return pytest.importorskip("lion_pytorch")


def make_params(shapes, dtype, device, scale=0.1):
    """Random params, small enough that bf16 params still move by lr=1e-3 steps."""
    return [(torch.randn(s) * scale).to(device=device, dtype=dtype) for s in shapes]


def twins(tensors):
    """Two independent leaf copies of each tensor."""
    return ([t.clone().requires_grad_() for t in tensors],
            [t.clone().requires_grad_() for t in tensors])


def random_grad(p):
    """A fresh gradient; about 10% exact zeros, so sign(0) and c == 0 get exercised too."""
    g = torch.randn(p.shape) * (torch.rand(p.shape) > 0.1)
    return g.to(device=p.device, dtype=p.dtype)


def one_minus_gap(beta):
    """Relative gap between the two legitimate fp32 values of 1 - beta (see module doc)."""
    b32 = torch.tensor(beta, dtype=torch.float32).item()
    via_fp32 = torch.tensor(1.0 - b32, dtype=torch.float32).item()
    via_double = torch.tensor(1.0 - beta, dtype=torch.float32).item()
    return abs(via_fp32 - via_double) / (1.0 - beta) if beta != 1.0 else 0.0


def decay_factor(opt_cls, lr, weight_decay, device):
    """The fp32 factor an optimizer shrinks params by: one step of a param 1.0 with a zero
    gradient and zero momentum (sign(0) = 0) leaves exactly 1 * (1 - lr*wd)."""
    p = torch.ones(1, device=device, requires_grad=True)
    opt = opt_cls([p], lr=lr, weight_decay=weight_decay)
    p.grad = torch.zeros_like(p)
    opt.step()
    return p.item()


def momentum_of(opt, p, key):
    state = opt.state.get(p)
    return state[key] if state else None


def step_of(opt, p):
    step = (opt.state.get(p) or {}).get("step")
    return None if step is None else int(step)


@dataclass
class Pair:
    a: Tensor
    b: Tensor
    group: dict              # a's param group: where lr and betas are read
    env: Tensor              # fp64 envelope of |m| (see module doc)
    rnd: Tensor              # fp64 accumulated rounding magnitude R
    excused: Tensor = field(init=False)  # elements where sign(c) was ever ambiguous

    def __post_init__(self):
        self.excused = torch.zeros(self.a.shape, dtype=torch.bool)

    def momentum_bound(self):
        return BOOKKEEPING_SLACK * (one_minus_gap(self.group["betas"][1]) * self.env
                                    + 4 * U32 * self.rnd)


class Lockstep:
    """Steps optimizer `opt_a` (params of its groups) and `opt_b` (the twin params, in the same
    group layout) with identical gradients, and after every step checks that params and
    momenta agree within the bounds of the module docstring. `b` is the reference whose
    momentum the bounds are computed from. Momenta that exist when this starts must already
    be equal (a fresh optimizer, or both loaded from one checkpoint)."""

    def __init__(self, opt_a, opt_b, key_a="state1", key_b="state1"):
        self.opt_a, self.opt_b, self.key_a, self.key_b = opt_a, opt_b, key_a, key_b
        self.pairs = []
        self.compared = 0
        for ga, gb in zip(opt_a.param_groups, opt_b.param_groups, strict=True):
            for pa, pb in zip(ga["params"], gb["params"], strict=True):
                ma, mb = momentum_of(opt_a, pa, key_a), momentum_of(opt_b, pb, key_b)
                assert (ma is None) == (mb is None)
                if mb is not None:
                    assert torch.equal(ma.float(), mb.float()), "momenta differ at the start"
                env = torch.zeros(pa.shape, dtype=torch.float64) if mb is None \
                    else mb.detach().cpu().double().abs()
                self.pairs.append(Pair(pa, pb, ga, env, torch.zeros_like(env)))

    def step(self, without_grad=()):
        """One step of both; params whose index is in `without_grad` get no gradient."""
        for i, pair in enumerate(self.pairs):
            if i in without_grad:
                pair.a.grad = pair.b.grad = None
                continue
            g = random_grad(pair.a)
            pair.a.grad, pair.b.grad = g.clone(), g.clone()
            self._track(pair, g.cpu().double())
            self.compared += pair.a.numel()
        self.opt_a.step()
        self.opt_b.step()
        self.check()

    def _track(self, pair, g):
        """Before a step: mark where sign(c) is ambiguous, then advance the bounds."""
        b1, b2 = pair.group["betas"]
        m = momentum_of(self.opt_b, pair.b, self.key_b)
        m = torch.zeros_like(g) if m is None else m.detach().cpu().double()
        c = b1 * m + (1 - b1) * g
        scale = b1 * m.abs() + (1 - b1) * g.abs()
        # |c_a - c_b| <= b1*|m_a - m_b| + gap(1-b1)*(1-b1)*|g| + rounding on each side.
        slack = (b1 * pair.momentum_bound() + one_minus_gap(b1) * (1 - b1) * g.abs()
                 + 4 * U32 * scale)
        pair.excused |= c.abs() < slack  # strict: c == 0 exactly is never excused
        pair.rnd = b2 * pair.rnd + b2 * m.abs() + (1 - b2) * g.abs()
        pair.env = b2 * pair.env + (1 - b2) * g.abs()

    def check(self):
        for i, pair in enumerate(self.pairs):
            where = f"param {i} {tuple(pair.a.shape)} {pair.a.dtype}"
            ma = momentum_of(self.opt_a, pair.a, self.key_a)
            mb = momentum_of(self.opt_b, pair.b, self.key_b)
            assert (ma is None) == (mb is None), f"{where}: state in one optimizer only"
            if mb is None:
                assert torch.equal(pair.a, pair.b), f"{where}: a param without state changed"
                continue
            step_a, step_b = step_of(self.opt_a, pair.a), step_of(self.opt_b, pair.b)
            if step_a is not None and step_b is not None:
                assert step_a == step_b, f"{where}: step {step_a} != {step_b}"
            diff = (ma.detach().cpu().double() - mb.detach().cpu().double()).abs()
            bound = pair.momentum_bound()
            assert bool((diff <= bound).all()), (
                f"{where}: momentum off by {diff.max().item():.3g}, worst ratio to its bound "
                f"{(diff / bound.clamp_min(1e-300)).max().item():.3g}")
            keep = ~pair.excused.to(pair.a.device)
            mismatch = (pair.a != pair.b) & keep
            assert not bool(mismatch.any()), (
                f"{where}: {int(mismatch.sum())} params differ where sign(c) was unambiguous, "
                f"e.g. {pair.a[mismatch][:4].tolist()} vs {pair.b[mismatch][:4].tolist()}")
        excused = sum(int(p.excused.sum()) for p in self.pairs)
        assert excused <= MAX_EXCUSED_FRACTION * self.compared, (
            f"{excused} sign-ambiguous elements in {self.compared} updates: too many to be "
            "rounding")


def assert_moved(before, after, min_fraction=0.5):
    """Guards against vacuous agreement (e.g. both sides never updating)."""
    moved = sum(int((b != a.detach()).sum()) for b, a in zip(before, after))
    total = sum(b.numel() for b in before)
    assert moved >= min_fraction * total, f"only {moved} of {total} param elements moved"


# ---- 1. lion_ops.Lion vs bitsandbytes.optim.Lion, one param group -----------------------------
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_matches_bitsandbytes(bnb, device, dtype):
    skip_unless_bnb_runs_on(device)
    if device.type == "cuda" and dtype in HALF_DTYPES:
        # The bounds above are derived from bitsandbytes' CPU path, which rounds a 16-bit
        # param once per step; its CUDA kernel's rounding of 16-bit params is not verified.
        pytest.skip("16-bit params are compared with bitsandbytes on the CPU only")
    lr, betas, wd = 1e-3, (0.9, 0.99), 0.1
    assert decay_factor(lion_ops.Lion, lr, wd, device) == \
        decay_factor(bnb.optim.Lion, lr, wd, device)
    initial = make_params(SHAPES, dtype, device)
    ours, theirs = twins(initial)
    run = Lockstep(lion_ops.Lion(ours, lr=lr, betas=betas, weight_decay=wd),
                   bnb.optim.Lion(theirs, lr=lr, betas=betas, weight_decay=wd))
    for _ in range(100):
        run.step()
    assert_moved(initial, ours)


# ---- 2. param groups, params without gradients -------------------------------------------------
GROUP_DEFAULTS = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
GROUP_OVERRIDES = [{},  # the constructor's values
                   {"lr": 3e-3, "betas": (0.95, 0.98), "weight_decay": 0.0},
                   {"lr": 1e-2, "betas": (0.8, 0.999), "weight_decay": 0.5}]


def grouped(params):
    """Three groups with different hyperparameters, over params [0:2], [2:5] and [5:]."""
    return [dict(params=params[a:b], **over)
            for (a, b), over in zip([(0, 2), (2, 5), (5, None)], GROUP_OVERRIDES)]


def test_param_groups_and_missing_grads_match_bitsandbytes(bnb):
    device = torch.device("cpu")
    shapes = [(1,), (33, 17), (7,), (1000,), (3, 5, 7), (4097,), (5, 5)]
    initial = make_params(shapes, torch.float32, device)
    initial[3] = initial[3].bfloat16()  # a bf16 param among fp32 ones in group 1
    ours, theirs = twins(initial)
    for over in GROUP_OVERRIDES:
        lr, wd = over.get("lr", GROUP_DEFAULTS["lr"]), \
            over.get("weight_decay", GROUP_DEFAULTS["weight_decay"])
        assert decay_factor(lion_ops.Lion, lr, wd, device) == \
            decay_factor(bnb.optim.Lion, lr, wd, device)
    run = Lockstep(lion_ops.Lion(grouped(ours), **GROUP_DEFAULTS),
                   bnb.optim.Lion(grouped(theirs), **GROUP_DEFAULTS))
    never, sometimes = 4, 6  # (3,5,7) never gets a gradient; (5,5) only on even steps
    for step in range(60):
        run.step(without_grad={never} | ({sometimes} if step % 2 else set()))
    assert ours[never].grad is None and torch.equal(ours[never], initial[never])
    assert run.opt_a.state.get(ours[never]) is None
    assert step_of(run.opt_a, ours[sometimes]) == 30
    assert step_of(run.opt_a, ours[0]) == 60


# ---- 3. checkpoints between lion_ops and bitsandbytes -------------------------------------------
def save_and_load(state_dict, through_bytes):
    if not through_bytes:
        return state_dict
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def checkpoint_groups(params):
    return [{"params": params[:3], "lr": 1e-3, "betas": (0.9, 0.99), "weight_decay": 0.1},
            {"params": params[3:], "lr": 3e-3, "betas": (0.95, 0.98), "weight_decay": 0.0}]


@pytest.mark.parametrize("through_bytes", [False, True], ids=["in_memory", "torch_save"])
@pytest.mark.parametrize("saver", ["lion_ops", "bitsandbytes"])
def test_checkpoint_interchange(bnb, device, saver, through_bytes):
    skip_unless_bnb_runs_on(device)
    classes = {"lion_ops": lion_ops.Lion, "bitsandbytes": bnb.optim.Lion}
    saver_cls = classes[saver]
    loader_cls = classes["bitsandbytes" if saver == "lion_ops" else "lion_ops"]
    shapes = [(7,), (33, 17), (4097,), (1000,), (3, 5, 7)]
    initial = make_params(shapes, torch.float32, device)
    if device.type == "cpu":
        initial[3] = initial[3].bfloat16()  # the loader must keep its momentum fp32
    no_grad = 4

    trained = [p.clone().requires_grad_() for p in initial]
    saving = saver_cls(checkpoint_groups(trained))
    for _ in range(20):
        for i, p in enumerate(trained):
            p.grad = None if i == no_grad else random_grad(p)
        saving.step()
    checkpoint = save_and_load(saving.state_dict(), through_bytes)

    resumed = [p.detach().clone().requires_grad_() for p in trained]
    # Deliberately different hyperparameters: the checkpoint's must replace them.
    loading = loader_cls([{"params": resumed[:3]}, {"params": resumed[3:]}], lr=0.5,
                         betas=(0.5, 0.5), weight_decay=0.0)
    loading.load_state_dict(checkpoint)

    for saved, loaded in zip(saving.param_groups, loading.param_groups, strict=True):
        assert loaded["lr"] == saved["lr"]
        assert tuple(loaded["betas"]) == tuple(saved["betas"])
        assert loaded["weight_decay"] == saved["weight_decay"]
    for p_saved, p_loaded in zip(trained, resumed):
        m_saved, m_loaded = momentum_of(saving, p_saved, "state1"), \
            momentum_of(loading, p_loaded, "state1")
        assert (m_saved is None) == (m_loaded is None)
        if m_saved is not None:
            assert m_loaded.dtype == torch.float32 and m_loaded.device == p_loaded.device
            assert torch.equal(m_loaded, m_saved)
            assert step_of(loading, p_loaded) == step_of(saving, p_saved) == 20

    # Both continue with the same gradients: the loader, resumed from the saver's
    # checkpoint, must track the saver as closely as two fresh optimizers would.
    run = Lockstep(loading, saving)
    for step in range(20):
        run.step(without_grad={no_grad} if step < 10 else ())
    assert step_of(loading, resumed[0]) == 40 and step_of(loading, resumed[no_grad]) == 10


def test_state_dict_layout_is_bitsandbytes(bnb):
    device = torch.device("cpu")
    initial = make_params([(7,), (33, 17), (4097,), (1000,), (3, 5, 7)], torch.float32, device)
    ours, theirs = twins(initial)
    run = Lockstep(lion_ops.Lion(checkpoint_groups(ours)),
                   bnb.optim.Lion(checkpoint_groups(theirs)))
    for _ in range(3):
        run.step(without_grad={4})
    mine, reference = run.opt_a.state_dict(), run.opt_b.state_dict()

    assert sorted(mine["state"]) == sorted(reference["state"]) == [0, 1, 2, 3]
    for index, entry in mine["state"].items():
        assert set(entry) == {"step", "__bnb_optimizer_quant_state__"}
        assert type(entry["step"]) is int and entry["step"] == 3
        nested = entry["__bnb_optimizer_quant_state__"]
        assert set(nested) == {"state1"}
        assert nested["state1"].dtype == torch.float32
        assert nested["state1"].shape == ours[index].shape
        ref_entry = reference["state"][index]
        assert set(entry) == set(ref_entry) and entry["step"] == ref_entry["step"]
        assert set(nested) == set(ref_entry["__bnb_optimizer_quant_state__"])
    assert len(mine["param_groups"]) == len(reference["param_groups"])
    for group, ref_group in zip(mine["param_groups"], reference["param_groups"]):
        assert {"lr", "betas", "weight_decay", "eps", "params"} <= set(group)
        assert set(group) == set(ref_group)
        assert group == ref_group


# ---- 4. lion_ops.Lion vs lion_pytorch.Lion --------------------------------------------------
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_lion_pytorch(lion_pytorch, device, weight_decay):
    lr, betas = 1e-3, (0.9, 0.99)
    # lion-pytorch also decays with p *= 1 - lr*wd, before the sign update.
    assert decay_factor(lion_ops.Lion, lr, weight_decay, device) == \
        decay_factor(lion_pytorch.Lion, lr, weight_decay, device)
    initial = make_params(SHAPES, torch.float32, device)
    ours, theirs = twins(initial)
    run = Lockstep(lion_ops.Lion(ours, lr=lr, betas=betas, weight_decay=weight_decay),
                   lion_pytorch.Lion(theirs, lr=lr, betas=betas, weight_decay=weight_decay),
                   key_b="exp_avg")
    for _ in range(50):
        run.step()
    assert_moved(initial, ours)
