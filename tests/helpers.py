"""Helpers for end-to-end tests: run the real `plugformer` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings for end-to-end runs: a tiny model on a small MQAR task.
FAST = [
    "model.d_model=32",
    "model.n_layers=1",
    "data.train_examples=2000",
    "data.val_examples=128",
    "data.batch_size=32",
    "callbacks.progress_bar=none",
]


def plain_by_default(args: tuple[str, ...]) -> list[str]:
    """``train`` commands start from ``experiment=plain`` (the chosen attention in every
    layer; tests compare components) unless they name an experiment, resume a run or use
    their own primary config (sweep files choose their experiment themselves)."""
    own_config = any(a.startswith(("resume=", "--config-name", "-cn")) for a in args)
    if args[:1] != ("train",) or own_config:
        return list(args)
    # After leading flags (-m): Hydra wants the overrides together, and a later
    # experiment= must still win.
    at = 1
    while at < len(args) and args[at].startswith("-"):
        at += 1
    return [*args[:at], "experiment=plain", *args[at:]]


def run_cli(*args: str, env: dict[str, str] | None = None, python: str | None = None, timeout: int = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m plugformer <args>``; returns the completed process (output captured)."""
    inherited = {name: value for name, value in os.environ.items() if name != "HYDRA_FULL_ERROR"}
    full_env = {**inherited, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [python or sys.executable, "-m", "plugformer", *plain_by_default(args)],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=str(cwd or REPO),
    )


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())


def start_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m plugformer <args>`` in the background (stdout dropped, stderr piped)."""
    inherited = {name: value for name, value in os.environ.items() if name != "HYDRA_FULL_ERROR"}
    full_env = {**inherited, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "plugformer", *plain_by_default(args)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=full_env, cwd=str(REPO),
    )


def checkpoint_step(path: Path) -> int | None:
    """The global step saved in a checkpoint, or None while it is absent or unreadable."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:  # noqa: BLE001 - being written or not there yet
        return None


def metric_rows(run_dir: Path) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv, as written (empty cells as "")."""
    import csv

    with open(run_dir / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def row_identity(row: dict[str, str]) -> tuple[int, str]:
    """(step, "val" or "train" or "test"): what a row is, whatever its column order."""
    stage = next((name.split("/")[0] for name, value in row.items() if "/" in name and value != ""), "?")
    return int(float(row["step"])), stage


def same_rows(kept: list[dict[str, str]], now: list[dict[str, str]]) -> bool:
    """Whether every row of ``kept`` is in ``now`` with the same non-empty values."""
    def cells(row: dict[str, str]) -> frozenset[tuple[str, str]]:
        return frozenset((k, v) for k, v in row.items() if v != "")
    present = {cells(row) for row in now}
    return all(cells(row) in present for row in kept)


def wandb_history_steps(offline_run: Path) -> list[int]:
    """The history steps of a W&B offline run folder, read with W&B's own reader."""
    wandb = Path(sys.executable).with_name("wandb")
    records = subprocess.run(
        [str(wandb), "leet", "inspect", "--json", str(offline_run)], capture_output=True, text=True, timeout=120, check=True
    ).stdout.splitlines()
    return [json.loads(line)["history"]["item"]["_step"] for line in records if '"type":"history"' in line]


def record_score_shapes(monkeypatch: Any, module: Any) -> list[tuple[int, int]]:
    """Records (queries, keys) of every score block ``module`` (an Attention) forms, through
    its fused (``masked_attend``) and explicit (``explicit_attend``) paths; returns the list
    the records are appended to."""
    shapes: list[tuple[int, int]] = []

    def recording(name: str) -> None:
        original = getattr(type(module), name)

        def record(self, q, k, v, allowed, q_positions, k_positions):
            shapes.append((q.shape[-2], k.shape[-2]))
            return original(self, q, k, v, allowed, q_positions, k_positions)

        monkeypatch.setattr(type(module), name, record)

    recording("explicit_attend")
    recording("masked_attend")
    return shapes
