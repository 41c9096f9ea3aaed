"""What a run produces, as objects: one DesignResult per design (result.json) and the
RunMeta of the run (run.json). The report reads these, not string-keyed dicts."""

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .config import TrainConfig
from .designs import Design, run_label
from .files import atomic_write_text

# Per layer, the keys of ffn.telemetry.summarize() (telemetry) and of
# probes.OFFSET_KEYS (offsets): open tables of floats, kept as dicts.
LayerStats = dict[str, float]


@dataclass
class ShiftProbe:
    """The post-training mean-shift probe of one design (probes.py)."""

    shift_rms_units: float  # the shift, in units of each FFN norm input's rms
    norm_input_rms: list[float]  # per layer
    shifts: list[float]  # per layer, the absolute shift added
    val_loss: float  # validation loss with the shift
    telemetry: list[LayerStats] | None  # validation telemetry with the shift
    offsets: list[LayerStats]  # per layer: input_offset, gate_offset, down_in_offset


@dataclass
class DesignResult:
    spec: str  # as given in --designs
    label: str  # its directory name
    description: str  # canonical spelled-out form
    design: Design
    backend: str
    params: int
    ffn_params_per_layer: int
    d_ff: int
    steps: int
    tokens_seen: int
    final_val_loss: float
    final_train_loss: float  # mean of the last 10 steps
    tokens_per_s: float  # wall clock, telemetry steps included (their telemetry and compile seconds not)
    tokens_per_s_without_telemetry: float | None
    telemetry_overhead: float | None  # paired, median (metrics.paired_overhead)
    telemetry_overhead_clock: str
    memory_bytes: int
    memory_kind: str
    int8_val_loss: float  # int8 FFN weights
    int4_val_loss: float  # int4 FFN weights
    int8_h_val_loss: float  # int8 down-projection input
    int8_delta: float
    int4_delta: float
    int8_h_delta: float
    telemetry_val: list[LayerStats] | None  # validation telemetry at the end of training
    shift_probe: ShiftProbe | None
    # Seeds and learning-rate sweeps: which member of the run this is.
    seed: int | None = None
    lr: float | None = None
    group: str | None = None  # the spec, or spec@lr=... in a learning-rate sweep: what seeds average over
    health: dict | None = None  # health.health_flags
    outliers_val: list[LayerStats] | None = None  # outliers.OUTLIER_KEYS per layer, validation windows
    w8a8_val_loss: dict | None = None  # quant.W8A8_MODES -> validation loss
    w8a8_delta: dict | None = None
    vshift_probe: dict | None = None  # {shifts, val_loss, telemetry}: the per-sequence shift probe
    identity: dict | None = None  # train.run_identity: what --resume checks a finished member against
    compile_s: float | None = None  # --compile: seconds spent compiling, kept out of the step times; None: eager

    def __post_init__(self):
        if self.group is None:
            self.group = self.spec

    def to_json(self):
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_dict(cls, data):
        data = dict(data)
        data["design"] = Design(**data["design"])
        if data["shift_probe"] is not None:
            data["shift_probe"] = ShiftProbe(**data["shift_probe"])
        return cls(**data)

    def save(self, design_dir):
        atomic_write_text(Path(design_dir) / "result.json", self.to_json())

    @classmethod
    def load(cls, design_dir):
        return cls.from_dict(json.loads((Path(design_dir) / "result.json").read_text()))


@dataclass
class RunMeta:
    config: dict  # RunConfig.to_dict(): the training settings and the run's options
    designs: list[str]  # the specs, in order
    world_size: int
    device: str
    data: str
    train_bytes: int
    val_bytes: int
    unigram_entropy: float
    wall_s: float
    torch: str
    threads: int
    members: list[str] | None = None  # the result directories, in order (None: one per design)
    seeds: list[int] | None = None
    lrs: list[float] | None = None

    def train_config(self):
        """The shared training settings of the run."""
        return TrainConfig(**self.config["train"])

    def labels(self):
        return self.members or [run_label(spec) for spec in self.designs]

    def save(self, run_dir):
        atomic_write_text(Path(run_dir) / "run.json", json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir):
        data = json.loads((Path(run_dir) / "run.json").read_text())
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def load_run(run_dir):
    """(RunMeta, [DesignResult]) of a finished run directory; FileNotFoundError saying what is
    missing for one that has not finished."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(f"{run_dir} holds no finished run (no run.json): an A/B run writes it when "
                                "every design has trained; continue an interrupted one with --resume")
    meta = RunMeta.load(run_dir)
    missing = [label for label in meta.labels() if not (run_dir / label / "result.json").exists()]
    if missing:
        raise FileNotFoundError(f"{run_dir}: no result.json for {', '.join(missing)} of its run: the run did not "
                                "finish; continue it with --resume")
    return meta, [DesignResult.load(run_dir / label) for label in meta.labels()]
