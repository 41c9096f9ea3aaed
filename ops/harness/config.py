"""Typed configuration of an A/B run: the training settings every design shares
(TrainConfig), the run around them (RunConfig), and the presets."""

from dataclasses import asdict, dataclass, fields, replace

from .designs import Design

# Sizes and budgets. `cpu` is the default and is sized for a 2-core machine.
PRESETS = {
    "cpu": dict(d_model=96, n_layers=4, n_heads=4, d_ff=384, seq_len=128, batch_size=16, steps=120,
                lr=3e-3, warmup=12, eval_every=40, eval_windows=128, telemetry_every=10,
                ckpt_every=40, amp=False),
    "gpu": dict(d_model=512, n_layers=8, n_heads=8, d_ff=2048, seq_len=512, batch_size=64, steps=3000,
                lr=1e-3, warmup=200, eval_every=250, eval_windows=1024, telemetry_every=25,
                ckpt_every=500, amp=True),
    # The multi-seed study (STUDY below), sized by pilots on the shared 2-core CPU (README):
    # batch 32 (21k tokens/s vs 18k at batch 16 with two idle threads: CPU steps are compute-bound,
    # d_model 128 ran at 14k), 500 steps = 2.05M tokens, lr 8e-3 (final val 1.850 for A, 1.835 for
    # B+recenter; 500 steps at lr 4e-3: 1.912 for B; 400 steps at lr 1e-2: 1.912 for A).
    # The full study: mean val 1.830-1.852 per design, 33.5 min with a C++ build running alongside.
    "study": dict(d_model=96, n_layers=4, n_heads=4, d_ff=384, seq_len=128, batch_size=32, steps=500,
                  lr=8e-3, warmup=30, eval_every=125, eval_windows=128, telemetry_every=50,
                  ckpt_every=250, amp=False),
    # The case-study experiments (make study-2x2 / study-shift / study-layout, 3 seeds each):
    # the study's model, batch and lr at half its budget (250 steps, 1.02M tokens), so that
    # each target fits well under an hour on 2 cores (README gives the measured times).
    "short": dict(d_model=96, n_layers=4, n_heads=4, d_ff=384, seq_len=128, batch_size=32, steps=250,
                  lr=8e-3, warmup=15, eval_every=125, eval_windows=128, telemetry_every=25,
                  ckpt_every=125, amp=False),
    # A few seconds per design: for tests and smoke runs.
    "tiny": dict(d_model=32, n_layers=2, n_heads=2, d_ff=96, seq_len=32, batch_size=4, steps=4,
                 lr=3e-3, warmup=2, eval_every=2, eval_windows=8, telemetry_every=2,
                 ckpt_every=2, amp=False),
}
# The study (--preset study): several seeds of the default designs plus the per-sequence
# shift experiment, sized by measurement to fit 30 minutes on a 2-core CPU (README).
STUDY = dict(seeds=3, designs="A,B,B+bias,B+recenter")
DEFAULT_DESIGNS = "A,B,B+bias,B+recenter"
DEFAULT_PROBE_SHIFT = 1.0  # in units of the rms of each FFN norm's input


@dataclass(frozen=True)
class TrainConfig:
    """What every design of a run trains with: sizes, budget, optimizer, seed."""

    d_model: int
    n_layers: int
    n_heads: int
    d_ff: int  # the GELU FFN's width; gated FFNs use ffn.harness.model.gated_d_ff of it
    seq_len: int
    batch_size: int  # per rank
    steps: int
    lr: float  # peak
    warmup: int
    eval_every: int
    eval_windows: int
    telemetry_every: int  # 0: no telemetry
    ckpt_every: int  # 0: no checkpoints
    amp: bool  # bf16 autocast on CUDA
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    ffn_bias: bool = True
    seed: int = 1234
    backend: str = "ffn"  # "ffn" ops or plain "torch"
    compile: bool = False  # torch.compile of the training forward (evaluation and probes run uncompiled)

    @classmethod
    def from_preset(cls, preset, **overrides):
        """The preset's settings with every override that is not None."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        known = {f.name for f in fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"TrainConfig has no settings {sorted(unknown)}")
        config = cls(**PRESETS[preset])
        config = replace(config, **{k: v for k, v in overrides.items() if v is not None})
        return config if config.eval_every > 0 else replace(config, eval_every=config.steps)


@dataclass(frozen=True)
class RunConfig:
    """One A/B run: the designs, the shared training settings, where it reads and writes."""

    train: TrainConfig
    designs: tuple[tuple[str, Design], ...]  # (spec as given, Design), in order
    preset: str = "cpu"
    data: str | None = None  # a text file; None: the bundled corpus
    device: str = "auto"  # auto | cpu | cuda
    name: str = "ab"
    out: str = "runs"
    resume: bool = False
    stop_at: int | None = None  # stop after this step, as if killed (resume tests)
    probe_shift: float = DEFAULT_PROBE_SHIFT  # 0: no shift probe
    seeds: int = 1  # seed k of every design: train.seed + k (initialization and batches)
    lrs: tuple[float, ...] | None = None  # a learning-rate sweep: every design at each
    progress: bool = True
    report: bool = True

    def to_dict(self):
        """JSON-ready settings (run.json), designs as their specs."""
        out = asdict(self)
        out["designs"] = [spec for spec, _ in self.designs]
        return out
