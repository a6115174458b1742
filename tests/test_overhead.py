"""Per-step costs of the training path: the data-wait measure, training metrics logged only on
the steps the loggers write (with the same rows and final values), and pinned memory only on
a GPU."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from compose import compose_train
from helpers import FAST, read_summary
from plugformer import hookimpl
from plugformer.data import CachedDatasetTask
from plugformer.plugins import load_plugins
from plugformer.training.run import train

STEPS = 9
SHORT = ["logger=none", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=5", "trainer.log_every_n_steps=4", *FAST]


class LastStepLoss:
    """A plugin whose callback keeps the loss of every training step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    @hookimpl
    def lightning_callbacks(self, cfg):
        import lightning.pytorch as pl

        record = self.losses

        class Record(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                record.append(float(outputs["loss"].detach()))

        return [Record()]


def _train(tmp_path: Path, plugins=None, *overrides: str) -> dict:
    plugins = plugins or load_plugins()  # before composing: the plugins' config groups
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = compose_train(*SHORT, *overrides, f"run_dir={tmp_path}")
    return train(cfg, plugins, tmp_path, run_id=f"ovh{abs(hash(str(tmp_path))) % 10**5:05d}")


def test_data_wait_fraction_is_in_the_summary_and_metrics_and_grows_with_a_slow_loader(tmp_path: Path, monkeypatch) -> None:
    fast = _train(tmp_path / "fast")
    fraction = fast["data_wait_fraction"]
    assert isinstance(fraction, float) and 0.0 < fraction < 1.0
    assert read_summary(tmp_path / "fast")["metrics"]["train/data_wait_fraction"] == fraction
    logged = [row["train/data_wait_fraction"] for row in csv.DictReader(open(tmp_path / "fast" / "metrics.csv"))]
    values = [float(value) for value in logged if value]
    assert values and all(0.0 <= value <= 1.0 for value in values)

    collate = CachedDatasetTask.collate

    def slow_collate(self, rows):
        time.sleep(0.15)
        return collate(self, rows)

    monkeypatch.setattr(CachedDatasetTask, "collate", slow_collate)
    slow = _train(tmp_path / "slow")["data_wait_fraction"]
    assert 0.0 < slow <= 1.0 and slow > fraction, (slow, fraction)


def test_training_metrics_are_logged_on_log_steps_and_the_last_step(tmp_path: Path) -> None:
    recorder = LastStepLoss()
    summary = _train(tmp_path, load_plugins(extra={"last_step_loss": recorder}))
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    train_steps = [int(row["step"]) for row in rows if row.get("train/loss")]
    # every 4th step (Lightning counts from 1) and the last one
    assert train_steps == [3, 7, STEPS - 1]
    assert all(row.get("train/lr") and row.get("train/total_loss") for row in rows if row.get("train/loss"))
    assert len(recorder.losses) == STEPS
    assert summary["metrics"]["train/loss"] == pytest.approx(recorder.losses[-1])


def test_pinned_memory_only_when_the_trainer_is_on_a_gpu(tmp_path: Path) -> None:
    task = CachedDatasetTask(tmp_path, batch_size=2)
    assert task._pins_memory() is False  # no trainer: a CPU run by hand
    task.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    assert task._pins_memory() is False
    task.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert task._pins_memory() is True
    task.pin_memory = False
    assert task._pins_memory() is False
    task.pin_memory = True
    assert task._pins_memory() is torch.cuda.is_available()
