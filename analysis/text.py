"""Report tables: a titled table with notes, its cells, and its rendering as aligned text or Markdown."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from contract.table import render

CELL_LINE_LIMIT = 120  # a message in a table cell: its first line, cut shorter than contract.io's error lines


@dataclass
class Table:
    """A titled table with notes; rendered as aligned text or as Markdown."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


def missing(value: Any) -> bool:
    """None, NaN, NA: a value the table shows as '-'."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, dicts: present
        return False


def present(value: Any) -> bool:
    return not missing(value) and value != ""


def num(value: Any, digits: int = 1, thousands: bool = True) -> str:
    if missing(value):
        return "-"
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def pct(value: Any) -> str:
    return "-" if missing(value) else f"{value:+.1f}%"


def share(value: Any) -> str:
    """A share of a whole, unsigned: 35%."""
    return "-" if missing(value) else f"{value:.0f}%"


def params(value: Any) -> str:
    return "-" if missing(value) else f"{value / 1e6:.2f}M"


def mfu(value: Any) -> str:
    return "-" if missing(value) else f"{100 * value:.1f}%"


def text_cell(value: Any) -> str:
    return "-" if missing(value) else str(value)


def render_text(table: Table) -> str:
    out = [table.title, "=" * len(table.title)]
    if table.rows:
        out.append(render(table.headers, table.rows))
    out += table.notes
    return "\n".join(out)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(table: Table) -> str:
    out = [f"## {table.title}", ""]
    if table.rows:
        out.append("| " + " | ".join(table.headers) + " |")
        out.append("|" + "|".join("---" for _ in table.headers) + "|")
        out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
        out.append("")
    out += [f"{note}  " for note in table.notes]
    return "\n".join(out).rstrip()
