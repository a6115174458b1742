"""``resume=<run dir>``: continue a run from its last checkpoint, with its saved config,
global step, learning-rate schedule and W&B run id.

Before anything is written, a resume checks that the folder is a run directory, that the
chosen checkpoint (``resume_checkpoint=last|best|<file>``) can be read, and (once the model
is built) that the saved config still builds the model the checkpoint holds.
"""

from __future__ import annotations

import json
import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from plugformer.errors import ConfigError
from plugformer.sharded_checkpoint import read_metadata, tensor_shapes

RUN_FILE = "run.json"
CHECKPOINT_DIR = Path("checkpoints")
LAST_CHECKPOINT = CHECKPOINT_DIR / "last.ckpt"
# The key under which a checkpoint records what the run was composed of (see callbacks.RunRecord).
RECORD_KEY = "plugformer"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a resume needs to know about a checkpoint before restoring it."""

    path: Path
    global_step: int
    components: dict[str, str] | None
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPlan:
    """Where and how a run starts: its config, folder, W&B id and checkpoint to restore."""

    cfg: DictConfig
    run_dir: Path
    run_id: str
    ckpt_path: str | None
    checkpoint: CheckpointInfo | None = None


def new_run_id() -> str:
    """A fresh id, or the one a W&B sweep agent assigned to this run (``WANDB_RUN_ID``)."""
    if os.environ.get("WANDB_RUN_ID"):
        return os.environ["WANDB_RUN_ID"]
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_run_id(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError):
        return None


def write_run_id(run_dir: Path, run_id: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id}) + "\n")


def _value_overrides() -> list[str]:
    """The command line's ``key=value`` overrides other than ``resume``; group choices
    (``model/attention=...``) cannot change a run that already started."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("resume=", "resume_checkpoint="))]
    groups = [o for o in overrides if "/" in o.split("=", 1)[0] or o.split("=", 1)[0].lstrip("+~") in _GROUPS]
    if groups:
        raise ConfigError(
            f"resume continues a run with its saved components; cannot apply {', '.join(groups)}.",
            expected="only key=value overrides (trainer.max_steps=2000) next to resume=",
            fix="start a new run for a different composition",
        )
    return [o for o in overrides if not o.startswith("hydra.")]


_GROUPS = {"model", "objective", "data", "optim", "trainer", "logger", "callbacks", "paths", "experiment", "debug"}


def check_run_directory(resume: str) -> Path:
    """The resolved run directory named by ``resume=``; raises :class:`ConfigError` (and
    writes nothing) when it is not one."""
    run_dir = Path(resume).expanduser().resolve()
    config_file = run_dir / "config.yaml"
    checkpoints = sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt")) if run_dir.is_dir() else []
    if not config_file.is_file() or not checkpoints:
        raise ConfigError(
            f"resume={resume} is not a run directory with a last checkpoint.",
            expected=f"{config_file} and {run_dir / LAST_CHECKPOINT}",
            fix="pass the run directory that a previous `plugformer train` printed",
        )
    return run_dir


def read_checkpoint(path: Path) -> CheckpointInfo:
    """Open a checkpoint without loading its tensors (memory-mapped), a file or a sharded
    checkpoint directory (``trainer=fsdp``: its metadata and shard index); raises on one
    that is truncated or not a checkpoint."""
    import torch

    if Path(path).is_dir():
        checkpoint = read_metadata(path)  # raises when meta.pt is missing: not a checkpoint
        shapes = tensor_shapes(path)
    else:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        shapes = {name: tuple(value.shape) for name, value in checkpoint.get("state_dict", {}).items() if hasattr(value, "shape")}
    record = checkpoint.get(RECORD_KEY) or {}
    return CheckpointInfo(Path(path), int(checkpoint["global_step"]), record.get("components"), shapes)


def _try_read(path: Path) -> tuple[CheckpointInfo | None, str | None]:
    try:
        return read_checkpoint(path), None
    except Exception as error:  # noqa: BLE001 - any failure to read means "unusable"
        return None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _checkpoint_choice(run_dir: Path, choice: str) -> Path:
    if choice in ("last", "best"):
        return run_dir / CHECKPOINT_DIR / f"{choice}.ckpt"
    path = Path(choice).expanduser()
    return path if path.is_absolute() else (run_dir / CHECKPOINT_DIR / path)


def choose_checkpoint(run_dir: Path, choice: str = "last") -> CheckpointInfo:
    """The checkpoint ``resume_checkpoint=`` names, read and checked; a missing or unreadable
    one raises :class:`ConfigError` naming the file and the checkpoints that do load."""
    path = _checkpoint_choice(run_dir, choice)
    info, problem = _try_read(path) if path.exists() else (None, "the file does not exist")
    if info is not None:
        return info
    usable = []
    for other in sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt")):
        if other.resolve() != path.resolve():
            other_info, _ = _try_read(other)
            if other_info is not None:
                name = other.stem if other.stem in ("last", "best") else other.name
                usable.append(f"resume_checkpoint={name} (step {other_info.global_step})")
    fix = f"resume from another checkpoint: {' or '.join(usable)}" if usable else "start a new run; no checkpoint of this run can be read"
    raise ConfigError(
        f"Cannot resume from {path}: it is corrupt, truncated or missing ({problem}).",
        expected="a checkpoint written by plugformer train",
        fix=fix + f"; or move {path.name} away",
    )


def _read_saved_config(path: Path) -> DictConfig:
    try:
        saved = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - a file that does not parse is damaged
        saved = error
    if not isinstance(saved, DictConfig) or "model" not in saved:
        problem = f"{type(saved).__name__}: {str(saved).splitlines()[0] if str(saved) else ''}" if isinstance(saved, Exception) else "no model section"
        raise ConfigError(
            f"Cannot resume: the run's {path} is damaged ({problem}).",
            expected="the config.yaml that plugformer train wrote",
            fix=f"restore it (its record of the composition is in {path.parent / '.hydra' / 'config.yaml'}), or start a new run",
        )
    return saved


def plan_run(cfg: DictConfig, output_dir: Path) -> RunPlan:
    """A fresh run in Hydra's output folder, or the resumed run named by ``cfg.resume``."""
    if not cfg.get("resume"):
        run_id = read_run_id(output_dir) or new_run_id()
        return RunPlan(cfg, output_dir, run_id, None)
    run_dir = check_run_directory(str(cfg.resume))
    checkpoint = choose_checkpoint(run_dir, str(cfg.get("resume_checkpoint") or "last"))
    saved = _read_saved_config(run_dir / "config.yaml")
    overrides = _value_overrides()
    if overrides:
        saved = OmegaConf.merge(saved, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    with open_dict(saved):
        saved.resume = str(run_dir)
        saved.run_dir = str(run_dir)
    run_id = read_run_id(run_dir) or new_run_id()
    return RunPlan(saved, run_dir, run_id, str(checkpoint.path), checkpoint)


def check_matches_checkpoint(checkpoint: CheckpointInfo, components: dict[str, str], state: dict[str, Any]) -> None:
    """Refuse a resume whose config builds something else than the checkpoint holds (a
    config.yaml edited by hand): different components, or parameters of other names or shapes."""
    differences = []
    if checkpoint.components is not None:
        for kind in sorted(set(checkpoint.components) | set(components)):
            saved, now = checkpoint.components.get(kind), components.get(kind)
            if saved != now:
                differences.append(f"{kind}: checkpoint has {saved}, config.yaml has {now}")
    shapes = {name: tuple(value.shape) for name, value in state.items() if hasattr(value, "shape")}
    if checkpoint.shapes:
        for name in sorted(set(checkpoint.shapes) | set(shapes)):
            saved_shape, shape = checkpoint.shapes.get(name), shapes.get(name)
            if saved_shape != shape:
                differences.append(f"{name}: checkpoint {saved_shape or 'absent'}, config.yaml builds {shape or 'absent'}")
    if differences:
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        raise ConfigError(
            f"The run's config.yaml no longer matches its checkpoint {checkpoint.path}: {shown}.",
            expected="config.yaml as the run wrote it (change sizes or components in a new run)",
            fix="undo the edit of config.yaml, or start a new run with the new composition",
        )
