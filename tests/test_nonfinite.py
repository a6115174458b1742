"""A NaN or inf loss or gradient stops the run with one message (or, when asked, the bad
steps are skipped and counted), and non-finite metrics are recorded as such."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from compose import compose_train
from helpers import FAST, read_summary, run_cli
from plugformer import Component, hookimpl
from plugformer.errors import NonFiniteError
from plugformer.plugins import load_plugins
from plugformer.training.run import train

SHORT = ["logger=none", "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1", *FAST]


@dataclass
class PoisonConfig:
    # training steps (global_step, from 0) whose extra loss term "poison" is NaN
    bad_steps: list[int] | None = None


class Poison:
    """A technique whose extra loss term is NaN on chosen training steps, 0 otherwise."""

    def __init__(self, config: PoisonConfig, cfg) -> None:
        self.bad = set(config.bad_steps or [])

    @hookimpl
    def extra_losses(self, model, batch, outputs, stage):
        zero = outputs.loss * 0.0
        return {"poison": zero + (math.nan if stage == "train" and Poison.step in self.bad else 0.0)}

    @hookimpl
    def lightning_callbacks(self, cfg):
        import lightning.pytorch as pl

        class StepCounter(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                Poison.step = trainer.global_step

        return [StepCounter()]

    step = -1


class PoisonPlugin:
    @hookimpl
    def register_components(self, registry):
        registry.add(Component(kind="technique", name="poison", factory=Poison, config=PoisonConfig, summary="NaN on chosen steps"))


@pytest.fixture(scope="module")
def poison_plugins():
    return load_plugins(extra={"poison_plugin": PoisonPlugin()})


def test_a_nan_extra_term_stops_the_run_naming_step_and_term(poison_plugins, tmp_path: Path) -> None:
    cfg = compose_train("+technique=poison", "techniques.poison.bad_steps=[3]", *SHORT, f"run_dir={tmp_path}")
    with pytest.raises(NonFiniteError) as caught:
        train(cfg, poison_plugins, tmp_path, run_id="nan00001")
    message = caught.value.message()
    assert "step 3" in message and "extra loss term 'poison'" in message and "learning rate" in message
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and "NonFiniteError" in summary["error"] and "'poison'" in summary["error"]
    assert summary["global_step"] == 3  # stopped before the bad update
    assert math.isnan(summary["metrics"]["train/loss_poison"])  # recorded as NaN, not dropped
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert any(row.get("train/loss_poison") == "nan" for row in rows)


def test_skip_mode_drops_bad_updates_counts_them_and_finishes(poison_plugins, tmp_path: Path) -> None:
    cfg = compose_train(
        "+technique=poison", "techniques.poison.bad_steps=[2,5]", "callbacks.nonfinite.action=skip", *SHORT, f"run_dir={tmp_path}"
    )
    summary = train(cfg, poison_plugins, tmp_path, run_id="nan00002")
    assert summary["status"] == "finished" and summary["global_step"] == 8
    assert summary["extra"]["nonfinite/skipped_steps"] == 2
    assert math.isfinite(summary["metrics"]["val/loss"])  # the weights never saw a NaN update


def test_skip_mode_gives_up_after_too_many_bad_steps_in_a_row(poison_plugins, tmp_path: Path) -> None:
    cfg = compose_train(
        "+technique=poison", "techniques.poison.bad_steps=[1,2,3,4,5,6,7]", "callbacks.nonfinite.action=skip",
        "callbacks.nonfinite.max_consecutive_skips=3", *SHORT, f"run_dir={tmp_path}",
    )
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        train(cfg, poison_plugins, tmp_path, run_id="nan00003")
    assert read_summary(tmp_path)["extra"]["nonfinite/skipped_steps"] == 3


@pytest.mark.slow
def test_a_diverging_learning_rate_ends_the_command_with_status_2(tmp_path: Path) -> None:
    result = run_cli(
        "train", "optim.lr=1e6", "optim.warmup_steps=0", "trainer.max_steps=50", "trainer.val_check_interval=50",
        "data.train_examples=256", "data.val_examples=32", *FAST, "logger=none", f"run_dir={tmp_path}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "plugformer: error: Training stopped at step" in result.stderr and "not finite" in result.stderr
    assert "Traceback" not in result.stderr
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and "not finite" in summary["error"] and summary["global_step"] < 50


def test_checking_every_n_steps_stops_within_n_steps_naming_the_first(poison_plugins, tmp_path: Path) -> None:
    cfg = compose_train(
        "+technique=poison", "techniques.poison.bad_steps=[1]", "callbacks.nonfinite.check_every_n_steps=4", *SHORT, f"run_dir={tmp_path}"
    )
    with pytest.raises(NonFiniteError, match=r"stopped at step 3 \(the first non-finite value was at step 1"):
        train(cfg, poison_plugins, tmp_path, run_id="nan00004")
    assert read_summary(tmp_path)["global_step"] == 3


def test_a_bad_value_one_rank_sees_makes_every_rank_act(tmp_path: Path) -> None:
    import torch.multiprocessing as mp
    from rank_flags import flags_seen  # a small module: each process imports only it

    from plugformer.training.ranks import any_rank

    assert bool(any_rank(torch.tensor(True))) and not bool(any_rank(torch.tensor(False)))  # one process
    mp.spawn(flags_seen, args=(str(tmp_path),), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["[True, False]"] * 2
