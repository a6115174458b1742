"""The expert-load plot of an ``experiment=moe_small`` run: the fraction of tokens routed to
each expert at every validation, per MoE layer, with the dropped fraction (at the training
capacity factor) and the balanced level 1/E.

    python docs/results/moe_small_load.py runs/moe_small [docs/results/moe_small_load.png]

Reads the run's metrics.csv (``val/moe/<layer>/expert_load_<i>``, or the pooled
``val/moe/expert_load_<i>`` when the model has one MoE layer) and prints the last values.
"""

from __future__ import annotations

import csv
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOAD = re.compile(r"^val/moe/(?:(?P<layer>[^/]+)/)?expert_load_(?P<expert>\d+)$")


def read_series(metrics_csv: Path) -> dict[str, list[tuple[int, float]]]:
    """Every ``val/moe/...`` column as (step, value) pairs, in order."""
    series: dict[str, list[tuple[int, float]]] = {}
    with open(metrics_csv, newline="") as handle:
        for row in csv.DictReader(handle):
            for name, value in row.items():
                if name.startswith("val/moe/") and value not in ("", None):
                    series.setdefault(name, []).append((int(float(row["step"])), float(value)))
    return series


def layer_loads(series: dict[str, list[tuple[int, float]]]) -> dict[str, dict[int, list[tuple[int, float]]]]:
    """Layer ("all" for pooled) → expert → series; per-layer loads when there are any."""
    loads: dict[str, dict[int, list[tuple[int, float]]]] = {}
    for name, points in series.items():
        match = LOAD.match(name)
        if match:
            loads.setdefault(match["layer"] or "all", {})[int(match["expert"])] = points
    if len(loads) > 1:
        loads.pop("all", None)
    return dict(sorted(loads.items()))


def plot(run_dir: Path, out: Path) -> None:
    series = read_series(run_dir / "metrics.csv")
    loads = layer_loads(series)
    if not loads:
        raise SystemExit(f"{run_dir}/metrics.csv has no val/moe/*expert_load_* columns: is it an MoE run?")
    fig, axes = plt.subplots(1, len(loads), figsize=(5 * len(loads), 4.0), sharey=True, squeeze=False)
    for ax, (layer, experts) in zip(axes[0], loads.items()):
        for expert, points in sorted(experts.items()):
            ax.plot(*zip(*points), marker=".", label=f"expert {expert}")
        ax.axhline(1 / len(experts), color="grey", linestyle="--", linewidth=1, label=f"balanced (1/{len(experts)})")
        prefix = "val/moe/" if layer == "all" else f"val/moe/{layer}/"
        dropped = series.get(f"{prefix}dropped_fraction")
        if dropped:
            ax.plot(*zip(*dropped), color="black", linestyle=":", label="dropped (train capacity)")
        ax.set_title(f"MoE layer {layer}" if layer != "all" else "MoE layers (pooled)")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of routed tokens")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(f"Expert load at each validation: {run_dir.name}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    for name in sorted(series):
        print(f"{name} = {series[name][-1][1]:.4f} (step {series[name][-1][0]})")
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    plot(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else Path(__file__).with_suffix(".png"))
