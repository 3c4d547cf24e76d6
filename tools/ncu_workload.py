#!/usr/bin/env python3
"""The workload tools/gpu_check.sh profiles with Nsight Compute: a few steps of lion_ops'
Lion, Lion8bit (blockwise and block_wise=False) and PagedLion on one of the benchmark's sets
of shapes (fp32 params; the first argument, llama1b by default; gpu_check.sh passes gpt2,
whose 500 MB of params are well past the L2 and profile in seconds), so that ncu records the
achieved DRAM bandwidth of each of our kernels.

    ncu --kernel-name regex:lion_ --metrics ... python tools/ncu_workload.py

Run it as a script from any directory where the installed lion_ops is imported (not the
repository root's source tree). Each optimizer takes 2 steps (the first initializes state);
ncu's --launch-skip / --launch-count pick which launches to keep.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # noqa: E402  (the shapes are written down once, there)

import lion_ops  # noqa: E402


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        return
    if not torch.cuda.is_available():
        sys.exit("ncu_workload: needs a CUDA device")
    set_name = sys.argv[1] if len(sys.argv) > 1 else "llama1b"
    shapes = [shape for _, shape in benchmark.set_shapes(set_name)]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    for name, make in (("Lion", lambda: lion_ops.Lion(params, lr=1e-4, weight_decay=0.1)),
                       ("Lion8bit", lambda: lion_ops.Lion8bit(params, lr=1e-4, weight_decay=0.1)),
                       ("Lion8bit static", lambda: lion_ops.Lion8bit(
                           params, lr=1e-4, weight_decay=0.1, block_wise=False)),
                       ("PagedLion", lambda: lion_ops.PagedLion(params, lr=1e-4,
                                                                weight_decay=0.1))):
        optimizer = make()
        for _ in range(2):
            optimizer.step()
        torch.cuda.synchronize()
        print(f"ncu_workload: {name}: 2 steps on {set_name} ({len(params)} tensors)", flush=True)
        del optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
