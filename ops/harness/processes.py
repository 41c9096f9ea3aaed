"""The process group and device mesh of a run: one process, or ranks under torchrun
(gloo on CPU, nccl on CUDA) in one of the parallel modes

    ddp      DistributedDataParallel over all ranks (the default under torchrun)
    fsdp     FSDP2 (fully_shard) over all ranks, a 1-D mesh ("dp",)
    tp       tensor parallel over all ranks, a 1-D mesh ("tp",): every rank sees the same batch
    fsdp+tp  a 2-D mesh ("dp", "tp") of world/tp x tp ranks (--tp N): tensor parallel inside each
             group of N consecutive ranks (keep it within a host), FSDP2 across the groups

In every mode the global batch of a step is batch_size x (number of data-parallel groups),
and data-parallel group k reads rows [k * batch_size, (k + 1) * batch_size) of the batch a
one-process run with that global batch reads (train.py), so every world size trains on the
same data. With one process every mode is the one-process run.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

PARALLEL_MODES = ("ddp", "fsdp", "tp", "fsdp+tp")
# How long a collective waits for the other ranks (--dist-timeout): long enough for the
# slowest step, evaluation or checkpoint of the gpu preset, short enough that a rank that
# hangs stops the run in minutes instead of torch's default (10 min for NCCL, 30 for gloo).
DEFAULT_TIMEOUT_S = 600.0


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    parallel: str = "none"  # "none" (one process) or one of PARALLEL_MODES
    mesh: object = None  # the DeviceMesh of fsdp / tp / fsdp+tp (and ddp: ("dp",)), else None
    dp_rank: int = 0  # this rank's data-parallel group: which share of the global batch it reads
    dp_world: int = 1  # the number of data-parallel groups
    tp_world: int = 1  # the tensor-parallel degree
    owns_group: bool = False  # init_dist created the process group (close() destroys it)

    @property
    def main(self):
        return self.rank == 0

    @property
    def sharded(self):
        """Parameters are DTensors (FSDP2 and/or tensor parallel), not plain tensors."""
        return self.parallel in ("fsdp", "tp", "fsdp+tp")

    @property
    def uses_fsdp(self):
        return self.parallel in ("fsdp", "fsdp+tp")

    @property
    def uses_tp(self):
        return self.parallel in ("tp", "fsdp+tp")

    @property
    def tp_mesh(self):
        return self.mesh["tp"] if self.uses_tp else None

    @property
    def dp_mesh(self):
        return self.mesh["dp"] if self.parallel in ("ddp", "fsdp", "fsdp+tp") else None

    @property
    def dp_group(self):
        """The process group of the data-parallel ranks (None: all ranks, the default group)."""
        return self.mesh["dp"].get_group() if self.parallel == "fsdp+tp" else None

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def all_reduce_(self, tensor, op=None):
        if self.world > 1:
            dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
        return tensor

    def all_reduce_max_(self, tensor):
        return self.all_reduce_(tensor, dist.ReduceOp.MAX)

    def dp_all_reduce_(self, tensor):
        """Sums over the data-parallel groups (the ranks of a tensor-parallel group hold the same values)."""
        if self.dp_world > 1:
            dist.all_reduce(tensor, group=self.dp_group)
        return tensor

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
        if self.world > 1 and self.owns_group:
            dist.destroy_process_group()


def _check_mode(parallel, tp, world):
    if parallel not in PARALLEL_MODES:
        raise SystemExit(f"ab: --parallel must be one of {', '.join(PARALLEL_MODES)}, got {parallel!r}")
    if parallel == "tp":
        tp = world if tp is None else tp
        if tp != world:
            raise SystemExit(f"ab: --parallel tp uses all {world} ranks for tensor parallelism (--tp {tp} given); "
                             "for data parallelism across tensor-parallel groups use --parallel fsdp+tp")
    elif parallel == "fsdp+tp":
        if tp is None:
            raise SystemExit("ab: --parallel fsdp+tp needs --tp N, the tensor-parallel degree "
                             "(e.g. the GPUs of a host)")
        if tp < 1 or world % tp:
            raise SystemExit(f"ab: --tp {tp} must divide the world size {world}")
    elif tp not in (None, 1):
        raise SystemExit(f"ab: --tp {tp} needs --parallel tp or fsdp+tp")
    return tp or 1


def init_dist(device_arg, parallel="ddp", tp=None, timeout_s=DEFAULT_TIMEOUT_S):
    """The Dist of this process. Under torchrun (WORLD_SIZE > 1) it joins the process group
    (or uses the one the caller initialized), whose collectives fail after timeout_s seconds
    of waiting, and builds the device mesh of `parallel`."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and torch.cuda.is_available())
    parallel = parallel or "ddp"
    if world == 1:
        if parallel not in PARALLEL_MODES:
            _check_mode(parallel, tp, 1)
        return Dist(device=torch.device("cuda" if want_cuda else "cpu"))
    tp = _check_mode(parallel, tp, world)
    local_rank = int(os.environ["LOCAL_RANK"])
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if want_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank()
    from torch.distributed.device_mesh import init_device_mesh

    if parallel == "fsdp+tp":
        mesh = init_device_mesh(device.type, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        # A flattened view of both dims (torchtitan's way): DTensor then reduces a value that is
        # partial along both (e.g. the gradient norm) with one collective instead of two.
        mesh["dp", "tp"]._flatten("dp_tp")
        dp_rank, dp_world = mesh["dp"].get_local_rank(), world // tp
    elif parallel == "tp":
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("tp",))
        dp_rank, dp_world = 0, 1
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("dp",))
        dp_rank, dp_world, tp = rank, world, 1
    return Dist(rank=rank, world=world, device=device, parallel=parallel, mesh=mesh, dp_rank=dp_rank,
                dp_world=dp_world, tp_world=tp, owns_group=owns)
