"""A W&B logger whose history steps are the training steps.

Lightning's WandbLogger lets W&B number history rows itself (``_step`` 0, 1, 2, ...). A
resumed run restarts that count: offline, every attempt starts again at 0, and W&B drops
rows whose step is not above the run's last one when the attempts are synced into one run.
Logging each row at its training step instead keeps the history of all attempts in one
increasing sequence under the run's id.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


class StepWandbLogger(WandbLogger):
    """WandbLogger that logs every row at ``step`` (the CSV ``step``: training steps done - 1)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning passes anonymous=None to wandb.init, which then warns on the console that
        # "the anonymous setting has no effect"; leaving it out is wandb's default.
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is None or self._wandb_init.get("sync_tensorboard"):
            super().log_metrics(metrics, step)
            return
        row = {f"{self._prefix}{self.LOGGER_JOIN_CHAR}{k}" if self._prefix else k: v for k, v in metrics.items()}
        self.experiment.log({**row, "trainer/global_step": step}, step=step)
