"""End-to-end: the real `plugformer` command trains, tracks in W&B offline, writes its run
directory, and refuses bad input with one clear message and a non-zero exit."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FAST, read_summary, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = run_cli(
        "train", "trainer.max_steps=120", "trainer.val_check_interval=40", "trainer.log_every_n_steps=5",
        "optim.warmup_steps=10", "experiment_name=e2e", "tags=[smoke]", f"run_dir={run_dir}", *FAST,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, result


def val_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["val/loss"]) for row in csv.DictReader(handle) if row.get("val/loss")]


def test_validation_loss_falls(trained) -> None:
    losses = val_losses(trained[0])
    assert len(losses) == 3
    assert losses[-1] < losses[0] - 0.2, losses


def test_run_directory_holds_config_checkpoints_metrics_and_summary(trained) -> None:
    run_dir, result = trained
    for name in ("config.yaml", "metrics.csv", "summary.json", "run.json", "checkpoints/last.ckpt", "checkpoints/best.ckpt"):
        assert (run_dir / name).is_file(), name
    assert not list(run_dir.glob("checkpoints/*.tmp")), "temporary checkpoint files left behind"
    summary = read_summary(run_dir)
    assert summary["status"] == "finished"
    assert summary["experiment"] == "e2e"
    assert summary["components"] == {
        "attention": "full", "position": "learned", "norm": "layernorm",
        "ffn": "mlp", "block": "standard", "objective": "causal_lm", "data": "mqar",
    }
    assert summary["global_step"] == 120
    assert summary["params"] > 0 and summary["wall_time_s"] > 0 and summary["tokens_per_second"] > 0
    for name in ("train/loss", "val/loss", "val/accuracy", "val/perplexity", "train/lr", "train/tokens_per_second"):
        assert name in summary["metrics"], name
    assert summary["best"]["val/loss"] == min(val_losses(run_dir))
    assert str(run_dir) in result.stdout and "summary.json" in result.stdout and "wandb leet" in result.stdout


def leet(*args: str) -> str:
    wandb = Path(sys.executable).with_name("wandb")
    result = subprocess.run([str(wandb), "leet", "inspect", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_wandb_offline_run_has_config_group_tags_and_summary(trained) -> None:
    run_dir = trained[0]
    wandb_dir = Path(read_summary(run_dir)["wandb_dir"])
    assert wandb_dir.parent == run_dir / "wandb" and wandb_dir.name.startswith("offline-run-")
    record = json.loads(leet("--summary", "--json", str(wandb_dir)))
    assert record["state"] == "finished" and record["project"] == "plugformer"
    assert record["config"]["model"]["attention"]["name"] == "full"
    assert record["config"]["model"]["d_model"] == 32
    assert set(record["tags"]) == {
        "attention:full", "position:learned", "norm:layernorm", "ffn:mlp", "block:standard", "objective:causal_lm",
        "data:mqar", "smoke",
    }
    summary = record["summary"]
    for name in ("val/loss", "best/val/loss", "tokens_per_second", "params", "wall_time_s", "status"):
        assert name in summary, name
    assert summary["status"] == "finished"
    run = next(json.loads(line)["run"] for line in leet("--json", str(wandb_dir)).splitlines() if '"type":"run"' in line)
    assert run["run_group"] == "e2e" and run["job_type"] == "causal_lm"
    assert run["run_id"] == read_summary(run_dir)["run_id"]


def test_unknown_component_lists_the_available_names(tmp_path: Path) -> None:
    result = run_cli("train", "model/attention=nonexistent", f"run_dir={tmp_path}")
    assert result.returncode != 0
    assert "model/attention" in result.stderr and "full" in result.stderr
    assert not (tmp_path / "summary.json").exists()


# A badly typed override (model.d_model=wide): test_bad_inputs.py checks its one message and status 2.


def test_user_errors_are_short_and_still_write_the_summary(tmp_path: Path) -> None:
    result = run_cli("train", "+trainer.no_such_argument=1", "logger=none", f"run_dir={tmp_path}", *FAST)
    assert result.returncode == 2
    assert "plugformer: error:" in result.stderr and "no_such_argument" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) < 8
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and "no_such_argument" in summary["error"]


def test_full_traceback_on_request(tmp_path: Path) -> None:
    result = run_cli("train", "+trainer.no_such_argument=1", "logger=none", f"run_dir={tmp_path}", *FAST, env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_resume_of_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    result = run_cli("train", f"resume={tmp_path}")
    assert result.returncode == 2
    assert "last checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_no_command_and_help() -> None:
    assert run_cli().returncode == 2
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "plugins" in result.stdout


def test_a_sweep_records_a_refused_combination_and_goes_on(tmp_path: Path) -> None:
    result = run_cli(
        "train", "-m", "model/attention=linear,full", "model/position=alibi", "trainer.max_steps=2",
        "trainer.val_check_interval=2", "logger=none", f"paths.runs_dir={tmp_path}", "experiment_name=sweep", *FAST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "refused" in result.stderr and "1 job(s)" in result.stderr
    (sweep,) = (tmp_path / "sweep").iterdir()
    refused, trained = read_summary(sweep / "0"), read_summary(sweep / "1")
    assert refused["status"] == "failed" and "CapabilityError" in refused["error"]
    assert refused["components"]["attention"] == "linear"
    assert trained["status"] == "finished" and trained["components"]["attention"] == "full"
