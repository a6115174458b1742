"""The LightningModule: generic over the objective; adds the losses plugins contribute,
carries a stateful model's state across the batches of a stream, and keeps techniques'
frozen modules beside the model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import pluggy
from lightning.pytorch.plugins.precision import Precision
import torch
from torch import Tensor, nn

from plugformer.attention import Attention
from plugformer.components import ObjectiveOutput
from plugformer.config import OptimConfig
from plugformer.errors import PluginError
from plugformer.plugins import call_hook
from plugformer.model.transformer import ModelState, Transformer
from plugformer.training.optim import build_optimizer


class LossTerms:
    """Named loss terms with who contributed each; a name given by two contributors is an
    error naming both (terms of one contributor with one name, such as every MoE layer's
    balance loss, add up)."""

    def __init__(self) -> None:
        self.values: dict[str, Tensor] = {}
        self.contributors: dict[str, str] = {}

    def add(self, name: str, value: Tensor, contributor: str) -> None:
        owner = self.contributors.setdefault(name, contributor)
        if owner != contributor:
            raise PluginError(
                f"Two contributors add a loss term named {name!r}: {owner} and {contributor}.",
                expected="unique loss term names (they are logged as <stage>/loss_<name>)",
                fix=f"rename the term in one of them, or disable one with PLUGFORMER_DISABLE_PLUGINS=<plugin>",
            )
        self.values[name] = self.values[name] + value if name in self.values else value

    def total(self, loss: Tensor) -> Tensor:
        return loss + sum(self.values.values(), torch.zeros((), device=loss.device))


class TrainingModule(pl.LightningModule):
    """Trains a :class:`Transformer`. Logs ``<stage>/loss`` (the objective's loss, comparable
    across runs), ``<stage>/total_loss`` (what is optimized: the loss plus every extra term),
    ``<stage>/loss_<name>`` for each auxiliary and plugin term, ``<stage>/<metric>`` for the
    objective's metrics, and ``train/lr``.

    With ``carry_state`` (a data task that streams ordered segments), each stage keeps the
    model's streaming state from one batch to the next, detached after every step and
    started afresh at every epoch. ``frozen`` modules (techniques' teachers) follow the
    model's device but are neither trained nor saved; ``auxiliary`` modules (a technique's
    trainable projection) follow the device, are optimized with the model and saved under
    ``auxiliary.<name>`` (absent when there are none, so checkpoints keep their keys).
    """

    def __init__(
        self,
        model: Transformer,
        optim: OptimConfig,
        hooks: pluggy.PluginManager,
        *,
        carry_state: bool = False,
        frozen: Mapping[str, nn.Module] | None = None,
        auxiliary: Mapping[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.optim = optim
        self.hooks = hooks
        self.carry_state = carry_state
        self._states: dict[str, ModelState | None] = {}
        self._step_metrics: tuple[dict[str, Tensor], int] = ({}, 0)  # the last training step's, see log_step_metrics
        self._gradient_norm: tuple[Any, list[Tensor], Tensor] | None = None  # see note_gradient_norm
        self._attentions: list[Attention] | None = None  # see _attentions_with_losses
        # A plain dict, so these modules are not submodules: out of state_dict and parameters().
        self.frozen: dict[str, nn.Module] = dict(frozen or {})
        if auxiliary:
            self.auxiliary = nn.ModuleDict(dict(auxiliary))

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        return self.model(batch)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> TrainingModule:
        super()._apply(fn, *args, **kwargs)
        for module in self.frozen.values():
            module._apply(fn)
        return self

    def _state_for(self, stage: str, batch: dict[str, Tensor]) -> ModelState | None:
        if not self.carry_state:
            return None
        examples = self.model.objective.examples_in(batch)
        state = self._states.get(stage)
        if state is None or state.batch_size != examples:
            state = self._states[stage] = self.model.new_state(examples, streaming=True)
        return None if state.empty else state

    def _loss_terms(self, batch: dict[str, Tensor], outputs: ObjectiveOutput, stage: str) -> LossTerms:
        terms = LossTerms()
        for ffn in self.model.feed_forward_layers():
            for name, value in ffn.aux_losses().items():
                terms.add(name, value, f"the feed-forward layers ({type(ffn).__name__})")
        for attention in self._attentions_with_losses():
            for name, value in attention.aux_losses().items():
                terms.add(name, value, f"the attention layers ({type(attention).__name__})")
        contributions = call_hook(
            self.hooks, "extra_losses", expect=dict, items=Tensor, model=self.model, batch=batch, outputs=outputs, stage=stage
        )
        for plugin_name, contributed in contributions:
            for name, value in contributed.items():
                terms.add(name, value, f"plugin {plugin_name!r}")
        return terms

    def _attentions_with_losses(self) -> list[Attention]:
        """The model's attentions that report auxiliary losses (an ``aux_losses()`` method,
        as on a feed-forward layer: terms of their last forward pass, already weighted).
        Found once per epoch of each stage (walking every module at every step cost more than
        the rest of the loss terms), so a model changed between epochs is seen."""
        if self._attentions is None:
            self._attentions = [
                m for m in self.model.modules() if isinstance(m, Attention) and callable(getattr(m, "aux_losses", None))
            ]
        return self._attentions

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        objective = self.model.objective
        batch = objective.prepare_batch(batch)
        state = self._state_for(stage, batch)
        logged = stage != "train" or self._loggers_write_this_step()
        # A training step whose metrics no logger reads lets the objective skip them.
        objective.metrics_due = logged
        try:
            outputs = self.model(batch, state=state)
        finally:
            objective.metrics_due = True
        if state is not None:
            state.detach()
        terms = self._loss_terms(batch, outputs, stage)
        total = terms.total(outputs.loss)
        values = {f"{stage}/loss": outputs.loss, f"{stage}/total_loss": total}
        values.update({f"{stage}/loss_{name}": value for name, value in terms.values.items()})
        values.update({f"{stage}/{name}": value for name, value in outputs.metrics.items()})
        batch_size = self.model.objective.examples_in(batch)
        if stage == "train":
            self._step_metrics = (values, batch_size)
            if logged:
                self.log_step_metrics()
            return total
        for name, value in values.items():
            prog_bar = name == f"{stage}/loss" or (name == f"{stage}/accuracy" and stage == "val")
            self.log(name, value, prog_bar=prog_bar, on_step=False, on_epoch=True, sync_dist=True, batch_size=batch_size)
        return total

    def _loggers_write_this_step(self) -> bool:
        """Whether this training step's metrics reach the loggers (every
        ``trainer.log_every_n_steps``, as Lightning decides), or the step is the last of the run
        or of an epoch (so the final values in summary.json are the last step's). Lightning's
        bookkeeping per logged metric was the largest per-step cost of the training path
        (BENCHMARKS.md), so on the other steps nothing is logged. Without a trainer (a module
        driven by hand), always."""
        trainer = self._trainer
        if trainer is None or trainer.log_every_n_steps == 0:
            return True
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step + 1
        return trainer._logger_connector.should_update_logs or last_step or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch

    def log_step_metrics(self) -> None:
        """Log this training step's losses and metrics and the learning rate now: what a
        training step logs on the steps the loggers write, and what a callback that stops
        the run at another step (the non-finite guard) calls, so the step's values are
        recorded. Only from a hook in which Lightning allows logging."""
        values, batch_size = self._step_metrics
        for name, value in values.items():
            self.log(name, value, prog_bar=name == "train/loss", on_step=True, on_epoch=False, sync_dist=False, batch_size=batch_size)
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, on_epoch=False)

    def note_gradient_norm(self, optimizer: Any, parameters: list[Tensor], norm: Tensor) -> None:
        """The total gradient norm of ``optimizer``'s ``parameters`` at this step (the
        non-finite guard computes it): clipping by norm uses it instead of computing it again."""
        self._gradient_norm = (optimizer, parameters, norm)

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        """Lightning's clipping; by norm, with the norm noted this step when there is one and
        the precision plugin clips the optimizer's parameters as Lightning's default does
        (``clip_grad_norm_`` is that norm followed by ``clip_grads_with_norm_``: the same result)."""
        noted, self._gradient_norm = self._gradient_norm, None
        if noted is not None and noted[0] is optimizer and gradient_clip_val and _clips_by_plain_norm(self, gradient_clip_algorithm):
            torch.nn.utils.clip_grads_with_norm_(noted[1], gradient_clip_val, noted[2])
            return
        self.clip_gradients(optimizer, gradient_clip_val=gradient_clip_val, gradient_clip_algorithm=gradient_clip_algorithm)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_epoch_start(self) -> None:
        self._states.pop("train", None)
        self._attentions = None

    def on_validation_epoch_start(self) -> None:
        self._states.pop("val", None)
        self._attentions = None

    def on_test_epoch_start(self) -> None:
        self._states.pop("test", None)
        self._attentions = None

    def configure_optimizers(self) -> dict[str, Any]:
        auxiliary = getattr(self, "auxiliary", None)
        trained = self.model if auxiliary is None else nn.ModuleList([self.model, auxiliary])
        optimizer, scheduler = build_optimizer(trained, self.optim, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _clips_by_plain_norm(module: pl.LightningModule, algorithm: str | None) -> bool:
    """Whether clipping is by norm, over the optimizer's own parameters with
    ``torch.nn.utils.clip_grad_norm_``, as Lightning's default precision plugin does (not under
    a gradient scaler, a sharded strategy's plugin or Fabric)."""
    if module._fabric is not None or not hasattr(torch.nn.utils, "clip_grads_with_norm_"):
        return False
    if (algorithm or module.trainer.gradient_clip_algorithm or "norm") != "norm":
        return False
    plugin = module.trainer.precision_plugin
    kind = type(plugin)
    return (
        getattr(plugin, "scaler", None) is None
        and kind.clip_grad_by_norm is Precision.clip_grad_by_norm
        and kind.main_params is Precision.main_params
    )
