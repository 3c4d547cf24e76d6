"""Running the CPU operators with their scalar loops (LION_OPS_NO_AVX2=1, in a subprocess,
as the choice is made once per process) to compare them bit for bit with the AVX2 loops."""

import os
import subprocess
import sys

import torch


def run_with_scalar_loops(tmp_path, script, inputs):
    """Saves `inputs`, runs `script` (which loads sys.argv[1], updates it, saves it back) with
    the scalar loops forced, and returns what it saved."""
    path = tmp_path / "inputs.pt"
    torch.save(inputs, path)
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, cwd=tmp_path,
                   env=dict(os.environ, LION_OPS_NO_AVX2="1"))
    return torch.load(path)


def put_special_values(params, grads):
    """Puts values where conversions and signs go wrong into the first 16 of each 1-D tensor:
    NaN and infinite params and grads, zero grads, subnormals, float16's largest values, and
    bfloat16 rounding ties."""
    info = torch.finfo(params[0].dtype)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, info.max,
                             -info.max, info.tiny / 4, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8, 3e-5,
                             -7e4, 1e-3, -1e-3, 2.0, -2.0])
    for p, g in zip(params, grads):
        if p.dim() != 1:
            continue
        n = min(p.numel(), specials.numel())
        p[:n] = specials[:n].to(p.dtype)
        g[:n] = specials.flip(0)[:n].to(g.dtype)
        g[n // 2:n] = 0


def raw_bits(t):
    """The raw bits of a tensor, so that NaNs compare equal to themselves."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16,
                   torch.float16: torch.int16}.get(t.dtype, t.dtype))
