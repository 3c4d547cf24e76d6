"""The optimizer classes as torch users use them: parity with the fp64 reference over 100
steps, param groups, closures, schedulers, tensor lr, checkpoints, and bad input."""

import copy
import inspect
import io
import os
import pickle
import warnings

import pytest
import torch

import lion_ops
from lion_ops import Lion, Lion8bit, Lion32bit
from reference import lion_reference_step

SHAPES = [(0,), (1,), (7,), (33, 17), (1000,), (4097,), (3, 5, 7)]


def _params(dtype, device, shapes=SHAPES, with_transposed=True):
    params = [torch.nn.Parameter(torch.randn(s, dtype=dtype, device=device)) for s in shapes]
    if with_transposed:  # a non-contiguous leaf
        params.append(torch.nn.Parameter(torch.randn(19, 11, dtype=dtype, device=device).t()))
    return params


def _set_random_grads(params):
    for p in params:
        p.grad = torch.randn_like(p)


# ---- API ----------------------------------------------------------------------------------------

def test_constructors_match_bitsandbytes():
    assert str(inspect.signature(Lion)) == (
        "(params, lr=0.0001, betas=(0.9, 0.99), weight_decay=0, optim_bits=32, args=None, "
        "min_8bit_size=4096, percentile_clipping=100, block_wise=True, is_paged=False)")
    assert str(inspect.signature(Lion32bit)) == (
        "(params, lr=0.0001, betas=(0.9, 0.99), weight_decay=0, args=None, min_8bit_size=4096, "
        "percentile_clipping=100, block_wise=True, is_paged=False)")
    assert lion_ops.optim.Lion is Lion and lion_ops.optim.Lion32bit is Lion32bit
    assert issubclass(Lion, torch.optim.Optimizer)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lr=-1.0), "invalid learning rate"),
    (dict(lr=float("nan")), "invalid learning rate"),
    (dict(lr=1e39), "finite in float32"),  # the kernels take lr in float32
    (dict(lr=torch.tensor(-0.5)), "invalid learning rate"),
    (dict(lr=torch.zeros(2)), "1-element"),
    (dict(betas=(1.0, 0.99)), "beta parameter at index 0"),
    (dict(betas=(0.9, -0.1)), "beta parameter at index 1"),
    (dict(betas=(0.9,)), "betas must be a pair"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(weight_decay=float("inf")), "weight_decay"),
    (dict(lr=torch.tensor(1)), "1-element floating-point tensor"),
    (dict(betas=(torch.tensor(1.0), 0.99)), "beta parameter at index 0"),
    # In range as a double, not as the float32 the kernels take: 1.0 and inf there.
    (dict(betas=(0.9, 1 - 1e-9)), "beta parameter at index 1.*in float32"),
    (dict(betas=(torch.tensor(1 - 1e-9, dtype=torch.float64), 0.99)), "beta parameter at index 0"),
    (dict(weight_decay=1e39), "weight_decay.*finite in float32"),
    (dict(betas=(torch.tensor(0.9, device="meta"), 0.99)), "tensor beta1 must be a dense tensor"),
    (dict(weight_decay=torch.tensor(0.1).to_sparse()), "tensor weight_decay must be a dense"),
    (dict(betas=(0.9, torch.tensor([0.5, 0.5]))), "tensor beta2 must be a 1-element"),
    (dict(weight_decay=torch.tensor(-0.5)), "weight_decay"),
    (dict(weight_decay=torch.tensor(1)), "tensor weight_decay must be a 1-element floating"),
    (dict(optim_bits=16), "optim_bits must be 8 or 32"),
    (dict(percentile_clipping=0), "percentile_clipping must be an int in 1..100"),
    (dict(percentile_clipping=101), "percentile_clipping must be an int in 1..100"),
    (dict(percentile_clipping=True), "percentile_clipping must be an int in 1..100"),
    (dict(percentile_clipping=True), r"got True \(bitsandbytes 0.50 takes is_paged in this "
                                     r"position; this signature is 0.49's: pass is_paged=... by "
                                     r"keyword\)"),
    (dict(min_8bit_size=-1), "min_8bit_size"),
    (dict(is_paged="yes"), "is_paged must be a bool"),
    # Exact messages: what is refused, named as the user wrote it (a tensor's value as the
    # float32 the kernels would read).
    (dict(betas=(0.9, 0.99, 0.999)), r"Lion: betas must be a pair \(beta1, beta2\), got "
                                     r"\(0.9, 0.99, 0.999\)"),
    (dict(betas=torch.tensor([0.9, 0.99, 0.999])), r"Lion: betas must be a pair \(beta1, beta2\)"),
    (dict(betas=torch.tensor(0.9)), r"Lion: betas must be a pair \(beta1, beta2\)"),
    (dict(betas="ab"), r"Lion: betas must be a pair \(beta1, beta2\), got 'ab'"),
    (dict(lr=torch.zeros(0)), r"Lion: a tensor lr must be a 1-element floating-point tensor, "
                              r"got shape \(0,\) and dtype torch.float32"),
    (dict(weight_decay=torch.tensor([1, 2])), r"tensor weight_decay must be a 1-element "
                                              r"floating-point tensor, got shape \(2,\) and "
                                              r"dtype torch.int64"),
    (dict(lr="0.1"), r"Lion: invalid learning rate lr='0.1': must be a number >= 0, finite in "
                     r"float32"),
    (dict(lr=None), r"Lion: invalid learning rate lr=None"),
    (dict(betas=(0.9, 1j)), r"Lion: invalid beta parameter at index 1: 1j: must be in \[0, 1\)"),
    (dict(weight_decay=1e39), r"Lion: invalid weight_decay value: 1e\+39: must be a number >= 0, "
                              r"finite in float32"),
    (dict(lr=1e39), r"Lion: invalid learning rate lr=1e\+39: must be a number >= 0, finite in "
                    r"float32"),
    # Beyond float32's range, a tensor's value reads as infinite, with its sign.
    (dict(lr=torch.tensor(-1e39, dtype=torch.float64)), r"Lion: invalid learning rate lr=-inf:"),
    (dict(weight_decay=torch.tensor(1e39, dtype=torch.float64)),
     r"Lion: invalid weight_decay value: inf:"),
    # 1 - 2**-25 is halfway between float32's largest value below 1 and 1: it rounds to 1.
    (dict(betas=(1 - 2**-25, 0.99)), r"Lion: invalid beta parameter at index 0: "
                                     r"0.99999997\d*: must be in \[0, 1\) in float32"),
])
def test_out_of_range_hyperparameters_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Lion([torch.nn.Parameter(torch.zeros(3))], **kwargs)


_FLOAT32_MAX = torch.finfo(torch.float32).max


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.0), dict(lr=_FLOAT32_MAX), dict(lr=torch.tensor(_FLOAT32_MAX)),
    dict(weight_decay=0.0), dict(weight_decay=1.5), dict(weight_decay=_FLOAT32_MAX),
    dict(weight_decay=torch.tensor(_FLOAT32_MAX, dtype=torch.float64)),
    dict(betas=(0.0, 0.0)), dict(betas=(torch.tensor(0.0), torch.tensor(0.0))),
    dict(betas=(1 - 2**-24, 1 - 2**-24)),  # float32's largest value below 1
    dict(betas=(0.9, torch.tensor(1 - 2**-24))),
], ids=lambda kwargs: repr(kwargs))
def test_hyperparameters_at_the_ends_of_their_ranges_are_accepted(kwargs):
    """lr and weight_decay in [0, float32 max], betas in [0, 1) as float32: the ends that are
    in range are taken, at construction and by a step (which the operators check again)."""
    settings = dict(lr=0.0, betas=(0.9, 0.99), weight_decay=0.0)
    settings.update(kwargs)
    p = torch.nn.Parameter(torch.ones(3))
    opt = Lion([p], **settings)
    p.grad = torch.ones(3)
    opt.step()
    assert int(opt.state[p]["step"]) == 1


def test_numpy_scalar_hyperparameters_work_as_python_numbers():
    """torch's optimizers and bitsandbytes take NumPy scalars (a schedule computed with NumPy
    gives np.float32); they step exactly as the same Python numbers."""
    np = pytest.importorskip("numpy")
    numpy_kwargs = dict(lr=np.float32(0.01), betas=(np.float32(0.9), np.float64(0.99)),
                        weight_decay=np.float32(0.1), optim_bits=np.int64(8),
                        min_8bit_size=np.int64(256), percentile_clipping=np.int32(90))
    python_kwargs = {k: (tuple(float(b) for b in v) if k == "betas" else v.item())
                     for k, v in numpy_kwargs.items()}
    runs = []
    for kwargs in (numpy_kwargs, python_kwargs):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(7))]
        opt = Lion(params, **kwargs)
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            opt.param_groups[0]["lr"] = (np.float32 if kwargs is numpy_kwargs else float)(0.005)
        runs.append((params, opt))
    (params, opt), (expected, expected_opt) = runs
    assert opt.state[params[0]]["state1"].dtype == torch.uint8
    for p, q in zip(params, expected):
        assert torch.equal(p, q)
        assert all(torch.equal(a, b) for a, b in zip(opt.state[p].values(),
                                                      expected_opt.state[q].values()))


def test_numpy_hyperparameters_are_python_numbers_in_param_groups_and_compile():
    """A group's NumPy hyperparameters become the Python numbers they hold, at construction and
    in add_param_group: torch.compile traces NumPy values as arrays, which the step's checks
    could not take (a fullgraph step failed to trace, and without fullgraph it broke the
    graph)."""
    np = pytest.importorskip("numpy")
    params = [torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(7))]
    opt = Lion(params[:1], lr=np.float32(0.01), betas=np.array([0.9, 0.99]),
               weight_decay=np.float64(0.1))
    opt.add_param_group({"params": params[1:], "lr": np.float64(0.02),
                         "betas": [np.float32(0.8), 0.9]})
    for group in opt.param_groups:
        for value in (group["lr"], *group["betas"], group["weight_decay"]):
            assert type(value) is float
    assert opt.param_groups[0]["lr"] == float(np.float32(0.01))
    expected = [p.detach().clone() for p in params]
    reference = Lion([{"params": [expected[0]]}, {"params": [expected[1]], "lr": 0.02,
                                                    "betas": (float(np.float32(0.8)), 0.9)}],
                     lr=float(np.float32(0.01)), betas=(0.9, 0.99), weight_decay=0.1)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend="eager", fullgraph=True)
    for _ in range(2):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, expected, grads):
            p.grad, q.grad = g, g.clone()
        step()
        reference.step()
    for p, q in zip(params, expected):
        assert torch.equal(p, q)


def test_betas_from_any_two_element_sequence_work_as_a_tuple():
    """torch's optimizers and bitsandbytes take betas as any indexable pair: a Hydra config's
    omegaconf ListConfig (a MutableSequence, not a list), a NumPy array. The constructor,
    add_param_group and override_config store them as a tuple."""
    import collections.abc
    np = pytest.importorskip("numpy")

    class ListConfig(collections.abc.MutableSequence):  # omegaconf's, stripped down
        def __init__(self, items):
            self._items = list(items)

        def __getitem__(self, i):
            return self._items[i]

        def __setitem__(self, i, value):
            self._items[i] = value

        def __delitem__(self, i):
            del self._items[i]

        def __len__(self):
            return len(self._items)

        def insert(self, i, value):
            self._items.insert(i, value)

    steps = []
    for betas in (ListConfig([0.5, 0.8]), np.array([0.5, 0.8]), (0.5, 0.8)):
        torch.manual_seed(0)
        a, b, c = (torch.nn.Parameter(torch.randn(300)) for _ in range(3))
        opt = Lion([a], lr=0.1, betas=betas)
        opt.add_param_group({"params": [b], "betas": betas})
        opt.add_param_group({"params": [c], "betas": (0.0, 0.0)})
        lion_ops.optim.GlobalOptimManager.get_instance().override_config(c, "betas", betas)
        assert opt.defaults["betas"] == opt.param_groups[1]["betas"] == (0.5, 0.8)
        assert type(opt.defaults["betas"]) is tuple
        for _ in range(3):
            for p in (a, b, c):
                p.grad = torch.randn_like(p)
            opt.step()
        steps.append([a, b, c])
    for run in steps[:2]:
        assert all(torch.equal(p, q) for p, q in zip(run, steps[2]))
    for bad in ("ab", {0.5, 0.8}, np.array(0.5), (0.5,)):
        with pytest.raises(ValueError, match="betas must be a pair"):
            Lion([torch.nn.Parameter(torch.zeros(3))], betas=bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_unsupported_param_dtypes_are_refused_at_construction(dtype):
    p = torch.nn.Parameter(torch.zeros(3, dtype=dtype))
    with pytest.raises(TypeError, match="group 0, index 0"):
        Lion([p])


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.int32])
def test_frozen_params_of_other_dtypes_are_skipped_as_in_bitsandbytes(dtype):
    """Lion(model.parameters()) on a model with frozen params that no kernel here takes
    (int8 quantized weights, a float64 constant) works, as in torch and bitsandbytes: they get
    no gradient, so no step touches them. One that gets a gradient later is refused by the
    step, naming it, before anything changes."""
    model = torch.nn.Linear(4, 3)
    model.register_parameter("frozen", torch.nn.Parameter(torch.ones(5, dtype=dtype),
                                                          requires_grad=False))
    opt = lion_ops.Lion8bit(model.named_parameters(), lr=0.1, min_8bit_size=1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    assert model.frozen not in opt.state and len(opt.state) == 2
    assert torch.equal(model.frozen, torch.ones(5, dtype=dtype))
    before = [p.detach().clone() for p in model.parameters()]
    model.frozen.grad = torch.ones(5, dtype=dtype)
    with pytest.raises(TypeError, match=r"parameter 'frozen' \(group 0, index 2"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert [int(opt.state[p]["step"]) for p in (model.weight, model.bias)] == [1, 1]


def test_state_dict_hooks_see_the_saved_layout():
    """Post-hooks see the bitsandbytes layout that state_dict returns (the nesting is done
    after torch's own state_dict); load pre-hooks get a copy of the caller's dict, as in
    torch, and may change it."""
    p = torch.nn.Parameter(torch.randn(5000))
    opt = lion_ops.Lion8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    seen = []
    opt.register_state_dict_post_hook(lambda o, sd: seen.append(sorted(sd["state"][0])))
    opt.register_state_dict_post_hook(lambda o, sd: dict(sd, note="added"))
    saved = opt.state_dict()
    assert seen == [["__bnb_optimizer_quant_state__", "step"]] and saved["note"] == "added"

    def pre_hook(o, sd):
        sd["param_groups"] = copy.deepcopy(sd["param_groups"])
        sd["param_groups"][0]["lr"] = 0.5
        sd.pop("note")
    opt.register_load_state_dict_pre_hook(pre_hook)
    opt.load_state_dict(saved)
    assert "note" in saved and saved["param_groups"][0]["lr"] != 0.5
    assert opt.param_groups[0]["lr"] == 0.5


def test_a_bad_tensor_lr_is_refused_before_any_group_steps():
    """A CPU tensor lr is checked at every step, naming its group, before anything changes (it
    was left to the operator, after earlier groups had stepped and every counter was bumped)."""
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = Lion([{"params": [a]}, {"params": [b], "lr": torch.tensor(0.1)}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    for bad in (float("nan"), -1.0, float("inf")):
        opt.param_groups[1]["lr"].fill_(bad)
        before = [a.detach().clone(), b.detach().clone()]
        with pytest.raises(ValueError, match=r"param group 1\).*invalid learning rate"):
            opt.step()
        assert torch.equal(a, before[0]) and torch.equal(b, before[1])
        assert [int(opt.state[p]["step"]) for p in (a, b)] == [1, 1]


def test_a_refused_param_group_leaves_the_optimizer_as_it_was():
    good = torch.nn.Parameter(torch.randn(4))
    opt = Lion([good], lr=0.1)
    bad = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"add_param_group: parameter \(group 1, index 1.*float64"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2)), bad]})
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"] == [good]
    good.grad = torch.randn(4)
    opt.step()  # still works, on the one group it has
    assert int(opt.state[good]["step"]) == 1


@pytest.mark.parametrize("group, message", [
    ({"lr": -1.0}, r"invalid learning rate lr=-1.0"),
    ({"lr": torch.tensor(float("nan"))}, r"invalid learning rate lr=nan"),
    ({"weight_decay": float("inf")}, r"invalid weight_decay value: inf"),
    ({"weight_decay": torch.tensor(-0.5)}, r"invalid weight_decay value: -0.5"),
    ({"betas": (0.9, 1.0)}, r"invalid beta parameter at index 1: 1.0"),
    ({"betas": (torch.tensor(-0.5), 0.9)}, r"invalid beta parameter at index 0: -0.5"),
    ({"lr": torch.tensor(1)}, r"a tensor lr must be a 1-element floating-point tensor"),
])
def test_a_param_group_with_a_bad_hyperparameter_is_refused(group, message):
    """add_param_group checks each hyperparameter the group sets, as the constructor does,
    and the optimizer keeps its groups as they were."""
    opt = Lion([torch.nn.Parameter(torch.randn(4))], lr=0.1)
    new = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"^Lion.add_param_group: " + message):
        opt.add_param_group(dict(group, params=[new]))
    assert len(opt.param_groups) == 1 and all(p is not new for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("cls", [Lion, Lion32bit, lion_ops.Lion8bit])
def test_a_param_listed_twice_in_a_group_is_refused(cls):
    """torch only warns about it; a step would update the param twice (and, in one operator
    call, from two threads at once)."""
    tied, other = torch.nn.Parameter(torch.randn(5000)), torch.nn.Parameter(torch.randn(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused with a clear error, not torch's warning
        with pytest.raises(ValueError, match=r"\(group 0, index 2, .* is the param at index 0 "
                                             r"of the same group again"):
            cls([tied, other, tied])
    opt = cls([other], lr=0.1)
    with pytest.raises(ValueError, match=r"\(group 1, index 1, .* at index 0 of the same group"):
        opt.add_param_group({"params": [tied, tied]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [tied]})  # once is fine
    tied.grad, other.grad = torch.randn(5000), torch.randn(3)
    before = tied.detach().clone()
    opt.step()
    assert torch.equal((before - tied.detach()).abs() > 0.05, torch.ones(5000, dtype=torch.bool))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_dtensor_params_state_kinds_and_refused_clipping():
    """DTensor params get 8-bit state only where their shards hold whole 256-element blocks,
    32-bit otherwise (same update, more memory); percentile clipping, which needs the grad
    norm over all shards, is refused naming the param, before anything changes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def param(shape, placement):
            return torch.nn.Parameter(distribute_tensor(torch.randn(shape), mesh, [placement]))
        rows = param((6, 512), Shard(0))        # whole blocks per row: 8-bit, absmax (6, 2)
        replicated = param((4, 256), Replicate())  # 8-bit, absmax (4, 1)
        narrow = param((300, 20), Shard(0))     # rows of 20: 32-bit
        flat = param((5000,), Shard(0))         # one dim: 32-bit
        by_columns = param((8, 512), Shard(1))  # sharded along dim 1: 32-bit
        params = [rows, replicated, narrow, flat, by_columns]
        with pytest.warns(UserWarning, match=r"3 DTensor param\(s\) keep 32-bit state.*index 2"):
            opt = Lion(params, lr=0.1, optim_bits=8, min_8bit_size=1000)
        for p in params:
            p.grad = distribute_tensor(torch.randn(p.shape), mesh, p.placements)
        opt.step()
        kinds = [opt.state[p]["state1"].dtype for p in params]
        assert kinds == [torch.uint8, torch.uint8, torch.float32, torch.float32, torch.float32]
        assert opt.state[rows]["absmax1"].shape == (6, 2)
        assert opt.state[replicated]["absmax1"].placements == (Replicate(),)

        clipped = Lion([param((3, 4), Shard(0))], lr=0.1, percentile_clipping=90)
        p = clipped.param_groups[0]["params"][0]
        p.grad = distribute_tensor(torch.randn(3, 4), mesh, [Shard(0)])
        before = p.full_tensor().clone()
        with pytest.raises(NotImplementedError, match=r"group 0, index 0.*percentile_clipping"):
            clipped.step()
        assert torch.equal(p.full_tensor(), before) and not clipped.state[p]
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_compiled_step_with_dtensor_params_equals_unsharded_steps():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(12)
        initial = [torch.randn(4, 256), torch.randn(30)]
        sharded = [torch.nn.Parameter(distribute_tensor(x, mesh, [Shard(0)])) for x in initial]
        plain = [torch.nn.Parameter(x.clone()) for x in initial]
        opt = Lion(sharded, lr=1e-2, optim_bits=8, min_8bit_size=64)
        reference = Lion(plain, lr=1e-2, optim_bits=8, min_8bit_size=64)
        step = torch.compile(opt.step, fullgraph=True)
        for _ in range(3):
            for p, q in zip(sharded, plain):
                q.grad = torch.randn(q.shape)
                p.grad = distribute_tensor(q.grad.clone(), mesh, [Shard(0)])
            step()
            reference.step()
        assert opt.state[sharded[0]]["state1"].dtype == torch.uint8
        for p, q in zip(sharded, plain):
            assert torch.equal(p.full_tensor(), q)
            for key, value in reference.state[q].items():
                mine = opt.state[p][key]
                mine = mine.full_tensor() if hasattr(mine, "full_tensor") else mine
                assert torch.equal(mine.reshape(-1), value.reshape(-1)), key
    finally:
        dist.destroy_process_group()


def _resume_on_one_rank(fsdp2_worker, checkpoint, optim_bits):
    """The 2-rank checkpoint (model and optimizer after 3 steps) loaded into FSDP2 on one
    rank, then 2 more steps: the full params and state."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = fsdp2_worker.make_model()
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        with warnings.catch_warnings():  # model[2].weight keeps 32-bit state, and says so
            warnings.filterwarnings("ignore", ".*keep 32-bit state")
            opt = fsdp2_worker.make_optimizer(model.parameters(), optim_bits, lr=1.0)
        state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(checkpoint))
        model.load_state_dict(state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        fsdp2_worker.train(model, opt, fsdp2_worker.batches(2, seed=2))
        return fsdp2_worker.full_state(model, opt)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("layout", ["nested", "flat"])
def test_state_put_in_optimizer_state_in_a_saved_layout_is_adopted(layout):
    """An entry of a state_dict (int step; momentum nested, or flat as older bitsandbytes saved
    it) written straight into optimizer.state steps as the same entry loaded with
    load_state_dict does, in the second group too (with a flat entry the int step reached the
    operator, after the first group had stepped)."""
    runs = []
    for how in ("assigned", "loaded"):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.randn(4))
        opt = Lion32bit([{"params": [a]}, {"params": [b]}], lr=0.1)
        entry = {"step": 2, "state1": torch.full((4,), 0.3)}
        if layout == "nested":
            entry = {"step": 2, "__bnb_optimizer_quant_state__": {"state1": entry["state1"]}}
        if how == "assigned":
            opt.state[b] = entry
        else:
            saved = opt.state_dict()
            saved["state"] = {1: entry}
            opt.load_state_dict(saved)
        a.grad, b.grad = torch.ones(4), torch.randn(4)
        opt.step()
        runs.append((a.detach().clone(), b.detach().clone(), dict(opt.state[b])))
    (a1, b1, s1), (a2, b2, s2) = runs
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert int(s1["step"]) == 3 and torch.equal(s1["state1"], s2["state1"])


def test_state_in_a_saved_layout_is_adopted_only_by_a_step_that_passes_its_checks():
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(5))
    opt = Lion32bit([{"params": [a]}, {"params": [b]}], lr=0.1)
    entry = {"step": 2, "__bnb_optimizer_quant_state__": {"state1": torch.full((4,), 0.3)}}
    opt.state[a] = entry
    a.grad, b.grad = torch.randn(4), torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match=r"group 1, index 0.*sparse gradient"):
        opt.step()
    assert opt.state[a] is entry and opt.state[a]["step"] == 2  # not adopted, not changed
    b.grad = torch.randn(5)
    opt.step()
    assert int(opt.state[a]["step"]) == 3


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("kwargs", [{}, {"optim_bits": 8, "min_8bit_size": 256},
                                    {"optim_bits": 8, "min_8bit_size": 256, "block_wise": False}],
                         ids=["32bit", "8bit_blockwise", "8bit_static"])
def test_zero_redundancy_optimizer_saves_and_resumes_exactly(kwargs):
    """torch's ZeroRedundancyOptimizer (ZeRO-1) wraps the class; its load_state_dict puts each
    param's state_dict entry straight into the wrapped optimizer's `state` (nested layout, int
    step) instead of calling its load_state_dict. The next step checks and adopts it, and the
    resumed run equals the uninterrupted one bit for bit (bitsandbytes 0.50 fails here: its
    step finds no 'state1')."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 40), torch.nn.Tanh(), torch.nn.Linear(40, 5))

    def train(model, opt, steps, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(8, 64, generator=generator)).square().mean().backward()
            opt.step()

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        first = model()
        opt = ZeroRedundancyOptimizer(first.parameters(), optimizer_class=Lion, lr=1e-2,
                                      weight_decay=0.1, **kwargs)
        train(first, opt, 3, seed=1)
        opt.consolidate_state_dict(to=0)
        saved = copy.deepcopy(opt.state_dict())
        second = model()
        second.load_state_dict(first.state_dict())
        resumed = ZeroRedundancyOptimizer(second.parameters(), optimizer_class=Lion, lr=1e-2,
                                          weight_decay=0.1, **kwargs)
        resumed.load_state_dict(copy.deepcopy(saved))
        train(first, opt, 2, seed=2)
        train(second, resumed, 2, seed=2)
        for p, q in zip(first.parameters(), second.parameters()):
            assert torch.equal(p, q)
            assert all(torch.equal(a, b) for a, b in zip(opt.optim.state[p].values(),
                                                          resumed.optim.state[q].values()))
            assert int(resumed.optim.state[q]["step"]) == 5

        # A corrupt entry put there the same way is refused, naming the param, before anything
        # changes.
        third = model()
        broken = ZeroRedundancyOptimizer(third.parameters(), optimizer_class=Lion, lr=1e-2,
                                         **kwargs)
        bad = copy.deepcopy(saved)
        bad["state"][2]["__bnb_optimizer_quant_state__"]["state1"] = torch.zeros(3)
        broken.load_state_dict(bad)
        third(torch.randn(2, 64)).sum().backward()
        before = [p.detach().clone() for p in third.parameters()]
        with pytest.raises(ValueError, match=r"shape \(5, 40\).*state_dict layout: .* shape \(3,\)"):
            broken.step()
        assert all(torch.equal(p, b) for p, b in zip(third.parameters(), before))
        assert all("__bnb_optimizer_quant_state__" in s for s in broken.optim.state.values())
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_fsdp2_on_two_ranks_trains_and_resumes_exactly_as_unsharded(tmp_path, optim_bits):
    """fully_shard over 2 processes (gloo, unevenly sharded params): 5 steps of Lion give the
    unsharded run's params and state bit for bit, and so do runs resumed from a
    torch.distributed.checkpoint taken after 3 steps, on 2 ranks and resharded to one. With
    8-bit state the blocks are the whole tensor's, so codes and scales are the unsharded
    run's too."""
    import subprocess
    import sys
    from lion_ops.optim import GlobalOptimManager
    worker = os.path.join(os.path.dirname(__file__), "fsdp2_worker.py")
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", worker, str(tmp_path), str(optim_bits)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt")
    assert results["shards"] == [(8, 256), (8,), (128, 15), (128,), (2, 256), (2,)]

    sys.path.insert(0, os.path.dirname(__file__))
    try:
        import fsdp2_worker
    finally:
        sys.path.pop(0)
    model = fsdp2_worker.make_model()
    GlobalOptimManager.get_instance().initialize()
    # Sharded, this weight's shards cannot hold whole blocks, so it keeps 32-bit state.
    GlobalOptimManager.get_instance().override_config(model[2].weight, "optim_bits", 32)
    opt = fsdp2_worker.make_optimizer(model.parameters(), optim_bits)
    try:
        fsdp2_worker.train(model, opt, fsdp2_worker.batches(3, seed=1))
        fsdp2_worker.train(model, opt, fsdp2_worker.batches(2, seed=2))
    finally:
        GlobalOptimManager.get_instance().initialize()  # (opt then drops the override)
    expected_kinds = [torch.uint8 if optim_bits == 8 and i == 0 else torch.float32
                      for i in range(6)]
    results["resharded"] = _resume_on_one_rank(fsdp2_worker, tmp_path / "ckpt", optim_bits)
    for run_name in ("continued", "resumed", "resharded"):
        params, states = results[run_name]
        assert [s["state1"].dtype for s in states] == expected_kinds, run_name
        for p, sharded_p, sharded_state in zip(model.parameters(), params, states):
            assert torch.equal(sharded_p, p.detach()), run_name
            for key, value in sharded_state.items():
                expected = opt.state[p][key].reshape(-1)
                assert torch.equal(value.reshape(-1), expected), (run_name, key)


# ---- numerics -------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [Lion, Lion32bit])
def test_100_steps_match_fp64_reference(cls, device, dtype):
    """Each step is compared with the reference applied to the optimizer's previous state, so
    that rounding does not compound; fp32 must agree to rounding, bf16/fp16 wherever the sign
    of c is not within rounding of zero."""
    lr, betas, wd = 1e-3, (0.9, 0.99), 0.1
    params = _params(dtype, device)
    opt = cls(params, lr=lr, betas=betas, weight_decay=wd)
    momenta = [torch.zeros(p.shape, dtype=torch.float64, device=device) for p in params]
    undecided = total = 0
    for _ in range(100):
        _set_random_grads(params)
        before = [p.detach().clone() for p in params]
        opt.step()
        for i, (p, p0) in enumerate(zip(params, before)):
            p_ref, m_ref, c_ref = lion_reference_step(p0, p.grad, momenta[i], lr, *betas, wd)
            state_m = opt.state[p]["state1"]
            torch.testing.assert_close(state_m.double(), m_ref, rtol=1e-5, atol=1e-6)
            scale = betas[0] * momenta[i].abs() + (1 - betas[0]) * p.grad.double().abs()
            decided = c_ref.abs() > 1e-5 * scale
            undecided += int((~decided).sum())
            total += p.numel()
            # Two fp32 roundings (decay, step) for fp32 params; one final rounding otherwise.
            info = torch.finfo(dtype)
            rtol = info.eps * (2 if dtype == torch.float32 else 1)
            torch.testing.assert_close(p.detach().double()[decided], p_ref[decided],
                                       rtol=rtol, atol=max(lr * 1.2e-7, info.tiny * info.eps))
            momenta[i] = state_m.double()  # resynchronize, as bitsandbytes' own tests do
    assert undecided < 1e-3 * total
    assert all(int(opt.state[p]["step"]) == 100 for p in params)


def test_params_without_grad_are_skipped_and_get_no_state(device):
    a, b = torch.nn.Parameter(torch.randn(5, device=device)), torch.nn.Parameter(
        torch.randn(5, device=device))
    opt = Lion([a, b], lr=0.1)
    a.grad = torch.randn_like(a)
    b_before = b.detach().clone()
    opt.step()
    assert torch.equal(b, b_before) and len(opt.state[b]) == 0 and len(opt.state[a]) == 2


def test_param_groups_and_add_param_group(device):
    p1 = _params(torch.float32, device, [(10,)], with_transposed=False)
    p2 = _params(torch.float32, device, [(6, 3)], with_transposed=False)
    p3 = _params(torch.float32, device, [(4,)], with_transposed=False)
    opt = Lion([{"params": p1}, {"params": p2, "lr": 0.05, "betas": (0.5, 0.6),
                                 "weight_decay": 0.2}], lr=0.01)
    opt.add_param_group({"params": p3, "weight_decay": 0.5})
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.05, 0.01]
    assert opt.param_groups[2]["betas"] == (0.9, 0.99)
    settings = [(0.01, (0.9, 0.99), 0.0), (0.05, (0.5, 0.6), 0.2), (0.01, (0.9, 0.99), 0.5)]
    for ps in (p1, p2, p3):
        _set_random_grads(ps)
    before = [p.detach().clone() for p in p1 + p2 + p3]
    opt.step()
    for p, p0, (lr, betas, wd) in zip(p1 + p2 + p3, before, settings):
        p_ref, _, _ = lion_reference_step(p0, p.grad, torch.zeros_like(p0), lr, *betas, wd)
        torch.testing.assert_close(p.detach().double(), p_ref)
    with pytest.raises(ValueError, match="beta parameter"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": (2.0, 0.1)})
    # betas given as a list (as a JSON round trip of a state_dict makes them) are kept as a
    # tuple, as the constructor keeps them, by add_param_group and by load_state_dict.
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "betas": [0.8, 0.9]})
    assert opt.param_groups[-1]["betas"] == (0.8, 0.9)
    assert isinstance(opt.param_groups[-1]["betas"], tuple)
    saved = opt.state_dict()
    saved["param_groups"][1]["betas"] = [0.7, 0.75]
    opt.load_state_dict(saved)
    assert opt.param_groups[1]["betas"] == (0.7, 0.75)
    assert isinstance(opt.param_groups[1]["betas"], tuple)


def test_closure_zero_grad_and_training_reduces_loss():
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    x, y = torch.randn(64, 8), torch.randn(64, 1)
    opt = Lion(model.parameters(), lr=3e-3, weight_decay=0.01)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    first = float(opt.step(closure).detach())
    for _ in range(200):
        last = float(opt.step(closure).detach())
    assert last < 0.7 * first
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("cls", [Lion, Lion8bit])
@pytest.mark.parametrize("registered", ["per optimizer", "global"])
def test_step_hooks_run_on_every_step_as_on_torch_optimizers(cls, registered):
    from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                       register_optimizer_step_pre_hook)
    params = _params(torch.float32, "cpu", [(5,), (70, 80)], False)
    opt = cls(params, lr=0.1, **({"min_8bit_size": 100} if cls is Lion8bit else {}))
    seen = []

    def pre_hook(optimizer, args, kwargs):
        seen.append(("pre", optimizer, args, dict(kwargs)))
        return args, {"closure": lambda: torch.tensor(7.0)}  # replaces the step's arguments

    def post_hook(optimizer, args, kwargs):
        seen.append(("post", optimizer, args, dict(kwargs)))

    if registered == "global":
        handles = [register_optimizer_step_pre_hook(pre_hook),
                   register_optimizer_step_post_hook(post_hook)]
    else:
        handles = [opt.register_step_pre_hook(pre_hook), opt.register_step_post_hook(post_hook)]
    try:
        for _ in range(3):  # the first is fully checked, the others planned
            _set_random_grads(params)
            before = [p.detach().clone() for p in params]
            assert float(opt.step()) == 7.0
            assert all(not torch.equal(p, b) for p, b in zip(params, before))
            assert [entry[0] for entry in seen] == ["pre", "post"]
            assert all(entry[1] is opt for entry in seen)
            assert seen[0][2] == (opt,) and seen[0][3] == {}
            assert seen[1][2] == (opt,) and "closure" in seen[1][3]  # the replaced arguments
            seen.clear()
            assert opt._step_plan is not None
    finally:
        for handle in handles:
            handle.remove()
    _set_random_grads(params)
    assert opt.step() is None and not seen


def test_step_hooks_run_once_for_a_subclass_that_overrides_step():
    class Traced(Lion8bit):
        def step(self, closure=None):
            self.calls = getattr(self, "calls", 0) + 1
            return super().step(closure)

    params = _params(torch.float32, "cpu", [(5,), (70, 80)], False)
    opt = Traced(params, lr=0.1, min_8bit_size=100)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append("pre"))
    opt.register_step_post_hook(lambda o, a, k: seen.append("post"))
    for step in range(1, 4):
        _set_random_grads(params)
        opt.step()
        assert seen == ["pre", "post"] * step and opt.calls == step
    assert int(opt.state[params[1]]["step"]) == 3


def test_step_shows_in_profiles_and_calls_the_profiler_entry_point(monkeypatch):
    params = _params(torch.float32, "cpu", [(5,), (6,)], False)
    opt = Lion(params, lr=0.1)
    entered = []
    monkeypatch.setattr(opt, "_optimizer_step_code", lambda: entered.append(1))
    for _ in range(2):
        _set_random_grads(params)
        opt.step()
    assert len(entered) == 2
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        _set_random_grads(params)
        opt.step()
    assert "Optimizer.step#Lion.step" in {event.name for event in profile.events()}
    assert len(entered) == 3


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_as_torch_optimizers_do_it_and_in_profiles(set_to_none):
    params = _params(torch.float32, "cpu", [(5,), (6,), (7,)], False)
    opt = Lion([{"params": params[:1]}, {"params": params[1:], "lr": 0.2}], lr=0.1)
    _set_random_grads(params[:2])  # params[2] has no grad
    grads = [p.grad for p in params[:2]]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        opt.zero_grad(set_to_none=set_to_none)
    assert "Optimizer.zero_grad#Lion.zero_grad" in {event.name for event in profile.events()}
    for p, g in zip(params[:2], grads):
        assert p.grad is None if set_to_none else (p.grad is g and not g.any())
    assert params[2].grad is None
    _set_random_grads(params)
    opt.zero_grad()  # no profiler: the fast path
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("grad_enabled", [True, False])
def test_step_restores_grad_mode_also_when_it_refuses_its_input(grad_enabled):
    params = _params(torch.float32, "cpu", [(5,), (6,)], False)
    opt = Lion(params, lr=0.1)
    loss_grad_mode = []

    def closure():
        loss_grad_mode.append(torch.is_grad_enabled())
        return torch.tensor(1.0)

    with torch.set_grad_enabled(grad_enabled):
        for _ in range(3):
            _set_random_grads(params)
            opt.step(closure)
            assert torch.is_grad_enabled() == grad_enabled
            assert all(p.grad_fn is None for p in params)
        assert loss_grad_mode == [True] * 3  # as torch's optimizers run a closure
        params[1].grad.set_(torch.randn(7))  # refused by the plan's check, then the full check
        with pytest.raises(ValueError, match="index 1"):
            opt.step()
        assert torch.is_grad_enabled() == grad_enabled


def test_one_operator_call_per_device_and_dtype(monkeypatch, device):
    calls = []
    real = lion_ops.ops.lion_update_32bit
    monkeypatch.setattr(lion_ops.ops, "lion_update_32bit",
                        lambda params, *a: (calls.append(len(params)), real(params, *a)))
    params = (_params(torch.float32, device, [(3,), (4,), (5,)], False)
              + _params(torch.bfloat16, device, [(6,), (7,)], False))
    opt = Lion(params, lr=0.1)
    _set_random_grads(params)
    opt.step()
    assert sorted(calls) == [2, 3]


# ---- learning rates -----------------------------------------------------------------------------

def _step_sizes(opt, params, steps, scheduler=None):
    """The size of each step (|dp| = lr with weight decay 0 and c != 0)."""
    sizes = []
    for _ in range(steps):
        _set_random_grads(params)
        before = params[0].detach().clone()
        opt.step()
        sizes.append(float((params[0].detach() - before).abs().max()))
        if scheduler is not None:
            scheduler.step()
    return sizes


@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_scheduler(device, tensor_lr):
    params = _params(torch.float32, device, [(64,)], False)
    lr = torch.tensor(0.1) if tensor_lr else 0.1
    opt = Lion(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    sizes = _step_sizes(opt, params, 10, sched)
    expected = [0.1 * (1 + torch.cos(torch.tensor(i * torch.pi / 10)).item()) / 2 for i in range(10)]
    torch.testing.assert_close(torch.tensor(sizes), torch.tensor(expected), rtol=1e-5, atol=1e-7)
    if tensor_lr:
        assert opt.param_groups[0]["lr"] is lr  # updated in place by the scheduler


def test_one_cycle_lr_cycles_beta1_and_the_step_uses_it():
    params = _params(torch.float32, "cpu", [(50,)], False)
    opt = Lion(params, lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10,
                                                cycle_momentum=True)
    seen = set()
    for _ in range(6):
        _set_random_grads(params)
        lr, betas = opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]
        seen.add(betas[0])
        p0, m0 = params[0].detach().clone(), opt.state[params[0]].get("state1")
        m0 = torch.zeros_like(p0) if m0 is None else m0.clone()
        opt.step()
        p_ref, m_ref, _ = lion_reference_step(p0, params[0].grad, m0, lr, *betas, 0.0)
        torch.testing.assert_close(params[0].detach().double(), p_ref)
        torch.testing.assert_close(opt.state[params[0]]["state1"].double(), m_ref)
        sched.step()
    assert len(seen) == 6  # beta1 changed on every step


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_grad_scaler_steps_with_the_unscaled_grads(optim_bits):
    torch.manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(7))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Lion(params, lr=1e-2, optim_bits=optim_bits, min_8bit_size=256)
    ref_opt = Lion(reference, lr=1e-2, optim_bits=optim_bits, min_8bit_size=256)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        if step == 1:
            grads[1][3] = float("inf")  # this step is skipped and the scale backs off
        scale = scaler.scale(torch.tensor(1.0))  # what a scaled loss's backward multiplies by
        for p, q, g in zip(params, reference, grads):
            p.grad = g * scale
            q.grad = g.clone()
        scaler.step(opt)
        scaler.update()
        if step != 1:
            ref_opt.step()
        for p, q in zip(params, reference):
            assert torch.equal(p, q), step
    assert scaler.get_scale() == 2.0 ** 9


@pytest.mark.cuda
@pytest.mark.parametrize("where", ["constructor", "add_param_group", "override",
                                   "load_state_dict"])
def test_a_bad_hyperparameter_tensor_on_the_device_is_refused_where_it_is_given(where):
    """A hyperparameter tensor on the GPU is read by the kernels, not by each step (that would
    synchronize): its value is checked, with one host read, where it is given."""
    bad = torch.tensor(1.0, device="cuda")  # as beta2
    message = r"invalid beta parameter at index 1: 1.0: must be in \[0, 1\)"
    p = torch.nn.Parameter(torch.randn(4, device="cuda"))
    if where == "constructor":
        with pytest.raises(ValueError, match=r"^Lion: " + message):
            Lion([p], betas=(0.9, bad))
        with pytest.raises(ValueError, match=r"^Lion: invalid learning rate lr=-0.5"):
            Lion([p], lr=torch.tensor(-0.5, device="cuda"))
    elif where == "add_param_group":
        opt = Lion([p], lr=0.1)
        with pytest.raises(ValueError, match=r"^Lion.add_param_group: " + message):
            opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3, device="cuda"))],
                                 "betas": (0.9, bad)})
        assert len(opt.param_groups) == 1
    elif where == "override":
        manager = lion_ops.optim.GlobalOptimManager.get_instance()
        with pytest.raises(ValueError, match=r"^GlobalOptimManager.override_config: " + message):
            manager.override_config(p, "betas", (0.9, bad))
        assert manager.config_for(0, 0, p) == {}
    else:
        opt = Lion([p], lr=0.1)
        saved = opt.state_dict()
        saved["param_groups"][0]["betas"] = (0.9, bad)
        with pytest.raises(ValueError, match=r"^Lion.load_state_dict \(param group 0\): "
                           + message):
            opt.load_state_dict(saved)
        assert opt.param_groups[0]["betas"] == (0.9, 0.99)


@pytest.mark.cuda
def test_tensor_lr_on_the_device():
    params = _params(torch.float32, "cuda", [(64,)], False)
    lr = torch.tensor(0.25, device="cuda")
    opt = Lion(params, lr=lr)
    sizes = _step_sizes(opt, params, 1)
    lr.fill_(0.125)
    sizes += _step_sizes(opt, params, 1)
    assert sizes == pytest.approx([0.25, 0.125], rel=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("kwargs", [{}, {"optim_bits": 8, "min_8bit_size": 256},
                                    {"optim_bits": 8, "min_8bit_size": 256, "block_wise": False},
                                    {"percentile_clipping": 90}],
                         ids=["32-bit", "8-bit blockwise", "8-bit static", "clipping"])
def test_step_captured_in_a_cuda_graph_replays_as_eager_steps(kwargs):
    """With lr a tensor on the device, a step has no host synchronization and reads nothing on
    the host that changes between steps, so it can be captured once and replayed."""
    shapes = [(300,), (33, 17), (5,)]
    torch.manual_seed(5)
    initial = [torch.randn(s, device="cuda") for s in shapes]
    grads = [[torch.randn(s, device="cuda") for s in shapes] for _ in range(5)]

    def make():
        params = [torch.nn.Parameter(x.clone()) for x in initial]
        lr = torch.tensor(1e-2, device="cuda")
        return params, lr, Lion(params, lr=lr, weight_decay=0.1, **kwargs)

    eager_params, eager_lr, eager = make()
    graph_params, graph_lr, captured = make()
    for params in (eager_params, graph_params):  # graph_params' grads become the graph's inputs
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
    eager.step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # the first step (state initialization) outside the capture
        captured.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured.step()
    for i in range(1, 5):
        for lr in (eager_lr, graph_lr):
            lr.fill_(1e-2 * 0.5 ** i)
        for p, q, g in zip(eager_params, graph_params, grads[i]):
            p.grad = g.clone()
            q.grad.copy_(g)
        eager.step()
        graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(eager_params, graph_params):
        assert torch.equal(p, q)
        for key, value in eager.state[p].items():
            assert torch.equal(captured.state[q][key], value), key


# ---- checkpoints ------------------------------------------------------------------------------------

def _make_model_and_opt(device, seed=3):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(12, 9), torch.nn.ReLU(), torch.nn.Linear(9, 1)).to(device)
    opt = Lion([{"params": model[0].parameters()},
                {"params": model[2].parameters(), "lr": 3e-3, "weight_decay": 0.1}], lr=1e-3)
    return model, opt


def _train(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def test_stop_save_load_continue_equals_not_stopping(device):
    batches = [(torch.randn(16, 12, device=device), torch.randn(16, 1, device=device))
               for _ in range(20)]
    model_a, opt_a = _make_model_and_opt(device)
    _train(model_a, opt_a, batches)

    model_b, opt_b = _make_model_and_opt(device)
    _train(model_b, opt_b, batches[:10])
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    model_c, opt_c = _make_model_and_opt(device, seed=99)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    _train(model_c, opt_c, batches[10:])
    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)
    assert opt_c.param_groups[1]["lr"] == 3e-3
    state = opt_c.state_dict()["state"][0]
    assert state["step"] == 20 and set(state) == {"step", "__bnb_optimizer_quant_state__"}


@pytest.mark.parametrize("optim_bits", [32, 8])
def test_load_state_dict_copies_each_state_tensor_once_and_leaves_the_dict_alone(
        monkeypatch, optim_bits):
    """Loading copies every state tensor into the optimizer's own (no aliasing of the caller's
    tensors, which stay unmodified) without deep-copying the whole dict first, which would hold
    a second copy of all the state at once."""
    torch.manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(7))]
    opt = Lion(params, lr=torch.tensor(1e-2), optim_bits=optim_bits, min_8bit_size=256,
               percentile_clipping=50)
    for _ in range(2):
        _set_random_grads(params)
        opt.step()
    saved = opt.state_dict()
    before = {k: {name: value.clone() for name, value in
                  saved["state"][k]["__bnb_optimizer_quant_state__"].items()}
              for k in saved["state"]}
    copies = []
    original = torch.Tensor.__deepcopy__
    monkeypatch.setattr(torch.Tensor, "__deepcopy__",
                        lambda self, memo: copies.append(self.numel()) or original(self, memo))
    other = Lion([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1.0,
                 optim_bits=optim_bits, min_8bit_size=256, percentile_clipping=50)
    other.load_state_dict(saved)
    assert copies == [1]  # the tensor lr of the param group, nothing else
    assert other.param_groups[0]["lr"] is not saved["param_groups"][0]["lr"]
    for k, p in enumerate(other.param_groups[0]["params"]):
        nested = saved["state"][k]["__bnb_optimizer_quant_state__"]
        assert "gnorm_vec" in nested
        for name in ("state1", "absmax1", "gnorm_vec"):
            if name in nested:
                assert other.state[p][name].data_ptr() != nested[name].data_ptr()
                assert torch.equal(other.state[p][name], nested[name])
    _set_random_grads(other.param_groups[0]["params"])
    other.step()
    for k, nested in before.items():
        for name, value in nested.items():
            assert torch.equal(saved["state"][k]["__bnb_optimizer_quant_state__"][name], value)


def test_load_state_dict_keeps_eps_param_names_and_copies_other_entries():
    model = torch.nn.Linear(3, 2)
    opt = Lion(model.named_parameters(), lr=0.1)
    _set_random_grads(list(model.parameters()))
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["eps"], group["param_names"]  # as a state_dict without them
    extra = torch.ones(3)
    saved["state"][0]["an_entry_of_another_library"] = extra
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert group["eps"] == 0.0  # bitsandbytes reads it when it loads our checkpoints
    assert group["param_names"] == ["weight", "bias"]  # errors keep naming params
    kept = opt.state[model.weight]["an_entry_of_another_library"]
    assert torch.equal(kept, extra) and kept is not extra


@pytest.mark.cuda
def test_state_dict_reads_the_step_counters_with_one_synchronization():
    params = [torch.nn.Parameter(torch.randn(5, device="cuda")) for _ in range(20)]
    opt = Lion(params, lr=1e-2)
    _set_random_grads(params)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            saved = opt.state_dict()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    assert [saved["state"][k]["step"] for k in range(20)] == [1] * 20


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kwargs", [{}, {"optim_bits": 8, "min_8bit_size": 256},
                                    {"optim_bits": 8, "min_8bit_size": 256, "block_wise": False},
                                    {"percentile_clipping": 80}],
                         ids=["32-bit", "8-bit blockwise", "8-bit static", "clipping"])
def test_copied_optimizer_is_independent_and_steps_as_the_original(how, kwargs):
    torch.manual_seed(8)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(300,), (7,), (20, 30)]]
    opt = Lion(params, lr=1e-2, weight_decay=0.1, **kwargs)
    for _ in range(2):
        _set_random_grads(params)
        opt.step()
    if how == "deepcopy":
        copied_params, copied = copy.deepcopy((params, opt))
    else:
        copied_params, copied = pickle.loads(pickle.dumps((params, opt)))
    assert copied.param_groups[0]["params"][0] is copied_params[0]
    for _ in range(3):
        for p, q in zip(params, copied_params):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        opt.step()
        copied.step()
    for p, q in zip(params, copied_params):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(copied.state[q][key], value), key
            assert copied.state[q][key].data_ptr() != value.data_ptr(), key


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("kwargs", [{}, {"optim_bits": 8, "min_8bit_size": 64}],
                         ids=["32-bit", "8-bit"])
def test_distributed_checkpoint_save_load_continues_exactly(tmp_path, kwargs):
    """torch.distributed.checkpoint (here in one process): get_optimizer_state_dict keys the
    state by parameter name, dcp saves and loads it, set_optimizer_state_dict puts it back."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    def train(model, opt, steps, seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(8, 16, generator=generator)).square().sum().backward()
            opt.step()

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))
    opt = Lion(model.parameters(), lr=1e-2, **kwargs)
    train(model, opt, 3, seed=1)
    saved = get_optimizer_state_dict(model, opt)
    assert set(saved["state"]) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    dcp.save({"optim": saved}, checkpoint_id=str(tmp_path))

    resumed_model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 1))
    resumed_model.load_state_dict(model.state_dict())
    resumed = Lion(resumed_model.parameters(), lr=1.0, **kwargs)
    loaded = get_optimizer_state_dict(resumed_model, resumed)
    dcp.load({"optim": loaded}, checkpoint_id=str(tmp_path))
    set_optimizer_state_dict(resumed_model, resumed, loaded)
    assert resumed.param_groups[0]["lr"] == 1e-2
    train(model, opt, 2, seed=2)
    train(resumed_model, resumed, 2, seed=2)
    for a, b in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert int(resumed.state[resumed_model[0].weight]["step"]) == 5


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_8bit_state_checkpointed_with_dcp_into_a_32bit_optimizer_is_refused(tmp_path):
    """torch.distributed.checkpoint loads into the receiving optimizer's own state tensors and
    casts: 8-bit codes arrived as float32 momenta of 0..255, silently (the next step moved
    nearly every weight by -lr). A momentum of nothing but whole numbers in 0..255 is refused.
    (dcp.load has written the live tensors by then, as for any torch optimizer.)"""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 64)
    opt = Lion8bit(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 256)).square().mean().backward()
        opt.step()
    opt.zero_grad()
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(tmp_path))
    resumed = Lion(model.parameters(), lr=1e-3)
    loaded = get_optimizer_state_dict(model, resumed)
    dcp.load({"optim": loaded}, checkpoint_id=str(tmp_path))
    with pytest.raises(ValueError, match=r"index 0, shape \(64, 256\).*the saved 32-bit "
                                         r"momentum 'state1' holds nothing but whole numbers "
                                         r"in 0..255"):
        set_optimizer_state_dict(model, resumed, loaded)
    # A real momentum, a fresh (zero) one, or one of small whole numbers (below 2) loads.
    for momentum in (torch.randn(64, 256) * 1e-3, torch.zeros(64, 256),
                     torch.ones(64, 256)):
        state = Lion(model.parameters()).state_dict()
        state["state"] = {0: {"step": 3, "__bnb_optimizer_quant_state__": {"state1": momentum}}}
        Lion(model.parameters()).load_state_dict(state)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_flattened_dcp_state_dicts_are_refused_saying_why():
    """With flatten_optimizer_state_dict=True torch rebuilds each param's entry from the live
    state's keys, which the saved (bitsandbytes) layout nests: every momentum came back as {}
    (or not at all, before a first step), refused with no hint of why."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    model = torch.nn.Linear(8, 4)
    opt = Lion(model.parameters(), lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    saved = get_optimizer_state_dict(model, opt, options=options)
    for resumed in (Lion(model.parameters(), lr=1e-3), opt):  # without and with live state
        with pytest.raises(ValueError, match=r"no momentum tensor 'state1' \(got (NoneType|"
                                             r"dict)\).*flatten_optimizer_state_dict=True\) "
                                             "arrives so"):
            set_optimizer_state_dict(model, resumed, saved, options=options)


def test_empty_state_entries_load_as_no_state():
    """Reading optimizer.state[p] (a defaultdict) for a param without state leaves an empty
    entry, which state_dict() saves: it loads as no state, as in torch and bitsandbytes."""
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(5))]
    opt = lion_ops.Lion8bit(params, lr=0.1, min_8bit_size=256)
    params[0].grad = torch.randn(300)
    opt.step()
    assert opt.state[params[1]] == {}  # a read: an empty entry
    saved = opt.state_dict()
    assert saved["state"][1] == {}
    fresh = lion_ops.Lion8bit(params, lr=0.1, min_8bit_size=256)
    assert fresh.state[params[0]] == {} and fresh.state[params[1]] == {}
    fresh.load_state_dict(fresh.state_dict())  # nothing but empty entries: no state
    for resumed in (lion_ops.Lion8bit(params, lr=0.1, min_8bit_size=256), opt):
        resumed.load_state_dict(saved)
        assert not resumed.state.get(params[1])
        assert torch.equal(resumed.state[params[0]]["state1"], opt.state[params[0]]["state1"])
        params[1].grad = torch.randn(5)
        resumed.step()


def test_to_bitsandbytes_layout_flattens_2d_absmax():
    """A full state dict gathered from FSDP2 holds DTensor params' absmax1 as (rows, blocks per
    row); bitsandbytes' step refuses that shape, so it is flattened for bitsandbytes."""
    bnb = pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(16, 512))
    opt = Lion8bit([weight], lr=1e-3)
    weight.grad = torch.randn_like(weight)
    opt.step()
    state_dict = opt.state_dict()
    nested = state_dict["state"][0]["__bnb_optimizer_quant_state__"]
    flat_absmax = nested["absmax1"]
    nested["absmax1"] = flat_absmax.reshape(16, 2)  # as gathered from FSDP2
    converted = lion_ops.optim.to_bitsandbytes_layout(state_dict)
    converted_absmax = converted["state"][0]["__bnb_optimizer_quant_state__"]["absmax1"]
    assert converted_absmax.shape == (32,) and torch.equal(converted_absmax, flat_absmax)
    assert nested["absmax1"].shape == (16, 2)  # the input is left as it was
    theirs_weight = torch.nn.Parameter(weight.detach().clone())
    theirs = bnb.optim.Lion8bit([theirs_weight], lr=1e-3)
    theirs.load_state_dict(converted)
    theirs_weight.grad = torch.randn_like(weight)
    theirs.step()
    assert torch.isfinite(theirs_weight).all()


def _corruptions():
    def wrong_shape(sd):
        sd["state"][0]["__bnb_optimizer_quant_state__"]["state1"] = torch.zeros(3)
    def missing_momentum(sd):
        del sd["state"][0]["__bnb_optimizer_quant_state__"]
    def eight_bit_codes(sd):
        nested = sd["state"][0]["__bnb_optimizer_quant_state__"]
        nested["state1"] = torch.zeros(nested["state1"].shape, dtype=torch.uint8)
    def bad_step(sd):
        sd["state"][0]["step"] = "ten"
    def nan_step(sd):  # became an out-of-bounds write in percentile clipping's history
        sd["state"][0]["step"] = float("nan")
    def infinite_step(sd):
        sd["state"][0]["step"] = torch.tensor(float("inf"))
    def negative_step(sd):
        sd["state"][0]["step"] = -3
    def step_past_float32(sd):  # an infinite float32 counter, which state_dict cannot save
        sd["state"][0]["step"] = 1e40
    def state_as_list(sd):
        sd["state"] = list(sd["state"].values())
    def entry_not_a_dict(sd):
        sd["state"][1] = 7
    def groups_not_a_list(sd):
        sd["param_groups"] = {"params": [0, 1]}
    def bad_beta(sd):
        sd["param_groups"][0]["betas"] = (1.5, 0.9)
    def extra_group(sd):
        sd["param_groups"].append(dict(sd["param_groups"][0]))
    def unknown_param(sd):
        sd["state"][1234] = sd["state"][0]
    def missing_lr(sd):
        del sd["param_groups"][0]["lr"]
    def negative_tensor_weight_decay(sd):
        sd["param_groups"][0]["weight_decay"] = torch.tensor(-1.0)
    def integer_tensor_beta(sd):
        sd["param_groups"][0]["betas"] = (0.9, torch.tensor(1))
    return [(wrong_shape, "expected a floating-point tensor of shape"), (missing_momentum, "no momentum"),
            (eight_bit_codes, "8-bit"), (bad_step, "'step' must be a finite number >= 0"),
            (nan_step, "'step' must be a finite number >= 0, got nan"),
            (infinite_step, "'step' must be a finite number >= 0, got inf"),
            (negative_step, "'step' must be a finite number >= 0, got -3"),
            (step_past_float32, r"'step' must be a finite number >= 0, got 1e\+40 \(infinite "
                                r"in float32, the counter's type\)"),
            (state_as_list, "'state' must be a dict of per-param dicts, got a list"),
            (entry_not_a_dict, "'state' must be a dict of per-param dicts, got int for param 1"),
            (groups_not_a_list, "'param_groups' must be a list of dicts, each with a list of "
                                "'params'"),
            (bad_beta, "beta parameter at index 0"), (extra_group, "param groups"),
            (unknown_param, "param id 1234"),
            (missing_lr, r"load_state_dict \(param group 0\): invalid learning rate lr=None"),
            (negative_tensor_weight_decay,
             r"load_state_dict \(param group 0\): invalid weight_decay value: -1.0"),
            (integer_tensor_beta, r"a tensor beta2 must be a 1-element floating-point tensor")]


@pytest.mark.parametrize("case", range(len(_corruptions())))
def test_corrupt_state_dict_is_refused_and_optimizer_unchanged(case):
    corrupt, message = _corruptions()[case]
    model, opt = _make_model_and_opt("cpu")
    batches = [(torch.randn(4, 12), torch.randn(4, 1)) for _ in range(3)]
    _train(model, opt, batches)
    good = opt.state_dict()
    bad = opt.state_dict()
    bad["state"] = {k: {kk: (dict(vv) if isinstance(vv, dict) else vv) for kk, vv in v.items()}
                    for k, v in bad["state"].items()}
    bad["param_groups"] = [dict(g) for g in bad["param_groups"]]
    corrupt(bad)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    assert after["param_groups"] == good["param_groups"]
    for k in good["state"]:
        a = after["state"][k]["__bnb_optimizer_quant_state__"]["state1"]
        assert torch.equal(a, good["state"][k]["__bnb_optimizer_quant_state__"]["state1"])


# ---- bad input at step time: clear error naming the param, nothing modified -----------------------

def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in params if opt.state[p]})


def _assert_unchanged(opt, params, snapshot):
    values, states = snapshot
    for p, v in zip(params, values):
        assert torch.equal(p, v)
    for p in params:
        for k, v in states.get(id(p), {}).items():
            assert torch.equal(opt.state[p][k], v)


def test_sparse_grad_is_refused_and_nothing_changes():
    model = torch.nn.ModuleDict({"dense": torch.nn.Linear(4, 4),
                                 "emb": torch.nn.Embedding(10, 4, sparse=True)})
    opt = Lion(model.named_parameters(), lr=0.1)
    params = list(model.parameters())
    (model["dense"](torch.randn(2, 4)).sum() + model["emb"](torch.tensor([1, 2])).sum()).backward()
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match="'emb.weight'.*sparse gradient"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


def test_hyperparameter_broken_after_construction_is_refused_and_nothing_changes():
    params = _params(torch.float32, "cpu", [(5,), (6,)], False)
    opt = Lion([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    _set_random_grads(params)
    opt.step()
    opt.param_groups[1]["betas"] = (0.9, 1.2)
    _set_random_grads(params)
    snapshot = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"param group 1.*index 1"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("group_index, change, message", [
    (0, lambda g: g.update(lr=-1.0), r"invalid learning rate lr=-1.0"),
    (0, lambda g: g.update(lr=float("nan")), r"invalid learning rate lr=nan"),
    (0, lambda g: g.update(betas=(0.9, 1.0)), r"invalid beta parameter at index 1: 1.0"),
    (0, lambda g: g.update(weight_decay=float("inf")), r"invalid weight_decay value: inf"),
    (0, lambda g: g.update(weight_decay=-1), r"invalid weight_decay value: -1"),
    (1, lambda g: g["betas"].__setitem__(0, 1.5), r"invalid beta parameter at index 0: 1.5"),
    (1, lambda g: g["lr"].fill_(-1.0), r"invalid learning rate lr=-1.0"),
    (1, lambda g: g["weight_decay"].fill_(-1.0), r"invalid weight_decay value: -1.0"),
])
def test_hyperparameters_changed_between_planned_steps_are_checked(group_index, change,
                                                                    message):
    """Planned steps skip checking again a Python number they checked in an earlier step (the
    same object, which cannot change), and check everything else: a new value in the group
    (the first group's lr is a new float at every step, as a schedule makes it), a list of
    betas changed in place, a CPU tensor changed in place."""
    params = _params(torch.float32, "cpu", [(5,), (6,)], False)
    opt = Lion([{"params": params[:1], "weight_decay": 0},
                {"params": params[1:], "lr": torch.tensor(0.1),
                 "weight_decay": torch.tensor(0.1)}], lr=0.1)
    opt.param_groups[1]["betas"] = [0.9, 0.99]  # (a list, set after construction)
    for i in range(3):
        opt.param_groups[0]["lr"] = 0.1 * 0.9 ** i
        _set_random_grads(params)
        opt.step()
    assert opt._step_plan is not None
    change(opt.param_groups[group_index])
    _set_random_grads(params)
    snapshot = _snapshot(opt, params)
    with pytest.raises(ValueError, match=rf"param group {group_index}\).*{message}"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("key, bad, message", [
    ("lr", float("nan"), r"invalid learning rate lr=nan"),
    ("weight_decay", -1.0, r"invalid weight_decay value: -1.0"),
    ("beta2", 1.0, r"invalid beta parameter at index 1: 1.0"),
])
def test_a_hyperparameter_broken_before_the_first_step_is_refused_and_nothing_changes(
        key, bad, message):
    """The first step (the full check, with no plan yet) refuses a CPU tensor hyperparameter
    changed in place since construction before any group steps or any state is made."""
    params = _params(torch.float32, "cpu", [(5,), (6,)], False)
    values = {"lr": torch.tensor(0.1), "weight_decay": torch.tensor(0.1),
              "beta2": torch.tensor(0.99)}
    opt = Lion([{"params": params[:1]},
                {"params": params[1:], "lr": values["lr"], "betas": (0.9, values["beta2"]),
                 "weight_decay": values["weight_decay"]}], lr=0.1)
    values[key].fill_(bad)
    _set_random_grads(params)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=r"^Lion.step \(param group 1\): " + message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not opt.state


def test_param_replaced_after_first_step_is_refused_and_nothing_changes():
    params = _params(torch.float32, "cpu", [(5,), (6,)], False)
    opt = Lion(params, lr=0.1)
    _set_random_grads(params)
    opt.step()
    params[1].data = torch.randn(7)
    params[1].grad = torch.randn(7)
    params[0].grad = torch.randn(5)
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"index 1.*does not fit"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("planned", [False, True], ids=["first check", "planned step"])
@pytest.mark.parametrize("count", [float("nan"), -5.0, float("inf")])
def test_a_counter_that_is_no_count_is_refused_before_clipping_counts_it(planned, count):
    """With percentile clipping on the CPU the counters are read to pick the history slot; one
    changed in place to no count is refused naming its param, before anything (the other
    counters included) is counted or updated, in the first check and in a planned step."""
    params = _params(torch.float32, "cpu", [(5,), (300,)], False)
    opt = Lion([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, percentile_clipping=50)
    _set_random_grads(params)
    opt.step()
    opt.state[params[1]]["step"].fill_(count)
    if not planned:
        opt.state[params[1]]["step"] = opt.state[params[1]]["step"].clone()  # the full check
    _set_random_grads(params)
    snapshot = _snapshot(opt, params)
    with pytest.raises(ValueError, match=r"Lion.step: the step counter of parameter \(group 1, "
                                         rf"index 0, .*\) is {count}; it must be a finite count"):
        opt.step()
    for p, value in zip(params, snapshot[0]):
        assert torch.equal(p, value)
    for p in params:
        for key, value in snapshot[1][id(p)].items():
            assert torch.allclose(opt.state[p][key], value, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(ValueError, match=rf"state_dict: the step counter of param 1 is {count:g}, "
                                         "not a count"):
        opt.state_dict()


@pytest.mark.parametrize("where", ["load_state_dict", "first step"])
@pytest.mark.parametrize("cls, kwargs", [(Lion, {}), (Lion8bit, {"min_8bit_size": 256}),
                                         (Lion, {"percentile_clipping": 50})])
def test_state_made_under_inference_mode_is_ordinary(where, cls, kwargs):
    """State made by a load_state_dict or a first step under torch.inference_mode is made of
    ordinary tensors, as torch.optim's is: a later step outside inference mode could not write
    an inference tensor (and the operators refuse to)."""
    torch.manual_seed(0)
    source = [torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(7))]
    reference = cls(source, lr=0.1, **kwargs)
    params = [torch.nn.Parameter(p.detach().clone()) for p in source]
    opt = cls(params, lr=0.1, **kwargs)
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    for ps in (source, params):
        for p, g in zip(ps, grads[0]):
            p.grad = g.clone()
    reference.step()
    if where == "load_state_dict":
        opt.step()
        with torch.inference_mode():
            opt.load_state_dict(reference.state_dict())
    else:
        with torch.inference_mode():
            opt.step()
    state_tensors = [t for p in params for t in opt.state[p].values()
                     if isinstance(t, torch.Tensor)]
    assert state_tensors and not any(t.is_inference() for t in state_tensors)
    for step_grads in grads[1:]:
        for ps in (source, params):
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
        reference.step()
        opt.step()
    for a, b in zip(source, params):
        assert torch.equal(a, b)


def test_an_inference_tensor_param_is_refused_outside_inference_mode_and_nothing_changes():
    """Refused by the first check, naming the param, and by a step planned under inference
    mode (where it may be written) and run outside it, before the step's first call (of the
    other params) has written anything."""
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(4))]
    with torch.inference_mode():
        params.append(torch.randn(6, dtype=torch.bfloat16))  # as a model built there holds
    opt = Lion(params, lr=0.1)
    _set_random_grads(params)
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"index 2.* is an inference tensor"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)
    assert not any(opt.state.values())
    with torch.inference_mode():  # where it can be written
        opt.step()
    assert not torch.equal(params[2], snapshot[0][2])
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"index 2.* is an inference tensor"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


# ---- the step plan: eager steps reuse the last step's calls while nothing has changed -------------

def _count_full_checks(monkeypatch, opt):
    calls = []
    full_check = opt._check_step_inputs
    monkeypatch.setattr(opt, "_check_step_inputs",
                        lambda *args: calls.append(1) or full_check(*args))
    return calls


@pytest.mark.parametrize("config", ["32-bit", "8-bit blockwise", "8-bit static", "clipping",
                                    "override"])
def test_planned_steps_equal_fully_checked_steps(monkeypatch, config):
    from lion_ops import Lion8bit
    from lion_ops.optim import GlobalOptimManager
    GlobalOptimManager.get_instance().initialize()
    kwargs = {"32-bit": {}, "8-bit blockwise": {"min_8bit_size": 300},
              "8-bit static": {"min_8bit_size": 300, "block_wise": False},
              "clipping": {"percentile_clipping": 90}, "override": {"min_8bit_size": 300}}[config]
    shapes = [(700,), (33, 17), (5,), (1000,)]
    torch.manual_seed(11)
    planned = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    full = [torch.nn.Parameter(p.detach().clone()) for p in planned]
    if config == "override":
        for ps in (planned, full):
            GlobalOptimManager.get_instance().override_config(ps[1], "lr", 3e-3)
    opts = []
    for ps in (planned, full):
        groups = [{"params": ps[:2]}, {"params": ps[2:], "weight_decay": 0.3}]
        opts.append(Lion8bit(groups, lr=1e-2, **kwargs) if "8-bit" in config or
                    config == "override" else Lion(groups, lr=1e-2, **kwargs))
    opt, reference = opts
    checks = _count_full_checks(monkeypatch, opt)
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7) for o in opts]
    for step in range(6):
        grads = [torch.randn(s) for s in shapes]
        for ps in (planned, full):
            for i, (p, g) in enumerate(zip(ps, grads)):
                p.grad = None if step in (2, 3) and i == 3 else g.clone()
        if step == 4:
            for o in opts:
                o.param_groups[0]["betas"] = (0.8, 0.95)
                o.param_groups[1]["weight_decay"] = 0.05
        reference._step_plan = None  # every step of the reference takes the full check
        for o, scheduler in zip(opts, schedulers):
            o.step()
            scheduler.step()
        for p, q in zip(planned, full):
            assert torch.equal(p, q), step
            for key, value in reference.state[q].items():
                assert torch.equal(opt.state[p][key], value), (step, key)
    # Full checks: the first step, and the two where the set of params with grads changed.
    assert len(checks) == 3


def test_planned_steps_follow_new_groups_overrides_and_loaded_state():
    from lion_ops.optim import GlobalOptimManager
    GlobalOptimManager.get_instance().initialize()
    params = _params(torch.float32, "cpu", [(6,), (9,)], False)
    opt = Lion(params, lr=0.1)
    for _ in range(2):
        _set_random_grads(params)
        opt.step()
    extra = torch.nn.Parameter(torch.randn(4))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    GlobalOptimManager.get_instance().override_config(params[1], "lr", 0.0)
    _set_random_grads(params + [extra])
    before = [p.detach().clone() for p in params + [extra]]
    opt.step()
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[1], before[1] * (1 - 0.0 * 0.0))  # lr 0: unchanged
    assert not torch.equal(extra, before[2]) and int(opt.state[extra]["step"]) == 1
    saved = opt.state_dict()
    _set_random_grads(params + [extra])
    opt.step()
    opt.load_state_dict(saved)
    assert int(opt.state[params[0]]["step"]) == 3
    _set_random_grads(params + [extra])
    opt.step()
    assert int(opt.state[params[0]]["step"]) == 4 and int(opt.state[extra]["step"]) == 2


@pytest.mark.parametrize("corrupt", ["sparse grad", "param dtype", "param shape",
                                     "state dict replaced", "momentum replaced",
                                     "momentum made float64", "grad resized in place"])
def test_bad_input_after_planned_steps_is_refused_and_nothing_changes(corrupt):
    params = _params(torch.float32, "cpu", [(5,), (6,), (7,)], False)
    opt = Lion([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    for _ in range(2):
        _set_random_grads(params)
        opt.step()
    assert opt._step_plan is not None
    _set_random_grads(params)
    target = params[2]
    if corrupt == "sparse grad":
        target.grad = torch.randn(7).to_sparse()
        message = r"index 1,.*sparse gradient"
    elif corrupt == "param dtype":
        target.data = torch.randn(7, dtype=torch.float64)
        target.grad = torch.randn(7, dtype=torch.float64)
        message = r"index 1,.*must be float32, bfloat16 or float16"
    elif corrupt == "param shape":
        target.data = torch.randn(8)
        target.grad = torch.randn(8)
        message = r"index 1,.*does not fit"
    elif corrupt == "state dict replaced":
        opt.state[target] = {"step": opt.state[target]["step"].clone(),
                             "state1": torch.zeros(3)}
        message = r"index 1,.*does not fit"
    elif corrupt == "momentum replaced":
        opt.state[target]["state1"] = torch.zeros(2, 4)
        message = r"index 1,.*does not fit"
    elif corrupt == "momentum made float64":
        opt.state[target]["state1"] = opt.state[target]["state1"].double()
        message = r"index 1,.*torch.float64; expected a float32 tensor of shape \(7,\)"
    else:  # the same grad tensor, another shape: the plan checked the grad's shape
        target.grad.set_(torch.randn(8))
        message = r"index 1,.*gradient of shape \(8,\)"
    snapshot = _snapshot(opt, params)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


@pytest.mark.parametrize("kind", ["32-bit", "8-bit blockwise", "8-bit static"])
@pytest.mark.parametrize("corrupt", ["grad dtype", "grad shape", "grad of equal numel",
                                     "sparse grad", "complex grad", "param resized",
                                     "no grad"])
def test_bad_grad_in_the_call_whose_operator_checks_it_is_refused_naming_the_param(kind, corrupt):
    # A planned step leaves the grads of its largest call (here the second group's) to that
    # call's operator, which runs first: a bad one must get the full check's error and
    # change nothing, counters included.
    shapes = [(600,), (5,), (700,), (33, 17), (900,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    groups = [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.2}]
    kwargs = {"32-bit": {}, "8-bit blockwise": {"min_8bit_size": 500},
              "8-bit static": {"min_8bit_size": 500, "block_wise": False}}[kind]
    opt = Lion8bit(groups, lr=0.1, **kwargs) if kwargs else Lion(groups, lr=0.1)
    for _ in range(2):
        _set_random_grads(params)
        opt.step()
    plan = opt._step_plan
    group_id, _, _, checks = plan.groups[plan.order[0]]
    assert plan.order[0] == 1 and group_id == id(opt.param_groups[1])
    assert checks[0].checked_by_operator and any(
        opt.param_groups[1]["params"][i] is params[3] for i in checks[0].positions)
    _set_random_grads(params)
    target = params[3]
    message = r"index 1,.*gradient of shape"
    # torch refuses most bad grads at assignment; these get past it, as they can in training.
    if corrupt == "grad dtype":  # allowed by grad_dtype = None
        target.grad_dtype = None
        target.grad = torch.randn(33, 17, dtype=torch.bfloat16)
    elif corrupt == "grad shape":
        target.grad.set_(torch.randn(33, 18))
    elif corrupt == "grad of equal numel":
        target.grad.set_(torch.randn(17, 33))
    elif corrupt == "sparse grad":
        target.grad = torch.randn(33, 17).to_sparse()
        message = r"index 1,.*sparse gradient"
    elif corrupt == "complex grad":
        target.grad.data = torch.randn(33, 17, dtype=torch.complex64)
    elif corrupt == "param resized":
        target.data = torch.randn(34, 17)
        target.grad = torch.randn(34, 17)
        message = r"index 1,.*does not fit"
    else:  # a param of the call without a grad: the step takes the full check, and skips it
        target.grad = None
        message = None
    snapshot = _snapshot(opt, params)
    if message is None:
        opt.step()
        assert torch.equal(target, snapshot[0][3]) and not torch.equal(params[2], snapshot[0][2])
        assert int(opt.state[target]["step"]) == 2 and int(opt.state[params[2]]["step"]) == 3
        return
    with pytest.raises((RuntimeError, TypeError, ValueError), match=message):
        opt.step()
    _assert_unchanged(opt, params, snapshot)
    assert opt._step_plan is None
    if corrupt != "param resized":  # with a good grad again, the step goes on
        target.grad = None
        target.grad_dtype = torch.float32
        target.grad = torch.randn(33, 17)
        opt.step()
        assert int(opt.state[target]["step"]) == 3 and not torch.equal(target, snapshot[0][3])


@pytest.mark.parametrize("cls", [Lion, Lion8bit])
@pytest.mark.parametrize("release", ["state.clear()", "del state[p]", "new state",
                                     "offload", "param removed"])
def test_a_plan_keeps_no_param_and_no_state_alive(cls, release):
    """What the user drops between steps is freed at once, as with torch's optimizers: state
    cleared or moved off the device (RLHF trainers offload optimizer state to free the GPU
    while they generate), a param taken out of param_groups. A plan held them until the next
    step. And a param can be swapped (Module.to on DTensor params swaps them)."""
    import gc
    import weakref
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 2))
    opt = cls(model.parameters(), lr=0.1, **({"min_8bit_size": 500} if cls is Lion8bit else {}))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 40)).square().sum().backward()
        opt.step()
    assert opt._step_plan is not None
    weight = model[0].weight
    references = [weakref.ref(t) for key, t in opt.state[weight].items()
                  if key != "qmap1"]  # (the map, one for all params)
    if release == "state.clear()":
        opt.state.clear()
    elif release == "del state[p]":
        del opt.state[weight]
    elif release == "new state":
        opt.state = type(opt.state)(dict)
    elif release == "offload":  # state to the CPU and back: here, to another tensor
        for key, value in opt.state[weight].items():
            opt.state[weight][key] = value.clone()
        del value
    else:
        reference = weakref.ref(weight)
        del opt.state[weight]
        opt.param_groups[0]["params"].remove(weight)
        model[0].weight = None
        del weight
        gc.collect()
        assert reference() is None
    assert all(r() is None for r in references)  # (no collection needed: nothing else held them)
    opt.zero_grad()
    model(torch.randn(8, 40)).square().sum().backward() if release != "param removed" else None
    opt.step()  # and the next step takes the full check
    if release == "param removed":
        return
    assert opt.state[weight]["step"] == (3 if release == "offload" else 1)
    before = weight.detach().clone()
    torch.utils.swap_tensors(weight, torch.nn.Parameter(torch.zeros(30, 40)))
    assert torch.equal(weight, torch.zeros(30, 40)) and not torch.equal(before, weight)


@pytest.mark.parametrize("cls", [Lion, Lion8bit])
def test_param_given_another_dtype_after_planned_steps_steps_as_without_a_plan(cls):
    # The operator-checked call's params are not checked in Python: a param turned bfloat16
    # through .data (with a bfloat16 grad) is updated in that call as the full path's own
    # bfloat16 call would.
    shapes = [(600,), (5,), (33, 17)]
    torch.manual_seed(3)
    planned = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    full = [torch.nn.Parameter(p.detach().clone()) for p in planned]
    opts = [cls(ps, lr=0.1, min_8bit_size=500) for ps in (planned, full)]
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        if step == 2:
            for ps in (planned, full):
                ps[2].data = ps[2].data.to(torch.bfloat16)
                ps[2].grad = None
                ps[2].grad_dtype = None
        for ps in (planned, full):
            for p, g in zip(ps, grads):
                p.grad = g.to(p.dtype)
        opts[1]._step_plan = None
        for opt in opts:
            opt.step()
        assert opts[0]._step_plan.first_call_checks_its_grads
        for p, q in zip(planned, full):
            assert p.dtype == q.dtype and torch.equal(p, q), step
            for key, value in opts[1].state[q].items():
                assert torch.equal(opts[0].state[p][key], value), (step, key)


@pytest.mark.parametrize("corrupt", ["step int64", "step of two elements", "gnorm_vec float64",
                                     "gnorm_vec not contiguous", "absmax1 not contiguous",
                                     "max1 float64", "momentum expanded",
                                     "momentum shared with another param"])
def test_state_the_operators_would_refuse_is_refused_before_any_group_steps(corrupt):
    # Each of these passed the optimizer's own checks and was refused by an operator, after
    # the counters and the earlier groups had moved.
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(13, 5), (300, 7), (40, 50), (9,)]]
    opt = lion_ops.Lion8bit([{"params": params[:1]}, {"params": params[1:], "block_wise": True},
                             ], lr=0.1, min_8bit_size=2000, percentile_clipping=5)
    if corrupt == "max1 float64":
        opt = lion_ops.Lion8bit([{"params": params[:1]}, {"params": params[1:]}], lr=0.1,
                                min_8bit_size=2000, percentile_clipping=5, block_wise=False)
    for _ in range(2):
        _set_random_grads(params)
        opt.step()
    blockwise, static, fp32 = params[1], params[2], params[3]
    target = {"absmax1 not contiguous": blockwise, "max1 float64": static}.get(corrupt, fp32)
    state = opt.state[target]
    if corrupt == "step int64":
        state["step"] = state["step"].long()
    elif corrupt == "step of two elements":
        state["step"] = state["step"].repeat(2)
    elif corrupt == "gnorm_vec float64":
        state["gnorm_vec"] = state["gnorm_vec"].double()
    elif corrupt == "gnorm_vec not contiguous":
        state["gnorm_vec"] = state["gnorm_vec"].repeat(2)[::2]
    elif corrupt == "absmax1 not contiguous":
        state["absmax1"] = state["absmax1"].repeat(2)[::2]
    elif corrupt == "max1 float64":
        state["max1"] = state["max1"].double()
    elif corrupt == "momentum expanded":
        state["state1"] = state["state1"][:1].expand(9)
    else:
        state["state1"] = opt.state[params[0]]["state1"].view(-1)[:9]
    _set_random_grads(params)
    snapshot = _snapshot(opt, params)
    index = {fp32: 2, blockwise: 0, static: 1}[target]
    with pytest.raises(RuntimeError, match=rf"\(group 1, index {index},"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


def test_two_params_over_the_same_memory_are_refused_before_anything_changes():
    memory = torch.randn(120)
    tied = [torch.nn.Parameter(memory[:60]), torch.nn.Parameter(memory[:60].view(6, 10))]
    other = torch.nn.Parameter(torch.randn(7))
    opt = Lion([{"params": [other]}, {"params": tied}], lr=0.1)
    _set_random_grads([other] + tied)
    before = memory.clone(), other.detach().clone()
    with pytest.raises(RuntimeError, match=r"the param of parameter \(group 1, index 1, shape "
                       r"\(6, 10\).*same memory as the param of parameter \(group 1, index 0,"):
        opt.step()
    assert torch.equal(memory, before[0]) and torch.equal(other, before[1])
    assert not opt.state  # no state made either


def test_an_override_tensor_lr_broken_in_place_is_refused_before_anything_changes():
    a, b = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(6))
    override_lr = torch.tensor(0.01)
    manager = lion_ops.optim.GlobalOptimManager.get_instance()
    manager.override_config(b, "lr", override_lr)
    opt = Lion([a, b], lr=0.1)
    for _ in range(2):  # the second step runs from the plan
        _set_random_grads([a, b])
        opt.step()
    override_lr.fill_(float("nan"))
    _set_random_grads([a, b])
    snapshot = _snapshot(opt, [a, b])
    with pytest.raises(ValueError, match=r"override of param 1 of param group 0\): invalid "
                       r"learning rate lr=nan"):
        opt.step()
    _assert_unchanged(opt, [a, b], snapshot)


def test_planned_steps_use_replaced_counters_and_histories_and_new_overrides():
    params = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(7))]
    opt = Lion(params, lr=0.1, percentile_clipping=50)
    for _ in range(2):
        _set_random_grads(params)
        opt.step()
    assert opt._step_plan is not None
    state = opt.state[params[0]]
    state["step"] = torch.tensor(0.0)
    _set_random_grads(params)
    opt.step()
    assert state["step"].item() == 1.0
    state["gnorm_vec"] = torch.full((100,), -1.0)  # a fresh history: records everywhere
    _set_random_grads(params)
    opt.step()
    assert torch.allclose(state["gnorm_vec"], params[0].grad.double().pow(2).sum().float())
    # An override made after planned steps, and nothing else changed: params[1] stops moving.
    lion_ops.optim.GlobalOptimManager.get_instance().override_config(params[1], "lr", 0.0)
    before = params[1].detach().clone()
    _set_random_grads(params)
    opt.step()
    assert torch.equal(params[1], before)
    lion_ops.optim.GlobalOptimManager.get_instance().initialize()


def test_gnorm_vec_replaced_after_planned_steps_is_refused_and_nothing_changes():
    params = [torch.nn.Parameter(torch.randn(6)), torch.nn.Parameter(torch.randn(7))]
    opt = Lion([{"params": params[:1]}, {"params": params[1:]}], lr=0.1, percentile_clipping=50)
    for _ in range(2):
        _set_random_grads(params)
        opt.step()
    opt.state[params[1]]["gnorm_vec"] = torch.zeros(50)
    _set_random_grads(params)
    snapshot = _snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"group 1, index 0,.*gnorm_vec' must be a contiguous "
                       r"float32 tensor of 100"):
        opt.step()
    _assert_unchanged(opt, params, snapshot)


def test_tensor_betas_and_weight_decay_step_as_the_same_numbers():
    """As torch's optimizers take them (so that a compiled step reads them as inputs): 0-dim
    or 1-element tensors, of any floating dtype, on the CPU; changed in place between steps."""
    runs = []
    for as_tensor in (False, True):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(600)), torch.nn.Parameter(torch.randn(7))]
        wrap = (lambda x, **kw: torch.tensor(x, **kw)) if as_tensor else (lambda x, **kw: x)
        betas = (wrap(0.9), wrap([0.99], dtype=torch.float64) if as_tensor else 0.99)
        opt = lion_ops.Lion8bit(params, lr=0.01, betas=betas, weight_decay=wrap(0.1),
                                min_8bit_size=256)
        for step in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
            if as_tensor:
                opt.param_groups[0]["betas"][0].fill_(0.8)
                opt.param_groups[0]["weight_decay"].fill_(0.05)
            else:
                opt.param_groups[0]["betas"] = (0.8, 0.99)
                opt.param_groups[0]["weight_decay"] = 0.05
        runs.append(params)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_a_tensor_beta_broken_in_place_is_refused_before_any_group_steps():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    beta1 = torch.tensor(0.9)
    opt = Lion([{"params": [a]}, {"params": [b], "betas": (beta1, 0.99)}], lr=0.1)
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    beta1.fill_(1.0)
    before = [a.detach().clone(), b.detach().clone(), opt.state[a]["step"].clone()]
    with pytest.raises(ValueError, match=r"param group 1\).*beta parameter at index 0"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert torch.equal(opt.state[a]["step"], before[2])


def test_a_one_element_lr_tensor_steps_as_a_0_dim_one():
    a, b = torch.nn.Parameter(torch.randn(9)), torch.nn.Parameter(torch.randn(9))
    b.data.copy_(a)
    opt_a, opt_b = Lion([a], lr=torch.tensor([0.1])), Lion([b], lr=torch.tensor(0.1))
    for _ in range(2):
        a.grad = torch.randn(9)
        b.grad = a.grad.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a, b)


def test_the_cache_of_number_hyperparameters_stays_small_and_exact():
    """A schedule gives lr a new number at every step: the float32 CPU tensors kept for
    numbers (so that constant betas and weight decay cost no new tensor per step) stay at most
    64, each holding its own number."""
    from lion_ops.optim import base
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Lion([p], lr=0.1, weight_decay=0.01)
    for i in range(150):
        opt.param_groups[0]["lr"] = 1e-3 * (1 + i / 1000)
        p.grad = torch.ones(3)
        opt.step()
        assert len(base._NUMBER_TENSORS) <= 64
    assert 1e-3 * (1 + 149 / 1000) in base._NUMBER_TENSORS
    for number, tensor in base._NUMBER_TENSORS.items():
        assert tensor.device.type == "cpu" and tensor.dim() == 0
        assert tensor.item() == torch.tensor(number, dtype=torch.float32).item()


def _one_rank_mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist, init_device_mesh("cpu", (1,))


def _train_one(opt, p, steps, seed):
    torch.manual_seed(seed)
    for _ in range(steps):
        p.grad = torch.randn_like(p)
        opt.step()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("case", ["partial param", "grad sharded otherwise"])
def test_dtensor_params_the_operators_cannot_update_are_refused(case):
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    dist, mesh = _one_rank_mesh()
    try:
        if case == "partial param":
            p = torch.nn.Parameter(DTensor.from_local(torch.randn(4, 256), mesh, [Partial()]))
            grad = DTensor.from_local(torch.randn(4, 256), mesh, [Partial()])
            message = "partial placements"
        else:
            p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 256), mesh, [Shard(0)]))
            grad = distribute_tensor(torch.randn(4, 256), mesh, [Replicate()])
            message = "same mesh and placements"
        opt = Lion([p], lr=0.1)
        p.grad = grad
        before = p._local_tensor.clone()
        with pytest.raises(NotImplementedError, match=message):
            opt.step()
        assert torch.equal(p._local_tensor, before) and not opt.state[p]
    finally:
        dist.destroy_process_group()


# A DTensor param never gets per-tensor (static) 8-bit state.
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_static_8bit_is_kept_32bit_for_dtensor_params():
    from torch.distributed.tensor import Shard, distribute_tensor
    dist, mesh = _one_rank_mesh()
    try:
        p = torch.nn.Parameter(distribute_tensor(torch.randn(6, 512), mesh, [Shard(0)]))
        with pytest.warns(UserWarning, match=r"1 DTensor param\(s\) keep 32-bit state"):
            opt = Lion([p], lr=0.1, optim_bits=8, block_wise=False, min_8bit_size=1000)
        p.grad = distribute_tensor(torch.randn(6, 512), mesh, [Shard(0)])
        opt.step()
        assert opt.state[p]["state1"].dtype == torch.float32 and "max1" not in opt.state[p]
    finally:
        dist.destroy_process_group()


# An unsharded checkpoint's flat absmax loads into a DTensor
# param as (rows, blocks per row), sharded as the param is, as a fresh state's is.
@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built")
def test_a_flat_absmax_loads_into_a_dtensor_param_as_rows():
    from torch.distributed.tensor import Shard, distribute_tensor
    plain = torch.nn.Parameter(torch.randn(6, 512))
    opt = Lion8bit([plain], lr=0.01, min_8bit_size=256)
    _train_one(opt, plain, 2, 0)
    saved = opt.state_dict()
    dist, mesh = _one_rank_mesh()
    try:
        p = torch.nn.Parameter(distribute_tensor(plain.detach().clone(), mesh, [Shard(0)]))
        sharded = Lion8bit([p], lr=0.01, min_8bit_size=256)
        sharded.load_state_dict(saved)
        absmax = sharded.state[p]["absmax1"]
        assert absmax.shape == (6, 2) and absmax.placements == (Shard(0),)
        assert torch.equal(absmax.full_tensor().reshape(-1), opt.state[plain]["absmax1"])
    finally:
        dist.destroy_process_group()


# Empty params (all at address 0) are not
# "the same memory".
@pytest.mark.parametrize("optim_bits", [32, 8])
def test_several_empty_params_step(optim_bits):
    params = [torch.nn.Parameter(torch.empty(0)), torch.nn.Parameter(torch.empty(0, 4)),
              torch.nn.Parameter(torch.randn(3))]
    opt = Lion(params, lr=0.1, optim_bits=optim_bits, min_8bit_size=0)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    assert torch.allclose(params[2].detach(), params[2].detach())  # stepped without error
    assert all(int(opt.state[p]["step"]) == 2 for p in params)


# An infinite weight_decay is refused by the optimizer,
# at construction and at a step before anything (step counters included) changes.
def test_infinite_weight_decay_is_refused_before_anything_changes():
    with pytest.raises(ValueError, match="weight_decay"):
        Lion([torch.nn.Parameter(torch.zeros(3))], weight_decay=float("inf"))
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = Lion([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.randn(4), torch.randn(4)
    opt.step()
    opt.param_groups[1]["weight_decay"] = float("inf")
    before = a.detach().clone(), b.detach().clone()
    with pytest.raises(ValueError, match=r"param group 1.*weight_decay"):
        opt.step()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert int(opt.state[a]["step"]) == 1 and int(opt.state[b]["step"]) == 1


# An integer tensor lr is refused by the optimizer (the
# operators refuse it only after the step counters, and earlier groups, have moved).
def test_an_integer_tensor_lr_is_refused_before_anything_changes():
    with pytest.raises(ValueError, match="1-element floating-point"):
        Lion([torch.nn.Parameter(torch.zeros(3))], lr=torch.tensor(1))
    p = torch.nn.Parameter(torch.randn(3))
    opt = Lion([p], lr=0.1)
    p.grad = torch.randn(3)
    opt.step()
    opt.param_groups[0]["lr"] = torch.tensor(0)
    with pytest.raises(ValueError, match="1-element floating-point"):
        opt.step()
    assert int(opt.state[p]["step"]) == 1


@pytest.mark.parametrize("cls, kwargs", [
    (Lion, {}), (lion_ops.Lion8bit, {"min_8bit_size": 256}),
    (lion_ops.Lion8bit, {"min_8bit_size": 256, "block_wise": False, "percentile_clipping": 50})])
def test_a_default_device_other_than_the_params_does_not_leak_in(cls, kwargs):
    """torch.set_default_device (meta here, as a stand-in for "cuda" with CPU params): the
    optimizer's own tensors (the 8-bit map, hyperparameter tensors) are made where they are
    used. They followed the default device, and every step failed."""
    torch.manual_seed(0)
    grads = [torch.randn(600) for _ in range(3)]
    p, q = torch.nn.Parameter(torch.randn(600)), None
    q = torch.nn.Parameter(p.detach().clone())
    reference = cls([q], lr=0.1, betas=(0.9, 0.99), **kwargs)
    for g in grads:
        q.grad = g
        reference.step()
    torch.set_default_device("meta")
    try:
        opt = cls([p], lr=0.1, betas=(0.9, 0.99), **kwargs)
        for g in grads[:2]:
            p.grad = g
            opt.step()
        opt.load_state_dict(opt.state_dict())
        p.grad = grads[2]
        opt.step()
    finally:
        torch.set_default_device(None)
    assert torch.equal(p, q)
    assert all(t.device.type == "cpu" for t in opt.state[p].values() if torch.is_tensor(t))


def test_number_hyperparameters_are_made_on_the_cpu_whatever_the_default_device():
    """With no tensor for the step's numbers kept from an earlier step, a step under another
    default device (meta here, a stand-in for "cuda" with CPU params) still makes them as 0-dim
    float32 CPU tensors, and steps exactly as without it."""
    from lion_ops.optim import base
    runs = []
    for default_device in (None, "meta"):
        base._NUMBER_TENSORS.clear()
        p = torch.nn.Parameter(torch.linspace(-1, 1, 8))
        opt = Lion([p], lr=0.0625, betas=(0.875, 0.9375), weight_decay=0.25)
        p.grad = torch.linspace(1, -1, 8)
        torch.set_default_device(default_device)
        try:
            opt.step()
        finally:
            torch.set_default_device(None)
        assert all(t.device.type == "cpu" for t in base._NUMBER_TENSORS.values())
        runs.append(p)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("cls, kwargs", [
    (Lion, {}), (Lion8bit, {"min_8bit_size": 100, "percentile_clipping": 50}),
    (Lion8bit, {"min_8bit_size": 100, "block_wise": False})])
def test_steps_on_meta_params_and_under_fake_tensor_mode(cls, kwargs):
    """Dry runs (memory estimates, deferred initialization) step on tensors without memory:
    meta params, or a model and optimizer made under a FakeTensorMode. The step makes state of
    the right shapes (the check that no two params share memory, which compares addresses, once
    refused any second param there, and building the map read values)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 2))
    opt = cls(model.parameters(), lr=1e-3, **kwargs)
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.empty_like(p)
        opt.step()
    state = opt.state[model[0].weight]
    assert state["state1"].device.type == "meta" and state["state1"].shape == (30, 40)
    assert state["state1"].dtype == (torch.float32 if cls is Lion else torch.uint8)
    with FakeTensorMode() as mode:
        model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 2))
        opt = cls(model.parameters(), lr=1e-3, **kwargs)
        for _ in range(2):
            model(torch.randn(2, 40)).sum().backward()
            opt.step()
    state = opt.state[model[0].weight]
    assert all(mode.is_our_fake(t) for t in state.values() if isinstance(t, torch.Tensor)
               and t is not opt._qmaps[torch.device("cpu")])
    assert state["state1"].shape == (30, 40)


def test_a_step_under_fake_tensor_mode_leaves_later_steps_real():
    """A step traced under FakeTensorMode (a memory or FLOP estimate) made fake hyperparameter
    tensors, which a cache of them kept: every later eager step of any optimizer with the same
    values then ran the fake kernel, and the params silently stayed as they were."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    q = torch.nn.Parameter(torch.ones(4))
    q.grad = torch.ones(4)
    fake_opt = Lion([q], lr=0.0123, betas=(0.91, 0.991), weight_decay=0.0456)
    with FakeTensorMode(allow_non_fake_inputs=True):
        fake_opt.step()
    p = torch.nn.Parameter(torch.ones(4))
    opt = Lion([p], lr=0.0123, betas=(0.91, 0.991), weight_decay=0.0456)
    p.grad = torch.ones(4)
    opt.step()
    expected = 1.0 * (1 - 0.0123 * 0.0456) - 0.0123
    torch.testing.assert_close(p.detach(), torch.full((4,), expected), rtol=1e-6, atol=0)



@pytest.mark.parametrize("swap", ["inference tensor", "another param's memory",
                                  "in the largest call, another call's memory"])
def test_a_param_swapped_through_data_in_a_smaller_call_is_refused_before_anything_changes(swap):
    """A planned step leaves its largest call's params to that call's operator; the others'
    addresses are compared with the plan's, so that a param given other memory through .data
    (an inference tensor, or memory another call updates) takes the full check, which refuses
    it before the largest call has run (it used to run first, then fail or update memory
    twice)."""
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(64, 64)) for _ in range(3)]
    backing = torch.randn(64 * 64)
    bias = torch.nn.Parameter(backing[:64])
    opt = Lion([{"params": weights, "weight_decay": 0.1},
                {"params": [bias], "weight_decay": 0.0}], lr=1e-3)
    for _ in range(2):
        _set_random_grads(weights + [bias])
        opt.step()
    assert opt._step_plan is not None
    if swap == "inference tensor":
        with torch.inference_mode():
            bias.data = torch.randn(64)
        message = "inference tensor"
    elif swap == "another param's memory":
        bias.data = weights[0].data[0]
        message = "shares part of its memory|starts at the same memory"
    else:  # the weights' call, which its operator checks, takes the bias's memory
        weights[1].data = backing.view(64, 64)
        message = "starts at the same memory"
    _set_random_grads(weights + [bias])
    snapshot = _snapshot(opt, weights)
    with pytest.raises(RuntimeError, match=message):
        opt.step()
    _assert_unchanged(opt, weights, snapshot)
