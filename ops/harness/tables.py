"""Markdown tables and number cells: the one table helper of the harness report, its
studies and the benchmark scripts (scripts/benchmarking.py)."""

import math


def isnum(value):
    """A finite real number: what a table can print and a mean, a maximum or a comparison can
    use. None, NaN, ±inf (a diverged run's loss), bools and strings are not."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value, spec=".4f"):
    return format(value, spec) if isnum(value) else "–"


def pct(value, spec=".2f"):
    return fmt(100 * value if isnum(value) else None, spec)


def markdown_table(header, rows):
    """A markdown table; a '|' inside a cell is escaped so it cannot split the cell."""
    def cells(row):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    return "\n".join([cells(header), "|" + "|".join("---" for _ in header) + "|"] + [cells(row) for row in rows])
