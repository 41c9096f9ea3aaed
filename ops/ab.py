"""A/B training harness: trains several Transformer designs with the same seed, data
order and budget, logs per-layer FFN telemetry, probes a mean shift and int8 FFN
weights after training, and writes runs/<name>/ (metrics.jsonl, TensorBoard
events, checkpoints, report.md, plots).

    python -m ffn.ab                              # Design A vs B (+ interventions) on Shakespeare
    python -m ffn.ab --designs A,B,rms+gelu,ln+swiglu
    python -m ffn.ab --data my.txt --preset gpu
    torchrun --nproc_per_node=2 -m ffn.ab ...     # DDP: gloo on CPU, nccl on GPU

Every design trains from the same seed on the same batches (a function of the seed
and the step), for the same number of steps. The global batch is split across DDP
ranks, so a DDP run sees exactly the batches of a one-process run.
"""

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from . import data as textdata
from . import designs as designgrammar
from .files import atomic_write, atomic_write_text
from .model import Design, ModelConfig, TransformerLM, ffn_param_count, gated_d_ff, param_count, shift_probe
from .probes import norm_input_rms, shift_offsets
from .quant import quantized_down_input, quantized_ffn_weights

# Sizes and budgets. `cpu` is the default and is sized for a 2-core machine.
PRESETS = {
    "cpu": dict(d_model=96, n_layers=4, n_heads=4, d_ff=384, seq_len=128, batch_size=16, steps=120,
                lr=3e-3, warmup=12, eval_every=40, eval_windows=128, telemetry_every=10,
                ckpt_every=40, amp=False),
    "gpu": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, seq_len=512, batch_size=64, steps=3000,
                lr=1e-3, warmup=200, eval_every=250, eval_windows=1024, telemetry_every=25,
                ckpt_every=500, amp=True),
    # A few seconds per design: for tests and smoke runs.
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, d_ff=96, seq_len=32, batch_size=4, steps=4,
                 lr=3e-3, warmup=2, eval_every=2, eval_windows=8, telemetry_every=2,
                 ckpt_every=2, amp=False),
}
DEFAULT_DESIGNS = "A,B,B+bias,B+recenter"
DEFAULT_PROBE_SHIFT = 1.0  # in units of the rms of each FFN norm's input
SKIP_TIMING_STEPS = 3  # first steps carry one-off costs (allocator, thread pools)


# ----------------------------------------------------------------------------- distributed
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


def init_dist(device_arg):
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


# ----------------------------------------------------------------------------- telemetry
def reduce_stats(stats, env):
    """Combines raw telemetry sums [layers, fields] over ranks: sums add, maxima take the max."""
    from . import telemetry

    if env.world == 1:
        return stats
    maxed = stats.clone()
    env.all_reduce_(stats)
    env.all_reduce_(maxed, dist.ReduceOp.MAX)
    max_idx = [telemetry.STAT_FIELDS.index(f) for f in telemetry.MAX_FIELDS]
    stats[:, max_idx] = maxed[:, max_idx]
    return stats


def summarize_layers(stats):
    from . import telemetry

    return [telemetry.summarize(layer) for layer in stats]


# ----------------------------------------------------------------------------- helpers
def lr_at(step, args):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, args):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )


def autocast(env, enabled):
    if enabled and env.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sync(env):
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def atomic_torch_save(obj, path):
    """A run killed mid-save keeps the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save(obj, f))


# What a checkpoint's losses depend on besides the design: resuming with any of these
# changed would silently continue a different run (e.g. --steps moves the LR schedule).
RUN_IDENTITY_ARGS = ("seed", "steps", "d_model", "n_layers", "n_heads", "d_ff", "seq_len", "lr", "warmup",
                     "weight_decay", "grad_clip", "no_ffn_bias", "backend", "amp", "data")


def run_identity(args, design, env):
    return {**{key: getattr(args, key) for key in RUN_IDENTITY_ARGS}, "design": asdict(design),
            "global_batch": args.batch_size * env.world}


def check_resumable(saved, current, ckpt_path):
    changed = sorted(key for key in current.keys() | saved.keys() if saved.get(key) != current.get(key))
    if changed:
        diffs = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise SystemExit(f"ab: cannot --resume {ckpt_path}: it was trained with other settings ({diffs}); "
                         "resume with the original flags or use another --name")


def rng_state(env):
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def set_rng_state(state, env):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], env.device)


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
            f.write(json.dumps({"design": label, "step": step, "kind": kind, **values}) + "\n")
        if kind == "train":
            self.writer.add_scalar("loss/train", values["loss"], step)
            self.writer.add_scalar("lr", values["lr"], step)
        elif kind == "eval":
            self.writer.add_scalar("loss/val", values["val_loss"], step)
        elif kind == "telemetry":
            for key, value in values.items():
                if key != "layer" and isinstance(value, float) and math.isfinite(value):
                    self.writer.add_scalar(f"telemetry/layer{values['layer']}/{key}", value, step)


# ----------------------------------------------------------------------------- evaluation
def eval_batches(tokens, args, env):
    """The fixed validation windows of this rank (they are sharded over ranks), in batches."""
    offsets = textdata.eval_offsets(len(tokens), args.seq_len, args.eval_windows)[env.rank::env.world]
    for start in range(0, len(offsets), args.batch_size):
        yield textdata.get_batch(tokens, offsets[start:start + args.batch_size], args.seq_len, env.device)


@torch.no_grad()
def evaluate(model, tokens, args, env, with_stats=False):
    """Mean validation loss over the fixed windows, and the per-layer telemetry summary over
    the same windows when asked."""
    loss_sum = torch.zeros(2, dtype=torch.float64, device=env.device)  # (sum of losses, windows)
    layer_stats = None
    for x, y in eval_batches(tokens, args, env):
        stats = [] if with_stats else None
        with autocast(env, args.amp):
            _, loss = model(x, y, stats=stats)
        loss_sum += torch.tensor([loss.item() * len(x), len(x)], dtype=torch.float64, device=env.device)
        if with_stats:
            batch = torch.stack(stats)
            layer_stats = batch if layer_stats is None else _combine(layer_stats, batch)
    env.all_reduce_(loss_sum)
    val_loss = float(loss_sum[0] / loss_sum[1])
    if not with_stats:
        return val_loss, None
    if layer_stats is None:  # this rank had no window
        n_layers, n_fields = len(model.blocks), _n_stat_fields()
        layer_stats = _empty_stats(n_layers, n_fields, env.device)
    return val_loss, summarize_layers(reduce_stats(layer_stats, env))


def _n_stat_fields():
    from . import telemetry

    return len(telemetry.STAT_FIELDS)


def _empty_stats(n_layers, n_fields, device):
    """Neutral raw sums: zeros, and -inf for the maxima."""
    from . import telemetry

    stats = torch.zeros(n_layers, n_fields, dtype=torch.float64, device=device)
    for field in telemetry.MAX_FIELDS:
        stats[:, telemetry.STAT_FIELDS.index(field)] = -math.inf
    return stats


def _combine(a, b):
    from . import telemetry

    return torch.stack([telemetry.combine([x, y]) for x, y in zip(a, b)])


# ----------------------------------------------------------------------------- one design
def train_design(spec, design, args, corpus, env, log, run_dir):
    """Trains one design for args.steps steps; returns its result dict (rank 0) or None if
    stopped early by --stop-at."""
    label = designgrammar.run_label(spec)
    design_dir = run_dir / label
    ckpt_path = design_dir / "ckpt.pt"
    config = ModelConfig(vocab_size=textdata.VOCAB_SIZE, seq_len=args.seq_len, d_model=args.d_model,
                         n_layers=args.n_layers, n_heads=args.n_heads, d_ff=args.d_ff,
                         ffn_bias=not args.no_ffn_bias, design=design, backend=args.backend)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = TransformerLM(config).to(env.device)
    optimizer = make_optimizer(model, args)
    start_step, history = 0, {"step_times": [], "cpu_times": [], "telemetry_steps": [], "losses": []}
    identity = run_identity(args, design, env)
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=env.device, weights_only=True)
        check_resumable(ckpt["run"], identity, ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"], env)
        start_step, history = ckpt["step"], ckpt["history"]
    elif env.main:
        shutil.rmtree(design_dir, ignore_errors=True)
    env.barrier()
    if env.main:
        design_dir.mkdir(parents=True, exist_ok=True)
    train_model = model
    if env.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        train_model = DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)

    log.open_design(label, start_step)
    global_batch = args.batch_size * env.world
    tokens_per_step = global_batch * args.seq_len
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    desc = f"{spec} ({designgrammar.describe(design)})"
    progress = _progress(total=args.steps, initial=start_step, desc=desc, env=env, args=args)
    for step in range(start_step, args.steps):
        offsets = textdata.batch_offsets(len(corpus.train), args.seq_len, global_batch, args.seed, step)
        x, y = textdata.get_batch(corpus.train, offsets[env.rank * args.batch_size:(env.rank + 1) * args.batch_size],
                                  args.seq_len, env.device)
        with_tel = args.telemetry_every > 0 and (step % args.telemetry_every == 0 or step == args.steps - 1)
        stats = [] if with_tel else None
        lr = lr_at(step, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sync(env)
        t0, c0 = time.perf_counter(), time.process_time()
        with autocast(env, args.amp):
            _, loss = train_model(x, y, stats=stats)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(env)
        step_time, cpu_time = time.perf_counter() - t0, time.process_time() - c0
        loss_value = float(env.all_reduce_(loss.detach().double().clone()) / env.world)
        for key, value in (("step_times", step_time), ("cpu_times", cpu_time), ("telemetry_steps", with_tel),
                           ("losses", loss_value)):
            history[key].append(value)
        log.record(label, step, "train", loss=loss_value, lr=lr, step_time=step_time, telemetry=with_tel)
        if with_tel:
            for layer, summary in enumerate(summarize_layers(reduce_stats(torch.stack(stats), env))):
                log.record(label, step, "telemetry", layer=layer, **summary)
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            val_loss, _ = evaluate(model, corpus.val, args, env)
            log.record(label, step, "eval", val_loss=val_loss)
            progress.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_loss:.3f}")
        else:
            progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        progress.update(1)
        if args.ckpt_every and ((step + 1) % args.ckpt_every == 0 or step + 1 == args.steps):
            if env.main:
                atomic_torch_save({"step": step + 1, "run": identity, "model": model.state_dict(),
                                   "optimizer": optimizer.state_dict(), "rng": rng_state(env),
                                   "history": history}, ckpt_path)
            env.barrier()
        if args.stop_at is not None and step + 1 == args.stop_at:
            progress.close()
            log.close_design()
            return None
    progress.close()
    return finish_design(spec, label, design, config, model, args, corpus, env, log, history, tokens_per_step,
                         design_dir)


def _progress(total, initial, desc, env, args):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not env.main or args.no_progress,
                dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


def paired_overhead(times, telemetry_steps, skip=SKIP_TIMING_STEPS):
    """Median over telemetry steps of (its time / the mean time of the plain steps on either
    side) - 1: pairing with neighbours cancels slow drifts of a shared machine's load."""
    ratios = [times[i] / ((times[i - 1] + times[i + 1]) / 2)
              for i in range(max(skip, 1), len(times) - 1)
              if telemetry_steps[i] and not telemetry_steps[i - 1] and not telemetry_steps[i + 1]]
    return statistics.median(ratios) - 1 if ratios else None


def finish_design(spec, label, design, config, model, args, corpus, env, log, history, tokens_per_step,
                  design_dir):
    """Final evaluation, telemetry on validation (with and without the probe shift), the
    shift-offset probe, the quantization probes and performance figures; writes result.json
    and returns the result."""
    peak_cuda = torch.cuda.max_memory_allocated(env.device) if env.device.type == "cuda" else None
    with_tel = args.telemetry_every > 0
    reduce = env.all_reduce_ if env.world > 1 else None
    val_loss, tel_val = evaluate(model, corpus.val, args, env, with_stats=with_tel)
    log.record(label, args.steps - 1, "eval", val_loss=val_loss)
    probe = None
    if args.probe_shift:
        def inputs():
            return (x for x, _ in eval_batches(corpus.val, args, env))

        rms = norm_input_rms(model, inputs(), all_reduce=reduce)
        shifts = [args.probe_shift * r for r in rms]
        with shift_probe(model, shifts):
            shifted_loss, tel_shifted = evaluate(model, corpus.val, args, env, with_stats=with_tel)
        probe = {"shift_rms_units": args.probe_shift, "norm_input_rms": rms, "shifts": shifts,
                 "val_loss": shifted_loss, "telemetry": tel_shifted,
                 "offsets": shift_offsets(model, inputs(), shifts, all_reduce=reduce)}
    quantized_loss = {}
    for bits in (8, 4):
        with quantized_ffn_weights(model, bits):
            quantized_loss[f"int{bits}"], _ = evaluate(model, corpus.val, args, env)
    with quantized_down_input(model, 8):
        quantized_loss["int8_h"], _ = evaluate(model, corpus.val, args, env)

    step_times = history["step_times"]
    # CPU time per step on CPU (a shared machine's waits do not count), wall time on CUDA.
    cost = step_times if env.device.type == "cuda" else history["cpu_times"]
    plain = [t for t, tel in list(zip(step_times, history["telemetry_steps"]))[SKIP_TIMING_STEPS:] if not tel]
    if peak_cuda is not None:
        memory, memory_kind = peak_cuda, "cuda peak allocated"
    else:
        x, y = textdata.get_batch(corpus.train, textdata.batch_offsets(len(corpus.train), args.seq_len,
                                                                        args.batch_size, args.seed, 0),
                                  args.seq_len, env.device)
        memory, memory_kind = cpu_step_memory(model, x, y), "cpu params+grads+adam+saved activations"
    d_ff = gated_d_ff(config.d_model, config.d_ff, config.ffn_bias) if design.gated else config.d_ff
    result = {
        "spec": spec, "label": label, "description": designgrammar.describe(design), "design": asdict(design),
        "backend": args.backend, "params": param_count(model),
        "ffn_params_per_layer": ffn_param_count(config.d_model, d_ff, design.gated, config.ffn_bias),
        "d_ff": d_ff, "steps": args.steps, "tokens_seen": tokens_per_step * args.steps,
        "final_val_loss": val_loss,
        "final_train_loss": statistics.fmean(history["losses"][-10:]),
        "tokens_per_s": tokens_per_step * len(step_times) / sum(step_times),
        "tokens_per_s_without_telemetry": tokens_per_step / statistics.median(plain) if plain else None,
        "telemetry_overhead": paired_overhead(cost, history["telemetry_steps"]),
        "telemetry_overhead_clock": "wall" if env.device.type == "cuda" else "process cpu time",
        "memory_bytes": memory, "memory_kind": memory_kind,
        **{f"{name}_val_loss": loss for name, loss in quantized_loss.items()},
        **{f"{name}_delta": loss - val_loss for name, loss in quantized_loss.items()},
        "telemetry_val": tel_val, "shift_probe": probe,
    }
    if env.main:
        atomic_write_text(design_dir / "result.json", json.dumps(result, indent=1))
    log.close_design()
    return result


# ----------------------------------------------------------------------------- the job
def build_parser():
    p = argparse.ArgumentParser(
        prog="ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=designgrammar.__doc__,
    )
    p.add_argument("--designs", default=None,
                   help=f"comma-separated designs (grammar below; default {DEFAULT_DESIGNS})")
    p.add_argument("--norm", choices=["layernorm", "rmsnorm"], default=None,
                   help="train one design built from --norm/--ffn instead of --designs")
    p.add_argument("--ffn", choices=["gelu", "swiglu", "geglu", "reglu"], default=None)
    p.add_argument("--norm-bias", action="store_true", help="RMSNorm with a learnable bias (beta), every design")
    p.add_argument("--recenter", action="store_true",
                   help="every design with LayerNorm without bias in place of its norm: mean subtraction back, "
                        "the FFN kept (the design token 'recenter'; overrides --norm-bias)")
    p.add_argument("--placement", choices=["pre", "post"], default="pre")
    p.add_argument("--layout", choices=["serial", "parallel"], default="serial")
    p.add_argument("--mean-shift", type=float, default=0.0,
                   help="constant added to the input of every FFN norm while training (every design)")
    p.add_argument("--probe-shift", type=float, default=DEFAULT_PROBE_SHIFT,
                   help="after training, evaluate with an extra mean shift into every FFN norm of this many "
                        "times the rms of that norm's input (default %(default)s; 0 turns the probe off)")
    p.add_argument("--backend", choices=["ffn", "torch"], default="ffn")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes and budget (default: gpu with CUDA, else cpu)")
    for name in ("d_model", "n_layers", "n_heads", "d_ff", "seq_len", "batch_size", "steps", "warmup",
                 "eval_every", "eval_windows", "telemetry_every", "ckpt_every"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None, help="overrides the preset")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (overrides the preset)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--no-ffn-bias", action="store_true", help="FFNs without biases (LLaMA-style)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--data", default=None, help="a UTF-8 text file to train on (default: the bundled corpus)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--name", default="ab", help="the run's directory under --out")
    p.add_argument("--out", default="runs")
    p.add_argument("--resume", action="store_true",
                   help="continue runs/<name>: finished designs are kept, others restart from their last checkpoint")
    p.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="stop after step STEP (after its checkpoint), as if killed; for resume tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots")
    return p


def resolve_args(argv=None):
    args = build_parser().parse_args(argv)
    preset = args.preset or ("gpu" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    args.preset = preset
    for key, value in PRESETS[preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.eval_every <= 0:
        args.eval_every = args.steps
    base = Design(norm_bias=True if args.norm_bias else None, placement=args.placement, layout=args.layout,
                  mean_shift=args.mean_shift)
    if args.norm or args.ffn:
        if args.designs:
            raise SystemExit("ab: give either --designs or --norm/--ffn, not both")
        if not (args.norm and args.ffn):
            raise SystemExit("ab: --norm and --ffn go together")
        specs = f"{args.norm}+{args.ffn}"
    else:
        specs = args.designs or DEFAULT_DESIGNS
    if args.recenter:
        specs = ",".join(f"{spec.strip()}+recenter" for spec in specs.split(",") if spec.strip())
    try:
        args.design_list = designgrammar.parse_designs(specs, base)
    except ValueError as e:
        raise SystemExit(f"ab: {e}") from None
    return args


def load_corpus(args, env):
    if args.data:
        path = Path(args.data)
    else:
        path = textdata.default_data_dir() / textdata.CORPUS_FILE
        if env.main and not path.exists():
            textdata.install_corpus()
        env.barrier()
    corpus = textdata.TextData(path)
    corpus.check_seq_len(args.seq_len)
    return corpus


def main(argv=None):
    args = resolve_args(argv)
    env = init_dist(args.device)
    if args.eval_windows < env.world:
        raise SystemExit(f"ab: --eval-windows {args.eval_windows} is fewer than the {env.world} ranks: "
                         "every rank needs a validation window")
    torch.manual_seed(args.seed)
    run_dir = Path(args.out) / args.name
    t_start = time.perf_counter()
    try:
        corpus = load_corpus(args, env)
        unigram = textdata.unigram_entropy(corpus.val)
        if env.main:
            if not args.resume:
                (run_dir / "metrics.jsonl").unlink(missing_ok=True)
                shutil.rmtree(run_dir / "tb", ignore_errors=True)
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"data: {corpus.path} ({len(corpus.train)} train / {len(corpus.val)} val bytes); "
                  f"unigram entropy of val: {unigram:.4f} nats/byte")
            print(f"preset {args.preset}: d_model={args.d_model} layers={args.n_layers} heads={args.n_heads} "
                  f"d_ff={args.d_ff} seq={args.seq_len} batch={args.batch_size}x{env.world} steps={args.steps} "
                  f"backend={args.backend} device={env.device} ranks={env.world}")
        env.barrier()
        log = MetricsLog(run_dir, env)
        results = []
        for spec, design in args.design_list:
            result_path = run_dir / designgrammar.run_label(spec) / "result.json"
            if args.resume and result_path.exists():
                results.append(json.loads(result_path.read_text()))
                continue
            result = train_design(spec, design, args, corpus, env, log, run_dir)
            if result is None:  # --stop-at
                return 0
            results.append(result)
        wall = time.perf_counter() - t_start
        if env.main:
            meta = {"args": {k: v for k, v in vars(args).items() if k != "design_list"},
                    "designs": [spec for spec, _ in args.design_list], "world_size": env.world,
                    "device": str(env.device), "data": str(corpus.path), "train_bytes": len(corpus.train),
                    "val_bytes": len(corpus.val), "unigram_entropy": unigram, "wall_s": wall,
                    "torch": torch.__version__, "threads": torch.get_num_threads()}
            atomic_write_text(run_dir / "run.json", json.dumps(meta, indent=1))
            from . import report

            print(report.terminal_table(results, meta))
            if not args.no_report:
                path = report.write_report(run_dir, results, meta)
                print(f"report: {path}")
            print(f"wall time: {wall:.1f} s")
        return 0
    finally:
        if env.world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
