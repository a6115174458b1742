"""Curves for ``plugformer compare``: smoothing, the mean curve of a group of runs with its
band of ±1 standard deviation over the group's runs (seeds), and the figure of one metric.

Matplotlib is imported only when a figure is drawn, so importing this module stays cheap.
"""

from __future__ import annotations

import bisect
import io
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plugformer.compare import Run

Points = list[tuple[float, float]]


def smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with TensorBoard's (and W&B's "Exponential Moving
    Average") debiasing, over the points in logging order::

        m_0 = 0,   m_t = weight * m_(t-1) + (1 - weight) * v_t,   s_t = m_t / (1 - weight ** t)

    for t = 1, 2, ... The division removes the pull towards 0 that starting from m_0 = 0
    would give the first points. ``weight`` 0 returns the values unchanged; 0.9 or 0.99
    smooth more. Requires 0 <= weight < 1.
    """
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    smoothed, moving = [], 0.0
    for t, value in enumerate(values, start=1):
        moving = weight * moving + (1.0 - weight) * value
        smoothed.append(moving / (1.0 - weight**t))
    return smoothed


def clean_points(points: Points) -> Points:
    """Finite points sorted by step, one per step (the last logged value of a step wins)."""
    by_step: dict[float, float] = {}
    for step, value in points:
        if math.isfinite(value):
            by_step[float(step)] = float(value)
    return sorted(by_step.items())


def _interpolate(points: Points, steps: list[float], step: float) -> float | None:
    """The run's value at ``step``, linear between its logged steps (``steps`` are the
    points' steps, sorted); None outside them."""
    if not points or step < steps[0] or step > steps[-1]:
        return None
    at = bisect.bisect_left(steps, step)
    x1, y1 = points[at]
    if x1 == step:
        return y1
    x0, y0 = points[at - 1]
    return y0 + (y1 - y0) * (step - x0) / (x1 - x0)


@dataclass
class MeanCurve:
    """A group's curve of one metric: at every step any of its runs logged, the mean over
    the runs that cover that step, the sample standard deviation (None where fewer than
    two runs cover it) and how many runs that was."""

    steps: list[float]
    mean: list[float]
    std: list[float | None]
    count: list[int]


def mean_curve(curves: list[Points], weight: float = 0.0) -> MeanCurve:
    """Smooth each run's curve (:func:`smooth`), then average them step by step.

    Runs of one config log the same steps; where they do not (a resumed or stopped run),
    each run is interpolated linearly onto the other runs' steps inside its own range and
    never extrapolated, so a run that stopped early drops out of the mean after its last
    step instead of dragging it.
    """
    runs = []
    for points in curves:
        points = clean_points(points)
        if points:
            steps, values = zip(*points)
            runs.append(list(zip(steps, smooth(list(values), weight))))
    grid = sorted({step for points in runs for step, _ in points})
    steps_of = [[step for step, _ in points] for points in runs]
    result = MeanCurve([], [], [], [])
    for step in grid:
        values = [v for v in (_interpolate(points, steps, step) for points, steps in zip(runs, steps_of)) if v is not None]
        if not values:
            continue
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
        result.steps.append(step)
        result.mean.append(mean)
        result.std.append(std)
        result.count.append(len(values))
    return result


def curve_png(groups: list[tuple[str, list[Run]]], metric: str, weight: float) -> bytes:
    """A PNG of ``metric`` by step: per labelled group of runs, its smoothed mean curve and
    a shaded band of ±1 standard deviation over its runs (where two or more cover a step)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.6 + 0.2 * len(groups)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    for label, runs in groups:
        curve = mean_curve([run.curves.get(metric) or [] for run in runs], weight)
        if not curve.steps:
            continue
        (line,) = axes.plot(curve.steps, curve.mean, marker="o" if len(curve.steps) < 30 else None, markersize=3, label=label)
        banded = [(s, m, d) for s, m, d in zip(curve.steps, curve.mean, curve.std) if d is not None]
        if len(banded) == 1:  # a band needs two steps; one step gets an error bar
            step, mean, std = banded[0]
            axes.errorbar([step], [mean], yerr=[std], color=line.get_color(), capsize=4)
        elif banded:
            steps, means, stds = zip(*banded)
            axes.fill_between(steps, [m - d for m, d in zip(means, stds)], [m + d for m, d in zip(means, stds)], color=line.get_color(), alpha=0.2, linewidth=0)
    axes.set_xlabel("step")
    axes.set_ylabel(metric)
    smoothing = f", EMA smoothing {weight:g}" if weight else ""
    axes.set_title(f"{metric} by step: mean ± std over each group's runs{smoothing}")
    axes.grid(alpha=0.3)
    if axes.lines:
        figure.legend(loc="outside lower center", fontsize="x-small")
    else:
        axes.text(0.5, 0.5, f"no run logged {metric}", ha="center", va="center", transform=axes.transAxes)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def curve_file_name(metric: str, prefix: str = "curve") -> str:
    """``curve_val_loss.png`` for ``val/loss``: a file name safe on every filesystem."""
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in metric)
    return f"{prefix}_{safe}.png"
