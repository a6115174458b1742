"""Callbacks the core adds to every run: throughput, the history of validation metrics, and
what checkpoints record about the run."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch

from plugformer.components import batch_token_count
from plugformer.training.metrics_csv import PersistentCSVLogger


def _scalar(value: Any) -> float | None:
    """A one-number metric as a float (NaN and inf kept: a diverged metric is recorded as
    such, never dropped); None for anything else."""
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item() if value.numel() == 1 else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


class ThroughputMonitor(pl.Callback):
    """Logs ``train/tokens_per_second`` (all ranks together) over the steps since the last log,
    and keeps the run's overall rate (first step excluded: it pays for warm-up).

    Also measures how much of training waits for data: ``train/data_wait_fraction`` is the share
    of training time spent between one batch's end and the next one's start (fetching and
    collating the next batch, moving it to the device, and the loop's bookkeeping between
    steps), over every step but the first; gaps that hold a validation or an epoch's end are
    not counted. Logged (the run's fraction so far) whenever ``train/tokens_per_second`` is.

    Tokens are counted with the objective's ``count_tokens`` and added up where the batch is
    (a 0-d tensor on a GPU), then read only when logged or asked for: reading a count from the
    device every step would make the host wait for it.
    """

    def __init__(self) -> None:
        self._tokens: torch.Tensor | int = 0
        self.seconds = 0.0
        self.waited = 0.0  # seconds between a batch's end and the next one's start
        self.busy = 0.0  # seconds from batch start to batch end, of the same steps
        self._window_tokens: torch.Tensor | int = 0
        self._window_seconds = 0.0
        self._step_start = 0.0
        self._last_end: float | None = None
        self._gap: float | None = None

    @property
    def tokens(self) -> int:
        """Tokens of the timed steps so far (all ranks)."""
        return int(self._tokens)

    @property
    def tokens_per_second(self) -> float | None:
        return self.tokens / self.seconds if self.seconds > 0 else None

    @property
    def data_wait_fraction(self) -> float | None:
        """Waiting time over training time (in [0, 1]); None before two steps were timed."""
        total = self.waited + self.busy
        return self.waited / total if total > 0 else None

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._last_end = None

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._last_end = None

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()
        self._gap = self._step_start - self._last_end if self._last_end is not None else None

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_start
        if trainer.global_step <= 1:
            self._last_end = time.perf_counter()
            return
        tokens = batch_token_count(module.model.objective, batch) * trainer.world_size
        self._tokens = self._tokens + tokens
        self.seconds += elapsed
        self._window_tokens += tokens
        self._window_seconds += elapsed
        if self._gap is not None:
            self.waited += self._gap
            self.busy += elapsed
        if trainer.global_step % max(1, trainer.log_every_n_steps) == 0 and self._window_seconds > 0:
            module.log("train/tokens_per_second", int(self._window_tokens) / self._window_seconds, on_step=True, on_epoch=False)
            if self.data_wait_fraction is not None:
                module.log("train/data_wait_fraction", self.data_wait_fraction, on_step=True, on_epoch=False)
            self._window_tokens, self._window_seconds = 0, 0.0
        self._last_end = time.perf_counter()


class MetricHistory(pl.Callback):
    """Remembers the validation metrics after each validation and the best ones by
    ``monitor`` (lower is better when ``mode`` is "min")."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min") -> None:
        self.monitor = monitor
        self.mode = mode
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {name: _scalar(v) for name, v in trainer.callback_metrics.items() if name.startswith("val/")}
        values = {name: v for name, v in values.items() if v is not None}
        if not values:
            return
        values["step"] = float(trainer.global_step)
        self.history.append(values)
        current = values.get(self.monitor)
        best = self.best.get(self.monitor)
        if current is not None and math.isfinite(current) and (best is None or (current < best if self.mode == "min" else current > best)):
            self.best = dict(values)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.best = dict(state_dict.get("best", {}))


def final_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The last value of every logged scalar metric, by name."""
    values = {name: _scalar(v) for name, v in trainer.callback_metrics.items()}
    return {name: v for name, v in sorted(values.items()) if v is not None}


class RunRecord(pl.Callback):
    """Records what the run is composed of in every checkpoint (``checkpoint["plugformer"]``),
    so that a resume can refuse a config that no longer builds the same model."""

    def __init__(self, components: dict[str, str]) -> None:
        self.components = dict(components)

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint.setdefault("plugformer", {})["components"] = self.components


class StepRowInCheckpoint(pl.Callback):
    """Keeps a training step's metrics row in a checkpoint saved before the row is logged.

    Lightning saves ``every_n_train_steps`` checkpoints in ``on_train_batch_end`` and writes
    that step's row to the loggers only afterwards. A run killed between the two would resume
    after the step and never log its row. Such a checkpoint therefore carries the row
    (``checkpoint["plugformer"]["pending_row"]``), and a run resumed from it logs the row at
    its step before training on, unless metrics.csv shows that it was logged (the CSV logger
    comes first; a resume of a finished run, whose last checkpoint was saved so, finds it)."""

    def __init__(self) -> None:
        self._row_pending = False  # between a batch's end and Lightning's logging of its row
        self._restored: dict[str, Any] | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Checkpoint callbacks run after every other callback (Lightning orders them last).
        self._row_pending = True

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._row_pending = False

    def on_validation_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._row_pending = False

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._row_pending = False

    def on_save_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        connector = trainer._logger_connector
        if not (self._row_pending and trainer.training and trainer.loggers and connector.should_update_logs):
            return
        values = {name: _scalar(value) for name, value in connector.metrics["log"].items()}
        checkpoint.setdefault("plugformer", {})["pending_row"] = {
            "step": trainer.fit_loop.epoch_loop._batches_that_stepped,
            "metrics": {"epoch": trainer.current_epoch, **{k: v for k, v in values.items() if v is not None}},
        }

    def on_load_checkpoint(self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._restored = (checkpoint.get("plugformer") or {}).get("pending_row")

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        row, self._restored = self._restored, None
        if row is None or not trainer.is_global_zero:
            return
        step, names = int(row["step"]), list(row["metrics"])
        if any(isinstance(logger, PersistentCSVLogger) and logger.has_row(step, names) for logger in trainer.loggers):
            return
        for logger in trainer.loggers:
            logger.log_metrics(dict(row["metrics"]), step=step)
            logger.save()


class ValidateAtLastStep(pl.Callback):
    """Makes the last training step a validation step: a run always ends with validation
    metrics (and a last checkpoint) at its final step, whatever ``val_check_interval`` is.

    Setting ``should_stop`` at the final step is Lightning's documented way (early stopping
    uses it) to have the epoch loop validate before it stops."""

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        last_epoch = trainer.max_steps in (None, -1) and trainer.max_epochs is not None and trainer.max_epochs > 0 \
            and trainer.current_epoch >= trainer.max_epochs - 1 and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
        if last_step or last_epoch:
            trainer.should_stop = True


class OnTrainStart(pl.Callback):
    """Calls ``action`` once, on rank 0, when training has started (after a checkpoint was
    restored): what a resume may only change once it is known to work."""

    def __init__(self, action: Any) -> None:
        self.action = action

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.action()


class LoggingStepAfterResume(pl.Callback):
    """Puts Lightning's logging step back in line with the global step after a resume.

    A checkpoint saved in the middle of a training step (``every_n_train_steps`` saves at
    batch end, ``save_last`` during validation) stores the loop's logging counter
    (``_batches_that_stepped``) before that step is counted, and Lightning's restart completes
    the interrupted step for one kind of checkpoint only, so a resumed run logs every row one
    step early or late. In an uninterrupted run the counter equals the global step whenever a
    training batch starts; this sets it so at the first batch after the restore."""

    def __init__(self) -> None:
        self.aligned = False

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.aligned:
            return
        self.aligned = True
        loop = trainer.fit_loop.epoch_loop
        if getattr(loop, "_batches_that_stepped", None) is not None and trainer.accumulate_grad_batches == 1:
            loop._batches_that_stepped = trainer.global_step
