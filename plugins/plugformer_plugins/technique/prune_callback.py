"""The Lightning side of :mod:`prune` (imported when a run starts, so listing plugins does
not import Lightning): pruning on the schedule, structure removal, sparsity logging and the
saved pruned model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import move_data_to_device, rank_zero_only

from plugformer import ConfigError
from plugformer_plugins.technique import sparsity
from plugformer_plugins.technique.prune import PRUNED_MODEL_FILE, STRUCTURE_FILE, Prune, structure_of


class PruningCallback(pl.Callback):
    """Prunes at the start of the training steps the schedule names (so step t trains with
    the masks of step t), removes structures once at ``structured_step``, logs sparsity at
    every validation, and saves the model with masks applied when training ends."""

    def __init__(self, technique: Prune) -> None:
        self.technique = technique

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.technique.structural and trainer.world_size > 1:
            # Each rank would rank heads on its own batches and remove different ones.
            raise ConfigError(
                f"techniques.prune.heads/ffn_neurons remove parts in one process; this run has {trainer.world_size}.",
                expected="trainer.devices=1 (and one node) for structured pruning",
                fix="prune heads/neurons in a single-device run, or keep to unstructured pruning (sparsity) here",
            )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        technique = self.technique
        if technique.structural and step == technique.structured_step and not (technique.run_dir / STRUCTURE_FILE).is_file():
            self._remove_structures(trainer, pl_module)
        technique.maybe_prune_unstructured(step)

    def _remove_structures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        technique = self.technique
        objective = pl_module.model.objective
        batches = []
        for batch in trainer.datamodule.train_dataloader():
            batches.append(objective.prepare_batch(move_data_to_device(batch, pl_module.device)))
            if len(batches) >= technique.config.importance_batches:
                break
        technique.remove_structures(batches, list(trainer.optimizers))
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                _forget_checkpoints(callback)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in self.technique.measure().items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self.technique.model
        if model is None or rank_zero_only.rank != 0:
            return
        plain = sparsity.with_masks_applied(model)
        torch.save({"state_dict": plain.state_dict(), "structure": structure_of(plain)}, self.technique.run_dir / PRUNED_MODEL_FILE)


def _forget_checkpoints(callback: ModelCheckpoint) -> None:
    """After heads or neurons are removed, earlier checkpoints hold the larger model: set them
    aside (``<name>-before-structured-pruning.ckpt``) and start the best-model tracking
    afresh, so best.ckpt and last.ckpt always hold the pruned model."""
    if callback.dirpath is None:
        return
    folder = Path(callback.dirpath)
    for name in ("best.ckpt", "last.ckpt"):
        path = folder / name
        if path.is_file() and rank_zero_only.rank == 0:
            path.replace(folder / f"{path.stem}-before-structured-pruning.ckpt")
    callback.best_k_models = {}
    callback.kth_best_model_path = ""
    callback.best_model_score = None
    callback.best_model_path = ""
    callback.last_model_path = ""
    callback.kth_value = torch.tensor(float("inf") if callback.mode == "min" else float("-inf"))
