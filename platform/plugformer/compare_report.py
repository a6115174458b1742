"""The study report of ``plugformer compare --report FILE``: the tables and the figures in
one document.

- ``.html``: a single self-contained file; every figure is embedded as a base64 PNG
  (``<img src="data:image/png;base64,...">``), so it can be mailed or attached as it is.
- ``.md``: GitHub-flavoured Markdown; the figures are written as PNG files beside it
  (``<report stem>_<figure>.png``) and referenced by relative path.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from plugformer.compare import CompareError

REPORT_SUFFIXES = (".html", ".md")


@dataclass
class Figure:
    """One plot of the report: a caption, the PNG's bytes and its file name (for .md)."""

    caption: str
    png: bytes
    file_name: str


@dataclass
class Report:
    """What a report shows. Table rows hold display strings (or plain values) already."""

    title: str
    sources: list[str]
    run_rows: list[dict[str, Any]]
    group_rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


def check_report_path(path: str | Path) -> Path:
    """``path`` as a Path; raises CompareError unless it ends in .html or .md."""
    path = Path(path).expanduser()
    if path.suffix.lower() not in REPORT_SUFFIXES:
        raise CompareError(
            f"--report {path}: cannot tell which kind of report to write from the suffix {path.suffix or '(none)'!r}.",
            expected="a file name ending in .html (one self-contained file) or .md (Markdown with PNGs beside it)",
            fix=f"for example --report {path.with_suffix('.html')}",
        )
    return path


def write_report(report: Report, path: Path) -> list[Path]:
    """Write the report as HTML or Markdown by ``path``'s suffix; returns the files written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".html":
        path.write_text(render_html(report), encoding="utf-8")
        return [path]
    written = [path]
    for figure in report.figures:
        image = path.with_name(f"{path.stem}_{figure.file_name}")
        image.write_bytes(figure.png)
        written.append(image)
    path.write_text(render_markdown(report, image_prefix=f"{path.stem}_"), encoding="utf-8")
    return written


def _cell(value: Any) -> str:
    from plugformer.compare_table import format_value

    return format_value(value)


def render_markdown(report: Report, image_prefix: str = "") -> str:
    """The report as Markdown; figure ``f`` is referenced as ``image_prefix + f.file_name``."""
    from plugformer.compare_table import markdown_table

    parts = [f"# {report.title}", "", "Runs from: " + ", ".join(f"`{s}`" for s in report.sources), ""]
    if report.group_rows:
        parts += ["## Groups (mean ± std over each group's runs)", "", markdown_table(report.group_rows)]
    for figure in report.figures:
        parts += [f"## {figure.caption}", "", f"![{figure.caption}]({image_prefix}{figure.file_name})", ""]
    parts += ["## Runs", "", markdown_table(report.run_rows)]
    parts += [f"{line}\n" for line in report.notes]
    return "\n".join(parts).rstrip() + "\n"


def _html_table(rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in rows[0])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(value))}</td>" for value in row.values()) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-weight: 600; margin-bottom: 0.4em; }
.notes { color: #555; }
"""


def render_html(report: Report) -> str:
    """The report as one self-contained HTML page (no external files, scripts or fonts)."""
    title = html.escape(report.title)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{STYLE}</style></head><body>",
        f"<h1>{title}</h1>",
        "<p>Runs from: " + ", ".join(f"<code>{html.escape(s)}</code>" for s in report.sources) + "</p>",
    ]
    if report.group_rows:
        parts += ["<h2>Groups (mean ± std over each group's runs)</h2>", _html_table(report.group_rows)]
    for figure in report.figures:
        data = base64.b64encode(figure.png).decode("ascii")
        caption = html.escape(figure.caption)
        parts.append(f'<figure><figcaption>{caption}</figcaption><img alt="{caption}" src="data:image/png;base64,{data}"></figure>')
    parts += ["<h2>Runs</h2>", _html_table(report.run_rows)]
    if report.notes:
        parts.append('<div class="notes">' + "".join(f"<p>{html.escape(line)}</p>" for line in report.notes) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
