"""``plugformer compare --wandb ENTITY/PROJECT``: runs read from a W&B project.

Each run of W&B's public API (``wandb.Api().runs(...)``) becomes the same
:class:`plugformer.compare.Run` a run directory gives, from what ``plugformer train``
logged there:

- ``run.config``: the resolved config as a nested dict → ``Run.config`` (dotted keys;
  W&B's ``_*`` keys and Lightning's ``model/params`` are left out);
- ``run.summary``: the final metrics, ``best/<metric>``, ``report/*``, ``status``,
  ``params``, ``wall_time_s``, ``tokens_per_second`` → ``Run.summary`` in summary.json's
  shape;
- ``run.tags``: ``kind:name`` per chosen component → ``Run.summary["components"]``;
- ``run.history()``: rows logged at the training step (``trainer/global_step``) →
  ``Run.curves``.

Reading needs the network and an API key; without either, or with ``WANDB_MODE`` set to
``offline``/``disabled``, :func:`load_wandb_runs` raises one CompareError saying so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

from plugformer.compare import CompareError, Run, flatten

#: Rows of history asked for per run (W&B samples longer histories down to this many).
HISTORY_SAMPLES = 2000
#: Summary keys that summary.json keeps at its top level (run.py's _flat_summary).
TOP_LEVEL = ("status", "params", "wall_time_s", "tokens_per_second", "global_step")
#: History and summary keys that index rows rather than being metrics.
INDEX_KEYS = ("epoch", "trainer/global_step")
#: W&B run states → the statuses of summary.json (and "incomplete").
STATES = {"finished": "finished", "failed": "failed", "crashed": "failed", "killed": "failed"}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _summary(wandb_summary: dict[str, Any], tags: Iterable[str], state: str | None, config: dict[str, Any]) -> dict[str, Any]:
    """summary.json's shape from a W&B summary logged by plugformer train; ``config`` is
    the run's flattened config (a ``kind:name`` tag is a component when the config has
    ``model.<kind>.name`` or ``<kind>.name``; other tags are the user's)."""
    summary: dict[str, Any] = {"metrics": {}, "best": {}, "extra": {}}
    for key, value in wandb_summary.items():
        if key.startswith("_") or key in INDEX_KEYS:
            continue
        if key in TOP_LEVEL:
            summary[key] = value
        elif key.startswith("best/"):
            summary["best"][key.removeprefix("best/")] = value
        elif key.startswith("report/"):
            summary["extra"][key] = value
        elif "/" in key and _is_number(value):
            summary["metrics"][key] = value
    if "status" not in summary:
        summary["status"] = STATES.get(str(state).lower(), "incomplete")
    components: dict[str, str] = {}
    for tag in tags:
        kind, _, name = str(tag).partition(":")
        if name and (f"model.{kind}.name" in config or f"{kind}.name" in config):
            components[kind] = f"{components[kind]}+{name}" if kind in components else name  # a hybrid plan's layers
    summary["components"] = components
    return summary


def _curves(history: Iterable[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    curves: dict[str, list[tuple[float, float]]] = {}
    for index, row in enumerate(history):
        step = row.get("trainer/global_step", row.get("_step", index))
        for key, value in row.items():
            if key.startswith("_") or key in INDEX_KEYS or not _is_number(value):
                continue
            if isinstance(value, float) and math.isnan(value):
                continue  # W&B fills keys a row did not log with NaN
            curves.setdefault(key, []).append((float(step), float(value)))
    return curves


def run_from_wandb(api_run: Any, *, project: str = "") -> Run:
    """A :class:`Run` from a W&B public API run (any object with ``config``, ``summary``,
    ``history(samples=..., pandas=False)`` and optionally ``tags``, ``state``, ``name``,
    ``id``), named ``<project>/<run name>``."""
    # W&B's own keys start with "_"; Lightning adds "model/params" and the like, which are
    # no Hydra keys (config.yaml has no "/" in its keys) and would show as differing.
    config = {key: value for key, value in dict(api_run.config).items() if not str(key).startswith("_") and "/" not in str(key)}
    wandb_summary = dict(api_run.summary.items()) if hasattr(api_run.summary, "items") else dict(api_run.summary)
    history = api_run.history(samples=HISTORY_SAMPLES, pandas=False)
    name = getattr(api_run, "name", None) or getattr(api_run, "id", "run")
    flat = flatten(config)
    return Run(
        path=None,
        name=f"{project}/{name}" if project else str(name),
        config=flat,
        summary=_summary(wandb_summary, getattr(api_run, "tags", None) or [], getattr(api_run, "state", None), flat),
        curves=_curves(history),
    )


def _offline_reason() -> str | None:
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "dryrun", "disabled"):
        return f"WANDB_MODE is {mode!r}"
    from plugformer.training.wandb_online import online_unavailable_reason

    return online_unavailable_reason()


def load_wandb_runs(project: str, group: str | None = None) -> list[Run]:
    """The runs of the W&B project ``entity/project`` (only those of ``group`` when given),
    oldest first. Raises CompareError when W&B cannot be read or holds no such runs."""
    if project.count("/") != 1 or not all(project.split("/")):
        raise CompareError(
            f"--wandb {project!r} does not name a W&B project.",
            expected="ENTITY/PROJECT, as in a W&B URL: https://wandb.ai/ENTITY/PROJECT",
            fix="for example --wandb my-team/plugformer",
        )
    reason = _offline_reason()
    if reason is not None:
        raise CompareError(
            f"Cannot read runs from W&B project {project}: {reason}.",
            expected="W&B online: an API key (wandb login or WANDB_API_KEY) and a reachable server, WANDB_MODE unset or online",
            fix="run `wandb login` and unset WANDB_MODE (or set WANDB_MODE=online); or compare run directories "
            "(plugformer compare runs/), which needs no network",
        )
    import wandb

    filters = {"group": group} if group else None
    try:
        runs = [run_from_wandb(run, project=project) for run in wandb.Api(timeout=30).runs(project, filters=filters)]
    except (wandb.errors.Error, ValueError) as error:
        raise CompareError(
            f"Reading runs from W&B project {project} failed: {error}",
            expected="a W&B project you can read, spelled ENTITY/PROJECT",
            fix="check the name on wandb.ai and that `wandb login` used an account with access to it",
        ) from None
    if not runs:
        where = f"group {group!r} of W&B project {project}" if group else f"W&B project {project}"
        raise CompareError(
            f"No runs in {where}.",
            expected="a project (and group) that plugformer train logged to online",
            fix="check --wandb-group (a run's group is its experiment_name)" if group else "check the project name",
        )
    return runs
