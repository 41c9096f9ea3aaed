"""The one-call GPU proof: everything that shows the CUDA kernels work on a real
GPU, for a bare H100/H200 machine (Python, torch with CUDA, pytest, nvcc, no
network), in one command that ends within a time budget.

    python scripts/gpu_check.py OUT_DIR [--budget 480]       (make gpu-check OUT=...)

Stages, each with its own time limit (and never past the overall budget); a
stage that fails or runs out of time is reported and the next one still runs:

  environment   torch, CUDA, the device, nvcc, compute-sanitizer, Liger-Kernel
  install       the prebuilt wheel of `make wheel` (dist/ffn-*.whl, stable ABI
                and abi3: it loads into the GPU machine's torch and Python);
                nothing is compiled on the GPU machine. The device tool carries
                it with the working tree: run(..., carry=["dist"])
  cuda-tests    pytest -k cuda: tests/test_cuda.py and the cuda cases of the
                device-parametrized tests
  memcheck      compute-sanitizer --tool memcheck  } on scripts/sanitizer_workload.py:
  racecheck     compute-sanitizer --tool racecheck } every kernel forward and
  synccheck     compute-sanitizer --tool synccheck } backward, every row policy
  norm-plans    scripts/norm_plan_sweep.py: every row plan of the norm kernels
                forced and timed on the benchmark shapes (norm_plans.json, .md),
                within its own budget (the stage's limit less 15 s of startup)
  bench         scripts/bench.py --device cuda (against eager, torch.compile and
                Liger-Kernel when importable)

Logs go to OUT_DIR/<stage>.log, the summary to OUT_DIR/gpu_check.json (and on
stdout). Without a GPU it says so, runs what needs none (environment), and
exits 0 with status "no-gpu"; with one, the exit code is 0 only if every stage
passed.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds per stage, in order of what matters most: the install, the tests, the
# sanitizers, the plan sweep (a fixed cost, sized to its budget), then the
# benchmark, which gets what is left of the default 8 minutes (it saves every
# shape as it goes, so a cut-off run keeps what it measured).
STAGE_LIMITS = {
    "install": 60,
    "cuda-tests": 150,
    "memcheck": 40,
    "racecheck": 40,
    "synccheck": 25,
    "norm-plans": 45,
    "bench": 105,
}
# What the plan sweep leaves of its stage limit for starting Python, torch and CUDA.
SWEEP_STARTUP_S = 15
DEFAULT_BUDGET_S = 480


def environment():
    info = {"python": sys.version.split()[0], "nvcc": shutil.which("nvcc"),
            "compute_sanitizer": shutil.which("compute-sanitizer")}
    try:
        import torch
    except ImportError as e:
        info["torch"] = f"not importable: {e}"
        return info
    info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, gpu=torch.cuda.is_available())
    if info["gpu"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    try:  # a wheel installed before this check (the install stage reinstalls it anyway)
        import ffn  # noqa: F401

        info["ffn_cuda_kernels"] = torch._C._dispatch_has_kernel_for_dispatch_key("ffn::_rms_norm_fwd", "CUDA")
    except Exception as e:  # noqa: BLE001
        info["ffn_cuda_kernels"] = f"ffn not importable ({type(e).__name__})"
    try:
        import liger_kernel  # noqa: F401
        info["liger_kernel"] = getattr(liger_kernel, "__version__", "importable")
    except Exception as e:  # noqa: BLE001
        info["liger_kernel"] = f"not importable ({type(e).__name__})"
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        info["commit"] = commit.stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def run_stage(name, cmd, out_dir, limit, env=None):
    """Runs cmd with a time limit; its output goes to OUT_DIR/<name>.log."""
    log_path = os.path.join(out_dir, f"{name}.log")
    start = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
            status = "passed" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
            rc, status = None, "timeout"
    seconds = round(time.monotonic() - start, 1)
    with open(log_path) as f:
        tail = f.read()[-1500:]
    print(f"[gpu-check] {name}: {status} in {seconds} s (limit {limit} s) -> {log_path}", flush=True)
    return {"status": status, "returncode": rc, "seconds": seconds, "limit_s": limit, "log": log_path, "tail": tail}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="where logs and JSON go (created)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole check (default {DEFAULT_BUDGET_S})")
    p.add_argument("--skip", nargs="*", default=[], choices=sorted(STAGE_LIMITS), help="stages not to run")
    args = p.parse_args()
    deadline = time.monotonic() + args.budget
    os.makedirs(args.out_dir, exist_ok=True)
    out_dir = os.path.abspath(args.out_dir)
    summary = {"environment": environment(), "stages": {}}
    env_info = summary["environment"]
    print("[gpu-check] " + json.dumps(env_info), flush=True)

    def write_summary():
        with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
            json.dump(summary, f, indent=1)

    if not env_info.get("gpu"):
        summary["status"] = "no-gpu"
        summary["reason"] = ("torch sees no CUDA device" if "torch_cuda" in env_info
                             else "torch is not importable")
        write_summary()
        print(f"[gpu-check] no GPU here ({summary['reason']}): checked the environment only; nothing failed.")
        return 0

    py = sys.executable
    wheels = sorted(glob.glob(os.path.join(ROOT, "dist", "ffn-*.whl")))[-1:]
    sanitizer = env_info["compute_sanitizer"]
    workload = [py, os.path.join(ROOT, "scripts", "sanitizer_workload.py")]
    stages = [
        ("install", [py, "-m", "pip", "install", "--no-index", "--no-deps", "--force-reinstall", *wheels], None),
        ("cuda-tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", "-k", "cuda"], None),
        ("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", *workload], None),
        ("racecheck", [sanitizer, "--tool", "racecheck", "--racecheck-report", "all", "--error-exitcode", "1",
                       *workload, "--quick"], None),
        ("synccheck", [sanitizer, "--tool", "synccheck", "--error-exitcode", "1", *workload, "--quick"], None),
        ("norm-plans", lambda limit: [py, "scripts/norm_plan_sweep.py", "--budget", str(max(limit - SWEEP_STARTUP_S, 5)),
                                      "--json", os.path.join(out_dir, "norm_plans.json"),
                                      "--markdown", os.path.join(out_dir, "norm_plans.md")], None),
        ("bench", [py, "scripts/bench.py", "--device", "cuda", "--json", os.path.join(out_dir, "bench.json"),
                   "--markdown", os.path.join(out_dir, "bench.md")], None),
    ]
    built = True
    for name, cmd, env in stages:
        left = deadline - time.monotonic()
        if name in args.skip:
            summary["stages"][name] = {"status": "skipped", "reason": "--skip"}
        elif not built and name != "install":
            summary["stages"][name] = {"status": "skipped", "reason": "the wheel did not install"}
        elif not wheels:
            summary["stages"][name] = {"status": "failed",
                                       "reason": "no dist/ffn-*.whl: run `make wheel` and carry dist/"}
        elif not callable(cmd) and cmd[0] is None:
            summary["stages"][name] = {"status": "skipped", "reason": "compute-sanitizer not found"}
        elif left < 10:
            summary["stages"][name] = {"status": "skipped", "reason": "out of the overall time budget"}
        else:
            limit = min(STAGE_LIMITS[name], int(left))
            # A stage with its own budget is given the limit it runs under.
            summary["stages"][name] = run_stage(name, cmd(limit) if callable(cmd) else cmd, out_dir, limit, env)
            built = built and (name != "install" or summary["stages"][name]["status"] == "passed")
        write_summary()
    statuses = [s["status"] for s in summary["stages"].values()]
    summary["status"] = "passed" if all(s in ("passed",) for s in statuses) else "failed"
    write_summary()
    print(f"[gpu-check] {summary['status']}: " + ", ".join(f"{k} {v['status']}" for k, v in summary["stages"].items()))
    return 0 if summary["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
