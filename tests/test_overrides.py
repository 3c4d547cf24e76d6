"""The args object and GlobalOptimManager's per-parameter overrides, as bitsandbytes users
know them, against plain-PyTorch references."""

import gc
import types
import warnings
import weakref

import pytest
import torch

import lion_ops
from lion_ops import Lion, Lion8bit
from lion_ops.optim import GlobalOptimManager
from reference import lion_reference_step


@pytest.fixture(autouse=True)
def _fresh_manager():
    GlobalOptimManager.get_instance().initialize()
    yield
    GlobalOptimManager.get_instance().initialize()


def _args(**overrides):
    values = dict(optim_bits=8, min_8bit_size=100, percentile_clipping=100, block_wise=True,
                  max_unorm=0.0, skip_zeros=False)
    values.update(overrides)
    return types.SimpleNamespace(**values)


def _step(opt, params):
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()


# ---- args ----------------------------------------------------------------------------------------

def test_args_replace_the_keyword_configuration():
    params = [torch.nn.Parameter(torch.randn(200)), torch.nn.Parameter(torch.randn(50))]
    opt = Lion(params, lr=1e-3, optim_bits=32, min_8bit_size=4096, args=_args())
    _step(opt, params)
    assert opt.state[params[0]]["state1"].dtype == torch.uint8  # 200 >= args.min_8bit_size
    assert opt.state[params[1]]["state1"].dtype == torch.float32
    opt = Lion(params, args=_args(optim_bits=32, percentile_clipping=5))
    _step(opt, params)
    assert "gnorm_vec" in opt.state[params[0]] and opt.state[params[0]]["state1"].dtype == torch.float32


def test_args_without_the_optional_options_take_their_defaults():
    """Only optim_bits and min_8bit_size are required of args; percentile_clipping,
    block_wise, max_unorm and skip_zeros default to 100, True, 0.0 and False, as in
    bitsandbytes."""
    params = [torch.nn.Parameter(torch.randn(200))]
    opt = Lion(params, lr=1e-3, percentile_clipping=5, block_wise=False,
               args=types.SimpleNamespace(optim_bits=8, min_8bit_size=100))
    assert (opt.optim_bits, opt.min_8bit_size, opt.percentile_clipping, opt.block_wise) == \
        (8, 100, 100, True)
    _step(opt, params)
    assert "absmax1" in opt.state[params[0]] and "gnorm_vec" not in opt.state[params[0]]


@pytest.mark.parametrize("args, error, message", [
    (types.SimpleNamespace(optim_bits=8), ValueError, "args has no attribute 'min_8bit_size'"),
    (_args(max_unorm=1.0), NotImplementedError, "max_unorm"),
    (_args(skip_zeros=True), NotImplementedError, "skip_zeros"),
    (_args(optim_bits=4), ValueError, "optim_bits must be 8 or 32"),
    (_args(percentile_clipping=0), ValueError, "percentile_clipping must be an int in 1..100"),
])
def test_unsupported_args_are_refused(args, error, message):
    with pytest.raises(error, match=message):
        Lion([torch.nn.Parameter(torch.zeros(3))], args=args)


# ---- GlobalOptimManager --------------------------------------------------------------------------

class TinyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 64)
        self.proj = torch.nn.Linear(64, 80)

    def forward(self, tokens):
        return self.proj(self.embed(tokens)).sum()


@pytest.mark.parametrize("register_before_optimizer", [True, False])
def test_hf_trainer_pattern_keeps_embeddings_32bit(register_before_optimizer):
    model = TinyModel()
    manager = GlobalOptimManager.get_instance()
    if register_before_optimizer:
        manager.register_module_override(model.embed, "weight", {"optim_bits": 32})
    opt = Lion8bit(model.parameters(), lr=1e-3, min_8bit_size=1000)
    if not register_before_optimizer:
        manager.register_module_override(model.embed, "weight", {"optim_bits": 32})
    model(torch.tensor([1, 2, 3])).backward()
    opt.step()
    assert opt.state[model.embed.weight]["state1"].dtype == torch.float32
    assert opt.state[model.proj.weight]["state1"].dtype == torch.uint8
    assert opt.state[model.proj.bias]["state1"].dtype == torch.float32  # under min_8bit_size


def test_overrides_left_in_bitsandbytes_manager_are_warned_about():
    """Code switched from bitsandbytes by changing only the optimizer's import keeps
    registering with bitsandbytes' manager, which lion_ops does not read: the first step says
    so, once, rather than silently keeping the embeddings 8-bit."""
    bnb = pytest.importorskip("bitsandbytes")
    bnb_manager = bnb.optim.GlobalOptimManager.get_instance()
    bnb_manager.initialize()
    try:
        model = TinyModel()
        opt = Lion8bit(model.parameters(), lr=1e-3, min_8bit_size=1000)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(torch.tensor([1, 2, 3])).backward()
            opt.step()  # nothing registered there: no warning
        model, other = TinyModel(), TinyModel()
        bnb_manager.register_module_override(model.embed, "weight", {"optim_bits": 32})
        bnb_manager.override_config(other.proj.weight, "optim_bits", 32)  # not this optimizer's
        opt = Lion8bit(model.parameters(), lr=1e-3, min_8bit_size=1000)
        model(torch.tensor([1, 2, 3])).backward()
        with pytest.warns(UserWarning, match="bitsandbytes.optim.GlobalOptimManager holds "
                                             "overrides for 1 of this optimizer's params") as seen:
            opt.step()
        assert seen[0].filename == __file__
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()  # once
        assert opt.state[model.embed.weight]["state1"].dtype == torch.uint8
    finally:
        bnb_manager.initialize()


def test_override_hyperparameters_per_param_match_reference():
    params = [torch.nn.Parameter(torch.randn(30)) for _ in range(3)]
    manager = GlobalOptimManager.get_instance()
    manager.override_config(params[0], "lr", 0.1)
    manager.override_config([params[1]], key_value_dict={"betas": (0.5, 0.6),
                                                         "weight_decay": 0.3})
    opt = Lion(params, lr=0.01, weight_decay=0.05)
    settings = [(0.1, (0.9, 0.99), 0.05), (0.01, (0.5, 0.6), 0.3), (0.01, (0.9, 0.99), 0.05)]
    # Three steps, each against the reference from the optimizer's own state: from zero
    # momentum a first step's update does not depend on beta1, nor its params on beta2.
    for _ in range(3):
        before = [(p.detach().clone(), opt.state[p]["state1"].clone() if opt.state[p]
                   else torch.zeros_like(p)) for p in params]
        _step(opt, params)
        for p, (p0, m0), (lr, betas, wd) in zip(params, before, settings):
            expected_p, expected_m, _ = lion_reference_step(p0, p.grad, m0, lr, *betas, wd)
            torch.testing.assert_close(p.detach().double(), expected_p)
            torch.testing.assert_close(opt.state[p]["state1"].double(), expected_m)


def test_a_block_wise_override_gives_per_tensor_state():
    params = [torch.nn.Parameter(torch.randn(500)), torch.nn.Parameter(torch.randn(500))]
    GlobalOptimManager.get_instance().override_config(params[0], "block_wise", False)
    opt = Lion8bit(params, lr=1e-3, min_8bit_size=100)
    _step(opt, params)
    assert set(opt.state[params[0]]) >= {"max1", "new_max1"} and "absmax1" not in opt.state[params[0]]
    assert "absmax1" in opt.state[params[1]] and "max1" not in opt.state[params[1]]


def test_a_module_override_wins_over_a_per_param_override_of_the_same_key():
    # As bitsandbytes, which keeps only the module's; other keys of both apply (merged).
    model = torch.nn.Linear(30, 1, bias=False)
    manager = GlobalOptimManager.get_instance()
    manager.override_config(model.weight, key_value_dict={"lr": 0.5, "weight_decay": 0.5})
    manager.register_module_override(model, "weight", {"lr": 0.25})
    opt = Lion(model.parameters(), lr=0.01)
    before = model.weight.detach().clone()
    _step(opt, [model.weight])
    expected, _, _ = lion_reference_step(before, model.weight.grad, torch.zeros_like(before), 0.25,
                                         0.9, 0.99, 0.5)
    torch.testing.assert_close(model.weight.detach().double(), expected)


def test_overrides_reach_a_param_group_added_later():
    first, added = torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(30))
    GlobalOptimManager.get_instance().override_config(added, "lr", 0.5)
    opt = Lion([first], lr=0.01)
    opt.add_param_group({"params": [added]})
    before = added.detach().clone()
    _step(opt, [first, added])
    assert (added - before).abs().max().item() == pytest.approx(0.5, rel=1e-6)


@pytest.mark.parametrize("how", ["initialize", "register_parameters"])
def test_manager_changes_after_planned_steps_reach_the_optimizer(how):
    params = [torch.nn.Parameter(torch.randn(30)), torch.nn.Parameter(torch.randn(30))]
    manager = GlobalOptimManager.get_instance()
    manager.override_config(params[1], "lr", 0.0)
    # Other Parameter objects at the same positions: the override reaches them only through
    # register_parameters (by position), as in bitsandbytes.
    moved = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = Lion(params if how == "initialize" else moved, lr=0.01)
    stepped = opt.param_groups[0]["params"]
    for _ in range(2):  # the second step runs from the plan
        _step(opt, stepped)
    frozen_before = how == "initialize"
    before = stepped[1].detach().clone()
    assert torch.equal(_stepped(opt, stepped)[1], before) == frozen_before
    if how == "initialize":
        manager.initialize()  # forgets the override: params[1] moves again
    else:
        manager.register_parameters(params)  # position (0, 1) takes the override: frozen
    before = stepped[1].detach().clone()
    assert torch.equal(_stepped(opt, stepped)[1], before) == (not frozen_before)


def _stepped(opt, params):
    _step(opt, params)
    return [p.detach().clone() for p in params]


def test_override_config_refuses_key_and_key_value_dict_together():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="either key and value or key_value_dict"):
        GlobalOptimManager.get_instance().override_config(p, "lr", 0.1,
                                                          key_value_dict={"lr": 0.2})


def test_a_module_override_of_a_missing_parameter_is_refused():
    with pytest.raises(ValueError, match="Linear has no parameter 'wieght'"):
        GlobalOptimManager.get_instance().register_module_override(torch.nn.Linear(2, 2),
                                                                   "wieght", {"lr": 0.1})


def test_override_percentile_clipping_and_min_8bit_size():
    params = [torch.nn.Parameter(torch.randn(500)), torch.nn.Parameter(torch.randn(500))]
    manager = GlobalOptimManager.get_instance()
    manager.override_config(params[0], key_value_dict={"percentile_clipping": 5,
                                                       "min_8bit_size": 100})
    opt = Lion8bit(params, lr=1e-3)
    _step(opt, params)
    assert "gnorm_vec" in opt.state[params[0]] and opt.state[params[0]]["state1"].dtype == torch.uint8
    assert "gnorm_vec" not in opt.state[params[1]]
    assert opt.state[params[1]]["state1"].dtype == torch.float32  # 500 < 4096


def test_params_with_equal_overrides_share_operator_calls(monkeypatch):
    calls = []
    real = lion_ops.ops.lion_update_32bit
    monkeypatch.setattr(lion_ops.ops, "lion_update_32bit",
                        lambda params, *a: (calls.append(len(params)), real(params, *a)))
    params = [torch.nn.Parameter(torch.randn(10)) for _ in range(5)]
    manager = GlobalOptimManager.get_instance()
    manager.override_config(params[0], "lr", 0.1)
    manager.override_config(params[3], "lr", 0.1)
    opt = Lion(params, lr=0.01)
    _step(opt, params)
    assert sorted(calls) == [2, 3]


def test_index_based_overrides_follow_positions():
    cpu_params = [torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(40))]
    manager = GlobalOptimManager.get_instance()
    manager.override_config(cpu_params[1], "lr", 0.5)
    manager.register_parameters(cpu_params)
    moved = [torch.nn.Parameter(p.detach().clone()) for p in cpu_params]  # new objects
    opt = Lion(moved, lr=0.01)
    before = [p.detach().clone() for p in moved]
    _step(opt, moved)
    assert (moved[1] - before[1]).abs().max().item() == pytest.approx(0.5, rel=1e-6)
    assert (moved[0] - before[0]).abs().max().item() == pytest.approx(0.01, rel=1e-6)


@pytest.mark.parametrize("config, message", [
    ({"eps": 1e-8}, r"unknown key\(s\) \['eps'\]"),
    ({"optim_bits": 16}, "optim_bits must be 8 or 32"),
    ({"betas": (1.5, 0.9)}, "beta parameter at index 0"),
    ({"lr": -1.0}, "invalid learning rate"),
    ({"min_8bit_size": True}, "min_8bit_size"),
    ({"percentile_clipping": True}, "percentile_clipping"),
    ({"weight_decay": -0.5}, r"invalid weight_decay value: -0.5: must be a number >= 0"),
    ({"weight_decay": float("inf")}, r"invalid weight_decay value: inf"),
    ({"weight_decay": torch.tensor(float("nan"))}, r"invalid weight_decay value: nan"),
    ({"betas": (0.9, 1 - 1e-9)}, r"invalid beta parameter at index 1: .*in float32"),
    ({"betas": (0.9,)}, r"betas must be a pair"),
    ({"lr": torch.tensor(1)}, r"a tensor lr must be a 1-element floating-point tensor"),
    ({"lr": "0.1"}, r"invalid learning rate lr='0.1'"),
])
def test_bad_overrides_are_refused(config, message):
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=message):
        GlobalOptimManager.get_instance().override_config(p, key_value_dict=config)
    with pytest.raises(ValueError, match=message):
        GlobalOptimManager.get_instance().register_module_override(torch.nn.Linear(2, 2),
                                                                   "weight", config)


def test_the_manager_keeps_no_model_alive():
    model = TinyModel()
    manager = GlobalOptimManager.get_instance()
    manager.override_config(model.proj.weight, "lr", 0.1)
    manager.register_module_override(model.embed, "weight", {"optim_bits": 32})
    opt = Lion(model.parameters())
    model_ref, weight_ref = weakref.ref(model), weakref.ref(model.proj.weight)
    del model, opt
    gc.collect()
    assert model_ref() is None and weight_ref() is None


def test_overrides_compile_without_recompiles():
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    model = TinyModel()
    GlobalOptimManager.get_instance().register_module_override(model.embed, "weight",
                                                               {"optim_bits": 32, "lr": 1e-2})
    opt = Lion8bit(model.parameters(), lr=torch.tensor(1e-3), min_8bit_size=1000)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    for i in range(4):
        opt.zero_grad()
        model(torch.tensor([i, i + 1])).backward()
        step()
        opt.param_groups[0]["lr"].fill_(1e-3 / (i + 2))
    assert counter.frame_count == 2
    assert opt.state[model.embed.weight]["state1"].dtype == torch.float32
    torch._dynamo.reset()


def test_a_tensor_override_compiles_once_and_steps_with_its_current_value():
    """A CPU tensor override, changed in place between compiled steps: its check (a host
    read, done by eager steps) stays out of the compiled step, which neither breaks the graph
    nor recompiles, and reads the tensor's current value."""
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    p, q = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    override_lr = torch.tensor(0.5)
    GlobalOptimManager.get_instance().override_config(q, "lr", override_lr)
    opt = Lion([p, q], lr=torch.tensor(0.25))
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    moves = []
    for lr in (0.5, 0.125, 0.0625):
        override_lr.fill_(lr)
        before = q.detach().clone()
        p.grad, q.grad = torch.ones(4), torch.ones(4)
        step()
        moves.append((before - q.detach()).abs().max().item())
    assert moves == [0.5, 0.125, 0.0625]
    assert counter.frame_count == 2  # the first step (state made) and the later ones
    torch._dynamo.reset()


def test_initialize_keeps_optimizers_attached():
    """initialize() forgets the overrides; optimizers made before it drop theirs and see the
    ones registered after it (as in bitsandbytes, whose optimizers look overrides up)."""
    mng = GlobalOptimManager.get_instance()
    emb = torch.nn.Embedding(100, 64)
    mng.override_config(emb.weight, "lr", 0.0)
    opt = Lion8bit(emb.parameters(), lr=1e-3)
    try:
        mng.initialize()
        mng.override_config(emb.weight, "optim_bits", 32)
        emb(torch.tensor([1, 2])).sum().backward()
        before = emb.weight.detach().clone()
        opt.step()
        assert opt.state[emb.weight]["state1"].dtype == torch.float32
        assert not torch.equal(before, emb.weight)  # the lr=0 override is gone
    finally:
        mng.initialize()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_overrides_of_their_params(how):
    """A copy's params are new objects, which the manager's overrides do not name: the copy
    carries them, steps as the original does, and reloads its own state_dict."""
    import copy
    import io
    mng = GlobalOptimManager.get_instance()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(100, 64), torch.nn.Linear(64, 64))
    opt = Lion8bit(model.parameters(), lr=1e-2, min_8bit_size=16)
    try:
        mng.register_module_override(model[0], "weight", {"optim_bits": 32})
        mng.override_config(model[1].weight, "lr", 0.0)
        x = torch.randint(0, 100, (8,))
        model(x).sum().backward()
        opt.step()
        if how == "deepcopy":
            model2, opt2 = copy.deepcopy((model, opt))
        else:
            buffer = io.BytesIO()
            torch.save((model, opt), buffer)
            buffer.seek(0)
            model2, opt2 = torch.load(buffer, weights_only=False)
        for m, o in ((model, opt), (model2, opt2)):
            m.zero_grad()
            m(x).sum().backward()
            frozen = m[1].weight.detach().clone()
            o.step()
            assert torch.equal(frozen, m[1].weight)  # lr 0 there, in the copy too
            assert o.state[m[0].weight]["state1"].dtype == torch.float32
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p, q)
        opt2.load_state_dict(opt2.state_dict())
    finally:
        mng.initialize()


def test_state_kind_after_an_override_and_reloading():
    """An override of optim_bits applies to new state: a param with state keeps stepping with
    its kind, and the optimizer reloads its own state_dict (as bitsandbytes does); a fresh
    optimizer with that override refuses the 8-bit state, naming the options in force."""
    mng = GlobalOptimManager.get_instance()
    lin = torch.nn.Linear(64, 64)
    opt = Lion8bit(lin.parameters(), lr=1e-3, min_8bit_size=16)
    try:
        lin(torch.randn(2, 64)).sum().backward()
        opt.step()
        mng.override_config(lin.weight, "optim_bits", 32)
        opt.step()
        saved = opt.state_dict()
        opt.load_state_dict(saved)
        assert opt.state[lin.weight]["state1"].dtype == torch.uint8
        opt.step()
        fresh = Lion8bit(lin.parameters(), lr=1e-3, min_8bit_size=16)
        with pytest.raises(ValueError, match=r"keeps 32-bit state for this param \(optim_bits=32, "
                                             r"min_8bit_size=16, block_wise=True, after "
                                             r"GlobalOptimManager overrides\)"):
            fresh.load_state_dict(saved)
    finally:
        mng.initialize()


def test_overrides_of_a_registered_param_reach_its_position():
    """As in bitsandbytes: register_parameters ties a param's overrides to its position, and
    overrides added to that param later reach the position too (a copy of the model, whose
    params are new objects, gets them)."""
    import copy
    mng = GlobalOptimManager.get_instance()
    model = torch.nn.Linear(64, 128)
    mng.override_config(model.weight, "optim_bits", 32)
    mng.register_parameters(model.parameters())
    mng.override_config(model.weight, "lr", 0.5)
    copied = copy.deepcopy(model)
    before = copied.weight.detach().clone()
    opt = Lion(copied.parameters(), lr=1e-3, optim_bits=8, min_8bit_size=100)
    copied.weight.grad, copied.bias.grad = torch.ones(128, 64), torch.ones(128)
    opt.step()
    assert opt.state[copied.weight]["state1"].dtype == torch.float32
    assert torch.allclose(before - copied.weight, torch.full((128, 64), 0.5))


# Param groups (a list of dicts) register positions
# per group, as bitsandbytes does.
def test_register_parameters_takes_param_groups():
    from lion_ops.optim.manager import GlobalOptimManager
    mng = GlobalOptimManager.get_instance()
    a, b = torch.nn.Parameter(torch.randn(40)), torch.nn.Parameter(torch.randn(40))
    try:
        mng.override_config(b, "lr", 0.5)
        mng.register_parameters([{"params": [a]}, {"params": [b]}])
        a2, b2 = (torch.nn.Parameter(t.detach().clone()) for t in (a, b))  # new objects
        opt = Lion([{"params": [a2]}, {"params": [b2]}], lr=0.01)
        before = b2.detach().clone()
        a2.grad, b2.grad = torch.randn(40), torch.randn(40)
        opt.step()
        assert (b2 - before).abs().max().item() == pytest.approx(0.5, rel=1e-6)
    finally:
        mng.initialize()


# Nothing to register is no error.
def test_register_parameters_of_nothing():
    GlobalOptimManager.get_instance().register_parameters([])
    GlobalOptimManager.get_instance().register_parameters(iter(()))


def test_override_tensors_that_print_alike_stay_apart():
    """Per-param overrides with distinct beta tensors: params whose tensors printed alike
    (0.90001 and 0.90004 both print as 0.9000) were put in one operator call, the second param
    stepping with the first one's tensors."""
    a, b = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    manager = GlobalOptimManager.get_instance()
    manager.register_parameters([a, b])
    beta_b = (torch.tensor(0.90004), torch.tensor(0.99))
    manager.override_config(a, "betas", (torch.tensor(0.90001), torch.tensor(0.99)))
    manager.override_config(b, "betas", beta_b)
    opt = Lion([a, b], lr=0.1)
    a.grad, b.grad = torch.ones(4), torch.ones(4)
    opt.step()  # both to -0.1, momentum 0.01
    beta_b[0].fill_(0.0)  # b's next direction is its grad's alone
    a.grad, b.grad = -0.05 * torch.ones(4), -0.05 * torch.ones(4)
    opt.step()
    # a: 0.90001 * 0.01 + 0.09999 * -0.05 > 0, down again; b: -0.05 < 0, back up.
    torch.testing.assert_close(a.detach(), torch.full((4,), -0.2))
    torch.testing.assert_close(b.detach(), torch.full((4,), 0.0))


@pytest.mark.parametrize("steps_before", [0, 2], ids=["first step", "planned step"])
@pytest.mark.parametrize("key, bad, message", [
    ("lr", -1.0, r"invalid learning rate lr=-1.0"),
    ("beta1", 1.0, r"invalid beta parameter at index 0: 1.0"),
    ("beta2", float("nan"), r"invalid beta parameter at index 1: nan"),
    ("weight_decay", float("inf"), r"invalid weight_decay value: inf"),
])
def test_an_override_tensor_broken_in_place_is_refused_before_anything_changes(
        steps_before, key, bad, message):
    """An override's CPU tensor hyperparameter changed in place after override_config is
    checked by every step, the first (the full check) and planned ones, naming it and its
    param, before any param, counter or momentum changes."""
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(6))]
    values = {"lr": torch.tensor(0.01), "beta1": torch.tensor(0.9),
              "beta2": torch.tensor(0.99), "weight_decay": torch.tensor(0.1)}
    GlobalOptimManager.get_instance().override_config(params[1], key_value_dict={
        "lr": values["lr"], "betas": (values["beta1"], values["beta2"]),
        "weight_decay": values["weight_decay"]})
    opt = Lion([{"params": params[:1]}, {"params": params[1:]}], lr=0.1)
    for _ in range(steps_before):
        _step(opt, params)
    values[key].fill_(bad)
    for p in params:
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    with pytest.raises(ValueError, match=r"^Lion.step \(override of param 0 of param group 1\): "
                       + message):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    for p, state in zip(params, states):
        assert opt.state[p].keys() == state.keys()
        assert all(torch.equal(opt.state[p][k], v) for k, v in state.items())


@pytest.mark.parametrize("edit", ["insert before", "append with its own override"])
def test_overrides_follow_their_params_when_param_groups_are_edited(edit):
    """Overrides are resolved by position; torch allows editing param_groups in place, and a
    step afterwards applied them by the old positions (a param inserted before an overridden
    one took its lr; an appended param's own override was ignored). bitsandbytes looks each
    param up on every step."""
    manager = GlobalOptimManager.get_instance()
    a, b, c = (torch.nn.Parameter(torch.zeros(4)) for _ in range(3))
    manager.override_config(a, "lr", 1.0)
    opt = Lion([a, b], lr=0.001)
    for p in (a, b):
        p.grad = torch.ones(4)
    opt.step()
    if edit == "insert before":
        opt.param_groups[0]["params"].insert(0, c)
    else:
        manager.override_config(c, "lr", 0.5)
        opt.param_groups[0]["params"].append(c)
    before = {id(p): p.detach().clone() for p in (a, b, c)}
    for p in (a, b, c):
        p.grad = torch.ones(4)
    opt.step()
    moved = {name: float(before[id(p)][0] - p.detach()[0]) for name, p in zip("abc", (a, b, c))}
    assert moved["a"] == pytest.approx(1.0) and moved["b"] == pytest.approx(1e-3)
    assert moved["c"] == pytest.approx(1e-3 if edit == "insert before" else 0.5)


def test_unrelated_manager_changes_do_not_retrace_a_compiled_step():
    """A compiled step guards on the identity of its overrides' configs; every manager change
    (an override of another optimizer's param, or the same value set again) made new ones, so
    it was traced again each time and fullgraph failed at the recompile limit."""
    manager = GlobalOptimManager.get_instance()
    params = [torch.nn.Parameter(torch.randn(64)) for _ in range(2)]
    manager.override_config(params[0], "lr", 0.2)
    opt = Lion(params, lr=0.01)
    torch._dynamo.reset()
    frames = []

    def count(graph_module, example_inputs):
        frames.append(graph_module)
        return graph_module.forward

    step = torch.compile(opt.step, backend=count, fullgraph=True)
    others = [torch.nn.Parameter(torch.zeros(3)) for _ in range(12)]
    for other in others:
        for p in params:
            p.grad = torch.randn(64)
        step()
        manager.override_config(other, "weight_decay", 0.0)
        manager.override_config(params[0], "lr", 0.2)  # the same value again
    assert len(frames) <= 2


def test_get_config_applies_overrides_as_bitsandbytes():
    """get_config reads lion_ops' GlobalOptimManager as bitsandbytes' reads its own, whether
    the override came before or after register_parameters."""
    embedding, linear = torch.nn.Embedding(300, 64), torch.nn.Linear(64, 64)
    params = list(embedding.parameters()) + list(linear.parameters())
    manager = GlobalOptimManager.get_instance()
    manager.register_parameters(params)
    manager.override_config(linear.weight, key_value_dict={"optim_bits": 32, "lr": 0.25})
    manager.register_module_override(embedding, "weight", {"percentile_clipping": 90})
    ours = Lion8bit(params, min_8bit_size=100)
    group = ours.param_groups[0]
    assert ours.get_config(0, 0, group)["percentile_clipping"] == 90
    config = ours.get_config(0, 1, group)
    assert (config["optim_bits"], config["lr"]) == (32, 0.25)
    assert ours.get_config(0, 2, group)["optim_bits"] == 8
    manager.override_config(linear.bias, "lr", 0.125)  # after the optimizer was made
    assert ours.get_config(0, 2, group)["lr"] == 0.125


def test_a_new_param_at_a_freed_params_address_does_not_inherit_its_override():
    """Positions are compared by id (an optimizer keeps no dropped param alive); a new param
    can take a freed one's id, so an overridden position also checks that its param is the
    one the override was resolved for."""
    import gc
    body, head = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = Lion([body, head], lr=0.1)
    GlobalOptimManager.get_instance().override_config(head, "lr", 0.0)
    for p in (body, head):
        p.grad = torch.ones(4)
    opt.step()
    old_id = id(head)
    del opt.state[head], p
    opt.param_groups[0]["params"].pop()
    del head
    gc.collect()
    kept = []
    for _ in range(1000):  # CPython reuses the freed object's memory soon
        new_head = torch.nn.Parameter(torch.zeros(4))
        if id(new_head) == old_id:
            break
        kept.append(new_head)
    else:
        pytest.skip("no new param took the freed one's id")
    opt.param_groups[0]["params"].append(new_head)
    new_head.grad, body.grad = torch.ones(4), torch.ones(4)
    opt.step()
    assert torch.equal(new_head.detach(), torch.full((4,), -0.1))  # lr 0.1: no override
