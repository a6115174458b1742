"""Studies: a failed job never stops a sweep and the sweep's study.json/study.md list every
job with the failed ones' reasons; with optimized_metric each job returns its best value, so
the Optuna sweeper searches over real runs (sweeps/optuna_listops.yaml)."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
import yaml

from helpers import FAST, REPO, read_summary, run_cli
from plugformer.cli import main
from plugformer.study import objective_value

TINY_LISTOPS = [
    "trainer.max_steps=4", "trainer.val_check_interval=2", "data.train_examples=200", "data.val_examples=32",
    "data.test_examples=16", "data.max_length=60", "test_after_fit=false", "logger=none", "callbacks.progress_bar=none",
]


def test_a_refused_job_is_listed_with_its_reason_and_the_sweep_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "study"
    result = run_cli(
        "train", "model/attention=linear", "model/position=learned,alibi", *FAST, "trainer.max_steps=2",
        "trainer.val_check_interval=2", "logger=none", "optimized_metric=val/loss", f"run_dir={root}", "-m",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = json.loads((root / "study.json").read_text())
    assert (study["jobs"], study["finished"]) == (2, 1)
    [failed] = study["failed"]
    assert failed["job"] == 1 and "model/position=alibi" in failed["overrides"] and "score_bias" in failed["reason"]
    assert study["best"]["job"] == 0
    assert study["best"]["value"] == read_summary(root / "0")["best"]["val/loss"]
    markdown = (root / "study.md").read_text()
    assert "1 of 2 jobs finished" in markdown and "score_bias" in markdown


def test_an_optuna_search_trains_each_trial_and_reports_the_best(tmp_path: Path) -> None:
    root = tmp_path / "optuna"
    result = run_cli(
        "train", "-m", "--config-dir", "sweeps", "--config-name", "optuna_listops", "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=2", "model.d_model=choice(32,48)", *TINY_LISTOPS, f"run_dir={root}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    optuna = yaml.safe_load((root / "optimization_results.yaml").read_text())
    study = json.loads((root / "study.json").read_text())
    values = [read_summary(root / str(job))["best"]["val/accuracy"] for job in range(3)]
    assert [row["objective"] for row in study["rows"]] == values
    assert study["direction"] == "maximize" and study["best"]["value"] == max(values) == optuna["best_value"]
    best_overrides = study["best"]["overrides"]
    for key, value in optuna["best_params"].items():
        assert any(o.split("=", 1)[0] == key and math.isclose(float(o.split("=", 1)[1]), float(value)) for o in best_overrides), (key, value)


def test_objective_value_prefers_the_best_and_fails_as_nan() -> None:
    finished = {"status": "finished", "best": {"val/loss": 1.5}, "metrics": {"val/loss": 2.0, "val/accuracy": 0.4}}
    assert objective_value(finished, "val/loss") == 1.5
    assert objective_value(finished, "val/accuracy") == 0.4
    assert math.isnan(objective_value({**finished, "status": "failed"}, "val/loss"))
    assert math.isnan(objective_value(finished, "val/bleu")) and math.isnan(objective_value(None, "val/loss"))


def test_a_study_file_becomes_a_wandb_sweep_whose_arguments_compose(tmp_path: Path) -> None:
    out = tmp_path / "zoology.wandb.yaml"
    result = run_cli("sweep", "wandb", "sweeps/zoology_mqar.yaml", "--out", str(out))
    assert result.returncode == 0, result.stderr
    sweep = yaml.safe_load(out.read_text())
    assert sweep["method"] == "grid" and "metric" not in sweep
    assert sweep["parameters"] == {
        "model.plan.attention": {"values": ["[full]", "[local]", "[linear]", "[short_conv,full]"]},
        "model.d_model": {"values": [32, 64, 128]},
    }
    assert sweep["command"][-1] == "${args_no_hyphens}"
    # What the agent runs for one trial: the study file plus key=value overrides.
    trial = [f"{key}={spec['values'][-1]}" for key, spec in sweep["parameters"].items()]
    assert sweep["command"][0] == "plugformer"
    shown = run_cli(*sweep["command"][1:-1], *trial, "--cfg", "job")
    assert shown.returncode == 0, shown.stderr[-2000:]
    job = yaml.safe_load(shown.stdout)
    assert job["model"]["plan"]["attention"] == ["short_conv", "full"] and job["model"]["d_model"] == 128

    optuna = yaml.safe_load(Path(run_cli("sweep", "wandb", "sweeps/optuna_listops.yaml", "--out", str(tmp_path / "o.yaml")).stdout.split()[1]).read_text())
    assert optuna["method"] == "bayes" and optuna["metric"] == {"name": "val/accuracy", "goal": "maximize"}
    assert optuna["parameters"]["optim.lr"] == {"distribution": "log_uniform_values", "min": 1e-4, "max": 3e-3}
    assert optuna["parameters"]["model.d_model"] == {"values": [64, 128, 192]}


def test_a_study_without_a_sweep_is_refused(tmp_path: Path) -> None:
    study = tmp_path / "empty.yaml"
    study.write_text("defaults:\n  - train\n")
    result = run_cli("sweep", "wandb", str(study))
    assert result.returncode == 2 and "hydra.sweeper.params" in result.stderr and "Traceback" not in result.stderr


def test_the_slurm_dry_run_writes_one_script_per_job_that_runs_that_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "slurm"
    # The CLI's main in this process (the job's script is then run through the real command below).
    status = main([
        "sweep", "slurm", "--study", str(REPO / "sweeps" / "zoology_mqar.yaml"), "--out", str(out), "model.d_model=32,64",
        "trainer.devices=2", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=2",
    ])
    assert status == 0, capsys.readouterr().err[-3000:]
    scripts = sorted(out.glob("job_*.sbatch"), key=lambda p: int(p.stem.split("_")[1]))
    assert len(scripts) == 4 * 2  # the study's 4 mixers x the command line's 2 widths (replacing its 3)
    text = scripts[-1].read_text()
    for line in ("#SBATCH --partition=gpu", "#SBATCH --ntasks-per-node=2", "#SBATCH --gpus-per-node=2", "#SBATCH --time=240"):
        assert line in text, text
    command = shlex.split(text.strip().splitlines()[-1])
    train = command[command.index("plugformer") + 1 :]
    assert "hydra.launcher.partition=gpu" not in train and "model.d_model=64" in train
    assert "model.plan.attention=[short_conv,full]" in train and train[-1].startswith("run_dir=")
    shown = run_cli(*train, "--cfg", "job")  # the script's job composes as written
    assert shown.returncode == 0, shown.stderr[-2000:]
    job = yaml.safe_load(shown.stdout)
    assert job["model"]["d_model"] == 64 and job["trainer"]["devices"] == 2
