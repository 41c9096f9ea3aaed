"""For tests/harness/test_faults.py, under torchrun with 2 ranks: init_dist with a collective
timeout of argv[1] seconds, then rank 1 hangs while rank 0 waits in a barrier."""

import sys
import time

from ffn.harness.processes import init_dist

timeout = float(sys.argv[1])
env = init_dist("cpu", "ddp", timeout_s=timeout)
if env.rank == 1:
    time.sleep(120)
t0 = time.perf_counter()
try:
    env.barrier()
except Exception as e:  # noqa: BLE001  (whatever the backend raises on a timeout)
    print(f"rank 0: the collective failed after {time.perf_counter() - t0:.1f} s: {type(e).__name__}: {e}",
          flush=True)
    sys.exit(3)
