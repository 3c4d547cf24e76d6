#!/usr/bin/env python3
"""Shapes of the CUDA update kernels timed against the library's (an experiment;
tools/gpu_check.sh runs it when its time budget allows).

    python tools/kernel_shapes.py                   # build, check, time llama1b, single16m, gpt2
    python tools/kernel_shapes.py --sets single16m --repeats 5 --json shapes.json

tools/kernel_shapes.cu compiles the library's kernel source (native/cuda/lion_kernels.cu) with
other Shape32bit arguments (elements per thread block, packs of 4 elements each thread loads
before any arithmetic, the streaming cache hint) and Shape8bit arguments (the blockwise 8-bit
kernel's encoder: the compact table per element, the folded table per element or a lane at a
time; its register budget). This script builds it with nvcc for the GPU it runs on, checks
every shape against the CPU operators bit for bit (32-bit: fp32, bf16 and fp16 params; 8-bit:
fp32; awkward sizes, misaligned tensors, two steps), then times, over the benchmark's sets of
fp32 shapes, each 32-bit shape against the library's operator (the same kernel as shape 0,
called through torch.ops) and the peers that the benchmark finds fastest on a GPU
(torch.compile'd foreach Lion, lion-pytorch's Triton kernel), and each 8-bit shape against the
library's 8-bit operator: back-to-back launches between two CUDA events, in rounds that run
every contender once, in an order rotated every round.

Run it as a script, from a directory where the installed lion_ops is imported (not the
repository root's source tree). tests/test_cuda_emulated.py runs check() and check8() on the
CPU emulation.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import benchmark  # noqa: E402  (the parameter sets, the foreach peer, the copy bandwidth)
SOURCE = os.path.join(HERE, "kernel_shapes.cu")
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
MAX_TENSORS_PER_LAUNCH = 384  # lion_kernels.cuh: kMaxTensorsPerLaunch
HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.1)
LIBRARY = "library op (lion_update_32bit)"
LIBRARY8 = "library op (lion_update_8bit_blockwise)"
PEERS = ("torch foreach compiled", "lion_pytorch triton")


def build(out_dir: str, arch: str | None = None) -> str:
    """Compiles kernel_shapes.cu with the library's CUDA flags (-O3 --fmad=false) into a shared
    library for `arch` (default: the current GPU's, e.g. sm_90); returns its path."""
    if arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    path = os.path.join(out_dir, "libkernel_shapes.so")
    command = [find_nvcc(), "-std=c++17", "-O3", "--fmad=false", f"-arch={arch}", "-shared",
               "-Xcompiler", "-fPIC,-fvisibility=hidden",
               "-I", os.path.join(REPO, "native", "cuda"), SOURCE, "-o", path]
    if os.environ.get("CUDAHOSTCXX"):  # gpu_check.sh's pick_compiler may set it
        command[1:1] = ["-ccbin", os.environ["CUDAHOSTCXX"]]
    subprocess.run(command, check=True)
    return path


def find_nvcc() -> str:
    """CUDACXX, else nvcc on PATH, else CUDA_HOME's (as torch finds it), else /usr/local/cuda's."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME
        candidates.append(CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    except Exception:  # noqa: BLE001
        pass
    candidates.append("/usr/local/cuda/bin/nvcc")
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise RuntimeError("kernel_shapes: nvcc not found (set CUDACXX)")


class KernelShapes:
    """The C interface of a built kernel_shapes library (nvcc's, or the CPU emulation's)."""

    def __init__(self, library_path: str):
        self._lib = ctypes.CDLL(library_path)
        self._lib.kernel_shape_count.restype = ctypes.c_int
        self._lib.kernel_shape_name.restype = ctypes.c_char_p
        self._lib.kernel_shape_name.argtypes = [ctypes.c_int]
        self._lib.kernel_shape_launch.restype = ctypes.c_int
        self._lib.kernel_shape_launch.argtypes = [
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        self.names = [self._lib.kernel_shape_name(i).decode()
                      for i in range(self._lib.kernel_shape_count())]
        lib = self._lib
        lib.kernel_shape8_name.restype = ctypes.c_char_p
        lib.kernel_shape8_name.argtypes = [ctypes.c_int]
        lib.kernel_shape8_build_tables.restype = ctypes.c_int
        lib.kernel_shape8_build_tables.argtypes = [ctypes.c_void_p] * 3
        lib.kernel_shape8_launch.restype = ctypes.c_int
        lib.kernel_shape8_launch.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_void_p] * 9
        self.names8 = [lib.kernel_shape8_name(i).decode() for i in range(lib.kernel_shape8_count())]

    def tables(self, qmap: torch.Tensor, stream: int = 0) -> torch.Tensor:
        """The encode tables of `qmap` (float32, 256 entries, on the device), as the library
        builds them for each 8-bit call."""
        out = torch.empty(self._lib.kernel_shape8_tables_bytes(), dtype=torch.uint8,
                          device=qmap.device)
        rc = self._lib.kernel_shape8_build_tables(qmap.data_ptr(), out.data_ptr(), stream)
        if rc != 0:
            raise RuntimeError(f"kernel_shape8_build_tables returned {rc}")
        return out

    def bind8(self, shape: int, params, grads, codes, absmaxes, qmap: torch.Tensor,
              tables: torch.Tensor, lr: float, beta1: float, beta2: float, weight_decay: float,
              stream: int = 0) -> Callable[[], None]:
        """As bind, for blockwise 8-bit shape `shape` (float32 params; codes uint8 of the
        params' shapes; one absmax per 256 elements)."""
        if not 0 <= shape < len(self.names8):
            raise ValueError(f"no 8-bit shape {shape}")
        for p, g, c, a in zip(params, grads, codes, absmaxes, strict=True):
            if p.dtype != torch.float32 or g.dtype != torch.float32 or c.dtype != torch.uint8 \
                    or c.shape != p.shape or g.shape != p.shape \
                    or a.numel() != (p.numel() + 255) // 256 or not a.is_contiguous():
                raise ValueError("float32 params and grads, uint8 codes, one absmax per 256")
        hyper = (ctypes.c_float * 4)(lr, beta1, beta2, weight_decay)
        calls = []
        for start in range(0, len(params), MAX_TENSORS_PER_LAUNCH):
            chunk = range(start, min(start + MAX_TENSORS_PER_LAUNCH, len(params)))
            n = len(chunk)
            arrays = tuple((ctypes.c_void_p * n)(*[ts[i].data_ptr() for i in chunk])
                           for ts in (params, grads, codes, absmaxes))
            arrays += ((ctypes.c_int64 * n)(*[params[i].numel() for i in chunk]),)
            calls.append((n, arrays))
        launch = self._lib.kernel_shape8_launch

        def run() -> None:
            for n, arrays in calls:
                rc = launch(shape, n, *(ctypes.addressof(a) for a in arrays), qmap.data_ptr(),
                            tables.data_ptr(), ctypes.addressof(hyper), stream)
                if rc != 0:
                    raise RuntimeError(f"kernel_shape8_launch({self.names8[shape]}) returned {rc}")

        run.alive = (params, grads, codes, absmaxes, qmap, tables, hyper)
        return run

    def bind(self, shape: int, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
             momenta: Sequence[torch.Tensor], lr: float, beta1: float, beta2: float,
             weight_decay: float, stream: int = 0) -> Callable[[], None]:
        """A function that runs one step of `shape` over the lists (one launch per 384 tensors,
        as the library; one dtype). Its argument arrays are built once, here, so that a call
        costs the host one ctypes call per launch."""
        if not 0 <= shape < len(self.names):
            raise ValueError(f"no shape {shape}")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise ValueError(f"one dtype per call, got {dtypes}")
        for p, g, m in zip(params, grads, momenta, strict=True):
            if g.shape != p.shape or m.shape != p.shape or g.dtype != p.dtype or \
                    m.dtype != torch.float32 or not (p.is_contiguous() and g.is_contiguous()
                                                     and m.is_contiguous()):
                raise ValueError("params, grads and momenta must match and be contiguous")
        dtype = DTYPE_CODES[dtypes.pop()]
        hyper = (ctypes.c_float * 4)(lr, beta1, beta2, weight_decay)
        calls = []
        for start in range(0, len(params), MAX_TENSORS_PER_LAUNCH):
            chunk = range(start, min(start + MAX_TENSORS_PER_LAUNCH, len(params)))
            n = len(chunk)
            arrays = ((ctypes.c_void_p * n)(*[params[i].data_ptr() for i in chunk]),
                      (ctypes.c_void_p * n)(*[grads[i].data_ptr() for i in chunk]),
                      (ctypes.c_void_p * n)(*[momenta[i].data_ptr() for i in chunk]),
                      (ctypes.c_int64 * n)(*[params[i].numel() for i in chunk]))
            calls.append((n, arrays))
        launch = self._lib.kernel_shape_launch
        alive = (params, grads, momenta, hyper)  # the pointers stay valid while bound

        def run() -> None:
            for n, arrays in calls:
                rc = launch(shape, dtype, n, *(ctypes.addressof(a) for a in arrays),
                            ctypes.addressof(hyper), stream)
                if rc != 0:
                    raise RuntimeError(f"kernel_shape_launch({self.names[shape]}) returned {rc}")

        run.alive = alive
        return run


# ---- bit-for-bit check against the CPU operator ---------------------------------------------

# Sizes around every span (1024 to 16384) and pack (4) boundary, and one past several blocks.
CHECK_SIZES = (1, 3, 4, 5, 1023, 1024, 1027, 2048 + 4, 4095, 4096 + 8, 8191, 8192 + 5,
               16384 + 3, 3 * 16384 + 1025)


def _tensors(sizes, dtype, device, generator, misaligned):
    """Params, grads and momenta on `device`; those whose index is in `misaligned` (0 param,
    1 grad, 2 momentum, per tensor index mod 3) start one element into their storage, so their
    vector alignment fails and the kernel takes its element path."""
    out = ([], [], [])
    for t, n in enumerate(sizes):
        for kind in range(3):
            scale = (1.0, 1e-2, 1e-2)[kind]
            x = torch.randn(n + 1, generator=generator) * scale
            x = x.to(torch.float32 if kind == 2 else dtype)
            x = x.to(device)
            out[kind].append(x[1:] if (t % 3 == kind and t in misaligned) else x[:n])
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(
        {4: torch.int32, 2: torch.int16}[t.element_size()])


def check(shapes: KernelShapes, device: str, steps: int = 2, seed: int = 0,
          log=print) -> bool:
    """Runs every shape `steps` steps on fresh random inputs and compares params and momenta
    with lion_ops' CPU operator, bit for bit. Returns whether all matched."""
    import lion_ops

    ok = True
    sizes = CHECK_SIZES
    misaligned = set(range(0, len(sizes), 2))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        generator = torch.Generator().manual_seed(seed)
        params, _, momenta = _tensors(sizes, dtype, "cpu", generator, misaligned)
        grads = [_tensors(sizes, dtype, "cpu", generator, misaligned)[1] for _ in range(steps)]
        ref_p = [p.clone() for p in params]
        ref_m = [m.clone() for m in momenta]
        for s in range(steps):
            lion_ops.ops.lion_update_32bit(ref_p, grads[s], ref_m, **HYPER)
        for shape, name in enumerate(shapes.names):
            # Fresh copies on the device, misaligned where the CPU inputs were.
            def placed(ts):
                out = []
                for t in ts:
                    base = torch.empty(t.numel() + 1, dtype=t.dtype, device=device)
                    view = base[1:] if t.data_ptr() % 16 else base[:t.numel()]
                    out.append(view.copy_(t))
                return out
            p, m = placed(params), placed(momenta)
            for s in range(steps):
                g = placed(grads[s])
                shapes.bind(shape, p, g, m, HYPER["lr"], HYPER["beta1"], HYPER["beta2"],
                            HYPER["weight_decay"])()
            if device != "cpu":
                torch.cuda.synchronize()
            bad = [i for i in range(len(sizes))
                   if not (torch.equal(_bits(p[i]), _bits(ref_p[i]))
                           and torch.equal(_bits(m[i]), _bits(ref_m[i])))]
            same = not bad
            ok &= same
            log(f"check {str(dtype).removeprefix('torch.'):8s} {name}: "
                + ("same as the CPU" if same else
                   f"DIFFERENT in tensors of sizes {[sizes[i] for i in bad]}"))
    return ok


# Sizes around the quantization block (256) and the 8-bit thread block's span (4096).
CHECK_SIZES_8BIT = (1, 255, 256, 257, 511, 4095, 4096, 4097, 2 * 4096 + 300,
                    3 * 4096 + 3 * 256 + 17)


def check8(shapes: KernelShapes, device: str, steps: int = 2, seed: int = 0, log=print) -> bool:
    """As check, for the blockwise 8-bit shapes (float32 params; params, grads or codes
    misaligned in some tensors, so both the vector and the element-wise paths run)."""
    import lion_ops
    from lion_ops.quantization import dynamic_map

    generator = torch.Generator().manual_seed(seed)
    sizes = CHECK_SIZES_8BIT
    qmap = dynamic_map()
    params = [torch.randn(n, generator=generator) for n in sizes]
    codes = [torch.randint(0, 256, (n,), generator=generator, dtype=torch.uint8) for n in sizes]
    absmaxes = [torch.rand((n + 255) // 256, generator=generator) * 0.1 for n in sizes]
    absmaxes[3][0] = 0.0  # an all-zero block
    grads = [[torch.randn(n, generator=generator) for n in sizes] for _ in range(steps)]
    h = HYPER
    ref = ([p.clone() for p in params], [c.clone() for c in codes], [a.clone() for a in absmaxes])
    for s in range(steps):
        lion_ops.ops.lion_update_8bit_blockwise(ref[0], grads[s], ref[1], ref[2], qmap,
                                                h["lr"], h["beta1"], h["beta2"], h["weight_decay"])

    def placed(ts, misaligned_every):
        out = []
        for i, t in enumerate(ts):
            shift = 1 if misaligned_every and i % misaligned_every == 1 else 0
            base = torch.empty(t.numel() + shift, dtype=t.dtype, device=device)
            out.append(base[shift:].copy_(t))
        return out

    device_qmap = qmap.to(device)
    tables = shapes.tables(device_qmap)
    ok = True
    for shape, name in enumerate(shapes.names8):
        p, c, a = placed(params, 3), placed(codes, 4), placed(absmaxes, 0)
        for s in range(steps):
            g = placed(grads[s], 5)
            shapes.bind8(shape, p, g, c, a, device_qmap, tables, h["lr"], h["beta1"],
                         h["beta2"], h["weight_decay"])()
        if device != "cpu":
            torch.cuda.synchronize()
        bad = [sizes[i] for i in range(len(sizes))
               if not (torch.equal(_bits(p[i]), _bits(ref[0][i]))
                       and torch.equal(c[i].cpu(), ref[1][i])
                       and torch.equal(_bits(a[i]), _bits(ref[2][i])))]
        ok &= not bad
        log(f"check float32  {name}: "
            + (f"DIFFERENT in tensors of sizes {bad}" if bad else "same as the CPU"))
    return ok


# ---- timing -------------------------------------------------------------------------------

def pipelined_ms(step: Callable[[], None], launches: int, device: torch.device) -> float:
    """Milliseconds per call of `launches` calls back to back: between two CUDA events on a GPU
    (the host runs ahead, as in training), by the host's clock on the CPU (the emulation)."""
    if device.type == "cuda":
        return benchmark.pipelined_time(step, launches) * 1e3
    start = time.perf_counter()
    for _ in range(launches):
        step()
    return (time.perf_counter() - start) * 1e3 / launches


def contenders(shapes: KernelShapes, params, grads, momenta, peers: bool, log):
    device = params[0].device
    h = HYPER
    hyper_tensors = [torch.tensor(h[k], device=device)
                     for k in ("lr", "beta1", "beta2", "weight_decay")]
    out = {LIBRARY: lambda: torch.ops.lion.lion_update_32bit.default(
        params, grads, momenta, *hyper_tensors, None)}
    for i, name in enumerate(shapes.names):
        out[f"shape {i}: {name}"] = shapes.bind(i, params, grads, momenta, h["lr"], h["beta1"],
                                                h["beta2"], h["weight_decay"])
    if peers:
        torch._dynamo.reset()
        compiled = torch.compile(benchmark.foreach_lion_, dynamic=False)
        out["torch foreach compiled"] = lambda: compiled(
            params, grads, momenta, h["lr"], h["beta1"], h["beta2"], h["weight_decay"])
        try:
            if device.type != "cuda":
                raise RuntimeError("a CUDA kernel")
            from lion_pytorch.triton import update_fn
        except Exception as error:  # noqa: BLE001  (reported, not fatal)
            log(f"lion_pytorch triton: not timed ({type(error).__name__}: {error})")
        else:
            def triton_step():
                for p, g, m in zip(params, grads, momenta):
                    update_fn(p, g, m, h["lr"], h["weight_decay"], h["beta1"], h["beta2"])
            out["lion_pytorch triton"] = triton_step
    return out


def _time_group(runs: dict, repeats: int, launches: int, device: torch.device, moved: int,
                copy_bytes_per_s: float, title: str, log) -> dict:
    """Times `runs` (the first is the base of the ratios): a warm-up, then `repeats` rounds of
    each once, in an order rotated every round. Returns a row per contender."""
    names = list(runs)
    for name in names:  # warm-up: compile, autotune, first touch
        for _ in range(3):
            runs[name]()
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(pipelined_ms(runs[name], launches, device))
    base = min(times[names[0]])
    log(title)
    log(f"{'contender':46s} {'min ms':>8s} {'med ms':>8s} {'GB/s':>8s} {'%copy':>6s} "
        f"{'base/it':>7s}")
    rows = {}
    for name in names:
        best, median = min(times[name]), statistics.median(times[name])
        rate = moved / (best / 1e3)
        rows[name] = dict(min_ms=best, median_ms=median, times_ms=times[name],
                          bytes_per_s=rate, fraction_of_copy=rate / copy_bytes_per_s,
                          library_over_this=base / best)
        log(f"{name:46s} {best:8.3f} {median:8.3f} {rate / 1e9:8.1f} "
            f"{100 * rate / copy_bytes_per_s:5.1f}% {base / best:7.3f}")
    return rows


def time_set(shapes: KernelShapes, set_name: str, shape_list: Sequence[tuple[int, ...]],
             device: torch.device, repeats: int, launches: int, peers: bool,
             copy_bytes_per_s: float, log) -> dict:
    """Times every 32-bit shape, the library's 32-bit operator and (with `peers`) the peers on
    fp32 params of `shape_list`, then every blockwise 8-bit shape and the library's 8-bit
    operator on the same params (every tensor with 8-bit state): `repeats` rounds each."""
    from lion_ops.quantization import dynamic_map

    generator = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=generator) for s in shape_list]
    grads = [torch.randn(s, device=device, generator=generator) * 1e-3 for s in shape_list]
    momenta = [torch.zeros(s, device=device) for s in shape_list]
    numel = sum(p.numel() for p in params)
    moved = 20 * numel  # read p, g, m and write p, m: fp32
    title = (f"\n== {set_name}: {len(params)} tensors, {numel / 1e6:.2f} M params, fp32, "
             f"32-bit state; {launches} launches back to back, {repeats} rounds")
    rows = _time_group(contenders(shapes, params, grads, momenta, peers, log), repeats,
                       launches, device, moved, copy_bytes_per_s, title, log)
    del momenta
    entry = dict(tensors=len(shape_list), params=numel, bytes_moved=moved, contenders=rows)
    if shapes.names8:
        codes = [torch.full(s, 127, dtype=torch.uint8, device=device) for s in shape_list]
        absmaxes = [torch.zeros((p.numel() + 255) // 256, device=device) for p in params]
        qmap = dynamic_map().to(device)
        tables = shapes.tables(qmap)
        h = HYPER
        hyper_tensors = [torch.tensor(h[k], device=device)
                         for k in ("lr", "beta1", "beta2", "weight_decay")]
        runs = {LIBRARY8: lambda: torch.ops.lion.lion_update_8bit_blockwise.default(
            params, grads, codes, absmaxes, qmap, *hyper_tensors, None)}
        for i, name in enumerate(shapes.names8):
            runs[f"shape {i}: {name}"] = shapes.bind8(i, params, grads, codes, absmaxes, qmap,
                                                      tables, h["lr"], h["beta1"], h["beta2"],
                                                      h["weight_decay"])
        moved8 = 14 * numel  # read p, g, codes and write p, codes (absmax: 1/64 B more)
        title = (f"\n== {set_name}: blockwise 8-bit state (every tensor), fp32 params; "
                 f"%copy at 14 B/param")
        entry.update(bytes_moved8=moved8,
                     contenders8=_time_group(runs, repeats, launches, device, moved8,
                                             copy_bytes_per_s, title, log))
        del runs, codes, absmaxes
    del params, grads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return entry


def summarize(report: dict) -> list[str]:
    """One line per set: the library's kernel, the fastest shape (library/it above 1: the shape
    is faster), the peers (fastest shape/it below 1: the shape beats the peer); min ms."""
    lines = [f"kernel shapes on {report['environment'].get('device_name')} at "
             f"{report['environment'].get('git_commit')}: "
             + ("every shape matches the CPU bit for bit" if report["checked"]
                else "SOME SHAPES DIFFER from the CPU (timings not valid)")]
    for set_name, error in report.get("failed", {}).items():
        lines.append(f"{set_name:<10} failed: {error}")
    for set_name, entry in report["sets"].items():
        rows = entry["contenders"]
        library = rows[LIBRARY]["min_ms"]
        shapes = {k: v for k, v in rows.items() if k.startswith("shape ")}
        best = min(shapes, key=lambda k: shapes[k]["min_ms"])
        fastest = shapes[best]["min_ms"]
        parts = [f"library {library:.3f} ms ({100 * rows[LIBRARY]['fraction_of_copy']:.0f}% of copy)",
                 f"fastest shape {best.split(': ', 1)[1]} {fastest:.3f} ms "
                 f"(library/it {library / fastest:.3f})"]
        parts += [f"{peer} {rows[peer]['min_ms']:.3f} ms (fastest shape/it "
                  f"{fastest / rows[peer]['min_ms']:.3f})" for peer in PEERS if peer in rows]
        lines.append(f"{set_name:<10} " + "; ".join(parts))
        rows8 = entry.get("contenders8")
        if rows8:
            library8 = rows8[LIBRARY8]["min_ms"]
            shapes8 = {k: v for k, v in rows8.items() if k.startswith("shape ")}
            best8 = min(shapes8, key=lambda k: shapes8[k]["min_ms"])
            fastest8 = shapes8[best8]["min_ms"]
            lines.append(
                f"{'':<10} 8-bit: library {library8:.3f} ms "
                f"({100 * rows8[LIBRARY8]['fraction_of_copy']:.0f}% of copy at 14 B/param; "
                f"over the 32-bit library op {library8 / library:.3f}); fastest shape "
                f"{best8.split(': ', 1)[1]} {fastest8:.3f} ms (library/it "
                f"{library8 / fastest8:.3f}, {100 * shapes8[best8]['fraction_of_copy']:.0f}% "
                f"of copy)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", default="llama1b,single16m,gpt2",
                        help="benchmark sets, in this order (the targets' set first)")
    parser.add_argument("--repeats", type=int, default=7, help="rounds (every contender once)")
    parser.add_argument("--launches", type=int, default=10, help="back-to-back launches timed")
    parser.add_argument("--no-peers", action="store_true",
                        help="leave out torch.compile'd foreach and lion-pytorch's Triton kernel")
    parser.add_argument("--library", help="a built kernel_shapes library (default: build one)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--summary", metavar="JSON", help="print the summary of a written report")
    args = parser.parse_args(argv)
    if args.summary:
        with open(args.summary, encoding="utf-8") as f:
            print("\n".join(summarize(json.load(f))))
        return 0
    if not torch.cuda.is_available():
        sys.exit("kernel_shapes: needs a CUDA device (tests/test_cuda_emulated.py checks the "
                 "shapes on the CPU)")
    import lion_ops  # noqa: F401  (the library op, the CPU reference)

    with tempfile.TemporaryDirectory() as build_dir:
        path = args.library or build(build_dir)
        shapes = KernelShapes(path)
        print(f"{len(shapes.names)} 32-bit and {len(shapes.names8)} 8-bit shapes built for "
              f"{torch.cuda.get_device_name()}", flush=True)
        checked = check(shapes, "cuda") & check8(shapes, "cuda")
        print("check: every shape matches the CPU operator bit for bit" if checked else
              "check: SOME SHAPES DIFFER from the CPU operator (their timings are not valid)",
              flush=True)
        copy = benchmark.copy_bandwidth(torch.device("cuda"), 1024, 10)["bytes_per_s"]
        print(f"copy bandwidth {copy / 1e9:.1f} GB/s", flush=True)
        report = dict(environment=benchmark.environment(torch.device("cuda")),
                      checked=checked, copy_bytes_per_s=copy, sets={})
        for set_name in args.sets.split(","):
            try:
                report["sets"][set_name] = time_set(
                    shapes, set_name, [s for _, s in benchmark.set_shapes(set_name)],
                    torch.device("cuda"), args.repeats, args.launches, not args.no_peers, copy,
                    lambda line: print(line, flush=True))
            except Exception as error:  # noqa: BLE001  (reported; the other sets still run)
                print(f"{set_name}: failed: {type(error).__name__}: {error}", flush=True)
                report.setdefault("failed", {})[set_name] = f"{type(error).__name__}: {error}"
                torch.cuda.empty_cache()
            if args.json:  # after every set, so that a run cut short keeps what it measured
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(report, f, indent=1)
    print("\nmin ms: fastest round; base/it: the first row's min (the library op's) over this "
          "one's (above 1: this one is faster); %copy: bytes a step moves (20 B/param, 8-bit 14)"
          " over min ms, over the copy bandwidth")
    return 0 if checked and not report.get("failed") else 1


if __name__ == "__main__":
    sys.exit(main())
