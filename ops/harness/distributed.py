"""The process group of a run: one process, or DDP ranks under torchrun (gloo on CPU, nccl on CUDA)."""

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_reduce_(self, tensor, op=None):
        if self.world > 1:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max_(self, tensor):
        return self.all_reduce_(tensor, dist.ReduceOp.MAX)

    def autocast(self, enabled):
        """bf16 autocast on CUDA when enabled; nothing on CPU."""
        if enabled and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self):
        """Waits for the device, so wall-clock timings cover the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self):
        if self.world > 1:
            dist.destroy_process_group()


def init_dist(device_arg):
    """The Dist of this process; under torchrun (WORLD_SIZE > 1) it joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    if world == 1:
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    local_rank = int(os.environ["LOCAL_RANK"])
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if want_cuda else "gloo")
    return Dist(rank=dist.get_rank(), world=world, device=device)
