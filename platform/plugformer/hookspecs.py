"""The hooks a plugin may implement. Each is documented in docs/plugins.md (a test checks).

Installed plugins implement them in the module their ``plugformer`` entry point names;
a technique object enabled in a run implements them as methods and takes part only in that
run. No hook is ever called inside a forward pass.
"""

from __future__ import annotations

from typing import Any

import pluggy

PROJECT = "plugformer"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_components(registry: Any) -> None:
    """Add components of any kind with ``registry.add(Component(...))``.

    Called once per session, when plugins are loaded, before any config is composed.
    Returns nothing.
    """


@hookspec
def validate_config(cfg: Any, registry: Any) -> None:
    """Reject a composed config early by raising :class:`plugformer.ConfigError` naming the
    conflicting options.

    Called after Hydra composes the run's config and the built-in capability checks pass,
    before data or model are built. ``cfg`` is read-only. Returns nothing.
    """


@hookspec
def model_built(model: Any, cfg: Any) -> None:
    """Modify the built model in place: masks, parameter sharing, wrappers of submodules.

    Called once per run after the model is built and initialized, before the optimizer
    exists and before a checkpoint is restored. Returns nothing.
    """


@hookspec
def extra_losses(model: Any, batch: Any, outputs: Any, stage: str) -> dict[str, Any] | None:
    """Named loss terms added to the objective's loss.

    Called on every training, validation and test step after the forward pass, with
    ``stage`` "train", "val" or "test" and ``outputs`` the objective's :class:`ObjectiveOutput`.
    Returns a dict name → scalar tensor (already weighted), or None. Each term is logged as
    ``<stage>/loss_<name>`` and added to ``<stage>/total_loss``, which is optimized;
    ``<stage>/loss`` stays the objective's loss. A name another contributor (a plugin or
    the feed-forward layers' auxiliary losses) also uses is an error naming both.
    """


@hookspec
def lightning_callbacks(cfg: Any) -> list[Any] | None:
    """Lightning callbacks for loop-time behaviour (schedules, pruning steps, probes).

    Called once per run when the Trainer is created. Returns a list of
    ``lightning.pytorch.Callback`` instances, or None.
    """


@hookspec
def run_summary(trainer: Any, module: Any) -> dict[str, Any] | None:
    """Extra metrics for the run summary (summary.json and the W&B summary).

    Called on rank 0 when training ends, also when it failed. Returns a dict name → JSON
    value, or None; names should be ``<plugin>/<metric>``.
    """


@hookspec
def tracking_tags(cfg: Any) -> list[str] | None:
    """Extra tags for the tracker, next to the ``kind:name`` tag of every chosen component.

    Called once per run when the loggers are created. Returns a list of strings, or None.
    """
