"""Training metrics: the metrics log (metrics.jsonl and TensorBoard), the paired
telemetry overhead, and the CPU memory count of a training step."""

import json
import math
import statistics

import torch

from .files import atomic_write_text

SKIP_TIMING_STEPS = 3  # first steps carry one-off costs (allocator, thread pools)


class MetricsLog:
    """metrics.jsonl (one JSON record a line) and TensorBoard scalars, written by rank 0."""

    def __init__(self, run_dir, env):
        self.path = run_dir / "metrics.jsonl"
        self.run_dir = run_dir
        self.env = env
        self.writer = None

    def open_design(self, label, start_step):
        if not self.env.main:
            return
        from torch.utils.tensorboard import SummaryWriter

        if self.path.exists():
            # Resuming: the records this design logged after its checkpoint will be logged again.
            kept = [line for line in self.path.read_text().splitlines()
                    if (r := json.loads(line))["design"] != label or r["step"] < start_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        self.writer = SummaryWriter(str(self.run_dir / "tb" / label), purge_step=start_step or None)

    def close_design(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def record(self, label, step, kind, **values):
        if not self.env.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"design": label, "step": step, "kind": kind, **values}, allow_nan=True) + "\n")
        if kind == "train":
            self.writer.add_scalar("loss/train", values["loss"], step)
            self.writer.add_scalar("lr", values["lr"], step)
        elif kind == "eval":
            self.writer.add_scalar("loss/val", values["val_loss"], step)
        elif kind in ("telemetry", "optim", "outliers"):
            for key, value in values.items():
                if key != "layer" and isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/layer{values['layer']}/{key}", value, step)


def paired_overhead(times, telemetry_steps, skip=SKIP_TIMING_STEPS):
    """Median over telemetry steps of (its time / the mean time of the plain steps on either
    side) - 1: pairing with neighbours cancels slow drifts of a shared machine's load."""
    ratios = [times[i] / ((times[i - 1] + times[i + 1]) / 2)
              for i in range(max(skip, 1), len(times) - 1)
              if telemetry_steps[i] and not telemetry_steps[i - 1] and not telemetry_steps[i + 1]]
    return statistics.median(ratios) - 1 if ratios else None


def cpu_step_memory(model, x, y):
    """Bytes a training step holds on CPU (no allocator statistics there): parameters,
    gradients and the two AdamW moments, plus the tensors the forward saves for backward."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(x, y)
    del loss
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return 4 * param_bytes + sum(storages.values())
