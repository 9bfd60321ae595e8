"""Plain-text tables and number formatting shared by evaluation results and reports."""

from __future__ import annotations

import math


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""

    def cell(x: str) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def fmt(v: float | None, digits: int = 3) -> str:
    """A metric for a table: `digits` decimals, 3 significant digits past 1e5, `-` for None/nan/inf."""
    if v is None or not math.isfinite(v):
        return "-"
    return f"{v:.{digits}f}" if abs(v) < 1e5 else f"{v:.3g}"
