"""``plugformer train``: load plugins, compose the config with Hydra, and run.

Hydra reads ``sys.argv``, so the overrides are put there for the duration of Hydra's main;
the original arguments are restored before training, because Lightning re-runs the same
command line to start the other DDP ranks. Lightning, W&B and ``datasets`` are imported only
once a run starts (after its first line is printed), so a config error reaches the user
without waiting for them.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from plugformer.config import store_core_configs
from plugformer.errors import PlugformerError, full_tracebacks_requested, report_user_error
from plugformer.overrides import check_group_choices, composition_errors_raised
from plugformer.plugins import Plugins, load_plugins
from plugformer.resume import check_run_directory, plan_run, write_run_id
from plugformer.runlock import check_free, locked
from plugformer.study import objective_value, write_study_summary
from plugformer.sweep_root import with_sweep_root

CONFIG_PACKAGE = "pkg://plugformer.conf"


def _output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir).resolve()


def run_from_config(cfg: DictConfig, plugins: Plugins) -> dict[str, Any]:
    """Train one composed config in Hydra's output folder (``run_dir``)."""
    plan = plan_run(cfg, _output_dir())
    cfg, run_dir = plan.cfg, plan.run_dir
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    if process_rank() == 0:
        action = "resuming" if plan.ckpt_path is not None else "training"
        print(f"plugformer: {action} {cfg.get('experiment_name')} in {run_dir}", flush=True)
    _quiet_library_noise()
    from lightning.pytorch.utilities import rank_zero_only

    from plugformer.training.run import CONFIG_FILE, train

    # Only the process that writes the run directory locks it (DDP ranks share it by design).
    with locked(run_dir if rank_zero_only.rank == 0 else None):
        if rank_zero_only.rank == 0:
            if plan.ckpt_path is None:  # a resume saves its config once training has started
                (run_dir / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
            write_run_id(run_dir, plan.run_id)
        # train prints the run's header and closing block (plugformer.training.console).
        return train(cfg, plugins, run_dir, run_id=plan.run_id, ckpt_path=plan.ckpt_path, checkpoint=plan.checkpoint)


def _quiet_library_noise() -> None:
    """Silence messages that say nothing about the run (progress bars of cache writes,
    deprecations inside libraries, a warning about the run folder we created ourselves)."""
    import datasets

    datasets.disable_progress_bars()
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*Experiment logs directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*The anonymous setting has no effect.*")


def launch_training(overrides: list[str]) -> int:
    """Run ``plugformer train`` with these overrides; returns the exit status.

    A user error ends a single run with a short message (status 2). In a sweep (``-m``) any
    failure ends only that job: its summary.json records it, the sweep goes on (a study over
    components survives the combinations refused by design, and a diverged run), and the
    sweep's folder gets study.json/study.md listing every job, the failed ones with their
    reasons (:mod:`plugformer.study`). With ``optimized_metric`` set, each job returns that
    metric's best value (NaN when it failed) for search sweepers such as Optuna.
    """
    plugins = load_plugins()  # lazy components: their modules load when the config chooses them
    store_core_configs()
    check_group_choices(overrides)  # a typo in experiment= or debug= must not train the default
    original_argv = list(sys.argv)
    rejected: list[str] = []
    sweep: dict[str, Any] = {}
    # Hydra composes once; its refusals end as one plugformer error (exit 2), raised here.
    composing = composition_errors_raised(overrides)

    @hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name="train")
    def hydra_task(cfg: DictConfig) -> float | None:
        composed()
        sys.argv = original_argv
        hydra_cfg = HydraConfig.get()
        metric = cfg.get("optimized_metric")
        multirun = hydra_cfg.mode.name == "MULTIRUN"
        if multirun:
            sweep.update(dir=hydra_cfg.sweep.dir, metric=metric, direction=str(hydra_cfg.sweeper.get("direction", "minimize")))
        try:
            summary = run_from_config(cfg, plugins)
        except Exception as error:
            if full_tracebacks_requested() or not (multirun or isinstance(error, PlugformerError)):
                raise
            if not multirun:
                raise SystemExit(report_user_error(error)) from None
            job = f"job {hydra_cfg.job.num} ({' '.join(hydra_cfg.overrides.task)})"
            reason = error.what if isinstance(error, PlugformerError) else f"{type(error).__name__}: {error}"
            print(f"plugformer: {job} {'refused' if isinstance(error, PlugformerError) else 'failed'}: {reason}", file=sys.stderr)
            rejected.append(job)
            return math.nan if metric else None
        return objective_value(summary, metric) if metric else None

    sys.argv = [original_argv[0], *_with_shared_run_dir(_with_resume_dir(with_sweep_root(overrides)))]
    try:
        with locked(_known_run_dir(overrides)), composing as composed:
            hydra_task()
    finally:
        sys.argv = original_argv
    if rejected:
        print(f"plugformer: {len(rejected)} job(s) of the sweep failed or were refused; their summary.json says why.", file=sys.stderr)
    if sweep and process_rank() == 0 and Path(sweep["dir"]).is_dir():
        write_study_summary(Path(sweep["dir"]), sweep["metric"], "maximize" if "maximize" in sweep["direction"].lower() else "minimize")
        print(f"plugformer: study summary: {Path(sweep['dir']) / 'study.md'}")
    return 0


def _known_run_dir(overrides: list[str]) -> Path | None:
    """The run directory, when the command line names it literally (``resume=``, ``run_dir=``),
    for rank 0 of a single run: it is locked before Hydra writes anything into it."""
    if process_rank() != 0 or any(o in ("-m", "--multirun") or o.startswith("hydra.mode=") for o in overrides):
        return None
    for key in ("resume=", "run_dir="):
        values = [o.split("=", 1)[1] for o in overrides if o.startswith(key)]
        if values and values[-1] not in ("", "null") and "${" not in values[-1]:
            return Path(values[-1]).expanduser().resolve()
    return None


def process_rank() -> int:
    """This process's rank as the launcher set it in the environment (0 when none did): the
    same variables, in the same order, as Lightning's ``rank_zero_only`` reads at import."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key) is not None:
            return int(os.environ[key])
    return 0


def _with_resume_dir(overrides: list[str]) -> list[str]:
    """With ``resume=<dir>``, Hydra's output folder is that run's folder (its own config is
    kept in .hydra/resume), so a resumed run adds no stray run directory. A folder that is
    not a run directory is refused here, before Hydra writes anything into it."""
    resume = [o.split("=", 1)[1] for o in overrides if o.startswith("resume=")]
    if not resume or resume[-1] in ("", "null"):
        return overrides
    if process_rank() == 0:  # other ranks run beside rank 0, which holds the run's lock
        check_free(Path(resume[-1]).expanduser())  # a running run is named as such, checkpoint or not
    run_dir = check_run_directory(resume[-1])
    if any(o.startswith("hydra.run.dir=") for o in overrides):
        return overrides
    return [*overrides, f"hydra.run.dir={run_dir}", "hydra.output_subdir=.hydra/resume"]


def _launch_id() -> str | None:
    """An id shared by all processes of one external launch (torchrun, SLURM), or None when
    this process was not started by one. Lightning's own DDP ranks get the run folder from
    Lightning instead (hydra.run.dir on their command line)."""
    if "RANK" not in os.environ and "SLURM_JOB_ID" not in os.environ:
        return None
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
    # Single-node torchrun: the ranks share their parent, the elastic agent.
    return f"torchrun-{run_id if run_id != 'none' else os.getppid()}"


def _with_shared_run_dir(overrides: list[str]) -> list[str]:
    """Under an external launcher every rank composes its own config, so the timestamped
    default run_dir would differ between ranks; name it after the launch instead."""
    launch_id = _launch_id()
    if launch_id is None or any(o.startswith(("run_dir=", "hydra.run.dir=")) for o in overrides):
        return overrides
    extra = [f"run_dir=${{paths.runs_dir}}/${{experiment_name}}/{launch_id}"]
    if os.environ.get("RANK", "0") != "0":
        extra.append("hydra.output_subdir=null")
    return [*overrides, *extra]
