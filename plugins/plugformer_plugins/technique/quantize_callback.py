"""The Lightning side of :mod:`quantize` (imported when a run starts): evaluating the int8
model when fitting ends."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_only

from plugformer_plugins.technique import measure
from plugformer_plugins.technique.quantize import Quantize


class QuantizationReport(pl.Callback):
    """When fitting ends, evaluates the int8 model on the first validation batches (prepared
    by the objective in eval mode, so masked-LM noise is the seeded validation noise)."""

    def __init__(self, technique: Quantize) -> None:
        self.technique = technique

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if rank_zero_only.rank != 0 or trainer.datamodule is None:
            return
        model = pl_module.model
        was_training = model.training
        model.eval()
        batches = []
        with torch.no_grad():
            for batch in trainer.datamodule.val_dataloader():
                batches.append(measure.to_cpu(model.objective.prepare_batch(measure.to_cpu(batch))))
                if len(batches) >= self.technique.config.eval_batches:
                    break
        model.train(was_training)
        if batches:
            self.technique.evaluate(batches)
