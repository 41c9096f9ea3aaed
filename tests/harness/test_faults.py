"""The harness under faults and bad input: damaged and truncated checkpoints, changed data
or settings on --resume, torn metrics lines and a full disk, two runs on one directory,
numeric flags out of range, the collective timeout."""

import errno
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ffn.harness import checkpoint, cli, metrics, processes
from ffn.harness.processes import Dist
from ffn.harness.files import LOCK_FILE, RunLock, atomic_write_text
from ffn.harness.metrics import MetricsLog

from .tiny import read_metrics, run_args

COMMON = ("--designs", "B", "--steps", "4", "--ckpt-every", "2", "--no-report", "--telemetry-every", "0",
          "--probe-shift", "0")


def stopped_run(tmp_path, name, stop_at=2, *extra):
    """A run killed (--stop-at) after step `stop_at`, its last checkpoint at that step."""
    assert cli.main(run_args(tmp_path, name, *COMMON, *extra, "--stop-at", str(stop_at))) == 0
    return tmp_path / "runs" / name / "B"


def flip_bits(path, at=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x5A
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- checkpoints
def test_a_damaged_checkpoint_is_named_and_never_loaded(tmp_path):
    design_dir = stopped_run(tmp_path, "flipped")
    distcp = next(checkpoint.path_of(design_dir).glob("*.distcp"))
    flip_bits(distcp)  # a few bits of tensor data: DCP itself loads it without complaint
    with pytest.raises(SystemExit, match=rf"{distcp.name} is damaged: its sha256 differs.*Nothing was loaded"):
        cli.main(run_args(tmp_path, "flipped", *COMMON, "--resume"))
    assert not (design_dir / "result.json").exists()


@pytest.mark.parametrize("name", ["train.pt", "__0_0.distcp"])
def test_a_truncated_checkpoint_file_is_named(tmp_path, name):
    design_dir = stopped_run(tmp_path, "cut")
    path = checkpoint.path_of(design_dir) / name
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(SystemExit, match=rf"{name} is truncated or damaged: \d+ bytes, \d+ written"):
        cli.main(run_args(tmp_path, "cut", *COMMON, "--resume"))


@pytest.mark.parametrize("name", ["train.pt", "__0_0.distcp"])
def test_a_truncated_file_of_a_checkpoint_without_checksums_is_named(tmp_path, name):
    """Checkpoints of older versions carry no sha256.json: their readers' errors name the file."""
    design_dir = stopped_run(tmp_path, "old")
    ckpt = checkpoint.path_of(design_dir)
    (ckpt / checkpoint.MANIFEST).unlink()
    path = ckpt / name
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    with pytest.raises(SystemExit, match=rf"cannot (read|load) the checkpoint (file )?{ckpt}"):
        cli.main(run_args(tmp_path, "old", *COMMON, "--resume"))


def test_a_damaged_latest_checkpoint_falls_back_to_an_intact_older_one(tmp_path, capfd):
    """A save killed after moving the previous checkpoint to ckpt.old leaves both; when the
    newer one is damaged the older one is used, the run says so, and it ends bit-exact."""
    six = ("--steps", "6")
    assert cli.main(run_args(tmp_path, "straight", *COMMON, *six)) == 0
    design_dir = stopped_run(tmp_path, "fallback", 2, *six)
    kept = tmp_path / "step2"
    shutil.copytree(checkpoint.path_of(design_dir), kept)
    assert cli.main(run_args(tmp_path, "fallback", *COMMON, *six, "--stop-at", "4", "--resume")) == 0
    shutil.copytree(kept, design_dir / "ckpt.old")
    flip_bits(checkpoint.path_of(design_dir) / checkpoint.TRAIN_STATE)
    capfd.readouterr()
    assert cli.main(run_args(tmp_path, "fallback", *COMMON, *six, "--resume")) == 0
    err = capfd.readouterr().err
    assert "train.pt is damaged" in err and f"resuming from the older checkpoint {design_dir / 'ckpt.old'}" in err
    losses = [r["loss"] for r in read_metrics(tmp_path, "fallback")]
    assert len(losses) == 6 and losses == [r["loss"] for r in read_metrics(tmp_path, "straight")]


# ----------------------------------------------------------------------------- run identity
def test_resume_refuses_data_whose_contents_changed(tmp_path):
    stopped_run(tmp_path, "data")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus.read_text().replace("king", "duke"))  # same path, other bytes
    with pytest.raises(SystemExit, match=r"other settings \(data_sha256: '[0-9a-f]{64}' -> '[0-9a-f]{64}'\)"):
        cli.main(run_args(tmp_path, "data", *COMMON, "--resume"))


@pytest.mark.parametrize("flag, value, diff", [("--seed", "7", "seed: 1234 -> 7"),
                                               ("--d-model", "16", "d_model: 32 -> 16")])
def test_resume_of_a_finished_run_refuses_other_settings(tmp_path, flag, value, diff):
    assert cli.main(run_args(tmp_path, "done", *COMMON)) == 0
    run_json = tmp_path / "runs" / "done" / "run.json"
    before = run_json.read_bytes()
    with pytest.raises(SystemExit, match=diff):
        cli.main(run_args(tmp_path, "done", *COMMON, flag, value, "--resume"))
    assert run_json.read_bytes() == before
    assert cli.main(run_args(tmp_path, "done", *COMMON, "--resume")) == 0  # the same settings: kept


# ----------------------------------------------------------------------------- metrics.jsonl
def test_resume_drops_a_torn_last_metrics_line_and_says_so(tmp_path, capfd):
    assert cli.main(run_args(tmp_path, "straight", *COMMON)) == 0
    stopped_run(tmp_path, "torn", 3)
    path = tmp_path / "runs" / "torn" / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"design": "B", "step": 3, "kind": "tra')  # the process died mid-line
    capfd.readouterr()
    assert cli.main(run_args(tmp_path, "torn", *COMMON, "--resume")) == 0
    assert "ignored its torn last line" in capfd.readouterr().err
    assert [r["loss"] for r in read_metrics(tmp_path, "torn")] == \
        [r["loss"] for r in read_metrics(tmp_path, "straight")]


def test_a_bad_metrics_line_before_the_last_is_an_error_naming_it(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"design": "B", "step": 0, "kind": "train"}\n{"desi\n{"design": "B", "step": 1, "kind": "train"}\n')
    with pytest.raises(SystemExit, match=rf"{path}, line 2: not a JSON record"):
        metrics.read_records(path)


def test_a_full_disk_names_the_metrics_file_and_leaves_no_half_line(tmp_path, monkeypatch):
    log = MetricsLog(tmp_path, Dist())
    log._append('{"design": "B", "step": 0}\n')
    real_write = os.write

    def disk_fills_up(fd, data):
        real_write(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(metrics.os, "write", disk_fills_up)
    with pytest.raises(OSError, match="No space left on device") as caught:
        log._append('{"design": "B", "step": 1}\n')
    assert caught.value.filename == str(log.path)
    assert log.path.read_text() == '{"design": "B", "step": 0}\n'


def test_a_full_disk_names_the_file_an_atomic_write_could_not_write(tmp_path, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device") as caught:
        atomic_write_text(tmp_path / "result.json", "{}")
    assert caught.value.filename == str(tmp_path / "result.json")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- the run lock
def test_a_second_run_on_a_locked_directory_refuses(tmp_path):
    run_dir = tmp_path / "runs" / "busy"
    lock = RunLock(run_dir).acquire()  # as a run in progress holds it
    try:
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {os.getpid()}, lock {run_dir / LOCK_FILE}\)"):
            cli.main(run_args(tmp_path, "busy", *COMMON))
    finally:
        lock.release()
    assert not (run_dir / "B").exists()  # refused before touching anything
    assert cli.main(run_args(tmp_path, "busy", *COMMON)) == 0


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run_dir = tmp_path / "runs" / "stale"
    run_dir.mkdir(parents=True)
    (run_dir / LOCK_FILE).write_text(f"{dead.pid}\n")
    assert cli.main(run_args(tmp_path, "stale", *COMMON)) == 0
    assert (run_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"


def test_a_lock_held_by_another_process_blocks(tmp_path):
    run_dir = tmp_path / "runs" / "other"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ffn.harness.files import RunLock; "
                               f"lock = RunLock({str(run_dir)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit, match=rf"in use by another run \(pid {holder.pid},"):
            cli.main(run_args(tmp_path, "other", *COMMON))
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "argument --steps: must be an integer >= 1, got 0"),
    ("--batch-size", "0", "argument --batch-size: must be an integer >= 1, got 0"),
    ("--seq-len", "0", "argument --seq-len: must be an integer >= 1, got 0"),
    ("--n-heads", "0", "argument --n-heads: must be an integer >= 1, got 0"),
    ("--d-model", "-4", "argument --d-model: must be an integer >= 1, got -4"),
    ("--eval-windows", "0", "argument --eval-windows: must be an integer >= 1, got 0"),
    ("--warmup", "-1", "argument --warmup: must be an integer >= 0, got -1"),
    ("--ckpt-every", "x", "argument --ckpt-every: must be an integer >= 0, got 'x'"),
    ("--seeds", "0", "argument --seeds: must be an integer >= 1, got 0"),
    ("--lr", "0", "argument --lr: must be a finite number > 0, got 0"),
    ("--lr", "inf", "argument --lr: must be a finite number > 0, got inf"),
    ("--grad-clip", "0", "argument --grad-clip: must be a finite number > 0, got 0"),
    ("--weight-decay", "-0.1", "argument --weight-decay: must be a finite number >= 0, got -0.1"),
    ("--probe-shift", "nan", "argument --probe-shift: must be a finite number >= 0, got nan"),
    ("--dist-timeout", "0", "argument --dist-timeout: must be a finite number > 0, got 0"),
])
def test_numeric_flags_out_of_range_are_argparse_errors_naming_the_flag(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.parse_config(["--preset", "tiny", flag, value])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_heads_that_do_not_divide_the_width_are_named():
    with pytest.raises(SystemExit, match="--d-model 32 must be a multiple of --n-heads 5"):
        cli.parse_config(["--preset", "tiny", "--n-heads", "5"])


# ----------------------------------------------------------------------------- collective timeout
def test_dist_timeout_reaches_the_process_group(monkeypatch):
    seen = {}

    def fake_init_dist(device, parallel, tp, timeout_s):
        seen["timeout_s"] = timeout_s
        raise SystemExit("stop here")

    monkeypatch.setattr(cli, "init_dist", fake_init_dist)
    for argv, want in (([], processes.DEFAULT_TIMEOUT_S), (["--dist-timeout", "42"], 42.0)):
        with pytest.raises(SystemExit, match="stop here"):
            cli.main(["--preset", "tiny", *argv])
        assert seen["timeout_s"] == want
    assert processes.DEFAULT_TIMEOUT_S == 600


def test_a_hung_rank_ends_the_run_after_the_timeout(tmp_path):
    """Two gloo ranks: rank 1 hangs, rank 0's barrier fails after --dist-timeout (3 s)
    instead of waiting torch's 30 minutes, and the run stops."""
    worker = Path(__file__).with_name("hang_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), "3"], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t0
    assert done.returncode != 0
    assert "rank 0: the collective failed after" in done.stdout + done.stderr, done.stderr[-3000:]
    assert elapsed < 60
