"""The per-run figures of ``plugformer compare``: a metric by step, one line per run
(``comparison.png``), and ``plugformer eval``'s metric by evaluated length
(``comparison_eval.png``). The per-group mean curves are compare_curves.py's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plugformer.compare import Run


def _save_plot(series: dict[str, list[tuple[float, float]]], *, x: str, y: str, title: str, path: Path, log_x: bool = False) -> None:
    """One line per labelled series of (x, y) points, saved as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    lines = sum(1 for points in series.values() if points)
    # The legend goes under the axes, one line per run, so long labels never cover the curves.
    figure = Figure(figsize=(9, 5 + 0.2 * lines), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for label, points in series.items():
        if points:
            xs, ys = zip(*points)
            axes.plot(xs, ys, marker="o", markersize=3, label=label)
    if log_x:
        axes.set_xscale("log", base=2)
    axes.set_xlabel(x)
    axes.set_ylabel(y)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.lines:
        figure.legend(loc="outside lower center", fontsize="x-small")
    figure.savefig(path, dpi=120)


def plot_curves(runs: list[Run], labels: list[str], metric: str, path: Path) -> None:
    """``metric`` against step, one line per run that logged it, saved as a PNG."""
    series = {label: run.curves.get(metric) or [] for run, label in zip(runs, labels)}
    _save_plot(series, x="step", y=metric, title=f"{metric} by step", path=path)


def plot_evaluations(runs: list[Run], labels: list[str], metric: str, path: Path) -> bool:
    """``plugformer eval``'s ``metric`` on the validation split against the evaluated
    length, one line per run; False (nothing written) when no run has such evaluations."""
    series = {}
    for run, label in zip(runs, labels):
        points = []
        for name, value in run.evaluations.items():
            where, name_metric = name.rsplit("/", 1)
            split, length = where.removeprefix("eval/").split("@")
            if split == "validation" and name_metric == metric:
                points.append((int(length), value))
        series[label] = sorted(points)
    if not any(series.values()):
        return False
    _save_plot(series, x="evaluated length (tokens)", y=f"eval {metric}", title=f"eval {metric} by length", path=path, log_x=True)
    return True
