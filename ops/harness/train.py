"""The training loop of one design: same seed, batches and budget for every design;
checkpoints (DCP, checkpoint.py) and --resume; under torchrun DDP, FSDP2, tensor parallel
or FSDP2 x TP (processes.py, parallel.py), on the batches of a one-process run.

train_design puts together the pieces below, one job each: build (seeding, the model, its
sharding and optimizer), restore (--resume: the run identity, the checkpoint, the RNG),
for_training (the DDP wrapper), batch_of (this rank's share of a step's batch), the step's
telemetry (measured outside its timed region, then logged), and finish_design (evaluation,
probes, performance, health)."""

import contextlib
import math
import random
import shutil
import statistics
import sys
import time
from dataclasses import asdict, fields

import torch

from . import checkpoint
from . import data as textdata
from . import health as healthmod
from . import parallel as par
from .. import telemetry
from .outliers import captured, model_outliers
from .designs import describe, run_label
from .evaluate import evaluate, evaluate_design, layer_summaries
from .metrics import SKIP_TIMING_STEPS, compile_seconds, cpu_step_memory, paired_overhead
from .model import ModelConfig, TransformerLM, ffn_param_count, param_count
from .results import DesignResult

# TrainConfig fields a checkpoint's losses do not depend on: resuming with any other
# setting changed would silently continue a different run (e.g. --steps moves the LR schedule).
# torch.compile changes the losses only by float rounding: a run may resume with it on or off.
_NOT_IDENTITY = ("batch_size", "eval_every", "eval_windows", "telemetry_every", "ckpt_every", "compile")


def lr_at(step, config):
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model, config):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95),
    )


def model_config(config, design):
    return ModelConfig(vocab_size=textdata.VOCAB_SIZE, seq_len=config.seq_len, d_model=config.d_model,
                       n_layers=config.n_layers, n_heads=config.n_heads, d_ff=config.d_ff,
                       ffn_bias=config.ffn_bias, design=design, backend=config.backend)


def run_identity(run, design, env, config, data_sha256):
    """What a checkpoint's losses depend on, the data's contents included: compared on --resume."""
    train = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _NOT_IDENTITY}
    return {**train, "data": run.data, "data_sha256": data_sha256, "design": asdict(design),
            "global_batch": config.batch_size * env.dp_world}


def check_resumable(saved, current, source, env):
    """SystemExit naming every setting in which `saved` (the identity a checkpoint or a finished
    result was trained with, read from `source`) differs from the current run's."""
    if "data_sha256" not in saved:  # written before identities held the data's hash
        saved = {**saved, "data_sha256": current["data_sha256"]}
        if env.main:
            print(f"ab: {source} was written by an older version that recorded no hash of the data: "
                  "the data's contents are not checked", file=sys.stderr)
    changed = sorted(key for key in current.keys() | saved.keys() if saved.get(key) != current.get(key))
    if changed:
        diffs = ", ".join(f"{key}: {saved.get(key)!r} -> {current.get(key)!r}" for key in changed)
        raise SystemExit(f"ab: cannot --resume {source}: it was trained with other settings ({diffs}); "
                         "resume with the original flags and data, or use another --name")


def finished_result(design_dir, identity, env):
    """The DesignResult of a member that finished in an earlier run (--resume), after checking
    it was trained as this run asks; None if it has not finished."""
    path = design_dir / "result.json"
    if not path.exists():
        return None
    result = DesignResult.load(design_dir)
    if result.identity is None:
        if env.main:
            print(f"ab: {path} was written by an older version that recorded no run identity: kept unchecked",
                  file=sys.stderr)
    else:
        check_resumable(result.identity, identity, path, env)
    return result


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


def _progress(total, initial, desc, env, run):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not env.main or not run.progress,
                dynamic_ncols=True, mininterval=1.0, file=sys.stderr)


def _train_summaries(stats, env):
    """Per-layer telemetry summaries of a training step's raw sums, combined over the
    data-parallel groups (the ranks of a tensor-parallel group computed the same sums)."""
    if env.parallel in ("tp", "fsdp+tp"):
        if env.dp_world > 1:
            telemetry.all_reduce_(stats, group=env.dp_group)
        return [telemetry.summarize(layer) for layer in stats]
    return layer_summaries(stats, env)


def member_label(spec, seed_index, lr, run):
    """The result directory of one member of a run: the design's label, plus @lr=... in a
    learning-rate sweep and @s<seed> with more than one seed (one seed, one lr: the label alone)."""
    label = run_label(spec)
    if run.lrs:
        label += f"@lr={lr:g}"
    if run.seeds > 1:
        label += f"@s{run.train.seed + seed_index}"
    return label


def build(config, design, env):
    """Seeds, then (mconfig, model, replica, optimizer): the model sharded as env asks, with a
    plain replica on every rank of a sharded mode for evaluation, probes and telemetry."""
    mconfig = model_config(config, design)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model = TransformerLM(mconfig).to(env.device)
    replica = None
    if env.sharded:
        par.parallelize(model, config, env)
        replica = par.make_replica(mconfig, env.device)
    return mconfig, model, replica, make_optimizer(model, config)


def restore(run, design_dir, identity, model, optimizer, env):
    """(start step, history): with --resume, those of design_dir's newest intact checkpoint,
    loaded into model and optimizer with its RNG state once it is shown to be this run's;
    otherwise a fresh start in an emptied design_dir."""
    ckpt_path = checkpoint.find(design_dir, report=_warn if env.main else None) if run.resume else None
    start_step, history = 0, {"step_times": [], "cpu_times": [], "telemetry_steps": [], "losses": []}
    if ckpt_path is not None:
        state = checkpoint.read_train_state(ckpt_path)
        check_resumable(state["run"], identity, ckpt_path, env)
        checkpoint.load(ckpt_path, model, optimizer, env)
        set_rng_state(state["rng"], env)
        start_step, history = state["step"], state["history"]
    elif env.main:
        shutil.rmtree(design_dir, ignore_errors=True)
    env.barrier()
    if env.main:
        design_dir.mkdir(parents=True, exist_ok=True)
    return start_step, history


def _warn(message):
    print(message, file=sys.stderr)


def for_training(model, env):
    """The module the steps call: DDP's wrapper under --parallel ddp, else the model itself."""
    if env.parallel != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)


def batch_of(corpus, config, env, step):
    """This rank's rows of step's global batch (its data-parallel group's share)."""
    global_batch = config.batch_size * env.dp_world
    offsets = textdata.batch_offsets(len(corpus.train), config.seq_len, global_batch, config.seed, step)
    mine = offsets[env.dp_rank * config.batch_size:(env.dp_rank + 1) * config.batch_size]
    return textdata.get_batch(corpus.train, mine, config.seq_len, env.device)


class StepTelemetry:
    """The telemetry of one training step beyond the forward's own statistics: gradient norms,
    parameters before the update (for update ratios) and post-activation outliers, measured
    between backward and the optimizer step, with the seconds that took (not the step's)."""

    def __init__(self, model, replica, caps, env):
        t0, c0 = time.perf_counter(), time.process_time()
        view = model if replica is None else par.sync_replica(model, replica, grads=True)
        self.grad_norms = healthmod.grad_norms(view)
        self.before = [[p.detach().clone() for p in ps] for ps in healthmod.layer_params(view)]
        self.outliers = model_outliers(view, caps) if env.main else None
        self.wall, self.cpu = time.perf_counter() - t0, time.process_time() - c0

    def log(self, log, label, step, stats, updated_model, total_grad, env):
        """Logs the step's per-layer telemetry, gradient norms, update ratios and outliers."""
        for layer, summary in enumerate(_train_summaries(torch.stack(stats), env)):
            log.record(label, step, "telemetry", layer=layer, **summary)
        ratios = healthmod.update_ratios(self.before, updated_model)
        for layer, (g, u) in enumerate(zip(self.grad_norms, ratios)):
            log.record(label, step, "optim", layer=layer, grad_norm=g, update_ratio=u,
                       grad_norm_total=float(total_grad))
        for layer, values in enumerate(self.outliers or []):
            log.record(label, step, "outliers", layer=layer, **values)
        self.before = None


def train_design(spec, design, run, corpus, env, log, run_dir, config=None, label=None, group=None):
    """Trains one design for config.steps steps (config: run.train, or a member's copy with
    its own seed and lr); returns its DesignResult, or None if stopped early by run.stop_at."""
    config = config or run.train
    label = label or run_label(spec)
    design_dir = run_dir / label
    mconfig, model, replica, optimizer = build(config, design, env)
    identity = run_identity(run, design, env, config, corpus.sha256)
    start_step, history = restore(run, design_dir, identity, model, optimizer, env)
    train_model = for_training(model, env)
    if config.compile:
        train_model = torch.compile(train_model)
    # FSDP2's MixedPrecisionPolicy replaces autocast (torchtitan's way); other modes autocast.
    train_autocast = par.mixed_precision(config, env) is None or not env.uses_fsdp

    def plain_model():
        """The model as plain tensors: itself, or the replica with the current parameters."""
        return model if replica is None else par.sync_replica(model, replica)

    log.open_design(label, start_step)
    if env.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(env.device)
    progress = _progress(total=config.steps, initial=start_step, desc=f"{spec} ({describe(design)})", env=env, run=run)
    for step in range(start_step, config.steps):
        x, y = batch_of(corpus, config, env, step)
        with_tel = config.telemetry_every > 0 and (step % config.telemetry_every == 0 or step == config.steps - 1)
        stats = [] if with_tel else None
        lr = lr_at(step, config)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        env.sync()
        compiled_before = compile_seconds() if config.compile else None
        t0, c0 = time.perf_counter(), time.process_time()
        with captured(model) if with_tel else contextlib.nullcontext() as caps:
            with env.autocast(config.amp and train_autocast):
                _, loss = train_model(x, y, stats=stats)
        loss.backward()
        tel = StepTelemetry(model, replica, caps, env) if with_tel else None
        if env.sharded:
            total_grad = par.clip_grad_norm_(model.parameters(), config.grad_clip)
        else:
            total_grad = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        env.sync()
        step_time, cpu_time = time.perf_counter() - t0, time.process_time() - c0
        if tel is not None:  # the telemetry's own cost is not the step's
            step_time, cpu_time = step_time - tel.wall, cpu_time - tel.cpu
        if compiled_before is not None:  # nor is compiling: its seconds are reported apart
            wall, cpu = (now - before for now, before in zip(compile_seconds(), compiled_before))
            step_time, cpu_time = step_time - wall, cpu_time - cpu
            history["compile_s"] = history.get("compile_s", 0.0) + wall
        loss_value = float(env.dp_all_reduce_(loss.detach().double().clone()) / env.dp_world)
        for key, value in (("step_times", step_time), ("cpu_times", cpu_time), ("telemetry_steps", with_tel),
                           ("losses", loss_value)):
            history[key].append(value)
        log.record(label, step, "train", loss=loss_value, lr=lr, step_time=step_time, telemetry=with_tel)
        if tel is not None:
            tel.log(log, label, step, stats, plain_model(), total_grad, env)
        if not math.isfinite(loss_value):  # diverged: nothing more to learn from this design
            progress.update(1)
            break
        if (step + 1) % config.eval_every == 0 and step + 1 < config.steps:
            val_loss, _ = evaluate(plain_model(), corpus.val, config, env)
            log.record(label, step, "eval", val_loss=val_loss)
            progress.set_postfix(loss=f"{loss_value:.3f}", val=f"{val_loss:.3f}")
        else:
            progress.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
        progress.update(1)
        if config.ckpt_every and ((step + 1) % config.ckpt_every == 0 or step + 1 == config.steps):
            checkpoint.save(design_dir, model, optimizer,
                            {"step": step + 1, "run": identity, "rng": rng_state(env), "history": history}, env)
        if run.stop_at is not None and step + 1 == run.stop_at:
            progress.close()
            log.close_design()
            return None
    progress.close()
    result = finish_design(spec, design, mconfig, plain_model(), run, corpus, env, history, config, label, group,
                           identity)
    log.record(label, config.steps - 1, "eval", val_loss=result.final_val_loss)
    if env.main:
        result.save(design_dir)
    log.close_design()
    return result


def finish_design(spec, design, mconfig, model, run, corpus, env, history, config=None, label=None, group=None,
                  identity=None):
    """The DesignResult of a trained model: evaluation and probes, performance figures, and
    the run identity it was trained with (checked when a --resume finds it finished)."""
    config = config or run.train
    peak_cuda = torch.cuda.max_memory_allocated(env.device) if env.device.type == "cuda" else None
    evaluation = evaluate_design(model, corpus, config, env, run.probe_shift)
    tokens_per_step = config.batch_size * env.dp_world * config.seq_len
    step_times = history["step_times"]
    # CPU time per step on CPU (a shared machine's waits do not count), wall time on CUDA.
    cost = step_times if env.device.type == "cuda" else history["cpu_times"]
    steps_run = len(step_times)
    plain = [t for t, tel in list(zip(step_times, history["telemetry_steps"]))[SKIP_TIMING_STEPS:] if not tel]
    if peak_cuda is not None:
        memory, memory_kind = peak_cuda, "cuda peak allocated"
    else:
        x, y = textdata.get_batch(corpus.train, textdata.batch_offsets(len(corpus.train), config.seq_len,
                                                                        config.batch_size, config.seed, 0),
                                  config.seq_len, env.device)
        memory, memory_kind = cpu_step_memory(model, x, y), "cpu params+grads+adam+saved activations"
        if env.sharded:  # measured on the plain replica: one process's memory, not a shard's
            memory_kind += " (unsharded model)"
    quantized = evaluation.quantized_val_loss
    health = healthmod.health_flags(history["losses"], evaluation.val_loss, textdata.unigram_entropy(corpus.val))
    health["steps_run"] = steps_run
    return DesignResult(
        spec=spec, label=label or run_label(spec), description=describe(design), design=design, backend=config.backend,
        params=param_count(model),
        ffn_params_per_layer=ffn_param_count(mconfig.d_model, mconfig.ffn_width, design.gated, mconfig.ffn_bias),
        d_ff=mconfig.ffn_width, steps=config.steps, tokens_seen=tokens_per_step * config.steps,
        final_val_loss=evaluation.val_loss,
        final_train_loss=statistics.fmean(history["losses"][-10:]),
        tokens_per_s=tokens_per_step * len(step_times) / sum(step_times),
        tokens_per_s_without_telemetry=tokens_per_step / statistics.median(plain) if plain else None,
        telemetry_overhead=paired_overhead(cost, history["telemetry_steps"]),
        telemetry_overhead_clock="wall" if env.device.type == "cuda" else "process cpu time",
        memory_bytes=memory, memory_kind=memory_kind,
        int8_val_loss=quantized["int8"], int4_val_loss=quantized["int4"], int8_h_val_loss=quantized["int8_h"],
        int8_delta=quantized["int8"] - evaluation.val_loss, int4_delta=quantized["int4"] - evaluation.val_loss,
        int8_h_delta=quantized["int8_h"] - evaluation.val_loss,
        telemetry_val=evaluation.telemetry_val, shift_probe=evaluation.shift_probe,
        seed=config.seed, lr=config.lr, group=group or spec, health=health, outliers_val=evaluation.outliers_val,
        w8a8_val_loss=evaluation.w8a8_val_loss,
        w8a8_delta={k: v - evaluation.val_loss for k, v in evaluation.w8a8_val_loss.items()},
        vshift_probe=evaluation.vshift_probe, identity=identity,
        compile_s=history.get("compile_s", 0.0) if config.compile else None,
    )
