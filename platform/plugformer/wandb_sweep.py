"""``plugformer sweep wandb <study.yaml>``: the W&B sweep configuration of a study file.

A study file (sweeps/*.yaml) is a Hydra primary config whose ``hydra.sweeper.params`` name
the swept keys in Hydra's override grammar. Each becomes a W&B sweep parameter:

- ``a,b,c`` and ``choice(a, b, c)`` → ``values: [a, b, c]``;
- ``range(start, stop, step)`` → ``values`` (the integers, as Hydra expands them);
- ``interval(lo, hi)`` → ``min``/``max`` (uniform), ``tag(log, interval(lo, hi))`` →
  ``distribution: log_uniform_values``; integer bounds give ``int_uniform``.

The method is ``grid`` for Hydra's basic sweeper when every parameter is a list, ``bayes``
for a search sweeper (Optuna), ``random`` otherwise; the metric is the study's
``optimized_metric`` with the sweeper's ``direction``. The agent runs ``plugformer train``
with the study file and each trial's values as Hydra overrides (``${args_no_hyphens}`` gives
``key=value``), so a W&B sweep trains exactly what ``-m`` would; the W&B run id the agent
assigns (``WANDB_RUN_ID``) becomes the run's id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from plugformer.errors import ConfigError


def sweep_parameter(key: str, expression: str) -> dict[str, Any]:
    """The W&B parameter for one Hydra sweep expression (see the module docstring)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    try:
        override = OverridesParser.create().parse_override(f"{key}={expression}")
    except Exception as error:  # noqa: BLE001 - Hydra's grammar errors, reported as ours
        raise ConfigError(
            f"the sweep expression {key}={expression} is not Hydra override syntax ({error})",
            expected="a,b,c or choice(...), range(...), interval(...), tag(log, interval(...))",
            fix=f"correct hydra.sweeper.params.{key} in the study file",
        ) from None
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return {"values": [_plain(v) for v in value.list]}
    if isinstance(value, RangeSweep):
        return {"values": [_plain(v) for v in override.sweep_iterator()]}
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if "log" in value.tags:
            return {"distribution": "log_uniform_values", "min": float(low), "max": float(high)}
        if isinstance(low, int) and isinstance(high, int):
            return {"distribution": "int_uniform", "min": low, "max": high}
        return {"distribution": "uniform", "min": float(low), "max": float(high)}
    return {"value": _plain(value)}  # a fixed value in the sweeper's params


def _plain(value: Any) -> Any:
    """A value as the agent will pass it back: scalars as they are, lists and dicts in
    Hydra's override syntax (``[short_conv,full]``), so ``key=value`` composes again."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(_plain(item)) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{key}:{_plain(item)}" for key, item in value.items()) + "}"
    return value if isinstance(value, (int, float, bool, str)) or value is None else str(value)


def wandb_sweep_config(study: Path, *, project: str | None = None) -> dict[str, Any]:
    """The W&B sweep configuration (a dict for ``wandb sweep``) of the study file ``study``."""
    from omegaconf import OmegaConf

    if not study.is_file():
        raise ConfigError(f"no study file at {study}", expected="a sweeps/<name>.yaml file", fix="check the path")
    cfg = OmegaConf.load(study)
    selected = OmegaConf.select(cfg, "hydra.sweeper")
    sweeper = OmegaConf.to_container(selected, resolve=False) if selected is not None else {}
    params = sweeper.get("params") or {}
    if not params:
        raise ConfigError(
            f"{study} sweeps nothing: it has no hydra.sweeper.params",
            expected="a study file with hydra.sweeper.params",
            fix="add the swept keys under hydra.sweeper.params",
        )
    search = any("optuna" in str(item) for item in cfg.get("defaults", [])) or "sampler" in sweeper
    parameters = {key: sweep_parameter(key, str(expression)) for key, expression in params.items()}
    if search:
        method = "bayes"
    else:
        method = "grid" if all("values" in p or "value" in p for p in parameters.values()) else "random"
    metric = cfg.get("optimized_metric")
    if method == "bayes" and not metric:
        raise ConfigError(
            f"{study} is a search (Optuna) but sets no optimized_metric",
            expected="optimized_metric: <a logged metric such as val/loss>",
            fix="set optimized_metric in the study file",
        )
    config: dict[str, Any] = {
        "name": str(cfg.get("experiment_name") or study.stem),
        "method": method,
        "parameters": parameters,
        "command": ["plugformer", "train", "--config-dir", str(study.parent), "--config-name", study.stem, "${args_no_hyphens}"],
    }
    if metric:
        goal = "maximize" if "max" in str(sweeper.get("direction", "minimize")).lower() else "minimize"
        config["metric"] = {"name": str(metric), "goal": goal}
    if project:
        config["project"] = project
    return config


def write_wandb_sweep(study: Path, out: Path | None = None, *, project: str | None = None) -> Path:
    """Write the W&B sweep YAML of ``study`` (default: ``<study>.wandb.yaml`` beside it)."""
    import yaml

    config = wandb_sweep_config(study, project=project)
    out = out or study.with_suffix(".wandb.yaml")
    out.write_text(yaml.safe_dump(config, sort_keys=False))
    return out
