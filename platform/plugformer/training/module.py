"""The LightningModule: generic over the objective; adds the losses plugins contribute."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pluggy
import torch
from torch import Tensor

from plugformer.components import ObjectiveOutput
from plugformer.config import OptimConfig
from plugformer.model.transformer import Transformer
from plugformer.training.optim import build_optimizer


class TrainingModule(pl.LightningModule):
    """Trains a :class:`Transformer`. Logs ``<stage>/loss``, ``<stage>/<metric>`` for the
    objective's metrics, ``<stage>/loss_<name>`` for auxiliary and plugin losses, and
    ``train/lr``. The loss is the objective's loss plus every auxiliary term."""

    def __init__(self, model: Transformer, optim: OptimConfig, hooks: pluggy.PluginManager) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.hooks = hooks

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        return self.model(batch)

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        outputs = self.model(batch)
        terms: dict[str, Tensor] = {}
        for ffn in self.model.feed_forward_layers():
            for name, value in ffn.aux_losses().items():
                terms[name] = terms.get(name, 0.0) + value
        for contributed in self.hooks.hook.extra_losses(model=self.model, batch=batch, outputs=outputs, stage=stage):
            terms.update(contributed or {})
        loss = outputs.loss + sum(terms.values(), torch.zeros((), device=outputs.loss.device))
        batch_size = batch["input_ids"].shape[0]
        on_step = stage == "train"
        log: dict[str, Any] = dict(on_step=on_step, on_epoch=not on_step, sync_dist=not on_step, batch_size=batch_size)
        self.log(f"{stage}/loss", loss, prog_bar=True, **log)
        for name, value in terms.items():
            self.log(f"{stage}/loss_{name}", value, **log)
        for name, value in outputs.metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name == "accuracy" and stage == "val", **log)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer, scheduler = build_optimizer(self.model, self.optim, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
