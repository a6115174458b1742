"""``plugformer compare``: what differs between runs, and how each run did; for a study,
how each setting did over its seeds.

Reads run directories (``config.yaml``, ``metrics.csv``, ``summary.json`` and, after
``plugformer eval``, ``eval.json``), so it works offline, without W&B and on runs that
failed; with ``--wandb`` it reads the runs of a W&B project instead or as well
(compare_wandb.py). It prints the table of runs and writes ``comparison.csv``,
``comparison.md`` (rendered by compare_table.py) and ``comparison.png`` (one curve per
run, compare_plots.py). Runs that repeat a setting
with other seeds, or ``--group-by`` keys, make groups: a table of mean ± std per group
(compare_groups.py) and per curve a figure of each group's mean with a ±std band
(compare_curves.py). ``--report`` writes the tables and figures as one HTML or Markdown
document (compare_report.py).
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from plugformer.compare_plots import plot_curves, plot_evaluations
from plugformer.compare_table import format_value, print_table, write_csv, write_markdown
from plugformer.errors import PlugformerError
from plugformer.model.plan import components_in_use

# The names training.run writes; repeated here so that comparing runs does not import
# Lightning and torch's training stack.
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.csv"
EVAL_FILE = "eval.json"
OUTPUT_NAMES = ("comparison.csv", "comparison.md", "comparison.png")
GROUP_OUTPUT_NAMES = ("comparison_groups.csv", "comparison_groups.md")

# Config keys that differ between any two runs without saying anything about them, or that
# are derived from other keys (resolved_layers follows from model.n_layers and model.plan).
IGNORED_KEYS = ("run_dir", "resume", "paths", "hydra", "resolved_layers", "providers")
# metrics.csv columns that index rows rather than being metrics.
INDEX_COLUMNS = ("step", "epoch")
SUMMARY_COLUMNS = ("params", "wall_time_s", "tokens_per_second")
#: The per-run report's columns (summary.json ``extra``; docs/compression.md), shown when a
#: run has them.
REPORT_COLUMNS = ("report/params", "report/nonzero_params", "report/model_bytes", "report/cpu_latency_per_token_s")


class CompareError(PlugformerError):
    """Input that ``plugformer compare`` cannot work with."""


@dataclass
class Run:
    """One run as read from its run directory (``path``) or from W&B (``path`` None,
    ``name`` ``<entity>/<project>/<run name>``).

    ``config`` holds the resolved config flattened to dotted keys; ``curves`` maps every
    metric in metrics.csv to its ``(step, value)`` points in logging order;
    ``evaluations`` maps ``eval/<split>@<length>/<metric>`` to the value ``plugformer eval``
    recorded (the best checkpoint's, or the latest evaluation's when several checkpoints).
    """

    path: Path | None
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    curves: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    evaluations: dict[str, float] = field(default_factory=dict)
    name: str | None = None

    @property
    def status(self) -> str:
        """``finished``/``failed`` from summary.json; ``incomplete`` when the run left none
        (it was killed, or is still running)."""
        return str(self.summary.get("status", "incomplete"))

    @property
    def components(self) -> dict[str, str]:
        """Kind → the component the run used (layer-planned slots named by their layers,
        also for summaries written before summary.json said so)."""
        return components_in_use(dict(self.summary.get("components") or {}), self.summary.get("layers") or {})

    def final_metrics(self) -> dict[str, float]:
        """The summary's final metrics; without a summary, the last logged value of each."""
        if self.summary.get("metrics"):
            return dict(self.summary["metrics"])
        return {name: points[-1][1] for name, points in self.curves.items() if points}


# --- finding and reading runs ---------------------------------------------------------


def is_run_dir(path: Path) -> bool:
    """A run directory holds summary.json, or config.yaml and metrics.csv."""
    if (path / SUMMARY_FILE).is_file():
        return True
    return (path / CONFIG_FILE).is_file() and (path / METRICS_FILE).is_file()


def _natural_key(path: Path) -> list[list[Any]]:
    # Multirun jobs are numbered folders: 2 sorts before 10.
    return [[int(p) if p.isdigit() else p for p in re.split(r"(\d+)", part)] for part in path.parts]


def _runs_below(root: Path) -> list[Path]:
    found = []
    for folder, subfolders, _ in os.walk(root):
        here = Path(folder)
        if is_run_dir(here):
            found.append(here)
            subfolders.clear()  # a run's own folders (checkpoints, wandb) hold no runs
            continue
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
    return found


def find_runs(paths: list[str] | list[Path]) -> list[Path]:
    """The run directories named by ``paths``, each a run directory or a folder searched
    recursively for them; resolved, without duplicates, in natural sort order.

    Raises CompareError for a path that does not exist and when no run directory is found.
    """
    runs: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser().resolve()
        if not path.exists():
            raise CompareError(
                f"{given} does not exist.",
                expected="run directories, or folders that hold them (such as runs/ or a multirun folder)",
                fix="check the path; runs go to runs/<experiment>/<timestamp>/ by default",
            )
        if path.is_file():
            path = path.parent
        runs.update(_runs_below(path))
    if not runs:
        raise CompareError(
            f"No run directories found under {', '.join(str(p) for p in paths)}.",
            expected="folders holding summary.json, or config.yaml and metrics.csv",
            fix="pass a run directory or a folder above some, e.g. plugformer compare runs/",
        )
    return sorted(runs, key=_natural_key)


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists stay values, empty mappings vanish."""
    if not isinstance(node, dict):
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    return flatten(OmegaConf.to_container(OmegaConf.load(path), resolve=False))


def _read_summary(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CompareError(
            f"{path} is not valid JSON ({error}).",
            expected="the summary.json that plugformer train writes",
            fix="remove the broken file (the run is then compared from metrics.csv) or the run directory",
        ) from None


def _number(cell: str | None) -> float | None:
    try:
        return float(cell) if cell not in (None, "") else None
    except ValueError:
        return None


def _read_curves(path: Path) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    if not path.is_file():
        return curves
    with path.open(newline="") as handle:
        for index, row in enumerate(csv.DictReader(handle)):
            step = _number(row.get("step"))
            for name, cell in row.items():
                value = _number(cell)
                if name in INDEX_COLUMNS or value is None:
                    continue
                curves.setdefault(name, []).append((index if step is None else step, value))
    return curves


def load_run(path: str | Path) -> Run:
    """Read one run directory; files it lacks leave their part empty."""
    path = Path(path)
    if not is_run_dir(path):
        raise CompareError(
            f"{path} is not a run directory.",
            expected="a folder holding summary.json, or config.yaml and metrics.csv",
            fix="pass the folder that plugformer train printed as its run directory",
        )
    return Run(
        path=path,
        config=_read_config(path / CONFIG_FILE),
        summary=_read_summary(path / SUMMARY_FILE),
        curves=_read_curves(path / METRICS_FILE),
        evaluations=_read_evaluations(path / EVAL_FILE),
    )


def _read_evaluations(path: Path) -> dict[str, float]:
    """``eval/<split>@<length>/<metric>`` → value from eval.json; later entries win, and
    evaluations of the best checkpoint win over others."""
    try:
        entries = json.loads(path.read_text()).get("evaluations", [])
    except (OSError, ValueError):
        return {}
    values: dict[str, float] = {}
    for entry in sorted(entries, key=lambda e: e.get("checkpoint") == "best.ckpt"):
        label = f"eval/{entry['split']}@{entry['max_length']}"
        values.update({f"{label}/{name}": value for name, value in entry.get("metrics", {}).items()})
    return values


# --- what differs -------------------------------------------------------------------


def _ignored(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in IGNORED_KEYS)


def _all_equal(values: list[Any]) -> bool:
    return all(value == values[0] for value in values[1:])


def differing_config(runs: list[Run]) -> dict[str, list[Any]]:
    """Dotted config keys whose values are not the same in all runs, each with its value
    per run (None where a run's config lacks the key), in the order keys first appear.
    Keys that differ between any two runs by construction (run_dir, paths.*, resume,
    hydra.*) are left out; seed is kept."""
    keys = list(dict.fromkeys(key for run in runs for key in run.config))
    differing = {}
    for key in keys:
        values = [run.config.get(key) for run in runs]
        if not _ignored(key) and not _all_equal(values):
            differing[key] = values
    return differing


def _component_kinds(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(kind for run in runs for kind in run.components))


def differing_components(runs: list[Run]) -> list[str]:
    """Component kinds (attention, position, ...) not chosen alike in all runs."""
    return [kind for kind in _component_kinds(runs) if not _all_equal([run.components.get(kind) for run in runs])]


def shared_components(runs: list[Run]) -> dict[str, str]:
    """Component kinds chosen alike in all runs, with their name."""
    differing = set(differing_components(runs))
    return {kind: runs[0].components[kind] for kind in _component_kinds(runs) if kind not in differing}


def _implied_by_component(key: str, values: list[Any], kinds: set[str]) -> bool:
    """True for ``model.attention.name`` (the attention column says it) and for a
    component's own option that differs only because the other runs chose another
    component (``model.attention.window`` set alike wherever attention is local)."""
    parts = key.split(".")
    if len(parts) < 2 or parts[-2] not in kinds:
        return False
    present = [value for value in values if value is not None]
    return parts[-1] == "name" or (len(present) < len(values) and _all_equal(present))


def common_parent(paths: list[Path]) -> Path | None:
    """The deepest folder above all ``paths`` (not one of them); None when that is the
    filesystem root or the paths share no folder."""
    try:
        parent = Path(os.path.commonpath([str(p) for p in paths]))
    except ValueError:
        return None
    if parent in paths:
        parent = parent.parent
    return None if parent == Path(parent.anchor) else parent


def run_names(runs: list[Run]) -> list[str]:
    """Short names: each run directory's path relative to the run directories' common
    parent; a run read from W&B keeps its ``name``."""
    local = [run.path for run in runs if run.path is not None]
    parent = common_parent(local) if local else None
    names = []
    for run in runs:
        if run.path is None:
            names.append(run.name or "?")
        else:
            names.append(str(run.path) if parent is None else run.path.relative_to(parent).as_posix())
    return names


# --- the table ------------------------------------------------------------------------


def _val_metric_names(runs: list[Run]) -> list[str]:
    names = {name for run in runs for name in run.final_metrics() if name.startswith("val/")}
    return sorted(names, key=lambda name: (name != "val/loss", name))


def _summary_metrics(run: Run, val_names: list[str]) -> dict[str, Any]:
    final = run.final_metrics()
    values: dict[str, Any] = {name: final.get(name) for name in val_names}
    values["best/val/loss"] = (run.summary.get("best") or {}).get("val/loss")
    values.update({name: run.summary.get(name) for name in SUMMARY_COLUMNS})
    return values


def _eval_columns(runs: list[Run], metrics: tuple[str, ...]) -> list[str]:
    """The eval.json columns for ``metrics``, by split, then length, then metric."""
    def order(name: str) -> tuple[str, int, int]:
        label, metric = name.rsplit("/", 1)
        split, length = label.removeprefix("eval/").split("@")
        return split, int(length), metrics.index(metric)

    names = {name for run in runs for name in run.evaluations if name.rsplit("/", 1)[1] in metrics}
    return sorted(names, key=order)


def comparison_table(runs: list[Run], eval_metrics: tuple[str, ...] = ("loss",)) -> list[dict[str, Any]]:
    """One row per run, all with the same columns in this order: ``run`` (name relative to
    the common parent), ``status``, one column per component kind that differs, the
    differing config keys (except those a component column implies), the
    final ``val/*`` metrics, ``best/val/loss``, ``params``, ``wall_time_s``,
    ``tokens_per_second``, the per-run report's ``report/*`` columns when a run has them, then ``eval/<split>@<length>/<metric>`` for the ``eval_metrics``
    that ``plugformer eval`` recorded. Missing values are None."""
    names = run_names(runs)
    kinds = differing_components(runs)
    all_kinds = set(_component_kinds(runs))
    config = {
        key: values
        for key, values in differing_config(runs).items()
        if not _implied_by_component(key, values, all_kinds)
    }
    val_names = _val_metric_names(runs)
    eval_names = _eval_columns(runs, eval_metrics)
    reported = [name for name in REPORT_COLUMNS if any(name in (run.summary.get("extra") or {}) for run in runs)]
    rows = []
    for index, run in enumerate(runs):
        row: dict[str, Any] = {"run": names[index], "status": run.status}
        row.update({kind: run.components.get(kind) for kind in kinds})
        row.update({key: values[index] for key, values in config.items()})
        row.update(_summary_metrics(run, val_names))
        row.update({name: (run.summary.get("extra") or {}).get(name) for name in reported})
        row.update({name: run.evaluations.get(name) for name in eval_names})
        rows.append(row)
    return rows


def differing_columns(row: dict[str, Any]) -> list[str]:
    """The columns of a comparison_table row that say what differs (components, config)."""
    columns = list(row)
    metric = [i for i, column in enumerate(columns) if column.startswith("val/") or column == "best/val/loss"]
    first_metric = metric[0] if metric else len(columns)
    return columns[2:first_metric]


def run_label(row: dict[str, Any]) -> str:
    """A legend label: the run's name and its differing values, and its status unless it finished."""
    values = ", ".join(f"{column}={format_value(row[column])}" for column in differing_columns(row))
    label = f"{row['run']}: {values}" if values else str(row["run"])
    return label if row["status"] == "finished" else f"{label} ({row['status']})"


# --- output (the tables: compare_table.py; the per-run figures: compare_plots.py) -------


def logged_metrics(runs: list[Run]) -> list[str]:
    """Every metric some run's metrics.csv holds, sorted."""
    return sorted({name for run in runs for name in run.curves})


def check_metric(runs: list[Run], metric: str) -> None:
    """Raise CompareError when runs logged metrics but not ``metric``, listing the ones
    that exist."""
    available = logged_metrics(runs)
    # With nothing logged at all (every run failed early) the table is still worth having.
    if metric in available or not available:
        return
    suggestion = next((name for name in available if name.startswith("val/")), available[0])
    raise CompareError(
        f"No run logged the metric {metric!r}.",
        expected=f"one of the metrics in the runs' metrics.csv: {', '.join(available)}",
        fix=f"choose one with --metric, e.g. --metric {suggestion}",
    )


def notes(runs: list[Run], rows: list[dict[str, Any]]) -> list[str]:
    """Lines to print under the table: the components all runs share, and why runs failed."""
    lines = []
    shared = shared_components(runs)
    if shared:
        lines.append("Same in all runs: " + ", ".join(f"{kind}={name}" for kind, name in shared.items()))
    for run, row in zip(runs, rows):
        if run.summary.get("error"):
            lines.append(f"run {row['run']} {run.status}: {run.summary['error'].splitlines()[0]}")
    return lines


def default_out_dir(runs: list[Run]) -> Path:
    """The run directories' common parent folder, or the current folder when they have none
    (or all runs come from W&B)."""
    local = [run.path for run in runs if run.path is not None]
    return (common_parent(local) if local else None) or Path.cwd()


def main_metric(runs: list[Run]) -> str:
    """The metric the runs' checkpoints monitor (``callbacks.checkpoint.monitor``, the most
    common one among the runs), or ``val/loss``."""
    monitored = [str(run.config.get("callbacks.checkpoint.monitor")) for run in runs if run.config.get("callbacks.checkpoint.monitor")]
    return max(dict.fromkeys(monitored), key=monitored.count) if monitored else "val/loss"


def _check_smoothing(weight: float) -> None:
    if not 0.0 <= weight < 1.0:
        raise CompareError(
            f"--smooth {weight:g} is out of range.",
            expected="an exponential moving average weight from 0 (no smoothing) up to, not including, 1",
            fix="for example --smooth 0.9 (W&B's and TensorBoard's slider uses the same weight)",
        )


def _load_runs(paths: list[str], wandb: str | None, wandb_group: str | None) -> tuple[list[Run], list[str]]:
    """The runs to compare and where they came from (for the report)."""
    if not paths and not wandb:
        raise CompareError(
            "Nothing to compare.",
            expected="run directories or folders holding them, and/or --wandb ENTITY/PROJECT",
            fix="for example plugformer compare runs/ or plugformer compare --wandb my-team/plugformer",
        )
    runs = [load_run(path) for path in find_runs(paths)] if paths else []
    sources = list(paths)
    if wandb:
        from plugformer.compare_wandb import load_wandb_runs

        runs += load_wandb_runs(wandb, wandb_group)
        sources.append(f"wandb:{wandb}" + (f" (group {wandb_group})" if wandb_group else ""))
    return runs, sources


def compare_command(
    paths: list[str],
    *,
    out: str | None,
    metric: str | None = None,
    eval_metrics: tuple[str, ...] = ("loss",),
    curves: tuple[str, ...] = (),
    smooth: float = 0.0,
    group_by: tuple[str, ...] = (),
    reports: tuple[str, ...] = (),
    wandb: str | None = None,
    wandb_group: str | None = None,
) -> int:
    """``plugformer compare [PATHS] [--out DIR] [--curve NAME ...] [--smooth W]
    [--group-by KEY ...] [--report FILE ...] [--wandb ENTITY/PROJECT [--wandb-group G]]
    [--eval-metrics a,b]``.

    Prints the table of runs and writes comparison.csv, comparison.md and comparison.png
    (the first curve, one line per run) into ``out`` (default: the run directories' common
    parent). Groups (:mod:`plugformer.compare_groups`: runs differing only in seed, or by
    ``group_by``) get comparison_groups.csv/.md when any group holds several runs or
    ``group_by`` is given. Every curve (``metric`` and ``curves``; default
    :func:`main_metric`) gets ``curve_<metric>.png``: per group the mean, smoothed with EMA
    weight ``smooth``, and a ±std band. ``reports`` (``.html``/``.md`` files) get the
    tables and figures. Returns the exit status; user errors raise CompareError.
    """
    from plugformer.compare_curves import curve_file_name, curve_png
    from plugformer.compare_groups import averaged_over, csv_rows, display_rows, group_runs, group_table
    from plugformer.compare_report import Figure, Report, check_report_path, write_report

    _check_smoothing(smooth)
    report_paths = [check_report_path(path) for path in reports]
    runs, sources = _load_runs(list(paths), wandb, wandb_group)
    names = list(dict.fromkeys([*([metric] if metric else []), *curves])) or [main_metric(runs)]
    for name in names:
        check_metric(runs, name)
    rows = comparison_table(runs, eval_metrics)
    out_dir = Path(out).expanduser() if out else default_out_dir(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path, png_path = (out_dir / name for name in OUTPUT_NAMES)
    write_csv(rows, csv_path)
    lines = notes(runs, rows)
    write_markdown(rows, lines, md_path)
    labels = [run_label(row) for row in rows]
    plot_curves(runs, labels, names[0], png_path)
    eval_path = out_dir / "comparison_eval.png"
    by_length = plot_evaluations(runs, labels, eval_metrics[0], eval_path) if eval_metrics else False

    groups = group_runs(runs, rows, group_by)
    grouped = bool(group_by) or any(len(group.indices) > 1 for group in groups)
    shown_groups: list[dict[str, Any]] = []
    group_lines: list[str] = []
    if grouped:
        stats = group_table(groups, rows)
        shown_groups = display_rows(stats)
        over = averaged_over(runs, rows, groups)
        group_lines = [f"Each group averages over runs that differ in: {', '.join(over)}" if over else "Each group's runs share every compared setting"]
        write_csv(csv_rows(stats), out_dir / GROUP_OUTPUT_NAMES[0])
        write_markdown(shown_groups, group_lines, out_dir / GROUP_OUTPUT_NAMES[1])
    members = [(group.label(), [runs[i] for i in group.indices]) for group in groups]
    figures = []
    for name in names:
        figure = Figure(f"{name} by step" + (f" (EMA {smooth:g})" if smooth else ""), curve_png(members, name, smooth), curve_file_name(name))
        (out_dir / figure.file_name).write_bytes(figure.png)
        figures.append(figure)
    if by_length:
        figures.append(Figure(f"eval {eval_metrics[0]} by evaluated length", eval_path.read_bytes(), eval_path.name))

    print_table(rows, lines)
    if grouped:
        print()
        print_table(shown_groups, group_lines)
    print(f"\nplugformer: compared {len(runs)} run(s)" + (f" in {len(groups)} group(s)" if grouped else ""))
    print(f"  table:  {csv_path}")
    print(f"          {md_path}")
    if grouped:
        print(f"  groups: {out_dir / GROUP_OUTPUT_NAMES[0]}")
        print(f"          {out_dir / GROUP_OUTPUT_NAMES[1]}")
    print(f"  curves: {png_path}  ({names[0]}, one line per run)")
    for figure in figures[: len(names)]:
        print(f"          {out_dir / figure.file_name}  ({figure.caption}, mean ± std per group)")
    if by_length:
        print(f"          {eval_path}  (eval {eval_metrics[0]} by length)")
    if report_paths:
        title = f"plugformer study: {len(runs)} runs" + (f" in {len(groups)} groups" if grouped else "")
        report = Report(title, sources, rows, shown_groups, lines + group_lines, figures)
        for path in report_paths:
            written = write_report(report, path)
            print(f"  report: {path}" + (f"  (+ {len(written) - 1} PNG beside it)" if len(written) > 1 else ""))
    return 0
