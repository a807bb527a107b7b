"""One plain-text table renderer, for every table a command prints (predictions, reports, dry runs)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def cell(value: Any) -> str:
    """A value as a table cell: '-' for missing (None, NaN), one decimal for floats."""
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def render(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Aligned columns under a header and a rule of dashes."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def render_rows(rows: Sequence[dict[str, Any]]) -> str:
    """A table of dicts (the first row's keys are the columns)."""
    if not rows:
        return "(no rows)"
    headers = list(rows[0])
    return render(headers, [[cell(r.get(h)) for h in headers] for r in rows])
