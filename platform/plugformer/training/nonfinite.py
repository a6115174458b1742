"""Non-finite losses and gradients: stop the run with one message, or skip the bad steps.

A NaN or infinite loss (the objective's or any extra term) or gradient norm never trains on
silently. ``callbacks.nonfinite`` configures what happens:

- ``action: stop`` (default): the run ends within ``check_every_n_steps`` steps of the first
  non-finite value with :class:`plugformer.errors.NonFiniteError` naming the step, the term and
  the usual causes; summary.json says "failed" with that reason, and the command exits 2.
- ``action: skip``: the optimizer step of a bad batch is skipped (its gradients are dropped,
  so no parameter, moment or weight decay changes); after ``max_consecutive_skips`` bad steps
  in a row the run stops as above. The count is ``nonfinite/skipped_steps`` in summary.json.
- ``action: off``: no check.

The guard is a Lightning callback; it joins every run as a core plugin (see
:class:`NonFinitePlugin`), through the same hooks a third-party plugin uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from plugformer.errors import NonFiniteError
from plugformer.training.ranks import any_rank
from plugformer.hookspecs import hookimpl

ACTIONS = ("stop", "skip", "off")
SKIPPED_METRIC = "nonfinite/skipped_steps"


@dataclass
class NonFiniteOptions:
    action: str = "stop"
    check_every_n_steps: int = 1
    max_consecutive_skips: int = 100

    @classmethod
    def from_config(cls, node: Any) -> NonFiniteOptions:
        """From ``cfg.callbacks.nonfinite`` (absent: the defaults)."""
        from plugformer.errors import ConfigError

        values = dict(node or {})
        unknown = set(values) - {"action", "check_every_n_steps", "max_consecutive_skips"}
        options = cls(**{k: v for k, v in values.items() if k not in unknown})
        problems = []
        if unknown:
            problems.append(f"unknown option(s) {', '.join(sorted(unknown))}")
        if options.action not in ACTIONS:
            problems.append(f"action={options.action!r} is not one of {', '.join(ACTIONS)}")
        if int(options.check_every_n_steps) < 1 or int(options.max_consecutive_skips) < 1:
            problems.append("check_every_n_steps and max_consecutive_skips must be ≥ 1")
        if problems:
            raise ConfigError(
                f"callbacks.nonfinite: {'; '.join(problems)}.",
                expected="callbacks.nonfinite.{action: stop|skip|off, check_every_n_steps: ≥ 1, max_consecutive_skips: ≥ 1}",
                fix="e.g. callbacks.nonfinite.action=skip",
            )
        return options


def optimizer_parameters(optimizer: Any) -> list[Tensor]:
    """The parameters an optimizer steps, in its order: what Lightning's gradient clipping
    measures (``Precision.main_params``), so a norm of their gradients is the clipping norm."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _gradient_norm(parameters: list[Tensor]) -> Tensor | None:
    """The total L2 norm of the gradients, computed as ``clip_grad_norm_`` computes it."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch ≥ 2.6: fused per device, as in clipping
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


def _value(value: Any) -> float | None:
    if isinstance(value, Tensor) and value.numel() == 1:
        return float(value.detach().float().item())
    return float(value) if isinstance(value, (int, float)) else None


def describe_terms(metrics: dict[str, Any], stage: str = "train") -> list[str]:
    """The logged loss terms of this step that are not finite, in words."""
    found = []
    for name, raw in sorted(metrics.items()):
        value = _value(raw)
        if value is None or math.isfinite(value):
            continue
        if name == f"{stage}/loss":
            found.append(f"the objective's loss ({name}={value})")
        elif name.startswith(f"{stage}/loss_"):
            found.append(f"the extra loss term {name[len(stage) + 6:]!r} ({name}={value})")
        elif name == f"{stage}/total_loss":
            continue  # the sum: named only when no part is
    return found


def _record_losses(trainer: pl.Trainer) -> None:
    """Send this step's loss terms to the loggers (metrics.csv, W&B) now: the step never
    reaches the end of its batch, where Lightning would log them."""
    values = {
        name: _value(raw)
        for name, raw in trainer.callback_metrics.items()
        if name.startswith("train/loss") or name == "train/total_loss"
    }
    values = {name: value for name, value in values.items() if value is not None}
    if values and trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)


class NonFiniteGuard(pl.Callback):
    """Checks the loss before backward and the gradient norm before each optimizer step.

    The norm is that of the optimizer's parameters' gradients, computed as gradient clipping
    computes it; a module with a ``note_gradient_norm(optimizer, parameters, norm)`` method
    (:class:`plugformer.training.module.TrainingModule`) is given it, so clipping reuses it
    instead of a second pass over every gradient."""

    def __init__(self, options: NonFiniteOptions | None = None) -> None:
        self.options = options or NonFiniteOptions()
        self.skipped = 0
        self._consecutive = 0
        self._loss_bad: Tensor | None = None  # any micro-batch of this step had a bad loss
        self._loss: Tensor | None = None
        self._first_bad_step: Tensor | None = None  # on device, so unchecked steps need no sync

    def on_before_backward(self, trainer: pl.Trainer, module: pl.LightningModule, loss: Tensor) -> None:
        if self.options.action == "off":
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_bad = bad if self._loss_bad is None else self._loss_bad | bad
        self._loss = loss.detach()

    def on_before_optimizer_step(self, trainer: pl.Trainer, module: pl.LightningModule, optimizer: Any) -> None:
        if self.options.action == "off":
            return
        loss_bad = self._loss_bad if self._loss_bad is not None else torch.zeros((), dtype=torch.bool)
        self._loss_bad = None
        norm = None
        # With a gradient scaler (fp16), infinite gradients are expected now and then: the
        # scaler skips those steps and lowers its scale. Only the loss is checked then.
        if getattr(trainer.strategy.precision_plugin, "scaler", None) is None:
            parameters = optimizer_parameters(optimizer)
            norm = _gradient_norm(parameters)
            # The training module clips with this norm instead of computing it again.
            note = getattr(module, "note_gradient_norm", None)
            if norm is not None and callable(note):
                note(optimizer, parameters, norm)
        bad = any_rank(loss_bad.to(norm.device) | ~torch.isfinite(norm) if norm is not None else loss_bad)
        step = trainer.global_step
        if self.options.action == "skip":
            if bool(bad):
                self._skip(trainer, module, norm)
            else:
                self._consecutive = 0
            return
        if self.options.check_every_n_steps == 1:  # checked at every step: no marker to keep
            if bool(bad):
                raise self._error(trainer, step, norm, bool(loss_bad))
            return
        marker = torch.where(bad, step, -1)
        if self._first_bad_step is None:
            self._first_bad_step = marker
        else:
            self._first_bad_step = torch.where(self._first_bad_step >= 0, self._first_bad_step, marker)
        if (step + 1) % self.options.check_every_n_steps == 0:  # reading the flag waits for the device
            first = int(self._first_bad_step.item())
            if first >= 0:
                raise self._error(trainer, first, norm, bool(loss_bad))

    def _skip(self, trainer: pl.Trainer, module: pl.LightningModule, norm: Tensor | None) -> None:
        for parameter in module.parameters():
            parameter.grad = None
        self.skipped += 1
        self._consecutive += 1
        module.log(SKIPPED_METRIC, float(self.skipped), on_step=True, on_epoch=False)
        if self._consecutive >= self.options.max_consecutive_skips:
            raise self._error(trainer, trainer.global_step, norm, True, skipped=True)

    def _error(self, trainer: pl.Trainer, step: int, norm: Tensor | None, loss_bad: bool, *, skipped: bool = False) -> NonFiniteError:
        log_now = getattr(trainer.lightning_module, "log_step_metrics", None)
        if callable(log_now):  # the training module logs a step's terms only on the steps the loggers write
            log_now()
        _record_losses(trainer)
        terms = describe_terms(trainer.callback_metrics)
        if not terms and loss_bad:
            terms = [f"the total loss ({_value(self._loss)})"]
        if not loss_bad and norm is not None:
            terms = [f"the gradient norm ({_value(norm)}; the loss was finite)"]
        what = "is" if len(terms) == 1 else "are"
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        intro = (
            f"Training stopped after {self.options.max_consecutive_skips} non-finite steps in a row (the last at step {step}): "
            if skipped
            else f"Training stopped at step {step}: "
            if step == trainer.global_step
            else f"Training stopped at step {trainer.global_step} (the first non-finite value was at step {step}, "
            f"checked every {self.options.check_every_n_steps} steps): "
        )
        return NonFiniteError(
            intro + f"{' and '.join(terms) or 'a loss term'} {what} not finite.",
            expected=f"finite losses and gradients; a NaN or inf usually comes from a learning rate that is too high "
            f"(the lr was {lr:g} at this step), from a precision that overflows (trainer.precision={trainer.precision}; "
            "fp16 overflows where bf16 or 32 do not), or from a loss term that divides by zero or takes the log of 0",
            fix="lower optim.lr or lengthen optim.warmup_steps, clip gradients (trainer.gradient_clip_val=1.0)"
            + ("" if str(trainer.precision).startswith(("32", "64")) else ", try trainer.precision=bf16-mixed or 32")
            + "; or skip such steps with callbacks.nonfinite.action=skip",
        )


class NonFinitePlugin:
    """The guard as a core run plugin: contributes the callback and the skipped-steps count."""

    def __init__(self) -> None:
        self.guard: NonFiniteGuard | None = None

    @hookimpl
    def lightning_callbacks(self, cfg: Any) -> list[pl.Callback]:
        options = NonFiniteOptions.from_config((cfg.get("callbacks") or {}).get("nonfinite"))
        self.guard = NonFiniteGuard(options)
        return [self.guard]

    @hookimpl
    def run_summary(self, trainer: Any, module: Any) -> dict[str, Any]:
        if self.guard is None or self.guard.options.action != "skip":
            return {}
        return {SKIPPED_METRIC: self.guard.skipped}
