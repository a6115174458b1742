"""``plugformer sweep slurm``: the SLURM submission scripts of a sweep, written and not
submitted (a dry run of ``hydra/launcher=slurm``).

The sweep is what ``plugformer train -m`` would run: a study file's
``hydra.sweeper.params`` (``--study``) and the sweep overrides on the command line (which
replace a study's axis of the same key), expanded into Hydra's grid. Every job gets one
script, ``<out>/job_<n>.sbatch``, whose #SBATCH lines come from the same
``hydra.launcher`` settings the real launcher reads (conf/hydra/launcher/slurm.yaml and
``hydra.launcher.*`` overrides), rendered by submitit itself, and whose command runs that
job's ``plugformer train`` under ``srun`` (one task per device: Lightning's SLURM
environment makes them DDP ranks). The scripts can be submitted by hand with ``sbatch``.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from plugformer.errors import ConfigError

LAUNCHER = "hydra/launcher=slurm"


def _compose(study: Path | None, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir, initialize_config_module

    from plugformer.config import store_core_configs
    from plugformer.plugins import load_plugins

    load_plugins()
    store_core_configs()
    if study is None:
        with initialize_config_module(config_module="plugformer.conf", version_base="1.3"):
            return compose(config_name="train", overrides=[*overrides, LAUNCHER], return_hydra_config=True)
    with initialize_config_dir(config_dir=str(study.parent.resolve()), version_base="1.3"):
        return compose(
            config_name=study.stem, overrides=["hydra.searchpath=[pkg://plugformer.conf]", *overrides, LAUNCHER], return_hydra_config=True
        )


def split_overrides(overrides: list[str]) -> tuple[list[str], dict[str, str]]:
    """The fixed overrides, and the swept ones by key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    return fixed, {o.get_key_element(): o.input_line for o in parsed if o.is_sweep_override()}


def sweep_jobs(swept: dict[str, str], study_params: dict[str, str]) -> list[list[str]]:
    """One override list per job: the study's axes, replaced by the command line's sweep
    overrides of the same key, expanded as Hydra's grid."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    axes = {key: f"{key}={value}" for key, value in study_params.items()}
    axes.update(swept)
    if not axes:
        return [[]]
    batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(list(axes.values())), None)
    return [list(job) for batch in batches for job in batch]


def _sbatch(command: str, launcher: dict[str, Any], folder: Path, job_name: str) -> str:
    from submitit.slurm.slurm import _make_sbatch_string

    optional = {
        "partition": launcher.get("partition"), "qos": launcher.get("qos"), "account": launcher.get("account"),
        "constraint": launcher.get("constraint"), "exclude": launcher.get("exclude"), "gres": launcher.get("gres"),
        "comment": launcher.get("comment"), "cpus_per_task": launcher.get("cpus_per_task"),
        "gpus_per_node": launcher.get("gpus_per_node"), "gpus_per_task": launcher.get("gpus_per_task"),
        "cpus_per_gpu": launcher.get("cpus_per_gpu"), "mem_per_gpu": launcher.get("mem_per_gpu"),
        "mem_per_cpu": launcher.get("mem_per_cpu"), "setup": launcher.get("setup") or None,
        "mem": f"{launcher['mem_gb']}GB" if launcher.get("mem_gb") else None,
    }
    return _make_sbatch_string(
        command=command,
        folder=str(folder),
        job_name=job_name,
        time=int(launcher.get("timeout_min") or 60),
        nodes=int(launcher.get("nodes") or 1),
        ntasks_per_node=int(launcher.get("tasks_per_node") or 1),
        signal_delay_s=int(launcher.get("signal_delay_s") or 90),
        stderr_to_stdout=bool(launcher.get("stderr_to_stdout")),
        additional_parameters=dict(launcher.get("additional_parameters") or {}),
        **{key: value for key, value in optional.items() if value is not None},
    )


def write_slurm_scripts(overrides: list[str], *, study: Path | None = None, out: Path | None = None) -> list[Path]:
    """Write one sbatch script per job of the sweep; returns their paths (see the module)."""
    if study is not None and not study.is_file():
        raise ConfigError(f"no study file at {study}", expected="a sweeps/<name>.yaml file", fix="check the path")
    fixed, swept = split_overrides(overrides)
    base = _compose(study, fixed)
    study_params = base.hydra.sweeper.get("params")
    params = OmegaConf.to_container(study_params, resolve=False) if study_params is not None else {}
    jobs = sweep_jobs(swept, {str(k): str(v) for k, v in params.items()})
    # The launcher's settings shape the script; the job's command needs none of them.
    job_fixed = [o for o in fixed if not o.startswith(("hydra.launcher.", "hydra/launcher="))]
    sweep_dir = Path(str(base.hydra.sweep.dir))
    out = out or sweep_dir / "slurm"
    out.mkdir(parents=True, exist_ok=True)
    prefix = ["plugformer", "train", *(["--config-dir", str(study.parent), "--config-name", study.stem] if study else [])]
    paths = []
    for number, job in enumerate(jobs):
        cfg = _compose(study, [*fixed, *job])
        launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
        command = shlex.join([*prefix, *job_fixed, *job, f"run_dir={sweep_dir / str(number)}"])
        path = out / f"job_{number}.sbatch"
        path.write_text(_sbatch(command, launcher, out / "logs", f"{cfg.experiment_name}-{number}"))
        paths.append(path)
    return paths
