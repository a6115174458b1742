"""The decoding metrics of :mod:`seq2seq` and span corruption as a Lightning callback: they
need the whole model, and Lightning is imported only when a run trains (not when plugins load)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from plugformer.model.generation import greedy
from plugformer_plugins.objective.seq2seq import (
    BLEU_STATISTICS,
    Seq2Seq,
    bleu_from_statistics,
    bleu_statistics,
    decoded_texts,
    exact_match,
)


class GenerationMetric(pl.Callback):
    """Greedy-decoding metrics of a model whose objective is a :class:`Seq2Seq` (or a
    subclass; each batch goes through its ``prepare_batch`` first, which is deterministic in
    eval mode): with ``generation_metric``, ``<stage>/exact_match`` and
    ``<stage>/generated_sequence_accuracy`` per validation and test batch (epoch means); with
    ``bleu``, ``<stage>/bleu`` once per epoch, corpus BLEU of the epoch's decodings, its
    statistics summed over DDP ranks. Texts come from the data module's ``tokenizer`` when it
    has one, else from the token ids."""

    def __init__(self) -> None:
        self._bleu: dict[str, Tensor] = {}

    @staticmethod
    def _objective(module: pl.LightningModule) -> Seq2Seq | None:
        objective = getattr(getattr(module, "model", None), "objective", None)
        if not isinstance(objective, Seq2Seq) or objective.start_id is None:
            return None
        return objective if objective.generation_metric or objective.bleu else None

    def _on_batch(self, trainer: pl.Trainer, module: pl.LightningModule, batch: dict[str, Tensor], stage: str) -> None:
        objective = self._objective(module)
        if objective is None:
            return
        batch = objective.prepare_batch(batch)
        labels = batch["labels"]
        with torch.no_grad():
            generated = greedy(
                module.model, batch["input_ids"], labels.shape[1], attention_mask=batch.get("attention_mask"),
                start_id=int(objective.start_id), eos_id=objective.eos_id,
            )
        if objective.generation_metric:
            value = exact_match(generated, labels)
            for name in ("exact_match", "generated_sequence_accuracy"):
                module.log(
                    f"{stage}/{name}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=objective.examples_in(batch)
                )
        if objective.bleu:
            tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
            tokenizer = tokenizer if hasattr(tokenizer, "decode") else None
            statistics = bleu_statistics(*decoded_texts(generated, labels, objective.eos_id, tokenizer))
            self._bleu[stage] = self._bleu[stage] + statistics if stage in self._bleu else statistics

    def _on_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        statistics = self._bleu.pop(stage, None)
        objective = self._objective(module)
        if objective is None or not objective.bleu:
            return
        if statistics is None:  # no batch here; this rank still joins the sum
            statistics = torch.zeros(BLEU_STATISTICS, dtype=torch.float64)
        statistics = trainer.strategy.reduce(statistics.to(module.device), reduce_op="sum")
        # The same value on every rank; sync_dist only keeps Lightning from warning about it.
        module.log(f"{stage}/bleu", bleu_from_statistics(statistics.cpu()), on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bleu.pop("val", None)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._bleu.pop("test", None)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._on_batch(trainer, pl_module, batch, "val")

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._on_batch(trainer, pl_module, batch, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_end(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on_epoch_end(trainer, pl_module, "test")
