"""A/B training harness: trains several Transformer designs with the same seed, data
order and budget, logs per-layer FFN telemetry, probes a mean shift and int8 FFN
weights after training, and writes runs/<name>/ (metrics.jsonl, TensorBoard
events, checkpoints, report.md, plots).

    python -m ffn.harness                         # Design A vs B (+ interventions) on Shakespeare
    python -m ffn.harness --designs A,B,rms+gelu,ln+swiglu
    python -m ffn.harness --data my.txt --preset gpu
    torchrun --standalone --nproc-per-node=2 -m ffn.harness ...                 # DDP: gloo on CPU, nccl on GPU
    torchrun --standalone --nproc-per-node=4 -m ffn.harness --parallel fsdp ... # FSDP2
    torchrun --standalone --nproc-per-node=2 -m ffn.harness --parallel tp ...   # tensor parallel
    torchrun --standalone --nproc-per-node=8 -m ffn.harness --parallel fsdp+tp --tp 4 ...

Every design trains from the same seed on the same batches (a function of the seed
and the step), for the same number of steps. The global batch (--batch-size times the
number of data-parallel groups) is split across the data-parallel groups, and the ranks
of a tensor-parallel group read the same rows, so a run sees exactly the batches of a
one-process run with that batch. Checkpoints (torch.distributed.checkpoint) resume in any
mode and world size.
"""

import argparse
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from . import data as textdata
from . import designs as designgrammar
from .config import DEFAULT_DESIGNS, DEFAULT_PROBE_SHIFT, PRESETS, STUDY, RunConfig, TrainConfig
from .designs import FFNS, LAYOUTS, NORMS, PLACEMENTS, Design
from .processes import DEFAULT_TIMEOUT_S, PARALLEL_MODES, init_dist
from .files import RunLock
from .metrics import MetricsLog
from .model import BACKENDS
from .results import RunMeta
from .train import finished_result, member_label, run_identity, train_design

# The size and budget flags and the least value each takes (0: "off" or "at the end only").
_SIZE_FLAGS = {"d_model": 1, "n_layers": 1, "n_heads": 1, "d_ff": 1, "seq_len": 1, "batch_size": 1, "steps": 1,
               "warmup": 0, "eval_every": 0, "eval_windows": 1, "telemetry_every": 0, "ckpt_every": 0}


def int_at_least(low):
    """An argparse type: an integer >= low (argparse's error then names the flag)."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {value}")
        return value

    return parse


def finite_float(low=None, above=False):
    """An argparse type: a finite float, >= low (> low when `above`) when low is given."""
    bound = "" if low is None else f" {'>' if above else '>='} {low:g}"

    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text!r}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if above else value < low)):
            raise argparse.ArgumentTypeError(f"must be a finite number{bound}, got {text}")
        return value

    return parse


def build_parser():
    p = argparse.ArgumentParser(
        prog="ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=designgrammar.__doc__,
    )
    p.add_argument("--designs", default=None,
                   help=f"comma-separated designs (grammar below; default {DEFAULT_DESIGNS})")
    p.add_argument("--norm", choices=list(NORMS), default=None,
                   help="train one design built from --norm/--ffn instead of --designs")
    p.add_argument("--ffn", choices=list(FFNS), default=None)
    p.add_argument("--norm-bias", action="store_true", help="RMSNorm with a learnable bias (beta), every design")
    p.add_argument("--recenter", action="store_true",
                   help="every design with LayerNorm without bias in place of its norm: mean subtraction back, "
                        "the FFN kept (the design token 'recenter'; overrides --norm-bias)")
    p.add_argument("--placement", choices=list(PLACEMENTS), default="pre")
    p.add_argument("--layout", choices=list(LAYOUTS), default="serial")
    p.add_argument("--mean-shift", type=finite_float(), default=0.0,
                   help="constant added to the input of every FFN norm while training (every design)")
    p.add_argument("--probe-shift", type=finite_float(0), default=DEFAULT_PROBE_SHIFT,
                   help="after training, evaluate with an extra mean shift into every FFN norm of this many "
                        "times the rms of that norm's input (default %(default)s; 0 turns the probe off)")
    p.add_argument("--backend", choices=list(BACKENDS), default="ffn")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the training model, either backend (evaluation and probes run it "
                        "uncompiled); the seconds spent compiling are reported apart from tokens/s. Off by "
                        "default: on CPU a design's compile (tens of seconds, a C++ compiler needed) costs more "
                        "than the presets' steps gain (README)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="sizes and budget (default: gpu with CUDA, else cpu)")
    for name, low in _SIZE_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int_at_least(low), default=None,
                       help="overrides the preset" + (" (0: off)" if name in ("telemetry_every", "ckpt_every") else
                                                      " (0: at the end only)" if name == "eval_every" else ""))
    p.add_argument("--lr", type=finite_float(0, above=True), default=None,
                   help="peak learning rate (overrides the preset)")
    p.add_argument("--weight-decay", type=finite_float(0), default=0.1)
    p.add_argument("--grad-clip", type=finite_float(0, above=True), default=1.0)
    p.add_argument("--no-ffn-bias", action="store_true", help="FFNs without biases (LLaMA-style)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--seeds", type=int_at_least(1), default=None,
                   help="train every design with N seeds (--seed, --seed+1, ...): initialization and batch order "
                        "vary with the seed and are paired across designs; the report gives means, 95%% t intervals "
                        f"and paired differences (default 1; the study preset: {STUDY['seeds']})")
    p.add_argument("--lrs", default=None, metavar="LR,LR,...",
                   help="a learning-rate sweep: every design at each peak lr (same seeds), e.g. 1e-3,3e-3,1e-2")
    p.add_argument("--data", default=None, help="a UTF-8 text file to train on (default: the bundled corpus)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--parallel", choices=list(PARALLEL_MODES), default="ddp",
                   help="under torchrun: ddp (default), fsdp (FSDP2), tp (tensor parallel over all ranks), "
                        "fsdp+tp (a 2-D mesh: tensor parallel in groups of --tp ranks, FSDP2 across them); "
                        "--batch-size is per data-parallel group. One process ignores it")
    p.add_argument("--tp", type=int_at_least(1), default=None, metavar="N",
                   help="the tensor-parallel degree of --parallel fsdp+tp (consecutive ranks: keep it within a host)")
    p.add_argument("--dist-timeout", type=finite_float(0, above=True), default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
                   help="under torchrun: how long a collective waits for the other ranks before the run stops "
                        "with an error (a rank that hangs or died; default %(default)g)")
    p.add_argument("--name", default="ab", help="the run's directory under --out")
    p.add_argument("--out", default="runs")
    p.add_argument("--resume", action="store_true",
                   help="continue runs/<name>: finished designs are kept, others restart from their last checkpoint")
    p.add_argument("--stop-at", type=int_at_least(1), default=None, metavar="STEP",
                   help="stop after step STEP (after its checkpoint), as if killed; for resume tests")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-report", action="store_true", help="skip report.md and plots")
    return p


def parse_config(argv=None):
    """The RunConfig the command line asks for (SystemExit with a message on a bad one)."""
    args = build_parser().parse_args(argv)
    preset = args.preset or ("gpu" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    train = TrainConfig.from_preset(
        preset, **{name: getattr(args, name) for name in (*_SIZE_FLAGS, "lr")},
        weight_decay=args.weight_decay, grad_clip=args.grad_clip, ffn_bias=not args.no_ffn_bias, seed=args.seed,
        backend=args.backend, compile=args.compile,
    )
    if train.d_model % train.n_heads:
        raise SystemExit(f"ab: --d-model {train.d_model} must be a multiple of --n-heads {train.n_heads}")
    base = Design(norm_bias=True if args.norm_bias else None, placement=args.placement, layout=args.layout,
                  mean_shift=args.mean_shift)
    if args.norm or args.ffn:
        if args.designs:
            raise SystemExit("ab: give either --designs or --norm/--ffn, not both")
        if not (args.norm and args.ffn):
            raise SystemExit("ab: --norm and --ffn go together")
        specs = f"{args.norm}+{args.ffn}"
    else:
        specs = args.designs or (STUDY["designs"] if preset == "study" else DEFAULT_DESIGNS)
    if args.recenter:
        specs = ",".join(f"{spec.strip()}+recenter" for spec in specs.split(",") if spec.strip())
    try:
        designs = tuple(designgrammar.parse_designs(specs, base))
    except ValueError as e:
        raise SystemExit(f"ab: {e}") from None
    seeds = args.seeds if args.seeds is not None else (STUDY["seeds"] if preset == "study" else 1)
    lrs = None
    if args.lrs:
        try:
            lrs = tuple(float(v) for v in args.lrs.split(",") if v.strip())
        except ValueError:
            raise SystemExit(f"ab: --lrs {args.lrs!r}: give comma-separated numbers, e.g. 1e-3,3e-3") from None
        if not lrs or len(set(lrs)) != len(lrs) or min(lrs) <= 0:
            raise SystemExit(f"ab: --lrs {args.lrs!r}: give distinct positive learning rates")
    return RunConfig(train=train, designs=designs, preset=preset, data=args.data, device=args.device,
                     name=args.name, out=args.out, resume=args.resume, stop_at=args.stop_at,
                     probe_shift=args.probe_shift, progress=not args.no_progress, report=not args.no_report,
                     seeds=seeds, lrs=lrs)


def members(run):
    """(spec, design, TrainConfig, label, group) of every training of the run, in order: per
    learning rate, per seed, every design (so an interrupted run has whole seeds)."""
    from dataclasses import replace

    out = []
    for lr in run.lrs or (run.train.lr,):
        for k in range(run.seeds):
            config = replace(run.train, seed=run.train.seed + k, lr=lr)
            for spec, design in run.designs:
                group = f"{spec}@lr={lr:g}" if run.lrs else spec
                out.append((spec, design, config, member_label(spec, k, lr, run), group))
    return out


def load_corpus(run, env):
    if run.data:
        path = Path(run.data)
    else:
        path = textdata.default_data_dir() / textdata.CORPUS_FILE
        if env.main and not path.exists():
            textdata.install_corpus()
        env.barrier()
    corpus = textdata.TextData(path)
    corpus.check_seq_len(run.train.seq_len)
    return corpus


def main(argv=None):
    run = parse_config(argv)
    args = build_parser().parse_args(argv)
    config = run.train
    env = init_dist(run.device, args.parallel, args.tp, timeout_s=args.dist_timeout)
    if config.eval_windows < env.world:
        raise SystemExit(f"ab: --eval-windows {config.eval_windows} is fewer than the {env.world} ranks: "
                         "every rank needs a validation window")
    torch.manual_seed(config.seed)
    run_dir = Path(run.out) / run.name
    t_start = time.perf_counter()
    lock = RunLock(run_dir)
    try:
        if config.compile and env.device.type == "cpu":
            check_cpu_compiler()
        lock_run_dir(lock, env)
        corpus = load_corpus(run, env)
        unigram = textdata.unigram_entropy(corpus.val)
        todo = members(run)
        if env.main:
            if not run.resume:
                start_afresh(run_dir, [label for *_, label, _group in todo])
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"data: {corpus.path} ({len(corpus.train)} train / {len(corpus.val)} val bytes); "
                  f"unigram entropy of val: {unigram:.4f} nats/byte")
            print(f"preset {run.preset}: d_model={config.d_model} layers={config.n_layers} heads={config.n_heads} "
                  f"d_ff={config.d_ff} seq={config.seq_len} batch={config.batch_size}x{env.dp_world} "
                  f"steps={config.steps} backend={config.backend}{' compiled' if config.compile else ''} "
                  f"device={env.device} ranks={env.world} "
                  + (f"parallel={env.parallel}" + (f" tp={env.tp_world} " if env.uses_tp else " ")
                     if env.world > 1 else "") +
                  f"seeds={run.seeds}" + (f" lrs={','.join(f'{v:g}' for v in run.lrs)}" if run.lrs else ""))
        env.barrier()
        log = MetricsLog(run_dir, env)
        results = []
        # Every finished member is checked against this run's settings before anything trains.
        finished = {label: finished_result(run_dir / label, run_identity(run, design, env, member_config,
                                                                         corpus.sha256), env)
                    for spec, design, member_config, label, group in todo} if run.resume else {}
        for spec, design, member_config, label, group in todo:
            if finished.get(label) is not None:
                results.append(finished[label])
                continue
            result = train_design(spec, design, run, corpus, env, log, run_dir, member_config, label, group)
            if result is None:  # --stop-at
                return 0
            results.append(result)
        wall = time.perf_counter() - t_start
        if env.main:
            parallel = {"parallel": env.parallel, "tp": env.tp_world, "dp": env.dp_world}
            meta = RunMeta(config={**run.to_dict(), **parallel}, designs=[spec for spec, _ in run.designs],
                           world_size=env.world,
                           device=str(env.device), data=str(corpus.path), train_bytes=len(corpus.train),
                           val_bytes=len(corpus.val), unigram_entropy=unigram, wall_s=wall,
                           torch=torch.__version__, threads=torch.get_num_threads(),
                           members=[m[3] for m in todo], seeds=[run.train.seed + k for k in range(run.seeds)],
                           lrs=list(run.lrs) if run.lrs else None)
            meta.save(run_dir)
            from . import report

            print(report.terminal_table(results, meta))
            if run.report:
                path = report.write_report(run_dir, results, meta)
                print(f"report: {path}")
            print(f"wall time: {wall:.1f} s")
        return 0
    finally:
        lock.release()
        env.close()


def start_afresh(run_dir, labels):
    """A run without --resume starts every member from scratch: an earlier run's files in run_dir
    (its metrics, run.json, and each member's checkpoints and result.json) are removed, or a later
    --resume would take them for this run's and finish with members that have no metrics."""
    stale = [run_dir / name for name in ("metrics.jsonl", "run.json", "tb", *labels) if (run_dir / name).exists()]
    if stale:
        print(f"ab: starting {run_dir} afresh: removing the earlier run's {', '.join(p.name for p in stale)} "
              "(--resume continues a run instead)")
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def check_cpu_compiler():
    """SystemExit unless Inductor finds the C++ compiler it builds CPU kernels with."""
    from torch._inductor import cpp_builder, exc

    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler as e:
        raise SystemExit(f"ab: --compile on CPU needs a C++ compiler for Inductor (set CXX to one): {e}") from None


def lock_run_dir(lock, env):
    """Rank 0 locks the run directory for the whole run; every rank stops with its message
    when another run holds it."""
    refusal = None
    if env.main:
        try:
            lock.acquire()
        except SystemExit as e:
            refusal = str(e)
    if env.all_reduce_max_(torch.tensor([refusal is not None], dtype=torch.int32, device=env.device)).item():
        raise SystemExit(refusal or f"ab: {lock.path.parent} is in use by another run (see rank 0)")


if __name__ == "__main__":
    sys.exit(main())
