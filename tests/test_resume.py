"""Kill a run with SIGKILL in the middle, resume it, and land where an uninterrupted run
with the same seed lands."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import FAST, REPO, read_summary, run_cli

pytestmark = pytest.mark.slow

STEPS = 60
SETTINGS = [
    f"trainer.max_steps={STEPS}", "trainer.val_check_interval=20", "trainer.log_every_n_steps=5",
    "callbacks.checkpoint.last_every_n_steps=5", "optim.warmup_steps=10", "seed=7", *FAST,
]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.Popen(
        [sys.executable, "-m", "plugformer", "train", *SETTINGS, f"run_dir={run_dir}", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )


def checkpoint_step(path: Path) -> int | None:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)["global_step"]
    except Exception:  # noqa: BLE001 - being written or not there yet
        return None


def test_killed_run_resumes_to_the_planned_step_and_matches(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert start(reference).wait(timeout=300) == 0

    crashed = tmp_path / "crashed"
    process = start(crashed)
    last = crashed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and (checkpoint_step(last) or 0) < 25:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_step(last)
    assert killed_at is not None and 25 <= killed_at < STEPS, killed_at
    assert not (crashed / "summary.json").exists()

    run_id = json.loads((crashed / "run.json").read_text())["run_id"]
    result = run_cli("train", f"resume={crashed}")
    assert result.returncode == 0, result.stderr[-3000:]

    resumed, uninterrupted = read_summary(crashed), read_summary(reference)
    assert resumed["status"] == "finished"
    assert resumed["global_step"] == STEPS == uninterrupted["global_step"]
    assert resumed["run_id"] == run_id
    assert resumed["metrics"]["train/lr"] == pytest.approx(uninterrupted["metrics"]["train/lr"], rel=1e-6)
    assert resumed["metrics"]["val/loss"] == pytest.approx(uninterrupted["metrics"]["val/loss"], abs=0.05)
    wandb_runs = sorted(p.name for p in (crashed / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(run_id) for name in wandb_runs)
    # The validation history before the crash survives in the resumed summary.
    assert resumed["best"]["val/loss"] <= resumed["metrics"]["val/loss"] + 1e-9
