"""The hooks a plugin may implement. Each is documented in docs/plugins.md (a test checks).

Installed plugins implement them in the module their ``plugformer`` entry point names;
a technique object enabled in a run implements them as methods and takes part only in that
run. No hook is ever called inside a forward pass.

Arguments are typed for readers and type checkers; the types are imported only under
``TYPE_CHECKING`` (as ``llm`` does), so importing this module, and every plugin that imports
:data:`hookimpl`, stays cheap and free of import cycles.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import pluggy

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from omegaconf import DictConfig
    from torch import Tensor

    from plugformer.api import LoadedRun
    from plugformer.components import ObjectiveOutput
    from plugformer.model.transformer import Transformer
    from plugformer.registry import Registry, RegistryView
    from plugformer.training.module import TrainingModule

#: The stages ``extra_losses`` is called for.
Stage = Literal["train", "val", "test"]

PROJECT = "plugformer"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_components(registry: RegistryView) -> None:
    """Add components of any kind with ``registry.add(Component(...))``.

    Called once per session, when plugins are loaded, before any config is composed.
    Returns nothing. ``registry`` is this plugin's :class:`plugformer.RegistryView`: it adds
    components with the plugin as their provider, and refuses to look other components up
    until every plugin has registered (so nothing depends on the load order): resolve them
    lazily in a factory or capabilities function, or in ``registry.after_loading(callback)``.
    """


@hookspec
def validate_config(cfg: DictConfig, registry: Registry) -> None:
    """Reject a composed config early by raising :class:`plugformer.ConfigError` naming the
    conflicting options.

    Called after Hydra composes the run's config and the built-in capability checks pass,
    before data or model are built. ``cfg`` is read-only. Returns nothing.
    """


@hookspec
def model_built(model: Transformer, cfg: DictConfig) -> None:
    """Modify the built model in place: masks, parameter sharing, wrappers of submodules.

    Called once per run after the model is built and initialized, before the optimizer
    exists and before a checkpoint is restored. Returns nothing.
    """


@hookspec
def extra_losses(
    model: Transformer, batch: dict[str, Tensor], outputs: ObjectiveOutput, stage: Stage
) -> dict[str, Tensor] | None:
    """Named loss terms added to the objective's loss.

    Called on every training, validation and test step after the forward pass, with
    ``stage`` "train", "val" or "test" and ``outputs`` the objective's :class:`ObjectiveOutput`.
    Returns a dict name → scalar tensor (already weighted), or None. Each term is logged as
    ``<stage>/loss_<name>`` and added to ``<stage>/total_loss``, which is optimized;
    ``<stage>/loss`` stays the objective's loss. A name another contributor (a plugin or
    the feed-forward layers' auxiliary losses) also uses is an error naming both.
    """


@hookspec
def lightning_callbacks(cfg: DictConfig) -> list[pl.Callback] | None:
    """Lightning callbacks for loop-time behaviour (schedules, pruning steps, probes).

    Called once per run when the Trainer is created. Returns a list of
    ``lightning.pytorch.Callback`` instances, or None.
    """


@hookspec
def run_summary(trainer: pl.Trainer, module: TrainingModule) -> dict[str, Any] | None:
    """Extra metrics for the run summary (summary.json and the W&B summary).

    Called on rank 0 when training ends, also when it failed. Returns a dict name → JSON
    value, or None; names should be ``<plugin>/<metric>``.
    """


@hookspec
def tracking_tags(cfg: DictConfig) -> list[str] | None:
    """Extra tags for the tracker, next to the ``kind:name`` tag of every chosen component.

    Called once per run when the loggers are created. Returns a list of strings, or None.
    """


@hookspec
def evaluation_metrics(
    namespace: str, options: dict[str, Any], run: LoadedRun, loader: Iterable[dict[str, Tensor]], split: str
) -> dict[str, float] | None:
    """Metrics of an evaluation that a plugin adds to ``plugformer eval`` under options of
    its own namespace (``plugformer eval RUN knn_lm.k=8`` → ``namespace`` "knn_lm",
    ``options`` {"k": 8}).

    Called once per namespace that the overrides name besides ``data.``, before the core's
    own evaluation pass, with the loaded ``run`` (model in eval mode) and the ``loader`` of
    the evaluated ``split`` (data overrides applied). Returns a dict name → float when the
    plugin owns ``namespace`` (stored as ``<namespace>/<name>`` beside the core's metrics in
    eval.json), else None. A namespace no plugin answers is an error naming it.
    """


@hookspec
def cli_commands() -> dict[str, Callable[[list[str]], int]] | None:
    """Subcommands a plugin adds to ``plugformer`` (``plugformer index`` comes from the
    built-in retrieval plugin).

    Called when ``plugformer`` is given a command it does not know itself (so the built-in
    commands never load plugins for this). Returns a dict command name → function taking
    the remaining arguments and returning the exit status, or None. A name two plugins
    provide is an error naming both.
    """
