"""The CUDA kernels (native/cuda/lion_kernels.cu) and their host code (native/cuda/lion_cuda.cpp),
run on the CPU by the emulation in tests/cuda_emulation, against the CPU operators: every output
and every tensor written in place must match bit for bit (NaN payloads aside), except the
squared norms of percentile clipping, which CUDA sums in another order.

The emulation runs a launch's blocks one after another and the threads of a block as fibers
that switch only at barriers; each comparison runs under two schedules of blocks and threads
(forward and reverse, or forward and a seeded shuffle), so that a missing barrier shows up as
a difference. Every tensor a call writes is a slice of a larger buffer filled with a sentinel
that must be intact afterwards, and scratch tensors the host code allocates with at::empty
start as NaN (deterministic mode fills them), so unwritten results show up too.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import pytest
import torch

import lion_ops  # noqa: F401  (loads torch.ops.lion)
from lion_ops.quantization import dynamic_map
from op_args import as_op_args

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location(
    "lion_cuda_emulation_build", os.path.join(_HERE, "cuda_emulation", "build.py"))
emu_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(emu_build)

_missing = emu_build.missing_prerequisites()
if _missing is not None:
    pytest.skip(f"the CUDA emulation cannot be built here: {_missing}", allow_module_level=True)

cpu = torch.ops.lion
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SIZES = [1, 3, 255, 256, 0, 257, 2047, 2048, 2049, 4095, 4096, 4097, 8191, 8192, 8193,
         3 * 8192 + 5, 60013]
SCHEDULES = {"forward": (0, 0), "reverse": (1, 0), "shuffle": (2, 20240601)}
LR, BETA1, BETA2, WD = 1e-2, 0.9, 0.99, 0.05


def _build_root(request) -> str:
    cache = getattr(request.config, "cache", None)
    root = str(cache.mkdir("cuda_emulation")) if cache is not None else tempfile.mkdtemp()
    return os.path.join(root, "torch-" + torch.__version__.replace("+", "_"))


@pytest.fixture(scope="session")
def emu(request):
    emu_build.build(_build_root(request))
    return torch.ops.lion_emu


@pytest.fixture(scope="session")
def emulated_kernel_shapes(request):
    """tools/kernel_shapes.py, and tools/kernel_shapes.cu built by the emulation (once: torch
    loads an extension of one name once per process)."""
    spec = importlib.util.spec_from_file_location(
        "kernel_shapes", os.path.join(os.path.dirname(_HERE), "tools", "kernel_shapes.py"))
    kernel_shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernel_shapes)
    path = emu_build.build_kernel_shapes(os.path.join(_build_root(request), "kernel_shapes"))
    return kernel_shapes, kernel_shapes.KernelShapes(path)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The comparisons are many small tensor ops; torch's intra-op threads only add overhead.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _reset_emulation(request):
    yield
    if "emu" in request.fixturenames:
        torch.ops.lion_emu.set_schedule(0, 0)
        torch.ops.lion_emu.set_hyperparameters_on_device(False)


def run_emulated(emu, schedule, op, *args, **kwargs):
    """One emulated call under `schedule`, with at::empty filling (NaN, max ints)."""
    emu.set_schedule(*SCHEDULES[schedule])
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        with torch.no_grad():
            return op(*args, **kwargs)
    finally:
        torch.use_deterministic_algorithms(previous)


# ---- comparisons and guarded tensors ------------------------------------------------------------

_INT_OF = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t):
    t = t.contiguous().reshape(-1)
    return t if not t.is_floating_point() else t.view(_INT_OF[t.element_size()])


def assert_bitwise(actual, expected, what):
    """Same values and bits (a NaN matches any NaN: payloads differ between conversions)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.reshape(-1), expected.reshape(-1)
    if torch.equal(_bits(a), _bits(e)):
        return
    differ = _bits(a) != _bits(e)
    if a.is_floating_point():
        differ &= ~(torch.isnan(a) & torch.isnan(e))
    if differ.any():
        where = differ.nonzero()[0].item()
        count = int(differ.sum())
        raise AssertionError(
            f"{what}: {count} of {a.numel()} elements differ; first at flat index {where}: "
            f"emulated CUDA {a[where].item()!r} (bits {_bits(a)[where].item():#x}) vs CPU "
            f"{e[where].item()!r} (bits {_bits(e)[where].item():#x})")


SENTINEL = {torch.float32: -777.25, torch.bfloat16: -777.0, torch.float16: -777.0,
            torch.uint8: 0xA5}
PAD = 37


class Guarded:
    """A tensor of `values` living at element `offset` of a sentinel-filled buffer."""

    def __init__(self, values, offset=0):
        self.offset, self.numel = offset, values.numel()
        self.buffer = torch.full((offset + self.numel + PAD,), SENTINEL[values.dtype],
                                 dtype=values.dtype)
        self.view = self.buffer[offset:offset + self.numel].view(values.shape)
        self.view.copy_(values)

    def check(self, what):
        sentinel = torch.full((1,), SENTINEL[self.buffer.dtype], dtype=self.buffer.dtype)
        outside = torch.cat([self.buffer[:self.offset], self.buffer[self.offset + self.numel:]])
        bad = _bits(outside) != _bits(sentinel)
        assert not bad.any(), f"{what}: written outside its {self.numel} elements"


class Copies:
    """The same guarded tensor once per run: "cpu", and one per emulated schedule."""

    def __init__(self, runs, values, offset=0):
        self.of = {run: Guarded(values, offset) for run in runs}

    def __getitem__(self, run):
        return self.of[run].view


def compare_runs(runs, copies, what):
    """Every emulated run's tensors against the CPU run's, and every sentinel intact."""
    for i, c in enumerate(copies):
        for run in runs:
            c.of[run].check(f"{run}: {what}[{i}]")
        for run in runs:
            if run != "cpu":
                assert_bitwise(c.of[run].view, c.of["cpu"].view, f"{run} schedule: {what}[{i}]")


def call_all(emu, runs, cpu_op, emu_op, make_args):
    """cpu_op(*make_args("cpu")), then emu_op(*make_args(run)) under each schedule."""
    results = {}
    for run in runs:
        args = as_op_args(make_args(run))
        if run == "cpu":
            with torch.no_grad():
                results[run] = cpu_op(*args)
        else:
            results[run] = run_emulated(emu, run, emu_op, *args)
    return results


# ---- inputs -------------------------------------------------------------------------------------

def with_specials(x, i, generator):
    """Every third tensor gets infinities, NaNs and zeros; every fifth an all-zero stretch."""
    x = x.clone()
    n = x.numel()
    if n == 0:
        return x
    flat = x.view(-1)
    if i % 3 == 1:
        idx = torch.randint(0, n, (max(1, n // 500),), generator=generator)
        flat[idx] = 0.0
        flat[idx[: max(1, len(idx) // 2)]] = float("inf")
        flat[idx[: max(1, len(idx) // 4)]] = float("-inf")
        flat[idx[: max(1, len(idx) // 8)]] = float("nan")
    if i % 5 == 2 and n > 600:
        flat[256:512] = 0.0  # a whole quantization block of zeros
    return x


def offsets_for(i, layout, shift, operands):
    """Element offsets of each operand of tensor i: all 0 (aligned), or one operand
    misaligned by 1..3 elements (which one and by how much varying with i), or all by 4."""
    if layout == "aligned":
        return [0] * operands
    case = (i + shift) % (operands + 1)
    if case == operands:
        return [4] * operands  # 16 bytes of fp32, 8 of bf16: aligned packs, 4 bytes of codes
    offsets = [0] * operands
    offsets[case] = 1 + (i + shift) % 3
    return offsets


def dtype_of(i, shift):
    return DTYPES[(i + shift) % len(DTYPES)]


def random_grads(sizes, dtypes, generator, step):
    return [with_specials(torch.randn(n, generator=generator).to(dt) * (1 + step), i + step,
                          generator) for i, (n, dt) in enumerate(zip(sizes, dtypes))]


def grad_views(grads, offsets):
    """The grads as read-only views at the given offsets (kept alive by the views)."""
    return [Guarded(gr, off).view for gr, off in zip(grads, offsets)]


# ---- lion_update_32bit --------------------------------------------------------------------------

def run_32bit(emu, second, sizes, dtypes, offsets, seed, hyperparameters_on_device=False, steps=3,
              expect_launches=None):
    runs = ("cpu", "forward", second)
    g = torch.Generator().manual_seed(seed)
    params = [Copies(runs, with_specials(torch.randn(n, generator=g), i + 7, g).to(dt), off[0])
              for i, (n, dt, off) in enumerate(zip(sizes, dtypes, offsets))]
    momenta = [Copies(runs, torch.randn(n, generator=g) * 0.1, off[2])
               for n, off in zip(sizes, offsets)]
    grad_scales = torch.rand(len(sizes), generator=g) + 0.25
    grad_scales[0] = 1.0
    emu.set_hyperparameters_on_device(hyperparameters_on_device)
    for step in range(steps):
        grads = grad_views(random_grads(sizes, dtypes, g, step), [off[1] for off in offsets])
        scales = grad_scales if step != 1 else None
        lr = torch.tensor(LR * (1 + step), dtype=torch.float64 if step == 2 else torch.float32)
        emu.take_launch_log()
        call_all(emu, runs, cpu.lion_update_32bit, emu.lion_update_32bit,
                 lambda run: ([p[run] for p in params], grads, [m[run] for m in momenta], lr,
                              BETA1, BETA2, WD, scales))
        if expect_launches is not None:
            assert emu.take_launch_log().splitlines() == expect_launches * 2
        compare_runs(runs, params, f"step {step}: params")
        compare_runs(runs, momenta, f"step {step}: momenta")


@pytest.mark.parametrize("second", ["reverse", "shuffle"])
@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
@pytest.mark.parametrize("shift", [0, 1, 2])
def test_update_32bit(emu, second, layout, shift):
    dtypes = [dtype_of(i, shift) for i in range(len(SIZES))]
    offsets = [offsets_for(i, layout, shift, 3) for i in range(len(SIZES))]
    run_32bit(emu, second, SIZES, dtypes, offsets, seed=100 + shift,
              hyperparameters_on_device=(shift == 1))


def test_update_32bit_more_tensors_than_one_launch_takes(emu):
    # 390 float32 tensors (two launches of 384 and 6), 20 bfloat16, 3 float16, empties between.
    g = torch.Generator().manual_seed(5)
    sizes = [int(n) for n in torch.randint(0, 300, (413,), generator=g)]
    sizes[10] = sizes[200] = 0
    dtypes = [torch.float32] * 390 + [torch.bfloat16] * 20 + [torch.float16] * 3
    offsets = [offsets_for(i, "misaligned", 0, 3) for i in range(len(sizes))]
    float_blocks = [sum(1 for n in sizes[:390] if n > 0)]
    expect = ["lion_32bit_kernel<float, Shape>[384]",
              f"lion_32bit_kernel<float, Shape>[{float_blocks[0] - 384}]",
              "lion_32bit_kernel<__nv_bfloat16, Shape>[20]", "lion_32bit_kernel<__half, Shape>[3]"]
    run_32bit(emu, "shuffle", sizes, dtypes, offsets, seed=6, steps=2, expect_launches=expect)


# ---- lion_update_8bit_blockwise / lion_update_8bit_static --------------------------------------

def initial_codes(n, i, generator):
    codes = torch.randint(0, 256, (n,), generator=generator, dtype=torch.uint8)
    if i % 5 == 2 and n > 600:
        codes[256:512] = 127  # a block of zero momentum (qmap[127] == 0)
    return codes


def run_8bit(emu, mode, second, sizes, dtypes, offsets, seed, hyperparameters_on_device=False, steps=3,
             expect_launches=None, infinite_scales=False, qmap=None):
    runs = ("cpu", "forward", second)
    g = torch.Generator().manual_seed(seed)
    qmap = dynamic_map() if qmap is None else qmap
    params = [Copies(runs, with_specials(torch.randn(n, generator=g), i + 7, g).to(dt), off[0])
              for i, (n, dt, off) in enumerate(zip(sizes, dtypes, offsets))]
    codes = [Copies(runs, initial_codes(n, i, g), off[2])
             for i, (n, off) in enumerate(zip(sizes, offsets))]
    scales, new_scales = [], []
    for i, n in enumerate(sizes):
        count = (n + 255) // 256 if mode == "blockwise" else 1
        s = torch.rand(count, generator=g) * 0.1
        if infinite_scales and i % 4 == 3:
            s[0] = float("inf")  # loaded state with an infinite scale
        if i % 6 == 5:
            s[-1] = 0.0
        scales.append(Copies(runs, s, i % 3))
        new_scales.append(Copies(runs, torch.full((1,), 123.0), (i + 1) % 3))
    grad_scales = torch.rand(len(sizes), generator=g) + 0.25
    grad_scales[0] = 1.0
    cpu_op = getattr(cpu, f"lion_update_8bit_{mode}")
    emu_op = getattr(emu, f"lion_update_8bit_{mode}")
    emu.set_hyperparameters_on_device(hyperparameters_on_device)
    for step in range(steps):
        grads = grad_views(random_grads(sizes, dtypes, g, step), [off[1] for off in offsets])
        gs = grad_scales if step != 1 else None
        lr = torch.tensor(LR * (1 + step))

        def make_args(run):
            state = [[s[run] for s in scales]]
            if mode == "static":
                state.append([s[run] for s in new_scales])
            return ([p[run] for p in params], grads, [c[run] for c in codes], *state, qmap, lr,
                    BETA1, BETA2, WD, gs)

        emu.take_launch_log()
        call_all(emu, runs, cpu_op, emu_op, make_args)
        if expect_launches is not None:
            assert emu.take_launch_log().splitlines() == expect_launches * 2
        compare_runs(runs, params, f"step {step}: params")
        compare_runs(runs, codes, f"step {step}: codes")
        compare_runs(runs, scales, f"step {step}: {'absmaxes' if mode == 'blockwise' else 'max1s'}")
        if mode == "static":
            compare_runs(runs, new_scales, f"step {step}: new_max1s")


@pytest.mark.parametrize("second", ["reverse", "shuffle"])
@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
@pytest.mark.parametrize("shift", [0, 1, 2])
@pytest.mark.parametrize("mode", ["blockwise", "static"])
def test_update_8bit(emu, mode, second, layout, shift):
    dtypes = [dtype_of(i, shift) for i in range(len(SIZES))]
    offsets = [offsets_for(i, layout, shift, 3) for i in range(len(SIZES))]
    run_8bit(emu, mode, second, SIZES, dtypes, offsets, seed=200 + shift,
             hyperparameters_on_device=(shift == 2), infinite_scales=True)


def other_sorted_maps():
    """Sorted maps unlike the dynamic one, whose encode-table buckets do not all fold, so the
    kernels' general encoder runs: a midpoint of exactly 0 (no bucket folds), several midpoints
    per bucket and midpoints below 2^-24, midpoints of 2 and more (in the merged top bucket;
    the other buckets fold), and a NaN entry (no bucket folds)."""
    tiny = torch.logspace(-14, -7, 40, dtype=torch.float64).float()
    with_nan = dynamic_map().clone()
    with_nan[200] = float("nan")
    return {"linear": torch.linspace(-1, 1, 256),
            # No entry of one sign: the sign rule must not step past either end of the map.
            "unsigned": torch.linspace(0, 1, 256),
            "nonpositive": torch.linspace(-1, -1e-3, 256),
            "clustered": torch.cat([torch.linspace(-1, 1, 175), tiny, -tiny,
                                    torch.zeros(1)]).sort().values,
            "wide": torch.linspace(-3, 3, 256),
            "nan entry": with_nan,
            **partly_folding_maps()}


def partly_folding_maps():
    """Maps where most buckets fold and some do not: the dynamic map with four entries
    squeezed into one bucket (three midpoints inside it), 255 evenly spaced entries in
    [-3, 3] plus 3.5 (no midpoint of 0; midpoints of 2 and more in the merged top bucket),
    and the dynamic map ending at 3.5 instead of 1 (one midpoint in that bucket)."""
    squeezed = dynamic_map().clone()
    squeezed[230:234] = 0.6555 + torch.arange(4) * 1e-4
    wide = torch.cat([torch.linspace(-3, 3, 255), torch.tensor([3.5])])
    top_past_2 = dynamic_map().clone()
    top_past_2[255] = 3.5  # one midpoint (2.24) in the merged top bucket
    return {"squeezed": squeezed, "wide odd": wide, "top past 2": top_past_2}


MAP_NAMES = ["linear", "unsigned", "nonpositive", "clustered", "wide", "nan entry", "squeezed",
             "wide odd", "top past 2"]


@pytest.mark.parametrize("name", MAP_NAMES)
@pytest.mark.parametrize("layout", ["aligned", "misaligned"])
@pytest.mark.parametrize("mode", ["blockwise", "static"])
def test_update_8bit_other_maps(emu, mode, layout, name):
    # Aligned: whole quantization blocks take the kernels' vector path (a lane's codes at once);
    # misaligned: most take the element-wise path.
    dtypes = [dtype_of(i, 0) for i in range(len(SIZES))]
    offsets = [offsets_for(i, layout, 0, 3) for i in range(len(SIZES))]
    run_8bit(emu, mode, "shuffle", SIZES, dtypes, offsets, seed=300, steps=2,
             qmap=other_sorted_maps()[name])


@pytest.mark.parametrize("name", MAP_NAMES)
def test_quantize_other_maps(emu, name):
    qmap = other_sorted_maps()[name]
    g = torch.Generator().manual_seed(11)
    x = torch.randn(20 * 256 + 5, generator=g) * torch.logspace(-12, 0, 20 * 256 + 5)
    x[::7] = 0.0
    x[1::7] = -0.0
    x[:256] = torch.nan_to_num(qmap)[torch.randperm(256, generator=g)]
    x[256:511] = torch.nan_to_num((qmap[1:] + qmap[:-1]) / 2)
    x[600] = float("inf")
    runs = ("cpu", "forward", "reverse")
    result = call_all(emu, runs, cpu.quantize_blockwise, emu.quantize_blockwise,
                      lambda run: (x, qmap, 256))
    for run in runs[1:]:
        assert_bitwise(result[run][0], result["cpu"][0], f"{name}, {run}: codes")
        assert_bitwise(result[run][1], result["cpu"][1], f"{name}, {run}: absmax")


@pytest.mark.parametrize("mode", ["blockwise", "static"])
def test_update_8bit_more_tensors_than_one_launch_takes(emu, mode):
    g = torch.Generator().manual_seed(7)
    sizes = [int(n) for n in torch.randint(0, 700, (400,), generator=g)]
    sizes[3] = sizes[300] = 0
    dtypes = [torch.bfloat16] * 390 + [torch.float32] * 10
    offsets = [offsets_for(i, "misaligned", 1, 3) for i in range(len(sizes))]
    blocks = sum(1 for n in sizes[:390] if n > 0)
    table = "build_encode_table_kernel[26]"
    if mode == "blockwise":
        kernel = "lion_8bit_kernel<T, Scaling::kBlockwise, Pass::kUpdate, Shape>"
        expect = [table, f"{kernel}[10]", f"{kernel}[384]", f"{kernel}[{blocks - 384}]"]
    else:
        def static(count):  # (each tensor here is one block)
            scale_blocks = (count + 255) // 256
            return [f"static_scales_kernel[{scale_blocks}]",
                    f"lion_8bit_kernel<T, Scaling::kStatic, Pass::kReduceOnly, Shape>[{count}]",
                    f"lion_8bit_kernel<T, Scaling::kStatic, Pass::kUpdate, Shape>[{count}]",
                    f"static_scales_kernel[{scale_blocks}]"]
        expect = [table] + static(10) + static(384) + static(blocks - 384)
    run_8bit(emu, mode, "reverse", sizes, dtypes, offsets, seed=8, steps=2,
             expect_launches=expect)


@pytest.mark.parametrize("cause", ["loaded_infinite_scale", "infinite_grads"])
@pytest.mark.parametrize("mode", ["blockwise", "static"])
def test_update_8bit_all_infinite_momenta(emu, mode, cause):
    """A block (static: a tensor) whose momenta are all infinite has the new scale 0: each
    momentum takes its own sign's extreme code (the CPU's AVX2 encoder gave them all code 0
    until the emulation found it)."""
    runs = ("cpu", "forward", "reverse")
    g = torch.Generator().manual_seed(9)
    qmap = dynamic_map()
    n = 1024
    params = [Copies(runs, torch.randn(n, generator=g))]
    codes_init = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
    grads = torch.randn(n, generator=g)
    count = (n + 255) // 256 if mode == "blockwise" else 1
    scale = torch.rand(count, generator=g) * 0.1
    if cause == "loaded_infinite_scale":
        scale[0] = float("inf")
        codes_init[codes_init == 127] = 128  # every momentum of block 0 is +-inf
    else:
        span = slice(0, 256) if mode == "blockwise" else slice(0, n)
        codes_init[span] = 127  # zero momentum ...
        grads[span] = torch.where(torch.rand(grads[span].shape, generator=g) < 0.5,
                                  float("inf"), float("-inf"))  # ... and infinite grads
    codes = [Copies(runs, codes_init)]
    scales = [Copies(runs, scale)]
    new_scales = [Copies(runs, torch.zeros(1))]

    def make_args(run):
        state = [[scales[0][run]]] + ([[new_scales[0][run]]] if mode == "static" else [])
        return ([params[0][run]], [grads], [codes[0][run]], *state, qmap, torch.tensor(LR),
                BETA1, BETA2, WD)

    call_all(emu, runs, getattr(cpu, f"lion_update_8bit_{mode}"),
             getattr(emu, f"lion_update_8bit_{mode}"), make_args)
    compare_runs(runs, params, "params")
    compare_runs(runs, scales, "scales")
    compare_runs(runs, codes, "codes")


# ---- percentile_clipping / increment_steps -------------------------------------------------------

def assert_close_tight(actual, expected, what, rtol=1.2e-7):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=0, equal_nan=True, msg=what)


@pytest.mark.parametrize("history", ["step1", "mid", "late", "fresh"])
@pytest.mark.parametrize("percentile", [0, 5, 50, 99])
def test_percentile_clipping(emu, history, percentile):
    second = "reverse" if percentile % 2 else "shuffle"
    runs = ("cpu", "forward", second)
    g = torch.Generator().manual_seed(300 + percentile)
    sizes = SIZES + [513, 70000]
    dtypes = [dtype_of(i, percentile) for i in range(len(sizes))]
    first_step = {"step1": 1.0, "mid": 37.0, "late": 250.0, "fresh": 12.0}[history]
    vecs = []
    for i in range(len(sizes)):
        v = torch.rand(100, generator=g) * 1000 if history in ("mid", "late") else torch.zeros(100)
        if history == "fresh":
            v.fill_(-1.0)
        vecs.append(Copies(runs, v, i % 4))
    steps = [Copies(runs, torch.full((1,), first_step + (i % 3 if history == "late" else 0)),
                    i % 2) for i in range(len(sizes))]
    for round_ in range(3):
        grads = grad_views(random_grads(sizes, dtypes, g, round_),
                           [(i + round_) % 4 for i in range(len(sizes))])
        if round_ == 2:
            grads[3] = grads[3] * 0  # a zero norm
        if round_ == 1:  # squares below float32's normal range (they vanished in fp32 sums)
            grads[8] = grads[8] * 1e-21
        before = {run: [v[run].clone() for v in vecs] for run in runs}
        result = call_all(emu, runs, cpu.percentile_clipping, emu.percentile_clipping,
                          lambda run: (grads, [v[run] for v in vecs],
                                       [s[run].view(()) for s in steps], percentile))
        for run in runs:
            for i, v in enumerate(vecs):
                v.of[run].check(f"{run}: gnorm_vecs[{i}]")
            if run == "cpu":
                continue
            assert result[run].dtype == torch.float32 and result[run].shape == (len(sizes),)
            assert_close_tight(result[run], result["cpu"], f"round {round_}, {run}: scales")
            for i, v in enumerate(vecs):
                # Slots the CPU did not write are untouched, bit for bit; the written ones hold
                # a squared norm summed in another order.
                kept = _bits(v.of["cpu"].view) == _bits(before["cpu"][i])
                assert_bitwise(v.of[run].view[kept], before[run][i][kept],
                               f"round {round_}, {run}: gnorm_vecs[{i}] unwritten slots")
                assert_close_tight(v.of[run].view, v.of["cpu"].view,
                                   f"round {round_}, {run}: gnorm_vecs[{i}]")
        # Next step: the counters advance, each side with its own increment_steps.
        call_all(emu, runs, cpu.increment_steps, emu.increment_steps,
                 lambda run: ([s[run] for s in steps],))
        compare_runs(runs, steps, "steps")


def test_percentile_clipping_more_tensors_than_one_launch_takes(emu):
    runs = ("cpu", "forward", "shuffle")
    g = torch.Generator().manual_seed(11)
    sizes = [int(n) for n in torch.randint(1, 20000, (400,), generator=g)]
    dtypes = [torch.float16 if i % 40 == 0 else torch.float32 for i in range(len(sizes))]
    grads = random_grads(sizes, dtypes, g, 0)
    vecs = [Copies(runs, torch.rand(100, generator=g) * 100) for _ in sizes]
    steps = [torch.full((), 40.0 + i) for i in range(len(sizes))]
    emu.take_launch_log()
    result = call_all(emu, runs, cpu.percentile_clipping, emu.percentile_clipping,
                      lambda run: (grads, [v[run] for v in vecs], steps, 7))
    log = emu.take_launch_log().splitlines()
    assert log.count("percentile_scales_kernel[384]") == 2, log
    for run in runs[1:]:
        assert_close_tight(result[run], result["cpu"], f"{run}: scales")
        for i, v in enumerate(vecs):
            v.of[run].check(f"{run}: gnorm_vecs[{i}]")
            assert_close_tight(v.of[run].view, v.of["cpu"].view, f"{run}: gnorm_vecs[{i}]")


def test_increment_steps(emu):
    runs = ("cpu", "forward", "reverse")
    g = torch.Generator().manual_seed(12)
    values = torch.randint(0, 1000, (800,), generator=g).float()
    values[:6] = torch.tensor([2.0**24, 2.0**24 - 1, float("inf"), float("nan"), -1.0, 0.5])
    steps = [Copies(runs, values[i:i + 1], i % 3) for i in range(len(values))]
    emu.take_launch_log()
    for _ in range(2):
        call_all(emu, runs, cpu.increment_steps, emu.increment_steps,
                 lambda run: ([s[run] for s in steps],))
        compare_runs(runs, steps, "steps")
    assert emu.take_launch_log().splitlines() == (["increment_steps_kernel[2]"] * 2 + [
        "increment_steps_kernel[1]"]) * 4


# ---- quantize_blockwise / dequantize_blockwise ------------------------------------------------------

@pytest.mark.parametrize("blocksize", [64, 256, 1000, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_quantize_dequantize(emu, blocksize, dtype):
    g = torch.Generator().manual_seed(blocksize)
    qmap = dynamic_map()
    for i, n in enumerate([1, 63, 64, 65, 999, 1000, 1001, 4095, 4097, 60013]):
        x = with_specials(torch.randn(n, generator=g) * 3, i, g).to(dtype)
        if n > 2 * blocksize:
            x[blocksize:2 * blocksize] = 0  # an all-zero block
        if i == 8:
            x = x.reshape(-1)[: n - n % 7].reshape(-1, 7)  # 2-D
        view = Guarded(x, i % 4).view  # misaligned for i % 4 != 0
        runs = ("cpu", "forward", "shuffle" if i % 2 else "reverse")
        result = call_all(emu, runs, cpu.quantize_blockwise, emu.quantize_blockwise,
                          lambda run: (view, qmap, blocksize))
        for run in runs[1:]:
            assert_bitwise(result[run][0], result["cpu"][0], f"n={n}, {run}: codes")
            assert_bitwise(result[run][1], result["cpu"][1], f"n={n}, {run}: absmax")

        codes = Guarded(torch.randint(0, 256, x.shape, generator=g, dtype=torch.uint8),
                        (i + 1) % 4).view
        absmax = torch.rand(result["cpu"][1].numel(), generator=g) * 10
        absmax[0] = float("inf")
        absmax[-1] = 0.0
        if absmax.numel() > 2:
            absmax[1] = float("nan")
        absmax = Guarded(absmax, i % 3).view
        out = call_all(emu, runs, cpu.dequantize_blockwise, emu.dequantize_blockwise,
                       lambda run: (codes, absmax, qmap, blocksize))
        for run in runs[1:]:
            assert_bitwise(out[run], out["cpu"], f"n={n}, {run}: dequantized")


# ---- empty inputs and launches of exactly kMaxTensorsPerLaunch -----------------------------------

def test_nothing_to_do_launches_nothing(emu):
    """Work that needs no block launches no kernel (CUDA refuses a grid of 0 blocks, and so
    does the emulation): a dtype whose gradients are all empty in percentile clipping, exactly
    384 or 768 step counters (whole launches, no empty last one), and empty (de)quantization."""
    g = torch.Generator().manual_seed(13)
    runs = ("cpu", "forward", "reverse")
    # Percentile clipping: float32 grads all empty, bfloat16 one empty and one not, float16 none.
    grads = [torch.zeros(0), torch.zeros(0, 3), torch.zeros(0, dtype=torch.bfloat16),
             torch.randn(300, generator=g).to(torch.bfloat16)]
    vecs = [Copies(runs, torch.rand(100, generator=g) * 10, i % 3) for i in range(len(grads))]
    steps = [torch.full((), 5.0 + i) for i in range(len(grads))]
    emu.take_launch_log()
    result = call_all(emu, runs, cpu.percentile_clipping, emu.percentile_clipping,
                      lambda run: (grads, [v[run] for v in vecs], steps, 5))
    assert emu.take_launch_log().splitlines() == [
        "percentile_scales_kernel[2]", "grad_norm_partials_kernel<__nv_bfloat16>[1]",
        "percentile_scales_kernel[2]"] * 2
    for run in runs[1:]:
        assert_close_tight(result[run], result["cpu"], f"{run}: scales")
        for i, v in enumerate(vecs):
            v.of[run].check(f"{run}: gnorm_vecs[{i}]")
            assert_close_tight(v.of[run].view, v.of["cpu"].view, f"{run}: gnorm_vecs[{i}]")

    # Step counters: one launch per 384, none for an empty remainder.
    for count, grids in ((384, [2]), (768, [2, 2])):
        counters = [Copies(runs, torch.randint(0, 100, (1,), generator=g).float(), i % 2)
                    for i in range(count)]
        emu.take_launch_log()
        call_all(emu, runs, cpu.increment_steps, emu.increment_steps,
                 lambda run: ([c[run] for c in counters],))
        compare_runs(runs, counters, f"{count} steps")
        assert emu.take_launch_log().splitlines() == [
            f"increment_steps_kernel[{b}]" for b in grids] * 2

    # (De)quantization of nothing: empty results, no launch but the encode table's.
    qmap = dynamic_map()
    for shape in ((0,), (0, 5)):
        x = torch.zeros(shape)
        emu.take_launch_log()
        result = call_all(emu, runs, cpu.quantize_blockwise, emu.quantize_blockwise,
                          lambda run: (x, qmap, 256))
        out = call_all(emu, runs, cpu.dequantize_blockwise, emu.dequantize_blockwise,
                       lambda run: (result["cpu"][0], result["cpu"][1], qmap, 256))
        assert emu.take_launch_log().splitlines() == ["build_encode_table_kernel[26]"] * 2
        for run in runs[1:]:
            assert_bitwise(result[run][0], result["cpu"][0], f"{shape}, {run}: codes")
            assert_bitwise(result[run][1], result["cpu"][1], f"{shape}, {run}: absmax")
            assert_bitwise(out[run], out["cpu"], f"{shape}, {run}: dequantized")


# ---- the emulation itself -----------------------------------------------------------------------------

def test_emulator_runs_barriers_and_catches_their_misuse(emu):
    for schedule in SCHEDULES:
        emu.set_schedule(*SCHEDULES[schedule])
        total = emu.selftest(0, 3)  # shuffles and __syncthreads in 3 blocks of 128 threads
        assert total[:3].tolist() == [128 * 129 / 2] * 3
        with pytest.raises(RuntimeError, match="lane 31 .* is exited while lane 0 waits at "
                                               "__shfl_xor_sync"):
            emu.selftest(1, 2)
        with pytest.raises(RuntimeError, match=r"__syncthreads is awaited .* thread \(5,0,0\) "
                                               "has exited"):
            emu.selftest(2, 2)
        with pytest.raises(RuntimeError, match="lane 16 .* is at __syncthreads while lane 0 "
                                               "waits at __shfl_xor_sync"):
            emu.selftest(3, 1)
        assert torch.isnan(emu.selftest(5, 2)[:128]).all()  # unwritten shared memory is NaN
    # A missing barrier: the result depends on the schedule.
    emu.set_schedule(0, 0)
    forward = emu.selftest(4, 1)[0].item()
    emu.set_schedule(1, 0)
    reverse = emu.selftest(4, 1)[0].item()
    assert {forward, reverse} == {7.0, 42.0}


def test_launch_rewriting():
    source = ("x;\n  k<T, A::b>\n<<<static_cast<unsigned>(n), 256,\n 0, s>>>(f(a, b),\n c);\n"
              "m<<<1, 2>>>();\n")
    out, count = emu_build.rewrite_launches(source)
    assert count == 2 and "<<<" not in out and out.count("\n") == source.count("\n")
    assert ('::lion_emu::launch("k<T, A::b>", [=] { k<T, A::b>(f(a, b),  c); }, '
            "static_cast<unsigned>(n), 256,  0, s);") in out
    assert '::lion_emu::launch("m", [=] { m(); }, 1, 2);' in out
    shared, count = emu_build.rewrite_shared("__shared__ float a[4 * K];\n__shared__ int b;")
    assert count == 2 and "__shared__" not in shared


def test_emulated_ops_run_the_cuda_host_code(emu):
    # The emulated op runs lion_cuda.cpp's batching and the kernels: one call with one dtype is
    # one launch; and its argument checks are lion_batch.cpp's, with their messages.
    p, gr, m = torch.zeros(10), torch.ones(10), torch.zeros(10)
    before = emu.launch_count()
    emu.lion_update_32bit(*as_op_args(([p], [gr], [m], torch.tensor(0.1), 0.9, 0.99, 0.0)))
    assert emu.launch_count() == before + 1
    assert torch.equal(p, torch.full((10,), -0.1))
    with pytest.raises(ValueError, match="lion_update_32bit: beta1 must be in"):
        emu.lion_update_32bit(*as_op_args(([p], [gr], [m], torch.tensor(0.1), 1.5, 0.99, 0.0)))


def test_every_kernel_shape_matches_the_cpu_operator_bit_for_bit(emulated_kernel_shapes):
    # tools/kernel_shapes.cu: the 32-bit kernel in the shapes tools/kernel_shapes.py times on a
    # GPU (spans, packs in flight, cache hints), run here through the emulation with that
    # script's own check: fp32/bf16/fp16, sizes around every span and pack boundary,
    # misaligned params, grads and momenta, two steps.
    kernel_shapes, shapes = emulated_kernel_shapes
    assert shapes.names[0] == "span=2048 unroll=2 kStreaming"  # the library's, checked at build
    assert len(shapes.names) >= 10
    lines = []
    matched = kernel_shapes.check(shapes, "cpu", log=lines.append)
    assert len(lines) == 3 * len(shapes.names)
    assert matched, "\n".join(line for line in lines if "DIFFERENT" in line)
    # The blockwise 8-bit kernel's shapes (encoders, register budgets), fp32.
    assert shapes.names8[0] == "8-bit kFoldedLane min_blocks=0"  # the library's
    lines = []
    matched = kernel_shapes.check8(shapes, "cpu", log=lines.append)
    assert len(lines) == len(shapes.names8) >= 3
    assert matched, "\n".join(line for line in lines if "DIFFERENT" in line)


def test_kernel_shapes_timing_runs_end_to_end_on_the_emulation(emulated_kernel_shapes):
    # What tools/kernel_shapes.py does on a GPU after its check, rehearsed on the emulation with
    # a few small tensors (host clock instead of CUDA events; no peers): every shape and the
    # library's operator timed, and the report it writes summarized.
    kernel_shapes, shapes = emulated_kernel_shapes
    lines = []
    entry = kernel_shapes.time_set(shapes, "small", [(3000,), (17, 301), (5,)],
                                   torch.device("cpu"), repeats=2, launches=1, peers=False,
                                   copy_bytes_per_s=1e10, log=lines.append)
    rows = entry["contenders"]
    assert list(rows)[0] == kernel_shapes.LIBRARY and len(rows) == 1 + len(shapes.names)
    assert all(len(r["times_ms"]) == 2 and r["min_ms"] > 0 for r in rows.values())
    assert entry["params"] == 3000 + 17 * 301 + 5 and entry["bytes_moved"] == 20 * entry["params"]
    rows8 = entry["contenders8"]
    assert list(rows8)[0] == kernel_shapes.LIBRARY8 and len(rows8) == 1 + len(shapes.names8)
    assert all(len(r["times_ms"]) == 2 and r["min_ms"] > 0 for r in rows8.values())
    assert entry["bytes_moved8"] == 14 * entry["params"]
    report = dict(environment=dict(device_name="emulation", git_commit="abc"), checked=True,
                  sets={"small": entry})
    summary = kernel_shapes.summarize(report)
    assert summary[0] == ("kernel shapes on emulation at abc: every shape matches the CPU bit "
                          "for bit")
    assert summary[1].startswith("small      library ") and "fastest shape span=" in summary[1]
    assert summary[2].strip().startswith("8-bit: library ") and "fastest shape 8-bit" in summary[2]
