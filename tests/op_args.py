"""Calling the update operators directly: their hyperparameters are tensors."""

import torch


def as_op_args(args):
    """args with every Python float (the hyperparameters lr, beta1, beta2, weight_decay) as a
    0-dim float32 CPU tensor, the form the operators take from the host."""
    return tuple(torch.tensor(a, dtype=torch.float32) if isinstance(a, float) else a
                 for a in args)


class TensorHyperparameters:
    """An update operator that takes its hyperparameters as numbers too (converted by
    as_op_args); `overload` is the operator itself, for opcheck."""

    def __init__(self, overload):
        self.overload = overload

    def __call__(self, *args):
        return self.overload(*as_op_args(args))
