"""The A/B report: terminal table, report.md with tables and findings, PNG plots.

Everything here is computed from the run's files (run.json, <design>/result.json,
metrics.jsonl), so `python -m ffn.harness.report runs/<name>` rebuilds a report, and
`python -m ffn.harness.report --studies RUN_DIR ... --out DIR` writes the case-study
answers of several runs as one.

    common.py     per-layer values and thresholds the others share
    tables.py     the summary (terminal and markdown), telemetry and probe tables
    findings.py   the findings: sentences from the measured numbers, thresholds stated
    plots.py      the PNG plots
    document.py   report.md
    combined.py   the case-study report across several runs (--studies)
    cli.py        the command line
"""

from .cli import main
from .document import write_report
from .findings import findings
from .tables import terminal_table

__all__ = ["findings", "main", "terminal_table", "write_report"]
