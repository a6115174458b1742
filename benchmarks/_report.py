"""Writing a benchmark's section of BENCHMARKS.md, shared by the benchmark scripts."""

from __future__ import annotations

from pathlib import Path


def write_section(out: Path, text: str, start: str, end: str) -> None:
    """Replace the text between the markers ``start`` and ``end`` (which ``text`` includes)
    with ``text``, or append it; every other section of the file stays as it is."""
    current = out.read_text() if out.exists() else "# Benchmarks\n"
    if start in current and end in current:
        head, rest = current.split(start, 1)
        updated = head + text + rest.split(end, 1)[1]
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    out.write_text(updated)
