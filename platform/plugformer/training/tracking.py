"""The run's loggers: CSV always, plus W&B (offline unless opted in) and TensorBoard when
chosen with ``logger=...``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

from plugformer.errors import ConfigError
from plugformer.training.wandb_online import choose_online
from plugformer.training.metrics_csv import PersistentCSVLogger


def wandb_offline(options: DictConfig) -> bool:
    """Offline unless WANDB_MODE=online or ``logger.wandb.offline=false``."""
    if os.environ.get("WANDB_MODE") == "online":
        return False
    return bool(options.get("offline", True))


def build_loggers(
    cfg: DictConfig, run_dir: Path, *, tags: list[str], job_type: str, run_id: str, resume_step: int | None = None
) -> list[Logger]:
    """metrics.csv always, plus the chosen trackers. ``resume_step``: the global step of the
    checkpoint a resume starts from; metrics.csv keeps the rows logged before it."""
    loggers: list[Logger] = [PersistentCSVLogger(save_dir=str(run_dir), keep_before_step=resume_step)]
    chosen = cfg.get("logger") or {}
    unknown = set(chosen) - {"wandb", "tensorboard"}
    if unknown:
        raise ConfigError(
            f"Unknown logger(s): {', '.join(sorted(unknown))}.",
            expected="logger= one or more of wandb, tensorboard, csv, none",
            fix="choose with logger=wandb or logger=[wandb,tensorboard]",
        )
    if "wandb" in chosen:
        loggers.append(_wandb_logger(cfg, chosen.wandb, run_dir, tags=tags, job_type=job_type, run_id=run_id))
    if "tensorboard" in chosen:
        loggers.append(_tensorboard_logger(run_dir))
    return loggers


def _wandb_logger(cfg: DictConfig, options: DictConfig, run_dir: Path, *, tags: list[str], job_type: str, run_id: str) -> Logger:
    from plugformer.training.wandb_steps import StepWandbLogger

    offline = wandb_offline(options) or not choose_online()  # never blocks: falls back to offline
    if offline:
        os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    config: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    return StepWandbLogger(
        save_dir=str(run_dir),
        offline=offline,
        project=options.get("project", "plugformer"),
        entity=options.get("entity"),
        name=options.get("name") or f"{cfg.experiment_name}/{run_dir.name}",
        group=cfg.experiment_name,
        tags=tags,
        job_type=job_type,
        id=run_id,
        resume="allow",
        config=config,
        notes=options.get("notes"),
    )


def _tensorboard_logger(run_dir: Path) -> Logger:
    from lightning.pytorch.loggers import TensorBoardLogger

    try:
        return TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="")
    except ModuleNotFoundError as error:
        raise ConfigError(
            f"logger=tensorboard needs the tensorboard package: {error}",
            fix="pip install tensorboard, or choose logger=wandb",
        ) from None


def is_wandb(logger: Logger) -> bool:
    """Whether ``logger`` is a (subclass of Lightning's) WandbLogger, without importing wandb."""
    return any(cls.__name__ == "WandbLogger" for cls in type(logger).__mro__)


def wandb_run_dir(loggers: list[Logger]) -> Path | None:
    """The W&B run's local folder (offline-run-... or run-...), when there is one."""
    for logger in loggers:
        if is_wandb(logger):
            experiment = logger.experiment
            directory = getattr(experiment, "dir", None)
            if isinstance(directory, str) and directory:
                return Path(directory).parent
    return None


def log_evaluation(cfg: DictConfig, run_dir: Path, entry: dict[str, Any], *, step: int) -> None:
    """Log an evaluation (``plugformer eval``) to the training run's W&B run at ``step``
    (after the training's last step, so W&B keeps it): its metrics as ``eval/<metric>``
    beside ``eval/max_length`` (evaluations at several lengths draw a curve), and in the
    run's summary under ``eval/<split>@<max_length>/<metric>``. Offline runs get a new
    offline folder with the same run id; ``wandb sync`` merges them."""
    import wandb

    from plugformer.resume import read_run_id

    options = (cfg.get("logger") or {}).get("wandb") or {}
    offline = wandb_offline(options) or not choose_online()
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        dir=str(run_dir),
        id=read_run_id(run_dir),
        resume="allow",
        project=options.get("project", "plugformer"),
        entity=options.get("entity"),
        mode="offline" if offline else "online",
        settings=wandb.Settings(silent=True),
    )
    try:
        metrics = {f"eval/{name}": value for name, value in entry["metrics"].items()}
        run.log({**metrics, "eval/max_length": entry["max_length"]}, step=step)
        label = f"eval/{entry['split']}@{entry['max_length']}"
        run.summary.update({f"{label}/{name}": value for name, value in entry["metrics"].items()})
    finally:
        run.finish()
