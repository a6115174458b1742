"""Resuming runs: after a kill, after a finished run with more steps, after a failed resume.
Nothing logged before the checkpoint is lost, a failed resume changes nothing, one process
per run directory, and a run always ends with validation metrics at its last step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from helpers import (
    FAST, checkpoint_step, metric_rows, read_summary, row_identity, run_cli, same_rows, start_cli, wandb_history_steps,
)

pytestmark = pytest.mark.slow

FAULT_PLUGIN = Path(__file__).parent / "fixtures" / "fault_plugin"

STEPS = 60
SETTINGS = [
    f"trainer.max_steps={STEPS}", "trainer.val_check_interval=20", "trainer.log_every_n_steps=5",
    "callbacks.checkpoint.last_every_n_steps=5", "optim.warmup_steps=10", "seed=7", *FAST,
]


def start(run_dir: Path, *extra: str, env: dict[str, str] | None = None):
    return start_cli("train", *SETTINGS, f"run_dir={run_dir}", *extra, env=env)


def assert_no_duplicate_rows(run_dir: Path) -> Counter:
    identities = Counter(row_identity(row) for row in metric_rows(run_dir))
    assert max(identities.values()) == 1, [key for key, n in identities.items() if n > 1]
    return identities


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run that the killed runs are compared with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert start(run_dir).wait(timeout=300) == 0
    return run_dir


def test_killed_run_resumes_to_the_planned_step_and_matches(reference: Path, tmp_path: Path) -> None:
    crashed = tmp_path / "crashed"
    process = start(crashed)
    last = crashed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and (checkpoint_step(last) or 0) < 25:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_step(last)
    assert killed_at is not None and 25 <= killed_at < STEPS, killed_at
    assert not (crashed / "summary.json").exists()
    before = [row for row in metric_rows(crashed) if row_identity(row)[0] < killed_at]
    assert any(stage == "val" for _, stage in map(row_identity, before))

    run_id = json.loads((crashed / "run.json").read_text())["run_id"]
    result = run_cli("train", f"resume={crashed}")
    assert result.returncode == 0, result.stderr[-3000:]

    resumed, uninterrupted = read_summary(crashed), read_summary(reference)
    assert resumed["status"] == "finished"
    assert resumed["global_step"] == STEPS == uninterrupted["global_step"]
    assert resumed["run_id"] == run_id
    assert resumed["metrics"]["train/lr"] == pytest.approx(uninterrupted["metrics"]["train/lr"], rel=1e-6)
    assert resumed["metrics"]["val/loss"] == pytest.approx(uninterrupted["metrics"]["val/loss"], abs=0.05)
    wandb_runs = sorted(p.name for p in (crashed / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 2 and all(name.endswith(run_id) for name in wandb_runs)
    # The validation history before the crash survives in the resumed summary: its best is
    # the lowest val/loss of all validations, those before the crash included.
    val_losses = [float(row["val/loss"]) for row in metric_rows(crashed) if row.get("val/loss")]
    assert len(val_losses) >= 2
    assert resumed["best"]["val/loss"] == pytest.approx(min(val_losses), rel=1e-6)
    # metrics.csv: the rows logged before the checkpoint, unchanged, then every later step once.
    assert same_rows(before, metric_rows(crashed))
    identities = assert_no_duplicate_rows(crashed)
    assert identities == Counter(row_identity(row) for row in metric_rows(reference))


def test_a_kill_between_a_step_checkpoint_and_the_steps_metrics_row_loses_no_row(reference: Path, tmp_path: Path) -> None:
    """Lightning saves a step's checkpoint before it logs that step's row: a run killed in
    between resumes after the step, and the row travels in the checkpoint instead."""
    crashed = tmp_path / "crashed"
    plugin = os.pathsep.join(filter(None, [str(FAULT_PLUGIN), os.environ.get("PYTHONPATH")]))
    killed = start(crashed, env={"PYTHONPATH": plugin, "PLUGFORMER_TEST_FAULT": "row-kill:25"})
    assert killed.wait(timeout=300) == -signal.SIGKILL, killed.stderr.read()[-3000:]
    assert checkpoint_step(crashed / "checkpoints" / "last.ckpt") == 25
    assert 24 not in {row_identity(row)[0] for row in metric_rows(crashed)}  # step 24's row is lost, as feared

    result = run_cli("train", f"resume={crashed}")
    assert result.returncode == 0, result.stderr[-3000:]

    identities = assert_no_duplicate_rows(crashed)
    assert identities == Counter(row_identity(row) for row in metric_rows(reference))
    row, expected = (next(r for r in metric_rows(run) if row_identity(r) == (24, "train")) for run in (crashed, reference))
    assert float(row["train/loss"]) == pytest.approx(float(expected["train/loss"]), rel=1e-6)
    assert float(row["train/lr"]) == pytest.approx(float(expected["train/lr"]), rel=1e-6)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 30-step run (validation every 20 steps, a test after fit), to copy from."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    result = run_cli("train", *SETTINGS, "trainer.max_steps=30", "test_after_fit=true", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, symlinks=True)
    return copy


def test_a_run_ends_with_validation_at_its_last_step(finished_run: Path, tmp_path: Path) -> None:
    """30 steps with validation every 20: the last step validates too, and test_after_fit's
    test/* metrics join the final val/* ones in summary.json."""
    summary = read_summary(finished_run)
    assert summary["global_step"] == 30 and checkpoint_step(finished_run / "checkpoints" / "last.ckpt") == 30
    assert {"val/loss", "test/loss"} <= set(summary["metrics"])
    val_steps = [step for step, stage in map(row_identity, metric_rows(finished_run)) if stage == "val"]
    assert val_steps == [19, 29]
    result = run_cli("compare", str(finished_run), "--out", str(tmp_path / "cmp"))
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_finished_run_resumed_after_a_failed_resume_keeps_everything(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    files = {name: (run_dir / name).read_bytes() for name in ("summary.json", "config.yaml", "metrics.csv")}

    failed = run_cli("train", f"resume={run_dir}", "trainer.max_steps=50", "+trainer.no_such_argument=1")
    assert failed.returncode == 2, failed.stderr[-3000:]
    for name, content in files.items():
        assert (run_dir / name).read_bytes() == content, f"a failed resume changed {name}"
    assert json.loads((run_dir / "summary.failed-resume.json").read_text())["status"] == "failed"

    result = run_cli("train", f"resume={run_dir}", "trainer.max_steps=50")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["global_step"] == 50
    assert "max_steps: 50" in (run_dir / "config.yaml").read_text()
    rows = metric_rows(run_dir)
    old = [row for row in files["metrics.csv"].decode().splitlines()[1:]]
    assert len(old) > 0 and same_rows(metric_rows(finished_run), rows)
    identities = assert_no_duplicate_rows(run_dir)
    assert sorted(step for step, stage in identities if stage == "val") == [19, 29, 39, 49]
    assert sorted(step for step, stage in identities if stage == "train") == list(range(4, 50, 5))
    run_id = summary["run_id"]
    attempts = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert {p.name[-len(run_id):] for p in attempts} == {run_id}
    # W&B history: each attempt's rows at their training steps, one increasing sequence, so
    # syncing the attempts into one run drops nothing.
    steps = [step for attempt in attempts for step in wandb_history_steps(attempt)]
    assert steps == sorted(set(steps)) and steps[0] == 4 and steps[-1] == 50, steps  # 50: the test after fit


def test_resume_refuses_a_config_edited_by_hand(finished_run: Path, tmp_path: Path) -> None:
    run_dir = copy_run(finished_run, tmp_path)
    original = (run_dir / "config.yaml").read_text()
    summary = (run_dir / "summary.json").read_bytes()
    for edit, named in (
        (("  attention:\n    bias: true\n    name: full", "  attention:\n    bias: true\n    name: linear"),
         "attention: checkpoint has full, config.yaml has linear"),
        (("n_layers: 1", "n_layers: 2"), "checkpoint absent"),
    ):
        assert original.count(edit[0]) == 1, edit[0]
        edited = original.replace(edit[0], edit[1])
        (run_dir / "config.yaml").write_text(edited)
        result = run_cli("train", f"resume={run_dir}", "trainer.max_steps=40")
        assert result.returncode == 2, result.stderr[-3000:]
        assert "no longer matches its checkpoint" in result.stderr and named in result.stderr
        assert "Traceback" not in result.stderr
        assert (run_dir / "config.yaml").read_text() == edited and (run_dir / "summary.json").read_bytes() == summary


def test_resume_into_a_folder_that_is_not_a_run_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    half = tmp_path / "half"  # (an empty folder: tests/test_cli.py)
    half.mkdir()
    (half / "config.yaml").write_text("seed: 1\n")
    for folder in (missing, half):
        before = sorted(p.name for p in folder.rglob("*")) if folder.exists() else None
        result = run_cli("train", f"resume={folder}")
        assert result.returncode == 2 and "not a run directory" in result.stderr, result.stderr[-2000:]
        after = sorted(p.name for p in folder.rglob("*")) if folder.exists() else None
        assert after == before, folder


def test_one_process_per_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # A run that stays alive (slowed down by the test-only fault plugin) without hogging a CPU.
    plugin = os.pathsep.join(filter(None, [str(FAULT_PLUGIN), os.environ.get("PYTHONPATH")]))
    slow = {"PYTHONPATH": plugin, "PLUGFORMER_TEST_FAULT": "slow-steps:200"}
    first = start_cli("train", *SETTINGS, f"run_dir={run_dir}", "trainer.max_steps=100000", "trainer.val_check_interval=1000", env=slow)
    try:
        # As soon as it holds its lock (maybe before its first checkpoint: then resume= is still
        # refused as "in use", not as "not a run directory").
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / ".hydra" / "overrides.yaml").exists():  # written last
            assert first.poll() is None, first.stderr.read()[-3000:]
            time.sleep(0.05)
        hydra_record = (run_dir / ".hydra" / "config.yaml").read_bytes()
        for second in (("train", *SETTINGS, f"run_dir={run_dir}"), ("train", f"resume={run_dir}")):
            result = run_cli(*second)
            assert result.returncode == 2, result.stderr[-3000:]
            assert "is in use by" in result.stderr and f"pid {first.pid}" in result.stderr
        assert first.poll() is None, "the running process was disturbed"
        assert (run_dir / ".hydra" / "config.yaml").read_bytes() == hydra_record
        while checkpoint_step(run_dir / "checkpoints" / "last.ckpt") is None:
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.1)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The dead process's lock file is stale: a resume takes it over.
    assert f'"pid": {first.pid}' in (run_dir / "run.lock").read_text()
    step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    result = run_cli("train", f"resume={run_dir}", f"trainer.max_steps={step + 5}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_summary(run_dir)["global_step"] == step + 5
    assert not (run_dir / "run.lock").exists()
    assert os.path.isdir(run_dir / "checkpoints")
