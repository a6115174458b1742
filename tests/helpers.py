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


def run_cli(*args: str, env: dict[str, str] | None = None, python: str | None = None, timeout: int = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m plugformer <args>``; returns the completed process (output captured)."""
    inherited = {name: value for name, value in os.environ.items() if name != "HYDRA_FULL_ERROR"}
    full_env = {**inherited, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run(
        [python or sys.executable, "-m", "plugformer", *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        cwd=str(cwd or REPO),
    )


def read_summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())
