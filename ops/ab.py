"""`python -m ffn.ab`: the A/B harness (ffn.harness) under its first name."""

import sys

from .harness.cli import main

if __name__ == "__main__":
    sys.exit(main())
