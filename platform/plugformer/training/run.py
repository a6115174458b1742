"""One training run from a composed config: choose and check components, build data and
model, train with Lightning, and always leave a summary behind."""

from __future__ import annotations

import json
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, ModelSummary
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from plugformer.api import build
from plugformer.compatibility import Chosen
from plugformer.config import optim_config
from plugformer.errors import ConfigError, PluginError
from plugformer.memory import InsufficientMemoryError, check_memory
from plugformer.model.builder import check_components, choose_components, chosen_techniques
from plugformer.model.plan import components_in_use
from plugformer.plugins import Plugins, blame_component, call_hook
from plugformer.provenance import PROVIDERS_KEY, component_providers
from plugformer.resume import CheckpointInfo, check_matches_checkpoint, read_checkpoint
from plugformer.threads import apply_threads, processes_on_this_node
from plugformer.training.callbacks import (
    LoggingStepAfterResume, MetricHistory, OnTrainStart, RunRecord, StepRowInCheckpoint, ThroughputMonitor, ValidateAtLastStep,
    final_metrics,
)
from plugformer.training import console
from plugformer.training.library_output import route_library_output
from plugformer.training.fsdp import check_fsdp_options, fsdp_trainer_arguments, is_fsdp, sharding_report
from plugformer.training.checkpointing import (
    AtomicCheckpointIO, remove_orphan_temporaries, replace_atomically, write_json_atomically,
)
from plugformer.training.module import TrainingModule
from plugformer.training.lightning_fastpaths import NoProfiler, install as install_lightning_fastpaths
from plugformer.training.tracking import build_loggers, is_wandb, wandb_run_dir

SUMMARY_FILE = "summary.json"
# Where a resume that failed writes its summary when summary.json holds a finished run.
FAILED_RESUME_SUMMARY_FILE = "summary.failed-resume.json"
CONFIG_FILE = "config.yaml"


@dataclass
class RunState:
    """What the summary reports, filled in as the run gets further."""

    run_dir: Path
    cfg: DictConfig
    run_id: str
    started: float = field(default_factory=time.time)
    components: dict[str, str] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)
    providers: dict[str, Any] = field(default_factory=dict)  # kind → name → distribution, version, plugin
    params: int | None = None
    trainer: pl.Trainer | None = None
    module: TrainingModule | None = None
    history: MetricHistory | None = None
    throughput: ThroughputMonitor | None = None
    loggers: list[Any] = field(default_factory=list)
    hook_failure: Exception | None = None  # a run_summary hook that failed
    resumed: bool = False
    memory: dict[str, Any] | None = None  # the memory preflight's estimate (bytes), see plugformer.memory
    # The metrics at the end of fit, kept when test_after_fit replaces Lightning's (val/* included).
    fit_metrics: dict[str, float] = field(default_factory=dict)
    log_file: Path | None = None  # where library messages go (plugformer.training.console)
    wandb: dict[str, Any] = field(default_factory=dict)  # the W&B run's mode, project, folder, URL


def component_tags(chosen: dict[str, Chosen], techniques: dict[str, Chosen], layers: dict[str, Any]) -> list[str]:
    """``kind:name`` for every component the run uses (a slot that a layer plan fills is
    tagged with its layers' components, not the group's unused default), then techniques."""
    in_use = components_in_use({kind: c.name for kind, c in chosen.items()}, layers)
    tags = [f"{kind}:{name}" for kind, names in in_use.items() for name in names.split("+")]
    return tags + [f"technique:{name}" for name in techniques]


def build_callbacks(cfg: DictConfig, run_dir: Path, hooks: Any) -> tuple[list[Callback], MetricHistory, ThroughputMonitor]:
    options = cfg.callbacks
    checkpoint = options.checkpoint
    history = MetricHistory(monitor=checkpoint.monitor, mode=checkpoint.mode)
    throughput = ThroughputMonitor()
    callbacks: list[Callback] = [
        ModelCheckpoint(
            dirpath=str(run_dir / "checkpoints"),
            filename="best",
            monitor=checkpoint.monitor,
            mode=checkpoint.mode,
            save_top_k=checkpoint.save_top_k,
            save_last=checkpoint.save_last and not checkpoint.get("last_every_n_steps"),
            auto_insert_metric_name=False,
        ),
        history,
        throughput,
    ]
    if checkpoint.save_last and checkpoint.get("last_every_n_steps"):
        # last.ckpt more often than validation runs, so a crash loses at most that many steps.
        callbacks.append(
            ModelCheckpoint(
                dirpath=str(run_dir / "checkpoints"),
                save_top_k=0,
                save_last=True,
                every_n_train_steps=checkpoint.last_every_n_steps,
            )
        )
    bar = options.get("progress_bar", "rich")
    if bar == "rich":
        callbacks.append(console.RichMetricsBar(leave=True))
    elif bar == "tqdm":
        callbacks.append(console.TQDMMetricsBar())
    if cfg.trainer.get("enable_model_summary", True):
        callbacks.append(ModelSummary(max_depth=1))  # logs to train.log (RichModelSummary would print it)
    if options.get("early_stopping"):
        from lightning.pytorch.callbacks import EarlyStopping

        callbacks.append(EarlyStopping(**OmegaConf.to_container(options.early_stopping, resolve=True)))
    for _, contributed in call_hook(hooks, "lightning_callbacks", expect=list, items=Callback, cfg=cfg):
        callbacks.extend(contributed)
    return callbacks, history, throughput


def build_trainer(
    cfg: DictConfig, run_dir: Path, loggers: list[Any], callbacks: list[Callback], model: nn.Module | None = None
) -> pl.Trainer:
    """The Lightning Trainer for ``cfg.trainer``; with ``strategy: fsdp`` the platform's FSDP
    strategy, whose units are ``model``'s blocks (:mod:`plugformer.training.fsdp`)."""
    install_lightning_fastpaths()
    options: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    options.setdefault("enable_progress_bar", cfg.callbacks.get("progress_bar", "rich") != "none")
    if options.get("profiler") is None:
        options["profiler"] = NoProfiler()
    plugins: list[Any] = [AtomicCheckpointIO()]
    if is_fsdp(options) and model is not None:
        options = fsdp_trainer_arguments(options, model)
        plugins += options.pop("plugins")
    try:
        return pl.Trainer(
            **options,
            default_root_dir=str(run_dir),
            logger=loggers,
            callbacks=callbacks,
            plugins=plugins,
        )
    except TypeError as error:
        raise ConfigError(
            f"The trainer config is not valid for lightning.pytorch.Trainer: {error}",
            expected="trainer.<name> keys that are Trainer arguments",
            fix="check the spelling against the Lightning Trainer documentation",
        ) from None


def train(
    cfg: DictConfig, plugins: Plugins, run_dir: Path, *, run_id: str, ckpt_path: str | None = None,
    checkpoint: CheckpointInfo | None = None,
) -> dict[str, Any]:
    """Train one run into ``run_dir``; returns the summary (also written, on rank 0, to
    ``run_dir/summary.json`` whether the run finished or failed)."""
    state = RunState(run_dir=run_dir, cfg=cfg, run_id=run_id, resumed=ckpt_path is not None)
    status, error, summary = "failed", None, None
    routing = route_library_output(run_dir, rank_zero_only.rank)
    state.log_file = routing.log_file
    try:
        _train(state, plugins, ckpt_path, checkpoint)
        status = "finished"
    except BaseException as failure:
        named = blame_component(failure, plugins.registry)  # a component's code raised: name its plugin
        error = f"{type(named or failure).__name__}: {named or failure}"
        if named is not None:
            raise named from failure
        raise
    finally:
        try:
            summary = _finish(state, plugins, status, error)
        except Exception as late:
            if error is None:
                raise
            # The run's own failure is on its way out; a later one must not replace it.
            print(f"plugformer: also, recording the failed run failed: {type(late).__name__}: {late}", file=sys.stderr)
        finally:
            routing.restore()
            if summary is not None and rank_zero_only.rank == 0:
                print(_closing_block(state, summary), flush=True)
    return summary


def _train(state: RunState, plugins: Plugins, ckpt_path: str | None, checkpoint: CheckpointInfo | None = None) -> None:
    """A resume (``ckpt_path``) writes the run's config.yaml only once training has started."""
    cfg, run_dir = state.cfg, state.run_dir
    if rank_zero_only.rank == 0:  # the run's lock is held: nobody else writes here
        remove_orphan_temporaries(run_dir)
        remove_orphan_temporaries(run_dir / "checkpoints")
    if ckpt_path is not None and checkpoint is None:
        checkpoint = read_checkpoint(Path(ckpt_path))
    threads = apply_threads(cfg)
    check_fsdp_options(cfg.get("trainer"))  # before anything is built
    registry = plugins.registry
    chosen = choose_components(cfg, registry)  # names the missing distribution of a saved run
    state.components = {kind: c.name for kind, c in chosen.items()}
    # Before data or model are built: a run that cannot fit stops here, with its estimate.
    try:
        estimate, memory = check_memory(cfg, chosen, check_components(cfg, chosen, registry), processes_on_this_node(cfg.get("trainer")))
    except InsufficientMemoryError as refused:
        state.memory = {**refused.estimate.as_dict(), "available_bytes": refused.available}
        raise
    state.memory = estimate.as_dict() if estimate is not None else None
    state.providers = component_providers(c.component for c in chosen.values())
    built = build(cfg, plugins=plugins, run_dir=run_dir, chosen=chosen)
    state.plan = built.plan.describe()
    state.providers = component_providers([
        *(c.component for c in chosen.values()),
        *(c.component for layer in built.plan.layers() for c in layer.slots().values()),
        *(t.component for t in chosen_techniques(cfg, registry).values()),
    ])
    with open_dict(cfg):
        cfg.resolved_layers = state.plan  # shown in config.yaml and the W&B config; never read back
        cfg[PROVIDERS_KEY] = state.providers  # config.yaml and the W&B config; checked when read back
    if ckpt_path is None and rank_zero_only.rank == 0:
        _write_config(run_dir, cfg)
    model, hooks, data = built.model, built.hooks, built.data
    techniques = chosen_techniques(cfg, registry)
    state.params = model.num_parameters()
    state.module = TrainingModule(
        model, optim_config(cfg), hooks, carry_state=data.streams, frozen=built.context.frozen,
        auxiliary=built.context.trainable,
    )

    tags = component_tags(chosen, techniques, state.plan) + list(cfg.get("tags") or [])
    for _, contributed in call_hook(hooks, "tracking_tags", expect=list, items=str, cfg=cfg):
        tags.extend(contributed)
    if checkpoint is not None:
        check_matches_checkpoint(checkpoint, state.components, state.module.state_dict())
    state.loggers = build_loggers(
        cfg, run_dir, tags=tags, job_type=chosen["objective"].name, run_id=state.run_id,
        resume_step=checkpoint.global_step if checkpoint is not None else None,
    )
    callbacks, state.history, state.throughput = build_callbacks(cfg, run_dir, hooks)
    callbacks += [RunRecord(state.components), StepRowInCheckpoint(), ValidateAtLastStep()]
    if ckpt_path is not None:
        callbacks += [OnTrainStart(lambda: _write_config(run_dir, cfg)), LoggingStepAfterResume()]
    state.trainer = build_trainer(cfg, run_dir, state.loggers, callbacks, state.module)
    for logger in state.loggers:
        logger.log_hyperparams({"model/params": state.params})
    if rank_zero_only.rank == 0:
        state.wandb = console.wandb_facts(state.loggers)
        print(_header(state, data, threads, memory, checkpoint), flush=True)
    state.trainer.fit(state.module, datamodule=data, ckpt_path=ckpt_path)
    state.fit_metrics = final_metrics(state.trainer)
    if cfg.get("test_after_fit"):
        state.trainer.test(state.module, datamodule=data, ckpt_path="best" if state.trainer.checkpoint_callback else None)


def _finish(state: RunState, plugins: Plugins, status: str, error: str | None) -> dict[str, Any]:
    summary = build_summary(state, plugins, status, error)
    if rank_zero_only.rank != 0:
        return summary
    write_json_atomically(_summary_path(state, summary["status"]), summary)
    for logger in state.loggers:
        if is_wandb(logger):
            experiment = logger.experiment
            experiment.summary.update(_flat_summary(summary))
            experiment.finish(exit_code=0 if summary["status"] == "finished" else 1)
    if state.hook_failure is not None and status == "finished":
        raise state.hook_failure  # a run_summary hook failed a run that had finished
    return summary


def _header(state: RunState, data: Any, threads: str, memory: str, checkpoint: CheckpointInfo | None) -> str:
    assert state.trainer is not None and state.module is not None
    return console.header(
        experiment=state.cfg.get("experiment_name"), run_dir=state.run_dir, components=state.components, plan=state.plan,
        params=state.params, data=data, trainer=state.trainer, wandb=state.wandb, threads=threads, memory=memory,
        main=console.main_metric(state.module.model.objective), log_file=state.log_file,
        resumed_from=checkpoint.global_step if checkpoint is not None else None,
    )


def _closing_block(state: RunState, summary: dict[str, Any]) -> str:
    objective = state.module.model.objective if state.module is not None else None
    return console.closing_block(
        summary, summary_path=_summary_path(state, summary["status"]), main=console.main_metric(objective),
        history=state.history.history if state.history is not None else [],
        monitor=state.history.monitor if state.history is not None else None,
        checkpoints=console.checkpoint_paths(state.trainer), wandb=state.wandb or console.wandb_from_summary(summary),
    )


def _write_config(run_dir: Path, cfg: DictConfig) -> None:
    text = OmegaConf.to_yaml(cfg, resolve=True)
    replace_atomically(run_dir / CONFIG_FILE, lambda handle: handle.write(text.encode()))


def _summary_path(state: RunState, status: str) -> Path:
    """summary.json, except for a failed resume of a run whose summary.json says it finished:
    that good summary is kept, and the failure goes next to it."""
    path = state.run_dir / SUMMARY_FILE
    if status != "finished" and state.resumed:
        try:
            finished = json.loads(path.read_text()).get("status") == "finished"
        except (OSError, ValueError, AttributeError):
            finished = False
        if finished:
            return state.run_dir / FAILED_RESUME_SUMMARY_FILE
    return path


def build_summary(state: RunState, plugins: Plugins, status: str, error: str | None) -> dict[str, Any]:
    trainer = state.trainer
    metrics = {**state.fit_metrics, **(final_metrics(trainer) if trainer is not None else {})}
    if state.throughput is not None and state.throughput.data_wait_fraction is not None:
        metrics["train/data_wait_fraction"] = state.throughput.data_wait_fraction  # the whole run's, not the last log's
    best = state.history.best if state.history is not None else {}
    extra: dict[str, Any] = {}
    if trainer is not None and state.module is not None and rank_zero_only.rank == 0:
        try:
            for _, contributed in call_hook(state.module.hooks, "run_summary", expect=dict, trainer=trainer, module=state.module):
                extra.update(contributed)
        except PluginError as hook_failure:  # the summary is still written; see _finish
            state.hook_failure = hook_failure
            status, error = ("failed", error or f"PluginError: {hook_failure}")
            extra["run_summary_error"] = str(hook_failure)
    wandb_dir = wandb_run_dir(state.loggers) if rank_zero_only.rank == 0 else None
    summary: dict[str, Any] = {
        "status": status,
        "experiment": state.cfg.get("experiment_name"),
        "run_id": state.run_id,
        "run_dir": str(state.run_dir),
        "components": components_in_use(state.components, state.plan or {}),
        "layers": state.plan,
        "providers": state.providers,
        "metrics": metrics,
        "best": {name: value for name, value in best.items()},
        "params": state.params,
        "global_step": trainer.global_step if trainer is not None else 0,
        "wall_time_s": round(time.time() - state.started, 3),
        "tokens_per_second": state.throughput.tokens_per_second if state.throughput is not None else None,
        "data_wait_fraction": state.throughput.data_wait_fraction if state.throughput is not None else None,
        "wandb_dir": str(wandb_dir) if wandb_dir else None,
        "memory": state.memory,
        "sharding": sharding_report(trainer) if trainer is not None else None,  # trainer=fsdp: what each rank holds
        "extra": extra,
    }
    if error is not None:
        summary["error"] = error
        summary["traceback"] = traceback.format_exc(limit=-8) if sys.exc_info()[0] else None
    return summary


def _flat_summary(summary: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {name: value for name, value in summary["metrics"].items()}
    flat.update({f"best/{name}": value for name, value in summary["best"].items()})
    flat.update({name: value for name, value in summary["extra"].items()})
    for key in ("status", "params", "wall_time_s", "tokens_per_second", "data_wait_fraction", "global_step"):
        flat[key] = summary[key]
    return flat
