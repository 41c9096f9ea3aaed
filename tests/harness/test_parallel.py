"""The harness under FSDP2, tensor parallel and FSDP2 x TP, with 2 and 4 gloo processes on
CPU, against the one-process run; DCP checkpoints that resume bit-exact and load into
other world sizes and modes.

All runs train the tiny preset (6 steps, 4 heads so that tensor parallelism over 4 ranks
splits the heads) with a global batch of 4 sequences: --batch-size is per data-parallel
group, so 4 in one process and under TP, 2 under FSDP2 on 2 ranks or FSDP2 x TP on 2x2,
1 under FSDP2 on 4 ranks. The multi-process runs are command lines of `python -m
ffn.harness` run by parallel_worker.py in two forked process groups (2, then 4 ranks);
the module fixture runs them once and the tests read their metrics.jsonl and result.json.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ffn import distributed as fd
from ffn.harness import checkpoint, cli
from ffn.harness.processes import Dist, _check_mode
from ffn.harness.evaluate import evaluate
from ffn.harness.model import TransformerLM
from ffn.harness.parallel import check_tp_sizes
from ffn.harness.train import make_optimizer, model_config

from .tiny import read_metrics, run_args

WORKER = Path(__file__).with_name("parallel_worker.py")
COMMON = ("--steps", "6", "--n-heads", "4", "--ckpt-every", "2", "--no-report")
QUIET = ("--telemetry-every", "0", "--probe-shift", "0")  # runs whose losses alone are compared
# Relative, per step: float32 sums taken in another order (split GEMMs, all-reduces and
# reduce-scatters of partial sums, per-shard gradient norms) change a loss by a few ulps
# (measured at most 2e-7 over these 6 AdamW steps, i.e. <2 float32 eps); a real fault (a
# gradient not reduced, a wrong share of the batch, permuted weights) moves the losses by
# far more than 1e-4 after the first update.
TOL = 2e-5

NEEDS_STRIDED = pytest.mark.skipif(
    not fd.strided_shard_supported(),
    reason=f"the harness's tensor parallelism (the packed qkv, and w_gate_up of gated FFNs) needs _StridedShard "
           f"support (torch >= "
           f"{'.'.join(map(str, fd.STRIDED_SHARD_MIN_TORCH))}); this is torch {torch.__version__}")


def _plan(out):
    def run(name, *extra):
        return run_args(out, name, *COMMON, *extra)

    runs = out / "runs"
    fsdp2 = ("--designs", "B", "--batch-size", "2", "--parallel", "fsdp", *QUIET)
    tp2 = ("--batch-size", "4", "--parallel", "tp")
    tp = fd.strided_shard_supported()  # else only the FSDP2 runs (the TP tests skip)
    two = [
        run("fsdp2", *fsdp2),
        run("fsdp2_stop", *fsdp2, "--stop-at", "3"),
        ["@copy", str(runs / "fsdp2_stop"), str(runs / "fsdp2_to_w4")],
        *([run("tp2", "--designs", "A,B", *tp2),  # telemetry and probes on
           run("tp2_stop", "--designs", "B", *tp2, *QUIET, "--stop-at", "3"),
           ["@copy", str(runs / "tp2_stop"), str(runs / "tp2_to_w1")],
           ["@copy", str(runs / "tp2_stop"), str(runs / "tp2_to_w4")]] if tp else []),
        run("fsdp2_stop", *fsdp2, "--resume"),
        *([run("tp2_stop", "--designs", "B", *tp2, *QUIET, "--resume")] if tp else []),
    ]
    fsdp_tp4 = ("--batch-size", "2", "--parallel", "fsdp+tp", "--tp", "2")
    four = [
        run("fsdp4", "--designs", "B", "--batch-size", "1", "--parallel", "fsdp", *QUIET),
        *([run("tp4", "--designs", "A,B", "--batch-size", "4", "--parallel", "tp", *QUIET),
           run("fsdp_tp4", "--designs", "B", *fsdp_tp4)] if tp else []),  # telemetry and probes on
        run("fsdp2_to_w4", "--designs", "B", "--batch-size", "1", "--parallel", "fsdp", *QUIET, "--resume"),
        *([run("tp2_to_w4", "--designs", "B", *fsdp_tp4, *QUIET, "--resume")] if tp else []),
    ]
    return {"out": str(out), "groups": [{"world": 2, "runs": two}, {"world": 4, "runs": four}]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel")
    assert cli.main(run_args(out, "one", "--designs", "A,B", *COMMON, "--batch-size", "4")) == 0
    plan = out / "plan.json"
    plan.write_text(json.dumps(_plan(out)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(WORKER), str(plan)], env=env, capture_output=True, text=True,
                          timeout=600)
    reports = [out / f"group{i}.json" for i in range(2)]
    failed = [r for p in reports if p.exists() for r in json.loads(p.read_text())["runs"] if not r["ok"]]
    if done.returncode != 0 or failed or not all(p.exists() for p in reports):
        logs = "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(out.glob("group*.rank0.log")))
        pytest.fail(f"parallel_worker.py failed (rc={done.returncode}): {failed}\n{done.stderr[-3000:]}\n{logs}")
    # A checkpoint written by 2 tensor-parallel ranks, resumed by one process.
    tp_ckpt = checkpoint.path_of(out / "runs" / "tp2" / "B")
    if fd.strided_shard_supported():
        assert cli.main(run_args(out, "tp2_to_w1", "--designs", "B", *COMMON, "--batch-size", "4", *QUIET,
                                 "--resume")) == 0
    return Runs(out, tp_ckpt)


class Runs:
    def __init__(self, out, tp_ckpt):
        self.out, self.tp_ckpt = out, tp_ckpt

    def losses(self, name, design, kind="train", key="loss"):
        return [r[key] for r in read_metrics(self.out, name, kind) if r["design"] == design]

    def result(self, name, design):
        return json.loads((self.out / "runs" / name / design / "result.json").read_text())

    def run_json(self, name):
        return json.loads((self.out / "runs" / name / "run.json").read_text())


def _rel(ours, theirs):
    assert len(ours) == len(theirs) > 0
    return max(abs(a - b) / abs(b) for a, b in zip(ours, theirs))


def assert_matches_one_process(runs, name, design):
    one, dist = runs.losses("one", design), runs.losses(name, design)
    assert len(dist) == 6
    assert _rel(dist, one) <= TOL, (name, design, dist, one)
    assert one[-1] < one[0] - 0.3, "the run must learn something for the comparison to mean anything"
    val_one, val = runs.losses("one", design, "eval", "val_loss"), runs.losses(name, design, "eval", "val_loss")
    assert _rel(val, val_one) <= TOL, (name, design, val, val_one)


@pytest.mark.parametrize("name, world", [("fsdp2", 2), ("fsdp4", 4)])
def test_fsdp_matches_one_process(runs, name, world):
    assert_matches_one_process(runs, name, "B")
    meta = runs.run_json(name)
    assert (meta["world_size"], meta["config"]["parallel"], meta["config"]["dp"]) == (world, "fsdp", world)


@NEEDS_STRIDED
@pytest.mark.parametrize("name, world", [("tp2", 2), ("tp4", 4)])
@pytest.mark.parametrize("design", ["A", "B"])  # GELU FFN (w1 Shard(0)) and SwiGLU (w_gate_up _StridedShard)
def test_tensor_parallel_matches_one_process(runs, name, world, design):
    assert_matches_one_process(runs, name, design)
    meta = runs.run_json(name)
    assert (meta["world_size"], meta["config"]["parallel"], meta["config"]["tp"]) == (world, "tp", world)


@NEEDS_STRIDED
def test_fsdp_x_tp_on_a_2d_mesh_matches_one_process(runs):
    assert_matches_one_process(runs, "fsdp_tp4", "B")
    meta = runs.run_json("fsdp_tp4")["config"]
    assert (meta["parallel"], meta["dp"], meta["tp"]) == ("fsdp+tp", 2, 2)


@NEEDS_STRIDED
@pytest.mark.parametrize("name, kinds", [("tp2", ("telemetry", "optim", "outliers")), ("fsdp_tp4", ("optim",))])
def test_telemetry_and_probes_match_one_process(runs, name, kinds):
    """Training telemetry and the end-of-training evaluation and probes (on the gathered
    replica) give the one-process numbers. Under TP alone every rank sees the whole batch, so
    the per-step FFN statistics (forward_with_preact on the sharded FFNs) and outliers (rank
    0's batch) compare too; with data parallelism, as under DDP, those are per-rank batch
    statistics (thresholds and rank 0's share of the batch), and only the gradient norms and
    update ratios are global. The W8A8 errors round activations to int8: a last-ulp change
    may move a value to the next step, hence their looser tolerance."""
    for kind in kinds:
        ours, theirs = read_metrics(runs.out, name, kind), read_metrics(runs.out, "one", kind)
        ours, theirs = [r for r in ours if r["design"] == "B"], [r for r in theirs if r["design"] == "B"]
        assert ours and len(ours) == len(theirs), kind
        for a, b in zip(ours, theirs):
            for key, value in b.items():
                if isinstance(value, float):
                    rel = 2e-2 if key.startswith("w8a8_") else 1e-4
                    assert a[key] == pytest.approx(value, rel=rel, abs=1e-6, nan_ok=True), (kind, key, a["step"])
                else:
                    assert a[key] == value, (kind, key)
    ours, theirs = runs.result(name, "B"), runs.result("one", "B")
    for key in ("final_val_loss", "int8_val_loss", "int4_val_loss", "int8_h_val_loss"):
        assert ours[key] == pytest.approx(theirs[key], rel=TOL), key
    for a, b in zip(ours["shift_probe"]["offsets"], theirs["shift_probe"]["offsets"]):
        for key, value in b.items():
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("stopped, straight", [
    ("fsdp2_stop", "fsdp2"), pytest.param("tp2_stop", "tp2", marks=NEEDS_STRIDED)])
def test_resume_is_bit_exact(runs, stopped, straight):
    """Stopped after step 3 (last checkpoint: step 2), resumed with the same world size: the
    losses, validation losses and final evaluation are those of the uninterrupted run."""
    assert runs.losses(stopped, "B") == runs.losses(straight, "B")
    assert runs.losses(stopped, "B", "eval", "val_loss") == runs.losses(straight, "B", "eval", "val_loss")
    assert runs.result(stopped, "B")["final_val_loss"] == runs.result(straight, "B")["final_val_loss"]


@pytest.mark.parametrize("name", [
    "fsdp2_to_w4",  # FSDP2 on 2 ranks -> FSDP2 on 4
    pytest.param("tp2_to_w4", marks=NEEDS_STRIDED),  # TP on 2 ranks -> FSDP2 x TP on 2x2
    pytest.param("tp2_to_w1", marks=NEEDS_STRIDED),  # TP on 2 ranks -> one process
])
def test_checkpoint_resumes_in_another_world_size(runs, name):
    """A checkpoint written by 2 ranks continues with 4 or 1: steps 0-1 are the 2-rank run's
    (its history), steps 2-5 are trained after loading, all within float32 rounding of
    the one-process run."""
    assert_matches_one_process(runs, name, "B")


@NEEDS_STRIDED
def test_tensor_parallel_checkpoint_loads_exactly_into_one_process(runs, tmp_path):
    """The final DCP checkpoint of the 2-rank TP run (w_gate_up and qkv as _StridedShard)
    loaded into a plain model and optimizer: every tensor equals the one DCP's own converter
    reads (dcp_to_torch_save), and the model evaluates to the run's final validation loss."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    run = cli.parse_config(run_args(runs.out, "x", "--designs", "B", *COMMON, "--batch-size", "4"))
    model = TransformerLM(model_config(run.train, run.designs[0][1]))
    optimizer = make_optimizer(model, run.train)
    env = Dist()
    checkpoint.load(runs.tp_ckpt, model, optimizer, env)
    state = checkpoint.read_train_state(runs.tp_ckpt)
    assert state["step"] == 6
    dcp_to_torch_save(runs.tp_ckpt, tmp_path / "full.pt")
    full = torch.load(tmp_path / "full.pt", weights_only=False)
    for name, param in model.named_parameters():
        assert torch.equal(param, full["model"][name]), name
        moments = optimizer.state[param]
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(moments[key], full["optim"]["state"][name][key]), (name, key)
    corpus = cli.load_corpus(run, env)
    val, _ = evaluate(model, corpus.val, run.train, env)
    assert val == pytest.approx(runs.result("tp2", "B")["final_val_loss"], rel=TOL)


def test_parallel_mode_errors():
    with pytest.raises(SystemExit, match="needs --tp"):
        _check_mode("fsdp+tp", None, 4)
    with pytest.raises(SystemExit, match="must divide"):
        _check_mode("fsdp+tp", 3, 4)
    with pytest.raises(SystemExit, match="fsdp\\+tp"):
        _check_mode("tp", 2, 4)
    with pytest.raises(SystemExit, match="--tp 2 needs"):
        _check_mode("fsdp", 2, 4)
    assert _check_mode("fsdp+tp", 2, 4) == 2 and _check_mode("tp", None, 4) == 4
    run = cli.parse_config(["--preset", "tiny", "--designs", "B"])
    with pytest.raises(SystemExit, match="--n-heads \\(2\\)"):
        check_tp_sizes(model_config(run.train, run.designs[0][1]), 4)


def test_checkpoint_of_an_older_version_still_resumes(tmp_path):
    """A design directory holding a ckpt.pt in the torch.save format of earlier versions
    resumes in one process, bit-exact."""
    common = ("--designs", "B", "--steps", "4", "--ckpt-every", "2", "--no-report", *QUIET)
    assert cli.main(run_args(tmp_path, "straight", *common)) == 0
    assert cli.main(run_args(tmp_path, "old", *common, "--stop-at", "3")) == 0
    design_dir = tmp_path / "runs" / "old" / "B"
    run = cli.parse_config(run_args(tmp_path, "old", *common))
    model = TransformerLM(model_config(run.train, run.designs[0][1]))
    optimizer = make_optimizer(model, run.train)
    path = checkpoint.find(design_dir)
    checkpoint.load(path, model, optimizer, Dist())
    state = checkpoint.read_train_state(path)
    torch.save({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
               design_dir / checkpoint.LEGACY_FILE)
    shutil.rmtree(path)
    assert checkpoint.find(design_dir) == design_dir / checkpoint.LEGACY_FILE
    assert cli.main(run_args(tmp_path, "old", *common, "--resume")) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path, "old")]
    assert len(losses) == 4 and losses == [r["loss"] for r in read_metrics(tmp_path, "straight")]
    assert checkpoint.find(design_dir) == checkpoint.path_of(design_dir)  # saved in the new format since
