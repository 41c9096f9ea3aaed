"""python -m ffn.harness.report RUN_DIR: rebuilds report.md and the plots from a run's files.
python -m ffn.harness.report --studies RUN_DIR [RUN_DIR ...] --out DIR: the case-study report
across experiments (combined.py) in DIR."""

import argparse

from ..results import load_run
from .combined import write_studies_report
from .document import write_report
from .tables import terminal_table


def main(argv=None):
    parser = argparse.ArgumentParser(description="Rebuild report.md and the plots of an A/B run, or write the "
                                                 "case-study report across several runs.")
    parser.add_argument("run_dir", nargs="?", help="the run whose report.md to rebuild")
    parser.add_argument("--studies", nargs="+", metavar="RUN_DIR",
                        help="write one case-study report from these runs (with --out) instead")
    parser.add_argument("--out", help="the directory --studies writes report.md and its plots into")
    args = parser.parse_args(argv)
    if args.studies:
        if args.run_dir is not None:
            parser.error(f"give either RUN_DIR or --studies, not both (got RUN_DIR {args.run_dir!r})")
        if not args.out:
            parser.error("--studies needs --out DIR, the directory to write the report into")
        try:
            path = write_studies_report(args.studies, args.out)
        except FileNotFoundError as e:
            parser.error(f"--studies: {e}")
        print(f"report: {path}")
        return 0
    if args.run_dir is None:
        parser.error("expected RUN_DIR, or --studies RUN_DIR [RUN_DIR ...] --out DIR")
    if args.out:
        parser.error("--out goes with --studies; RUN_DIR's report is written into RUN_DIR")
    try:
        meta, results = load_run(args.run_dir)
    except FileNotFoundError as e:
        parser.error(str(e))
    print(terminal_table(results, meta))
    print(f"report: {write_report(args.run_dir, results, meta)}")
    return 0
