"""What a sweep (a study) leaves besides its runs: the value a job hands to a search sweeper,
and one summary of every job.

- :func:`objective_value`: the number ``plugformer train -m`` returns for one job when
  ``optimized_metric`` is set (Optuna and other search sweepers read it): the run's best
  value of that metric, else its final value, NaN for a job that failed or never logged it
  (Optuna records such a trial as failed and the search goes on).
- :func:`write_study_summary`: ``study.json`` and ``study.md`` in the sweep's folder, one row
  per job from the job folders' ``summary.json`` (the job's overrides, status, the reason it
  failed, its main metrics), so a study's failures are listed in one place. It reads only the
  folders, so it works the same for jobs run by any launcher (in-process, SLURM).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"
JSON_FILE, MARKDOWN_FILE = "study.json", "study.md"


def objective_value(summary: dict[str, Any] | None, metric: str) -> float:
    """The run's best ``metric`` (else its last), or NaN when the run failed or lacks it."""
    if not summary or summary.get("status") != "finished":
        return math.nan
    for source in (summary.get("best") or {}, summary.get("metrics") or {}):
        if source.get(metric) is not None:
            return float(source[metric])
    return math.nan


def _job_overrides(job_dir: Path) -> list[str]:
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return []
    from omegaconf import OmegaConf

    return [str(item) for item in OmegaConf.load(path)]


def study_rows(sweep_dir: Path, metric: str | None = None) -> list[dict[str, Any]]:
    """One row per job folder (numbered sub-folders of ``sweep_dir``), in job order."""
    rows = []
    jobs = sorted((p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
    for job_dir in jobs:
        path = job_dir / SUMMARY_FILE
        summary = json.loads(path.read_text()) if path.exists() else None
        row: dict[str, Any] = {
            "job": int(job_dir.name),
            "overrides": _job_overrides(job_dir),
            "status": summary.get("status", "unknown") if summary else "no summary (killed, or still running)",
            "run_dir": str(job_dir),
        }
        if summary and summary.get("error"):
            row["reason"] = str(summary["error"]).splitlines()[0]
        if summary:
            row["metrics"] = {k: v for k, v in (summary.get("metrics") or {}).items() if k.startswith(("val/", "test/"))}
        if metric:
            row["objective"] = objective_value(summary, metric)
        rows.append(row)
    return rows


def write_study_summary(sweep_dir: Path, metric: str | None = None, direction: str = "minimize") -> list[dict[str, Any]]:
    """Write ``study.json`` and ``study.md`` into ``sweep_dir``; returns the failed jobs' rows."""
    sweep_dir = Path(sweep_dir)
    rows = study_rows(sweep_dir, metric)
    failed = [row for row in rows if row["status"] != "finished"]
    best = None
    scored = [row for row in rows if metric and not math.isnan(row.get("objective", math.nan))]
    if scored:
        best = (min if direction == "minimize" else max)(scored, key=lambda row: row["objective"])
    record = {
        "sweep_dir": str(sweep_dir),
        "jobs": len(rows),
        "finished": len(rows) - len(failed),
        "failed": [{"job": r["job"], "overrides": r["overrides"], "status": r["status"], "reason": r.get("reason", "")} for r in failed],
        "optimized_metric": metric,
        "direction": direction if metric else None,
        "best": {"job": best["job"], "overrides": best["overrides"], "value": best["objective"]} if best else None,
        "rows": rows,
    }
    (sweep_dir / JSON_FILE).write_text(json.dumps(record, indent=2, default=_nan_as_null) + "\n")
    (sweep_dir / MARKDOWN_FILE).write_text(_markdown(record, metric))
    return failed


def _nan_as_null(value: Any) -> Any:
    return None if isinstance(value, float) and math.isnan(value) else str(value)


def _markdown(record: dict[str, Any], metric: str | None) -> str:
    lines = [f"# Study: {record['sweep_dir']}", "", f"{record['finished']} of {record['jobs']} jobs finished."]
    if record["best"]:
        best = record["best"]
        lines += ["", f"Best {metric} ({record['direction']}): {best['value']:.4g}, job {best['job']} ({' '.join(best['overrides'])})."]
    header = ["job", "overrides", "status"] + ([metric] if metric else []) + ["reason"]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in record["rows"]:
        cells = [str(row["job"]), " ".join(row["overrides"]).replace("|", "\\|"), row["status"]]
        if metric:
            value = row.get("objective", math.nan)
            cells.append("" if math.isnan(value) else f"{value:.4g}")
        cells.append(row.get("reason", "").replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
