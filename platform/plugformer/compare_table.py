"""The tables of ``plugformer compare`` as people and programs read them: cells formatted
for people, the CSV (raw values), the Markdown table and the rich table on the terminal.
Rows are the dicts :func:`plugformer.compare.comparison_table` and
:mod:`plugformer.compare_groups` make (every row the same columns, missing values None)."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

#: How a missing value (None) is shown.
MISSING = "-"


def format_value(value: Any) -> str:
    """A cell for people: floats to 4 significant digits, large integers grouped."""
    if value is None:
        return MISSING
    if isinstance(value, (bool, str)):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return str(int(value)) if value.is_integer() and abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """Raw values, full precision; empty cells for missing values."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-flavoured Markdown table of formatted values."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    columns = list(rows[0])
    lines = [line(columns), line(["---"] * len(columns))]
    lines += [line([format_value(row[c]) for c in columns]) for row in rows]
    return "\n".join(lines) + "\n"


def write_markdown(rows: list[dict[str, Any]], lines: list[str], path: Path) -> None:
    path.write_text(markdown_table(rows) + "".join(f"\n{line}\n" for line in lines))


def print_table(rows: list[dict[str, Any]], lines: list[str]) -> None:
    """The table on the terminal; when output is not a terminal (a pipe, a log file) it is
    printed wide instead of squeezed to 80 columns. ``lines`` follow the table."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 240))
    table = Table()
    for column in rows[0]:
        table.add_column(column, justify="left" if column in ("run", "status") else "right")
    for row in rows:
        table.add_row(*(format_value(value) for value in row.values()))
    console.print(table)
    for line in lines:
        console.print(line, highlight=False, markup=False)
