"""Expert metrics of mixture-of-experts layers, logged once per validation (and test) epoch.

For every batch of the stage, each :class:`MixtureOfExperts` layer records the routing of
the batch's own forward pass (the first call after the batch starts, so decodings that
callbacks run afterwards are not counted). At the end of the epoch the counts are summed
over batches and DDP ranks and logged as

- ``<stage>/moe/expert_load_<i>``: the fraction of token-to-expert assignments (before
  capacity) that went to expert i, pooled over the MoE layers (1/E each when balanced);
- ``<stage>/moe/dropped_fraction``: the fraction of assignments over capacity. Evaluation
  drops nothing unless ``eval_capacity_factor`` is set, so this is what the training
  capacity would drop on the validation batches (or what the eval capacity did drop);
- ``<stage>/moe/router_entropy``: the mean entropy of the router's distribution per token,
  in nats (log E when uniform, 0 when certain);
- with more than one MoE layer, the same per layer: ``<stage>/moe/<stack>_<index>/<name>``.

Pooled metrics need every layer to have the same number of experts; otherwise only the
per-layer ones are logged.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from plugformer_plugins.ffn.moe import MixtureOfExperts, RoutingStatistics


def moe_layers(model: nn.Module) -> list[MixtureOfExperts]:
    """The model's MoE layers, in module order (encoder first)."""
    return [module for module in model.modules() if isinstance(module, MixtureOfExperts)]


class ExpertMetrics(pl.Callback):
    """Accumulates the MoE layers' routing statistics over an evaluation epoch and logs them
    (see the module docstring); does nothing for a model without MoE layers."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}

    def _layers(self, pl_module: pl.LightningModule) -> list[MixtureOfExperts]:
        return moe_layers(getattr(pl_module, "model", pl_module))

    def _start_batch(self, pl_module: pl.LightningModule) -> None:
        for layer in self._layers(pl_module):
            layer.record_next_call()

    def _end_batch(self, pl_module: pl.LightningModule) -> None:
        for layer in self._layers(pl_module):
            statistics = layer.take_statistics()
            if statistics is not None:
                vector = statistics.vector().cpu()
                previous = self._sums.get(layer.layer_name)
                self._sums[layer.layer_name] = vector if previous is None else previous + vector

    def _end_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        layers = self._layers(pl_module)
        sums, self._sums = self._sums, {}
        if not layers:
            return
        per_layer: dict[str, RoutingStatistics] = {}
        for layer in layers:  # every rank reduces every layer, in the same order
            vector = sums.get(layer.layer_name, torch.zeros(layer.num_experts + 3, dtype=torch.float64))
            reduced = trainer.strategy.reduce(vector.to(pl_module.device), reduce_op="sum")
            per_layer[layer.layer_name] = RoutingStatistics.from_vector(reduced.double().cpu())
        values: dict[str, float] = {}
        if len({layer.num_experts for layer in layers}) == 1:
            pooled = RoutingStatistics.from_vector(sum(s.vector() for s in per_layer.values()))
            values.update({f"{stage}/moe/{name}": value for name, value in pooled.metrics().items()})
        if len(layers) > 1:
            for layer_name, statistics in per_layer.items():
                values.update({f"{stage}/moe/{layer_name}/{name}": value for name, value in statistics.metrics().items()})
        for name, value in values.items():
            # The same value on every rank; sync_dist only keeps Lightning from warning about it.
            pl_module.log(name, value, on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums = {}

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums = {}

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._start_batch(pl_module)

    def on_test_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._start_batch(pl_module)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._end_batch(pl_module)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._end_batch(pl_module)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer, pl_module, "test")
