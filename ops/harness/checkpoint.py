"""Checkpoints of one design's training, in torch.distributed.checkpoint (DCP) format, for
every parallel mode and world size.

    <design>/ckpt/            the DCP directory (.metadata and one *.distcp file per writing rank):
                              {"model": model state dict, "optim": optimizer state dict}, both
                              from torch.distributed.checkpoint.state_dict.get_state_dict, keyed
                              by parameter name (FQN), tensors sharded as in training
    <design>/ckpt/train.pt    step, run identity, RNG state (rank 0's: every rank seeds alike),
                              history (losses, step times), written by rank 0

DCP reshards on load, so a checkpoint written by one mode and world size (one process, DDP,
FSDP2, tensor parallel, FSDP2 x TP) loads into any other. A checkpoint is written into
ckpt.tmp/ and then swapped in, so a run killed while saving keeps the previous one.

DCP cannot describe a tensor-parallel _StridedShard (the packed [gate; up] and [q; k; v]
weights: rank k's rows are not one contiguous block of the global tensor), so those
tensors are saved and loaded Replicate along the tensor-parallel mesh dim (one extra gather
of each such tensor per save or load); all others go as they are.

Runs checkpointed by older versions (<design>/ckpt.pt, torch.save of plain state dicts)
still resume with one process or DDP.
"""

import contextlib
import shutil
import warnings
from pathlib import Path

import torch

CKPT_DIR = "ckpt"
TRAIN_STATE = "train.pt"
LEGACY_FILE = "ckpt.pt"


def path_of(design_dir):
    return Path(design_dir) / CKPT_DIR


def find(design_dir):
    """The checkpoint to resume from in design_dir (a DCP directory, or a legacy ckpt.pt), or None."""
    design_dir = Path(design_dir)
    for candidate in (design_dir / CKPT_DIR, design_dir / (CKPT_DIR + ".old")):
        if (candidate / TRAIN_STATE).exists() and (candidate / ".metadata").exists():
            return candidate
    legacy = design_dir / LEGACY_FILE
    return legacy if legacy.exists() else None


# ----------------------------------------------------------------------------- strided placements
def _dcp_placements(t):
    """Placements DCP can save for DTensor t: its tensor-parallel _StridedShards as Replicate
    (None when t needs no change)."""
    from torch.distributed.tensor import DTensor, Replicate
    from torch.distributed.tensor.placement_types import _StridedShard

    if not isinstance(t, DTensor):
        return None
    names = t.device_mesh.mesh_dim_names or ("tp",) * t.device_mesh.ndim
    placements = [Replicate() if isinstance(p, _StridedShard) and names[i] == "tp" else p
                  for i, p in enumerate(t.placements)]
    return None if tuple(placements) == tuple(t.placements) else placements


def _map(obj, fn):
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map(v, fn) for v in obj]
    return fn(obj)


def _to_dcp(t):
    placements = _dcp_placements(t)
    return t if placements is None else t.redistribute(placements=placements)


def _back(loaded, like):
    """The loaded (DCP-layout) state in the layouts of the state dict `like`."""
    if isinstance(like, dict):
        return {k: _back(loaded[k], v) for k, v in like.items()}
    if isinstance(like, list):
        return [_back(a, b) for a, b in zip(loaded, like)]
    if _dcp_placements(like) is not None:
        return loaded.redistribute(placements=like.placements)
    return loaded


# ----------------------------------------------------------------------------- save / load
@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns on every single-process save or load that it assumes one process: it does."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save(design_dir, model, optimizer, train_state, env):
    """Writes the checkpoint of (model, optimizer) plus train_state (a dict for torch.save).
    Every rank calls it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .train import atomic_torch_save

    final = path_of(design_dir)
    tmp, old = final.with_name(CKPT_DIR + ".tmp"), final.with_name(CKPT_DIR + ".old")
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
    env.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with _single_process_quiet():
        dcp.save({"model": _map(model_sd, _to_dcp), "optim": _map(optim_sd, _to_dcp)}, checkpoint_id=str(tmp),
                 no_dist=env.world == 1)
    if env.main:
        atomic_torch_save(train_state, tmp / TRAIN_STATE)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    env.barrier()


def read_train_state(path):
    """The train_state of the checkpoint at `path` (find()): step, run identity, rng, history."""
    path = Path(path)
    if path.name == LEGACY_FILE:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        return {key: ckpt[key] for key in ("step", "run", "rng", "history")}
    return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)


def load(path, model, optimizer, env):
    """Loads the model and optimizer state of the checkpoint at `path` (find()) into
    (model, optimizer), resharding as needed. Every rank calls it."""
    path = Path(path)
    if path.name == LEGACY_FILE:
        if env.sharded:
            raise SystemExit(f"ab: {path} is a checkpoint of an older version (torch.save): resume it with one "
                             "process or --parallel ddp, or start the design again")
        ckpt = torch.load(path, map_location=env.device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": _map(model_sd, _to_dcp), "optim": _map(optim_sd, _to_dcp)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=env.world == 1)
    set_state_dict(model, optimizer, model_state_dict=_back(state["model"], model_sd),
                   optim_state_dict=_back(state["optim"], optim_sd))
