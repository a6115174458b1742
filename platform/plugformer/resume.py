"""``resume=<run dir>``: continue a run from its last checkpoint, with its saved config,
global step, learning-rate schedule and W&B run id."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from plugformer.errors import ConfigError

RUN_FILE = "run.json"
LAST_CHECKPOINT = Path("checkpoints") / "last.ckpt"


@dataclass(frozen=True)
class RunPlan:
    """Where and how a run starts: its config, folder, W&B id and checkpoint to restore."""

    cfg: DictConfig
    run_dir: Path
    run_id: str
    ckpt_path: str | None


def new_run_id() -> str:
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
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    groups = [o for o in overrides if "/" in o.split("=", 1)[0] or o.split("=", 1)[0].lstrip("+~") in _GROUPS]
    if groups:
        raise ConfigError(
            f"resume continues a run with its saved components; cannot apply {', '.join(groups)}.",
            expected="only key=value overrides (trainer.max_steps=2000) next to resume=",
            fix="start a new run for a different composition",
        )
    return [o for o in overrides if not o.startswith("hydra.")]


_GROUPS = {"model", "objective", "data", "optim", "trainer", "logger", "callbacks", "paths", "experiment", "debug"}


def plan_run(cfg: DictConfig, output_dir: Path) -> RunPlan:
    """A fresh run in Hydra's output folder, or the resumed run named by ``cfg.resume``."""
    if not cfg.get("resume"):
        run_id = read_run_id(output_dir) or new_run_id()
        return RunPlan(cfg, output_dir, run_id, None)
    run_dir = Path(str(cfg.resume)).expanduser().resolve()
    config_file = run_dir / "config.yaml"
    checkpoint = run_dir / LAST_CHECKPOINT
    if not config_file.is_file() or not checkpoint.is_file():
        raise ConfigError(
            f"resume={cfg.resume} is not a run directory with a last checkpoint.",
            expected=f"{config_file} and {checkpoint}",
            fix="pass the run directory that a previous `plugformer train` printed",
        )
    saved = OmegaConf.load(config_file)
    overrides = _value_overrides()
    if overrides:
        saved = OmegaConf.merge(saved, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
    with open_dict(saved):
        saved.resume = str(run_dir)
        saved.run_dir = str(run_dir)
    run_id = read_run_id(run_dir) or new_run_id()
    return RunPlan(saved, run_dir, run_id, str(checkpoint))
