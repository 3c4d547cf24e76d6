#!/usr/bin/env python3
"""Where the host time of one lion_ops step goes, and how long the device waits for it.

    python tools/host_timeline.py                          # gpt2 and llama1b on cuda
    python tools/host_timeline.py --device cpu --sets gpt2 # (on the CPU the ops compute)

On a GPU, a step started on an idle device takes the host's time up to the first launch plus
the kernels; at the 9f9f246 run (bench_results/h200/) lion_ops.Lion8bit's gpt2 step took 1.18
ms for 0.49 ms of kernels, Lion's 0.89 ms for 0.62 ms. This tool splits that up, per optimizer
class and parameter set (tools/benchmark.py's shapes, fp32): each step runs with every
lion_ops operator wrapped to stamp the host clock at its entry and exit, so the host time is
cut into Python before the first operator, each operator's own host time (checks, batch
building, launches; on the CPU also the arithmetic) and Python between and after them. On CUDA
it also reports the step's device time (events around the step, started on an idle device)
and the kernels' time in it (torch.profiler, the sum of the device time of the step's
kernels): their difference is what the device spent waiting for the host.

The figures are medians over --repeats steps after --warmup; the wrapper costs about a
microsecond per operator call. With --json the figures go to a file as well.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (the parameter sets and their shapes)

CLASSES = ("Lion", "Lion8bit", "PagedLion8bit")


class Stamps:
    """Wraps lion_ops.ops' operator functions (what the optimizers call) to stamp the host
    clock at each call's entry and exit while recording."""

    def __init__(self, ops_module):
        self.ops = ops_module
        self.recording = False
        self.events: list[tuple[str, float, float]] = []
        self.originals = {}
        for name in ("lion_update_32bit", "lion_update_8bit_blockwise",
                     "lion_update_8bit_static", "increment_steps", "percentile_clipping",
                     "prefetch_paged"):
            original = getattr(ops_module, name, None)
            if original is None:
                continue
            self.originals[name] = original
            setattr(ops_module, name, self._stamped(name, original))

    def _stamped(self, name, original):
        def stamped(*args, **kwargs):
            if not self.recording:
                return original(*args, **kwargs)
            entered = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.events.append((name, entered, time.perf_counter()))
        return stamped

    def restore(self):
        for name, original in self.originals.items():
            setattr(self.ops, name, original)


def split_host_time(start: float, end: float, events) -> dict[str, float]:
    """Seconds of one step's host time by part: python before the first operator, each
    operator (summed over its calls, with a call count), python between operators, python
    after the last."""
    parts: dict[str, float] = defaultdict(float)
    if not events:
        parts["python (no operator called)"] = end - start
        return dict(parts)
    parts["python before the first operator"] = events[0][1] - start
    previous_exit = None
    for name, entered, exited in events:
        if previous_exit is not None:
            parts["python between operators"] += entered - previous_exit
        parts[f"op {name}"] += exited - entered
        parts[f"calls of {name}"] += 1
        previous_exit = exited
    parts["python after the last operator"] = end - previous_exit
    between = parts.pop("python between operators", 0.0)
    parts["python between operators"] = between  # (listed after the operators)
    parts["python after the last operator"] = parts.pop("python after the last operator")
    return dict(parts)


def kernel_seconds_per_step(optimizer, device, steps: int) -> float | None:
    """The device time of the kernels of one step (median over `steps`), from torch.profiler."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    totals = []
    for _ in range(steps):
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            optimizer.step()
            torch.cuda.synchronize(device)
        total_us = sum(entry.self_device_time_total for entry in prof.key_averages()
                       if entry.device_type == torch.autograd.DeviceType.CUDA)
        totals.append(total_us / 1e6)
    return statistics.median(totals)


def make_optimizer(cls_name: str, shapes, device, warmup: int):
    """An optimizer of class cls_name over fresh params of the set, with grads, after `warmup`
    steps."""
    import lion_ops
    cls = getattr(lion_ops, cls_name)
    params = [torch.nn.Parameter(t) for t in benchmark.make_params(shapes, torch.float32,
                                                                    device, seed=0)]
    for p in params:
        p.grad = torch.randn_like(p).mul_(0.02)
    optimizer = cls(params, **benchmark.HYPERPARAMS)
    for _ in range(warmup):
        optimizer.step()
    benchmark.synchronize(device)
    return optimizer


def time_host(optimizer, device, repeats: int, stamps: Stamps) -> dict:
    """Median host time of a step and of its parts, and on CUDA the step's device time."""
    host, device_times, splits = [], [], []
    for _ in range(repeats):
        benchmark.synchronize(device)
        if device.type == "cuda":
            begin, finish = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            begin.record()
        stamps.events.clear()
        stamps.recording = True
        t0 = time.perf_counter()
        optimizer.step()
        t1 = time.perf_counter()
        stamps.recording = False
        if device.type == "cuda":
            finish.record()
            finish.synchronize()
            device_times.append(begin.elapsed_time(finish) / 1e3)
        host.append(t1 - t0)
        splits.append(split_host_time(t0, t1, list(stamps.events)))
    keys = list(dict.fromkeys(k for s in splits for k in s))  # in the order of the step
    parts = {k: statistics.median(s.get(k, 0.0) for s in splits) for k in keys}
    return dict(host_s=statistics.median(host), host_parts=parts,
                device_step_s=statistics.median(device_times) if device_times else None,
                kernel_s=None)


def measure_set(shapes, classes, device, warmup: int, repeats: int, stamps: Stamps) -> dict:
    """Every class on one set: all timed before any is profiled (a profiler session may leave
    the host slower after it ends), so all classes' optimizers are alive at once (about 37 GB
    of GPU memory for llama1b)."""
    optimizers = {c: make_optimizer(c, shapes, device, warmup) for c in classes}
    results = {c: time_host(optimizers[c], device, repeats, stamps) for c in classes}
    for c in classes:
        results[c]["kernel_s"] = kernel_seconds_per_step(optimizers[c], device, min(repeats, 5))
    del optimizers
    benchmark.free_memory(device)
    return results


def report_lines(name: str, cls_name: str, r: dict) -> list[str]:
    lines = [f"{name:9s} {cls_name:14s} host {r['host_s'] * 1e3:7.3f} ms"]
    if r["device_step_s"] is not None:
        lines[0] += f"; device step {r['device_step_s'] * 1e3:7.3f} ms"
        if r["kernel_s"] is not None:
            waiting = r["device_step_s"] - r["kernel_s"]
            lines[0] += (f", kernels {r['kernel_s'] * 1e3:7.3f} ms, waiting for the host "
                         f"{waiting * 1e3:7.3f} ms")
    for part, value in r["host_parts"].items():
        if part.startswith("calls of "):
            continue
        calls = r["host_parts"].get("calls of " + part[3:]) if part.startswith("op ") else None
        shown = f"{value * 1e6:9.1f} us"
        lines.append(f"    {part:40s}{shown}" + (f" ({calls:.0f} calls)" if calls else ""))
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sets", default=None,
                        help="comma-separated (default: gpt2,llama1b on cuda, gpt2 on cpu)")
    parser.add_argument("--classes", default=",".join(CLASSES))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("host_timeline: no CUDA device", file=sys.stderr)
        return 2
    sets = (args.sets or ("gpt2,llama1b" if device.type == "cuda" else "gpt2")).split(",")
    classes = [c for c in args.classes.split(",") if c]
    if device.type != "cuda":
        classes = [c for c in classes if not c.startswith("Paged")]
    from lion_ops import ops
    stamps = Stamps(ops)
    report = {"device": str(device), "torch": torch.__version__, "sets": {}}
    try:
        for name in sets:
            shapes = benchmark.tiny() if name == "tiny" else benchmark.set_shapes(name)
            results = measure_set(shapes, classes, device, args.warmup, args.repeats, stamps)
            report["sets"][name] = results
            for cls_name, r in results.items():
                print("\n".join(report_lines(name, cls_name, r)), flush=True)
    finally:
        stamps.restore()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
