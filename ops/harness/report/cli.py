"""python -m ffn.harness.report RUN_DIR: rebuilds report.md and the plots from a run's files."""

import argparse

from ..results import load_run
from .document import write_report
from .tables import terminal_table


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rebuild report.md and the plots of an A/B run.")
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    meta, results = load_run(args.run_dir)
    print(terminal_table(results, meta))
    print(f"report: {write_report(args.run_dir, results, meta)}")
    return 0
