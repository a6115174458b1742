"""Groups of runs for ``plugformer compare``: runs that share a setting, summarised by the
mean ± standard deviation of each metric over the group's runs (usually its seeds).

By default runs that differ only in ``seed`` (and the keys compare always ignores) form one
group; ``--group-by KEY`` groups by the given config keys or component kinds instead, and
averages over whatever else differs.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from plugformer.errors import PlugformerError

if TYPE_CHECKING:
    from plugformer.compare import Run

#: Config keys that default grouping averages over: repeats of one setting.
SEED_KEYS = ("seed",)
#: Columns of a comparison_table row that are never averaged.
LABEL_COLUMNS = ("run", "status")


class GroupByError(PlugformerError):
    """A ``--group-by`` key that no compared run has."""


@dataclass
class Group:
    """Runs that share the values of ``keys`` (in the order of ``values``); ``indices`` are
    the runs' positions in the compared list."""

    keys: list[str]
    values: list[Any]
    indices: list[int] = field(default_factory=list)

    def label(self) -> str:
        """``model.n_layers=2, attention=local (n=3)``; ``all runs (n=3)`` without keys."""
        from plugformer.compare_table import format_value

        setting = ", ".join(f"{key}={format_value(value)}" for key, value in zip(self.keys, self.values))
        return f"{setting or 'all runs'} (n={len(self.indices)})"


def _value(run: Run, key: str) -> Any:
    if key in run.config:
        return run.config[key]
    return run.components.get(key)


def check_group_keys(runs: list[Run], keys: Sequence[str]) -> None:
    """Raise GroupByError for a key that is neither a config key (dotted, as in
    config.yaml) nor a component kind of any run, suggesting close ones."""
    known = sorted({key for run in runs for key in run.config} | {kind for run in runs for kind in run.components})
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=4, cutoff=0.6)
            raise GroupByError(
                f"No compared run has the config key or component kind {key!r} to group by.",
                expected="a dotted config key from the runs' config.yaml (model.attention.name, optim.lr) or a component kind (attention, position)",
                fix=f"use {' or '.join(close)}" if close else "see a run's config.yaml for the keys",
            )


def default_group_keys(table_rows: list[dict[str, Any]]) -> list[str]:
    """What tells groups apart by default: the table's differing columns except seeds."""
    from plugformer.compare import differing_columns

    if not table_rows:
        return []
    return [column for column in differing_columns(table_rows[0]) if column not in SEED_KEYS]


def group_runs(runs: list[Run], table_rows: list[dict[str, Any]], keys: Sequence[str] | None = None) -> list[Group]:
    """Runs grouped by the values of ``keys`` (default: :func:`default_group_keys`), groups
    in the order of their first run. ``table_rows`` is comparison_table(runs)."""
    if keys:
        check_group_keys(runs, keys)
        values_of = [[_value(run, key) for key in keys] for run in runs]
    else:
        keys = default_group_keys(table_rows)
        values_of = [[row[key] for key in keys] for row in table_rows]
    groups: dict[str, Group] = {}
    for index, values in enumerate(values_of):
        identity = json.dumps(values, sort_keys=True, default=str)
        groups.setdefault(identity, Group(list(keys), values)).indices.append(index)
    return list(groups.values())


def averaged_over(runs: list[Run], table_rows: list[dict[str, Any]], groups: list[Group]) -> list[str]:
    """The differing columns whose values vary inside some group (what the means average over)."""
    from plugformer.compare import differing_columns

    columns = differing_columns(table_rows[0]) if table_rows else []
    keys = set(groups[0].keys) if groups else set()
    return [
        column
        for column in columns
        if column not in keys and any(len({json.dumps(table_rows[i][column], default=str) for i in g.indices}) > 1 for g in groups)
    ]


def metric_columns(table_rows: list[dict[str, Any]]) -> list[str]:
    """The columns of a comparison_table row that hold numbers to average (metrics,
    summary and report columns, evaluations)."""
    from plugformer.compare import differing_columns

    if not table_rows:
        return []
    skip = set(LABEL_COLUMNS) | set(differing_columns(table_rows[0]))
    return [column for column in table_rows[0] if column not in skip]


@dataclass
class Stat:
    """Mean and sample standard deviation (None for fewer than two values) of the ``count``
    values a group's runs have for one column (None, 0 when none has it)."""

    mean: float | None
    std: float | None
    count: int
    integral: bool = False  # all values were integers (parameter counts): shown as one


def stat(values: list[Any]) -> Stat:
    """The :class:`Stat` of the finite numbers among ``values`` (missing ones are skipped)."""
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not numbers:
        return Stat(None, None, 0)
    mean = sum(numbers) / len(numbers)
    std = math.sqrt(sum((v - mean) ** 2 for v in numbers) / (len(numbers) - 1)) if len(numbers) > 1 else None
    return Stat(mean, std, len(numbers), all(isinstance(v, int) and not isinstance(v, bool) for v in values if v is not None))


def _status(statuses: list[str]) -> str:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{count} {status}" for status, count in counts.items())


def group_table(groups: list[Group], table_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per group: its keys' values, ``n`` (runs), ``status`` (``2 finished, 1
    failed``), ``runs`` (their names), then a :class:`Stat` per metric column of
    ``table_rows`` (comparison_table's rows of the same runs)."""
    metrics = metric_columns(table_rows)
    rows = []
    for group in groups:
        members = [table_rows[i] for i in group.indices]
        row: dict[str, Any] = dict(zip(group.keys, group.values))
        row["n"] = len(members)
        row["status"] = _status([member["status"] for member in members])
        row["runs"] = ", ".join(str(member["run"]) for member in members)
        row.update({column: stat([member[column] for member in members]) for column in metrics})
        rows.append(row)
    return rows


def format_stat(value: Stat, n: int) -> str:
    """``0.4123 ± 0.0051`` (``± `` left out for a single value; ``[k of n]`` added when only
    k of the group's n runs have the value)."""
    from plugformer.compare_table import MISSING, format_value

    if value.mean is None:
        return MISSING
    mean = value.mean
    text = format_value(int(mean) if value.integral and mean.is_integer() else mean)
    if value.std is not None:
        text += f" ± {format_value(value.std)}"
    if value.count < n:
        text += f" [{value.count} of {n}]"
    return text


def display_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group rows with every Stat formatted for people (terminal, Markdown, HTML)."""
    return [{k: format_stat(v, row["n"]) if isinstance(v, Stat) else v for k, v in row.items()} for row in rows]


def csv_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group rows for CSV: every Stat as three raw columns, ``<name> mean``, ``<name> std``
    and ``<name> n`` (empty when missing)."""
    flat = []
    for row in rows:
        out: dict[str, Any] = {}
        for key, value in row.items():
            if isinstance(value, Stat):
                out.update({f"{key} mean": value.mean, f"{key} std": value.std, f"{key} n": value.count})
            else:
                out[key] = value
        flat.append(out)
    return flat
