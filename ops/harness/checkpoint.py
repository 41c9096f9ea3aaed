"""Checkpoints of one design's training, in torch.distributed.checkpoint (DCP) format, for
every parallel mode and world size.

    <design>/ckpt/            the DCP directory (.metadata and one *.distcp file per writing rank):
                              {"model": model state dict, "optim": optimizer state dict}, both
                              from torch.distributed.checkpoint.state_dict.get_state_dict, keyed
                              by parameter name (FQN), tensors sharded as in training
    <design>/ckpt/train.pt    step, run identity, RNG state (rank 0's: every rank seeds alike),
                              history (losses, step times), written by rank 0
    <design>/ckpt/sha256.json size and sha256 of every other file of the checkpoint, written
                              last by rank 0 (the ranks' files are on a filesystem it sees)

A resume verifies every file against sha256.json before loading anything: a damaged or
truncated file is named and never loaded (an older intact checkpoint, ckpt.old, is used when
a save was killed before it was removed; else the run stops with the file's name).

DCP reshards on load, so a checkpoint written by one mode and world size (one process, DDP,
FSDP2, tensor parallel, FSDP2 x TP) loads into any other. A checkpoint is written into
ckpt.tmp/ and then swapped in, so a run killed while saving keeps the previous one.

DCP cannot describe a tensor-parallel _StridedShard (the packed [gate; up] and [q; k; v]
weights: rank k's rows are not one contiguous block of the global tensor), so those
tensors are saved and loaded Replicate along the tensor-parallel mesh dim (one extra gather
of each such tensor per save or load); all others go as they are.

Runs checkpointed by older versions (<design>/ckpt.pt, torch.save of plain state dicts, or
a ckpt/ without sha256.json) still resume with one process or DDP; they carry no checksums,
so only an unreadable file is detected there.
"""

import contextlib
import json
import shutil
import warnings
from pathlib import Path

import torch

from .files import atomic_torch_save, atomic_write_text, sha256

CKPT_DIR = "ckpt"
TRAIN_STATE = "train.pt"
LEGACY_FILE = "ckpt.pt"
MANIFEST = "sha256.json"


def path_of(design_dir):
    return Path(design_dir) / CKPT_DIR


def _candidates(design_dir):
    """The checkpoints in design_dir, newest first: ckpt/, ckpt.old/ (a save killed before
    removing it), a legacy ckpt.pt. A directory without its manifest and train state is a
    save that never finished, not a checkpoint."""
    out = []
    for d in (design_dir / CKPT_DIR, design_dir / (CKPT_DIR + ".old")):
        if (d / MANIFEST).exists() or ((d / TRAIN_STATE).exists() and (d / ".metadata").exists()):
            out.append(d)
    legacy = design_dir / LEGACY_FILE
    return out + ([legacy] if legacy.exists() else [])


def write_manifest(path):
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)}
             for f in sorted(Path(path).iterdir()) if f.is_file() and f.name != MANIFEST}
    atomic_write_text(Path(path) / MANIFEST, json.dumps({"files": files}, indent=1))


def damage(path):
    """Why the checkpoint at `path` must not be loaded (a sentence naming the file), or None
    when its files match its manifest (or it has none: an older version's)."""
    path = Path(path)
    manifest = path / MANIFEST
    if path.name == LEGACY_FILE or not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{manifest} is unreadable ({e})"
    for name, want in files.items():
        f = path / name
        if not f.exists():
            return f"{f} is missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{f} is truncated or damaged: {size} bytes, {want['bytes']} written"
        if sha256(f) != want["sha256"]:
            return f"{f} is damaged: its sha256 differs from the one written with it"
    return None


def find(design_dir, report=None):
    """The newest intact checkpoint in design_dir (a DCP directory, or a legacy ckpt.pt), or
    None when there is none. A damaged one is never returned: report(message) is told about it
    when an older intact one is used instead; when none is intact, SystemExit names the files."""
    damaged = []
    for candidate in _candidates(Path(design_dir)):
        problem = damage(candidate)
        if problem is None:
            if damaged and report is not None:
                report(f"ab: not loaded: {'; '.join(damaged)}; resuming from the older checkpoint {candidate}")
            return candidate
        damaged.append(problem)
    if damaged:
        raise SystemExit(f"ab: cannot --resume {design_dir}: {'; '.join(damaged)}. Nothing was loaded; delete "
                         f"{path_of(design_dir)} to train this design again from step 0")
    return None


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
        write_manifest(tmp)  # last: a directory with a manifest is a finished save
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    env.barrier()


def _first_line(error):
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _torch_load(path, map_location):
    """torch.load naming the file when it cannot be read (a truncated file otherwise gives a
    zip reader's error or `OSError: [Errno 22]` with no file name)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (torch.load raises whatever its readers raise)
        raise SystemExit(f"ab: cannot read the checkpoint file {path}: it is truncated or damaged "
                         f"({_first_line(e)})") from e


def read_train_state(path):
    """The train_state of the checkpoint at `path` (find()): step, run identity, rng, history."""
    path = Path(path)
    if path.name == LEGACY_FILE:
        ckpt = _torch_load(path, "cpu")
        return {key: ckpt[key] for key in ("step", "run", "rng", "history")}
    return _torch_load(path / TRAIN_STATE, "cpu")


def load(path, model, optimizer, env):
    """Loads the model and optimizer state of the checkpoint at `path` (find()) into
    (model, optimizer), resharding as needed. Every rank calls it."""
    path = Path(path)
    if path.name == LEGACY_FILE:
        if env.sharded:
            raise SystemExit(f"ab: {path} is a checkpoint of an older version (torch.save): resume it with one "
                             "process or --parallel ddp, or start the design again")
        ckpt = _torch_load(path, env.device)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": _map(model_sd, _to_dcp), "optim": _map(optim_sd, _to_dcp)}
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _single_process_quiet():
            dcp.load(state, checkpoint_id=str(path), no_dist=env.world == 1)
    except (Exception, CheckpointException) as e:  # noqa: BLE001  (a BaseException, wrapping its readers' errors)
        # The wrapped error (a rank's traceback) ends with the reader's own message.
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise SystemExit(f"ab: cannot load the checkpoint {path} (is a file of it truncated or damaged?): "
                         f"{cause}") from e
    set_state_dict(model, optimizer, model_state_dict=_back(state["model"], model_sd),
                   optim_state_dict=_back(state["optim"], optim_sd))
