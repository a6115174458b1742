"""Two processes on CPU (gloo): Lightning starting the second rank under Hydra, and torchrun.
One run directory, one W&B run, and validation metrics averaged over both ranks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plugformer
from helpers import FAST, REPO, read_summary, run_cli

pytestmark = pytest.mark.slow

SETTINGS = ["experiment=plain", "trainer.max_steps=12", "trainer.val_check_interval=12", *FAST]


def full_validation_loss(run_dir: Path, registry) -> float:
    """val/loss of the saved last checkpoint over the whole validation split, in one process."""
    run = plugformer.load_run(run_dir, checkpoint="last")
    model, data = run.model, run.data
    losses, sizes = [], []
    with torch.no_grad():
        for batch in data.val_dataloader():
            losses.append(model(batch).loss.item())
            sizes.append(batch["input_ids"].shape[0])
    return sum(l * n for l, n in zip(losses, sizes)) / sum(sizes)


def check_single_run(run_dir: Path, registry) -> None:
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["global_step"] == 12
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert summary["metrics"]["val/loss"] == pytest.approx(full_validation_loss(run_dir, registry), abs=1e-4)


def test_lightning_starts_the_second_rank_under_hydra(tmp_path: Path, registry) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"run_dir={run_dir}", *SETTINGS)
    assert result.returncode == 0, result.stderr[-3000:]
    # Lightning's notices go to train.log; rank 0 alone prints the header and the closing block.
    assert "Starting with 2 processes" in (run_dir / "train.log").read_text()
    assert "Starting with 2 processes" not in result.stderr + result.stdout
    assert result.stdout.count("plugformer: run plain, training from scratch") == 1, result.stdout
    assert result.stdout.count("plugformer: run finished") == 1, result.stdout
    assert "strategy DDP (2 processes)" in result.stdout, result.stdout
    check_single_run(run_dir, registry)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]


def test_torchrun_two_processes(tmp_path: Path, registry) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    result = subprocess.run(
        [str(torchrun), "--nproc_per_node", "2", "-m", "plugformer", "train", "trainer=ddp", "trainer.accelerator=cpu",
         "trainer.devices=2", f"paths.runs_dir={tmp_path}", "experiment_name=tr", *SETTINGS],
        capture_output=True, text=True, cwd=REPO, timeout=300, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dirs = list((tmp_path / "tr").iterdir())
    assert len(run_dirs) == 1, run_dirs
    check_single_run(run_dirs[0], registry)
