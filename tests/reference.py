"""An independent reference of the Lion update in fp64 plain PyTorch, written from the paper
and bitsandbytes' formulas, never from lion_ops' code."""

import torch


def lion_reference_step(p, g, m, lr, beta1, beta2, weight_decay):
    """One Lion step in float64; returns the new (p, m) as float64 tensors."""
    p = p.double() * (1.0 - lr * weight_decay)
    g = g.double()
    m = m.double()
    c = beta1 * m + (1.0 - beta1) * g
    p = p - lr * torch.sign(c)
    m = beta2 * m + (1.0 - beta2) * g
    return p, m, c
