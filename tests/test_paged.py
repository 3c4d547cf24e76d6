"""Paged optimizer state: the zeros_paged_like, prefetch_paged and paging_support operators,
and PagedLion, PagedLion8bit, PagedLion32bit and is_paged=True.

On the CPU the paged classes must warn once and behave exactly as their unpaged twins. On a
GPU, paged state must be CUDA managed memory (checked independently, through the CUDA
runtime's own pointer attributes), invisible to torch's caching allocator, freed when it
dies, and give values identical to unpaged state, also after being paged out to the host.
Tests never ask for more managed memory than the GPU has free: oversubscribing a shared GPU
can hang it.
"""

import copy
import ctypes
import gc
import glob
import inspect
import os
import warnings

import pytest
import torch
from torch.library import opcheck

import lion_ops
from lion_ops import Lion, Lion8bit, Lion32bit, PagedLion, PagedLion8bit, PagedLion32bit, ops
from lion_ops.optim.base import PAGED_MIN_NUMEL

cuda_only = pytest.mark.cuda

# (paged class, constructor kwargs, unpaged twin, its kwargs)
TWINS = [
    pytest.param(PagedLion, {}, Lion, {}, id="PagedLion"),
    pytest.param(PagedLion32bit, {}, Lion32bit, {}, id="PagedLion32bit"),
    pytest.param(PagedLion8bit, {}, Lion8bit, {}, id="PagedLion8bit"),
    pytest.param(PagedLion8bit, dict(block_wise=False), Lion8bit, dict(block_wise=False),
                 id="PagedLion8bit-static"),
    pytest.param(PagedLion, dict(optim_bits=8, percentile_clipping=90), Lion,
                 dict(optim_bits=8, percentile_clipping=90), id="PagedLion-8bit-clipping"),
    pytest.param(Lion, dict(is_paged=True), Lion, {}, id="Lion-is_paged"),
    pytest.param(Lion8bit, dict(is_paged=True), Lion8bit, {}, id="Lion8bit-is_paged"),
    pytest.param(Lion32bit, dict(is_paged=True), Lion32bit, {}, id="Lion32bit-is_paged"),
]


def _params(device, dtype=torch.float32):
    """One param above the paging threshold (transposed, to check layouts), one at it, one
    just below it, and small ones, on `device`."""
    torch.manual_seed(1)
    shapes = [(PAGED_MIN_NUMEL // 250 + 3, 250), (PAGED_MIN_NUMEL,), (PAGED_MIN_NUMEL - 1,),
              (37, 5), (4096,)]
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in shapes]
    params[0] = torch.nn.Parameter(params[0].detach().t())
    return params


def _set_grads(params, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)


def _run_lockstep(paged_opt, paged_params, twin_opt, twin_params, steps, between=None):
    for step in range(steps):
        for params in (paged_params, twin_params):
            _set_grads(params, step)
        paged_opt.step()
        twin_opt.step()
        if between is not None:
            between(step)
    for p, q in zip(paged_params, twin_params):
        assert torch.equal(p, q)
        for key, value in twin_opt.state[q].items():
            assert torch.equal(paged_opt.state[p][key], value), key


# ---- the operators, on every device ----------------------------------------------------------

LIKES = {
    "contiguous": lambda d: torch.randn(7, 33, device=d),
    "transposed": lambda d: torch.randn(33, 7, device=d).t(),
    "sliced": lambda d: torch.randn(7, 66, device=d)[:, ::2],
    "empty": lambda d: torch.randn(0, 5, device=d),
    "scalar": lambda d: torch.randn((), device=d),
}


@pytest.mark.parametrize("like", LIKES)
@pytest.mark.parametrize("dtype", [None, torch.float32, torch.bfloat16, torch.float16,
                                   torch.uint8], ids=str)
@pytest.mark.parametrize("memory_format", [None, torch.contiguous_format], ids=["preserve",
                                                                                "contiguous"])
def test_zeros_paged_like(device, like, dtype, memory_format):
    source = LIKES[like](device)
    kwargs = dict(dtype=dtype, memory_format=memory_format)
    zeros = ops.zeros_paged_like(source, **kwargs)
    assert zeros.shape == source.shape and zeros.device == source.device
    assert zeros.dtype == (dtype or source.dtype)
    assert not zeros.requires_grad
    if memory_format is None and like in ("contiguous", "transposed"):
        assert zeros.stride() == source.stride()
    else:
        assert zeros.is_contiguous()
    assert torch.count_nonzero(zeros) == 0
    # The fake gives the same metadata (opcheck compares them, and the rest of the protocol).
    opcheck(torch.ops.lion.zeros_paged_like.default, (source,), kwargs)


def test_zeros_paged_like_of_a_param_does_not_require_grad(device):
    # State is made outside no_grad too (load_state_dict): it must not join autograd.
    param = torch.nn.Parameter(torch.randn(5, 7, device=device))
    zeros = ops.zeros_paged_like(param, dtype=torch.float32)
    assert not zeros.requires_grad and zeros.grad_fn is None
    opcheck(torch.ops.lion.zeros_paged_like.default, (param,), {"dtype": torch.float32})


def test_zeros_paged_like_refuses_bad_arguments(device):
    with pytest.raises(ValueError, match="memory_format must be"):
        ops.zeros_paged_like(torch.zeros(3, 3, device=device),
                             memory_format=torch.channels_last)
    with pytest.raises(TypeError, match="dense"):
        ops.zeros_paged_like(torch.zeros(3, 3, device=device).to_sparse())


@pytest.mark.parametrize("to_host", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.uint8],
                         ids=str)
def test_prefetch_paged_keeps_values(device, to_host, dtype):
    tensors = [ops.zeros_paged_like(torch.zeros(300, 301, device=device), dtype=dtype),
               torch.randn(17, device=device).to(dtype),  # ordinary memory: left alone
               ops.zeros_paged_like(torch.zeros(0, device=device), dtype=dtype)]
    tensors[0].copy_(torch.randn(300, 301, device=device) * 50)
    expected = [t.clone() for t in tensors]
    ops.prefetch_paged(tensors, to_host=to_host)
    ops.prefetch_paged(tensors)
    for t, e in zip(tensors, expected):
        assert torch.equal(t, e)
    opcheck(torch.ops.lion.prefetch_paged.default, (tensors, to_host))
    ops.prefetch_paged([])  # nothing to do, and no device to dispatch on


def test_prefetch_paged_changes_no_version_and_takes_tensors_that_require_grad(device):
    """Prefetching moves pages, not values: a backward that saved the tensor still runs, and
    a param that requires grad can be prefetched with grad mode on."""
    w = torch.randn(8, 8, device=device, requires_grad=True)
    x = torch.randn(2, 8, device=device, requires_grad=True)
    y = (x @ w).sum()  # saves w for x.grad
    version = w._version
    ops.prefetch_paged([w])
    assert w._version == version
    y.backward()
    assert x.grad is not None


def test_prefetch_paged_refuses_mixed_devices_and_sparse():
    with pytest.raises(ValueError, match="one device"):
        torch.ops.lion.prefetch_paged.default([torch.zeros(2), torch.zeros(2, device="meta")])
    with pytest.raises(TypeError, match="dense"):
        ops.prefetch_paged([torch.zeros(2, 2).to_sparse()])


def test_paging_support_on_the_cpu():
    assert ops.paging_support("cpu") == ops.PAGING_NONE
    assert ops.paging_support(torch.device("cpu")) == ops.PAGING_NONE
    # Under torch.compile the answer is a constant taken when the graph is traced.
    compiled = torch.compile(lambda x: x + ops.paging_support(x.device), backend="eager",
                             fullgraph=True)
    assert torch.equal(compiled(torch.zeros(3)), torch.full((3,), float(ops.PAGING_NONE)))


def test_zeros_paged_like_in_compiled_and_exported_graphs(device):
    seen = []

    def backend(gm, example_inputs):
        seen.append(gm)
        return gm

    @torch.compile(backend=backend, fullgraph=True)
    def two_states(p):
        a = ops.zeros_paged_like(p, dtype=torch.float32)
        b = ops.zeros_paged_like(p, dtype=torch.float32)
        ops.prefetch_paged([a, b])
        a.add_(p)
        return a, b

    p = torch.randn(5, 3, device=device)
    a, b = two_states(p)
    code = seen[0].code
    assert code.count("lion.zeros_paged_like") == 2 and "lion.prefetch_paged" in code
    assert torch.equal(a, p) and torch.count_nonzero(b) == 0
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()

    class Init(torch.nn.Module):
        def forward(self, p):
            m = ops.zeros_paged_like(p, dtype=torch.float32, memory_format=torch.contiguous_format)
            ops.prefetch_paged([m])
            return m + p

    program = torch.export.export(Init(), (p,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "lion.zeros_paged_like.default" in targets and "lion.prefetch_paged.default" in targets
    assert torch.equal(program.module()(p), p)


@pytest.mark.slow
def test_zeros_paged_like_under_inductor_gives_distinct_tensors(device):
    @torch.compile(fullgraph=True)
    def two_states(p):
        return (ops.zeros_paged_like(p, dtype=torch.float32),
                ops.zeros_paged_like(p, dtype=torch.float32))

    a, b = two_states(torch.randn(64, device=device))
    a.fill_(1.0)
    assert torch.count_nonzero(b) == 0


# ---- the classes: API and the CPU fallback ---------------------------------------------------

def test_constructors_match_bitsandbytes():
    tail = ("lr=0.0001, betas=(0.9, 0.99), weight_decay=0, {}args=None, min_8bit_size=4096, "
            "percentile_clipping=100, block_wise=True)")
    assert str(inspect.signature(PagedLion)) == "(params, " + tail.format("optim_bits=32, ")
    assert str(inspect.signature(PagedLion8bit)) == "(params, " + tail.format("")
    assert str(inspect.signature(PagedLion32bit)) == "(params, " + tail.format("")
    for name in ("PagedLion", "PagedLion8bit", "PagedLion32bit"):
        assert getattr(lion_ops.optim, name) is getattr(lion_ops, name)
    bnb = pytest.importorskip("bitsandbytes")
    for ours in (PagedLion, PagedLion8bit, PagedLion32bit):
        # bitsandbytes 0.50 dropped the trailing percentile_clipping and block_wise, which
        # lion_ops keeps: its parameters are a prefix of ours, with the same defaults.
        theirs = list(inspect.signature(getattr(bnb.optim, ours.__name__)).parameters.values())
        assert list(inspect.signature(ours).parameters.values())[:len(theirs)] == theirs


@pytest.mark.parametrize("paged_cls, kwargs, twin_cls, twin_kwargs", TWINS)
def test_on_the_cpu_paged_classes_warn_once_and_equal_their_twins(paged_cls, kwargs, twin_cls,
                                                                  twin_kwargs):
    paged_params, twin_params = _params("cpu"), _params("cpu")
    with pytest.warns(UserWarning, match="paged state needs CUDA managed memory") as record:
        paged = paged_cls(paged_params, lr=1e-3, weight_decay=0.1, **kwargs)
    assert len(record) == 1
    twin = twin_cls(twin_params, lr=1e-3, weight_decay=0.1, **twin_kwargs)
    assert paged.is_paged
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning per step
        _run_lockstep(paged, paged_params, twin, twin_params, steps=20)
    # The checkpoints are the same, and load both ways.
    saved, twin_saved = paged.state_dict(), twin.state_dict()
    assert saved["param_groups"] == twin_saved["param_groups"]
    assert saved["state"].keys() == twin_saved["state"].keys()
    paged.load_state_dict(twin_saved)
    twin.load_state_dict(saved)
    _run_lockstep(paged, paged_params, twin, twin_params, steps=3)


def test_unpaged_optimizers_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Lion(_params("cpu"))
        Lion8bit(_params("cpu"), is_paged=False)


def test_paged_class_warns_again_only_for_a_new_device():
    params = _params("cpu")
    with pytest.warns(UserWarning):
        opt = PagedLion(params[:2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.add_param_group({"params": params[2:]})  # same device: no second warning


# ---- on a GPU -----------------------------------------------------------------------------------

def _cudart():
    """The CUDA runtime torch loaded, for an independent look at pointers."""
    for name in ("libcudart.so.13", "libcudart.so.12"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for path in glob.glob(os.path.join(os.path.dirname(torch.__file__), os.pardir, "nvidia",
                                       "*", "lib", "libcudart.so*")):
        return ctypes.CDLL(path)
    pytest.skip("cannot find the CUDA runtime library")


class _PointerAttributes(ctypes.Structure):  # struct cudaPointerAttributes
    _fields_ = [("type", ctypes.c_int), ("device", ctypes.c_int),
                ("devicePointer", ctypes.c_void_p), ("hostPointer", ctypes.c_void_p),
                ("reserved", ctypes.c_long * 8)]


CUDA_MEMORY_TYPE_MANAGED = 3
CUDA_MEM_RANGE_ATTRIBUTE_LAST_PREFETCH_LOCATION_TYPE = 7
CUDA_MEM_LOCATION_TYPE_DEVICE, CUDA_MEM_LOCATION_TYPE_HOST = 1, 2


def _is_managed(t_or_pointer):
    pointer = t_or_pointer if isinstance(t_or_pointer, int) \
        else t_or_pointer.untyped_storage().data_ptr()
    attributes = _PointerAttributes()
    rc = _cudart().cudaPointerGetAttributes(ctypes.byref(attributes), ctypes.c_void_p(pointer))
    return rc == 0 and attributes.type == CUDA_MEMORY_TYPE_MANAGED


def _last_prefetch_location_type(t):
    """Where the range was last asked to be prefetched to (whether or not that has finished)."""
    value = ctypes.c_int(-1)
    storage = t.untyped_storage()
    rc = _cudart().cudaMemRangeGetAttribute(
        ctypes.byref(value), ctypes.c_size_t(4),
        ctypes.c_int(CUDA_MEM_RANGE_ATTRIBUTE_LAST_PREFETCH_LOCATION_TYPE),
        ctypes.c_void_p(storage.data_ptr()), ctypes.c_size_t(storage.nbytes()))
    assert rc == 0, f"cudaMemRangeGetAttribute returned {rc}"
    return value.value


def _require_free_gpu_memory(nbytes):
    free, _ = torch.cuda.mem_get_info()
    if free < 4 * nbytes:
        pytest.skip(f"the GPU has {free} bytes free; this test needs {4 * nbytes}")


def _prefetches():
    return ops.paging_support("cuda") == ops.PAGING_WITH_PREFETCH


@cuda_only
def test_paging_support_on_the_gpu():
    support = ops.paging_support("cuda")
    assert support in (ops.PAGING_WITHOUT_PREFETCH, ops.PAGING_WITH_PREFETCH)
    assert ops.paging_support(torch.device("cuda", torch.cuda.current_device())) == support


@cuda_only
def test_paged_memory_is_managed_uncounted_and_returned():
    nbytes = 256 << 20
    _require_free_gpu_memory(nbytes)
    like = torch.empty((), device="cuda").expand(nbytes // 4)  # overlapping: zeros are contiguous
    allocated = torch.cuda.memory_allocated()
    state = ops.zeros_paged_like(like)
    assert _is_managed(state) and state.is_contiguous() and state.shape == like.shape
    assert torch.cuda.memory_allocated() == allocated, "paged memory went through the allocator"
    assert torch.count_nonzero(state) == 0
    pointer = state.untyped_storage().data_ptr()
    del state
    gc.collect()
    assert not _is_managed(pointer), "the managed memory was not freed with its tensor"


@cuda_only
def test_paging_out_to_the_host_and_back_keeps_values_exact():
    nbytes = 64 << 20
    _require_free_gpu_memory(nbytes)
    state = ops.zeros_paged_like(torch.empty(nbytes // 4, device="cuda")).normal_()
    expected = state.cpu()
    ops.prefetch_paged([state], to_host=True)
    if _prefetches():
        assert _last_prefetch_location_type(state) == CUDA_MEM_LOCATION_TYPE_HOST
    torch.cuda.synchronize()
    assert torch.equal(state.cpu(), expected)
    ops.prefetch_paged([state])
    if _prefetches():
        assert _last_prefetch_location_type(state) == CUDA_MEM_LOCATION_TYPE_DEVICE
    state.mul_(2)  # a kernel on the pages brought back
    assert torch.equal(state.cpu(), expected * 2)


@pytest.fixture
def paging_device(device, monkeypatch):
    """The test device, with paging: on the CPU, which has none, the paged code path is forced
    (zeros_paged_like is then ordinary memory and prefetch_paged does nothing), so that CI runs
    everything but the managed memory itself."""
    if device.type == "cpu":
        monkeypatch.setattr(ops, "paging_support", lambda device: ops.PAGING_WITH_PREFETCH)
    return device


def _managed_where_expected(t):
    return _is_managed(t) if t.is_cuda else True


@pytest.mark.parametrize("paged_cls, kwargs, twin_cls, twin_kwargs", TWINS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_equals_unpaged_over_50_steps(paging_device, paged_cls, kwargs, twin_cls,
                                            twin_kwargs, dtype):
    on_gpu = paging_device.type == "cuda"
    paged_params, twin_params = _params(paging_device, dtype), _params(paging_device, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a GPU with managed memory: no fallback warning
        paged = paged_cls(paged_params, lr=1e-3, weight_decay=0.1, **kwargs)
    twin = twin_cls(twin_params, lr=1e-3, weight_decay=0.1, **twin_kwargs)

    def page_out_now_and_then(step):
        if step % 10 == 5:  # everything paged out to the host; the next step brings it back
            ops.prefetch_paged([paged.state[p]["state1"] for p in paged_params], to_host=True)

    _run_lockstep(paged, paged_params, twin, twin_params, steps=46, between=page_out_now_and_then)
    if on_gpu:
        for p in paged_params:  # the last page-out was after step 45; step 46 brings it back
            state = paged.state[p]
            assert _is_managed(state["state1"]) == (p.numel() >= PAGED_MIN_NUMEL)
            if _is_managed(state["state1"]) and _prefetches():
                assert _last_prefetch_location_type(state["state1"]) == CUDA_MEM_LOCATION_TYPE_HOST
    _run_lockstep(paged, paged_params, twin, twin_params, steps=4)
    for p in paged_params if on_gpu else ():
        state = paged.state[p]
        if _is_managed(state["state1"]) and _prefetches():
            assert _last_prefetch_location_type(state["state1"]) == CUDA_MEM_LOCATION_TYPE_DEVICE
        for key in ("absmax1", "qmap1", "max1", "new_max1", "gnorm_vec"):
            if key in state:
                assert not _is_managed(state[key]), key
    if paged.optim_bits == 32:
        assert paged.state[paged_params[0]]["state1"].stride() == paged_params[0].stride()

    # The checkpoint is the unpaged format; loading keeps a paged optimizer paged.
    saved = paged.state_dict()
    fresh_params = [torch.nn.Parameter(p.detach().clone()) for p in paged_params]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed = paged_cls(fresh_params, lr=1e-3, weight_decay=0.1, **kwargs)
    resumed.load_state_dict(copy.deepcopy(saved))
    assert _managed_where_expected(resumed.state[fresh_params[0]]["state1"])
    assert not any(t.requires_grad for state in resumed.state.values() for t in state.values()
                   if isinstance(t, torch.Tensor))
    twin.load_state_dict(saved)  # and an unpaged optimizer loads it as ordinary memory
    assert not (on_gpu and _is_managed(twin.state[twin_params[0]]["state1"]))
    _run_lockstep(resumed, fresh_params, twin, twin_params, steps=3)


@cuda_only
def test_paged_state_is_returned_when_the_optimizer_dies():
    numel = 16 << 20
    _require_free_gpu_memory(2 * 4 * numel)
    params = [torch.nn.Parameter(torch.randn(numel, device="cuda"))]
    params[0].grad = torch.randn_like(params[0])
    allocated = torch.cuda.memory_allocated()
    opt = PagedLion(params)
    opt.step()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - allocated < 4 * numel // 2
    momentum = opt.state[params[0]]["state1"]
    pointer = momentum.untyped_storage().data_ptr()
    assert _is_managed(pointer)
    del opt, momentum
    gc.collect()
    assert not _is_managed(pointer), "the paged state outlived its optimizer"


def test_compiled_paged_step_initializes_paged_state_in_the_graph(paging_device):
    from torch._dynamo.testing import CompileCounterWithBackend
    torch._dynamo.reset()
    params, twin_params = _params(paging_device), _params(paging_device)
    opt = PagedLion8bit(params, lr=torch.tensor(1e-3), weight_decay=0.1)
    twin = Lion8bit(twin_params, lr=torch.tensor(1e-3), weight_decay=0.1)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    counter = CompileCounterWithBackend(backend)

    @torch.compile(backend=counter, fullgraph=True)
    def step():
        opt.step()

    for i in range(5):
        _set_grads(params, i)
        _set_grads(twin_params, i)
        step()
        twin.step()
        opt.param_groups[0]["lr"].fill_(1e-3 / (i + 2))
        twin.param_groups[0]["lr"].fill_(1e-3 / (i + 2))
    assert counter.frame_count == 2  # the first step (state initialization), then every step
    assert graphs[0].count("lion.zeros_paged_like") == 2  # the two params at the threshold
    assert "lion.prefetch_paged" in graphs[1]
    assert _managed_where_expected(opt.state[params[0]]["state1"])
    for p, q in zip(params, twin_params):
        assert torch.equal(p, q)
    torch._dynamo.reset()


def test_each_step_prefetches_the_paged_state_before_updating_it(paging_device, monkeypatch):
    """The calls a paged step makes (on the CPU with paging forced, the same calls as on a
    GPU): one prefetch of exactly the paged momenta per operator call, before it; loading a
    state_dict allocates paged state again."""
    params = _params(paging_device)
    opt = PagedLion(params, lr=1e-3)
    calls = []
    real_prefetch, real_update, real_zeros = (ops.prefetch_paged, ops.lion_update_32bit,
                                              ops.zeros_paged_like)

    def prefetch(tensors, to_host=False):
        calls.append(("prefetch", [t.numel() for t in tensors], to_host))
        real_prefetch(tensors, to_host)

    def update(params, *args, **kwargs):
        calls.append(("update", len(params)))
        real_update(params, *args, **kwargs)

    def zeros(like, **kwargs):
        calls.append(("zeros_paged_like", like.numel()))
        return real_zeros(like, **kwargs)

    monkeypatch.setattr(ops, "prefetch_paged", prefetch)
    monkeypatch.setattr(ops, "lion_update_32bit", update)
    monkeypatch.setattr(ops, "zeros_paged_like", zeros)
    big = sorted(p.numel() for p in params if p.numel() >= PAGED_MIN_NUMEL)
    for step in range(2):
        _set_grads(params, step)
        calls.clear()
        opt.step()
        allocations = [c[1] for c in calls if c[0] == "zeros_paged_like"]
        assert sorted(allocations) == (big if step == 0 else [])
        steps = [c for c in calls if c[0] != "zeros_paged_like"]
        assert steps == [("prefetch", [p.numel() for p in params if p.numel() >= PAGED_MIN_NUMEL],
                          False), ("update", len(params))]
    calls.clear()
    opt.load_state_dict(opt.state_dict())
    assert sorted(c[1] for c in calls if c[0] == "zeros_paged_like") == big


# A paged optimizer says at add_param_group, not at some later
# step, that a new device keeps ordinary state.
def test_add_param_group_on_a_new_device_warns_then():
    with pytest.warns(UserWarning, match="which cpu does not have"):
        opt = lion_ops.PagedLion([torch.nn.Parameter(torch.randn(3))])
    with pytest.warns(UserWarning, match="which meta does not have"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.empty(3, device="meta"))]})
