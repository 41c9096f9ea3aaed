"""Runs harness command lines (ffn.harness.cli.main) in forked gloo process groups, for
tests/harness/test_parallel.py.

    python tests/harness/parallel_worker.py PLAN.json

PLAN.json: {"out": DIR, "groups": [{"world": N, "runs": [[arg, ...], ...]}, ...]}; a run
["@copy", SRC, DST] copies a run directory (rank 0), e.g. a stopped run to resume it
elsewhere too. For each group the parent (which imported torch, ffn and DTensor once) forks
N ranks that join one gloo process group (file:// rendezvous, OMP_NUM_THREADS=1, a 120 s
collective timeout) with the variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK),
and run every command line in order, as `torchrun --nproc-per-node=N -m ffn.harness ARGS`
would but without paying for N interpreter starts per run; init_dist uses the process
group it finds. Rank 0 writes DIR/group<I>.json (I: the group's index in the plan):
{"runs": [{"args", "ok", "error", "seconds"}]}, and each rank logs to DIR/group<I>.rank<R>.log.
A failing run stops its group (the others would wait on its collectives).
"""

import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import traceback

os.environ["OMP_NUM_THREADS"] = "1"

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.distributed.checkpoint  # noqa: E402,F401  (imported once, before the fork)
import torch.distributed.fsdp  # noqa: E402,F401
import torch.distributed.tensor.parallel  # noqa: E402,F401

import ffn  # noqa: E402,F401
from ffn.harness import cli  # noqa: E402


def rank_main(rank, index, world, rdv, runs, out):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    log = open(os.path.join(out, f"group{index}.rank{rank}.log"), "w")
    sys.stdout = sys.stderr = log
    results = []
    for args in runs:
        t0 = time.perf_counter()
        try:
            if args[0] == "@copy":  # ["@copy", SRC, DST]: rank 0 copies a run directory
                if rank == 0:
                    shutil.copytree(args[1], args[2])
                dist.barrier()
                continue
            rc = cli.main(args)
            error = None if rc == 0 else f"exit code {rc}"
        except BaseException:  # noqa: BLE001  (SystemExit included)
            error = traceback.format_exc(limit=12)[-4000:]
        results.append({"args": args, "ok": error is None, "error": error, "seconds": time.perf_counter() - t0})
        log.flush()
        if error is not None:
            break
    if rank == 0:
        with open(os.path.join(out, f"group{index}.json"), "w") as f:
            json.dump({"runs": results}, f, indent=1)
    if all(r["ok"] for r in results):
        dist.barrier()
        dist.destroy_process_group()
    log.close()
    os._exit(0)  # a rank whose peer failed must not wait for it


def main(plan_path):
    with open(plan_path) as f:
        plan = json.load(f)
    for index, group in enumerate(plan["groups"]):
        with tempfile.TemporaryDirectory() as tmp:
            args = (index, group["world"], os.path.join(tmp, "rdv"), group["runs"], plan["out"])
            mp.start_processes(rank_main, args=args, nprocs=group["world"], start_method="fork", join=True)


if __name__ == "__main__":
    main(sys.argv[1])
