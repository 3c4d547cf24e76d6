"""One rank of test_optim.py's FSDP2 test, launched by torch.distributed.run: trains a small
model sharded with fully_shard with lion_ops.Lion, checkpoints the optimizer with
torch.distributed.checkpoint, resumes it into a fresh sharded model, and writes (rank 0) the
full params and momenta of both runs for the test to compare with an unsharded reference."""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import lion_ops


def make_model():
    torch.manual_seed(0)  # the same initial weights on every rank and in the reference
    return torch.nn.Sequential(torch.nn.Linear(16, 15), torch.nn.Tanh(), torch.nn.Linear(15, 3))


def batches(count, seed):
    generator = torch.Generator().manual_seed(seed)  # the same batches on every rank
    return [torch.randn(8, 16, generator=generator) for _ in range(count)]


def train(model, opt, data):
    for x in data:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def full_state(model, opt):
    params = [p.full_tensor() for p in model.parameters()]
    momenta = [opt.state[p]["state1"].full_tensor() for p in model.parameters()]
    return params, momenta


def main(out_dir):
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_model()
    fully_shard(model, mesh=mesh)
    opt = lion_ops.Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    train(model, opt, batches(3, seed=1))
    dcp.save({"optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=f"{out_dir}/ckpt")

    resumed_model = make_model()
    fully_shard(resumed_model, mesh=mesh)
    resumed_model.load_state_dict(model.state_dict())
    resumed = lion_ops.Lion(resumed_model.parameters(), lr=1.0)
    loaded = {"optim": get_optimizer_state_dict(resumed_model, resumed)}
    dcp.load(loaded, checkpoint_id=f"{out_dir}/ckpt")
    set_optimizer_state_dict(resumed_model, resumed, loaded["optim"])

    train(model, opt, batches(2, seed=2))
    train(resumed_model, resumed, batches(2, seed=2))
    results = {"continued": full_state(model, opt), "resumed": full_state(resumed_model, resumed),
               "shards": [tuple(p.to_local().shape) for p in model.parameters()]}
    if dist.get_rank() == 0:
        torch.save(results, f"{out_dir}/results.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
