#!/usr/bin/env python3
"""The A/B main job: `python scripts/ab.py --help` (the code lives in ffn.harness)."""

import os
import sys

# OpenMP threads that spin while waiting collapse (5x slower steps, measured) when the
# cores are shared with other work; waiting passively costs little when they are not.
# libgomp reads this when torch loads, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ffn.harness.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
