"""Fault injection: runs killed during data preparation, training and checkpoint writing, a
disk that fills up, corrupt checkpoints and dataset caches. After each fault, nothing that
was written before it is lost, and the next start cleans up and carries on.

Faults inside a run come from a test-only plugin (tests/fixtures/fault_plugin), found through
its entry point like any installed plugin and switched on by PLUGFORMER_TEST_FAULT; the
other faults are real SIGKILLs at moments detected by polling, and damaged files. Nothing of
Lightning, W&B or datasets is mocked. docs/reliability.md lists the guarantees tested here.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from helpers import FAST, checkpoint_step, metric_rows, read_summary, row_identity, run_cli, same_rows, start_cli

FAULT_PLUGIN = Path(__file__).parent / "fixtures" / "fault_plugin"
SETTINGS = [
    "trainer.max_steps=20", "trainer.val_check_interval=10", "trainer.log_every_n_steps=2",
    "callbacks.checkpoint.last_every_n_steps=5", "logger=csv", *FAST,
]


def fault_env(fault: str | None = None, **extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(FAULT_PLUGIN), os.environ.get("PYTHONPATH")]))
    env = {"PYTHONPATH": path, **extra}
    if fault:
        env["PLUGFORMER_TEST_FAULT"] = fault
    return env


def killed_by_sigkill(result) -> bool:
    return result.returncode == -signal.SIGKILL


def resume_and_check(run_dir: Path, kept: list[dict[str, str]]) -> dict:
    """Resume to the planned 20 steps; the rows kept before the fault are all still there."""
    result = run_cli("train", f"resume={run_dir}", env=fault_env())
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["global_step"] == 20
    rows = metric_rows(run_dir)
    assert same_rows(kept, rows)
    identities = [row_identity(row) for row in rows]
    assert len(identities) == len(set(identities)), "duplicate rows in metrics.csv"
    assert sorted(step for step, stage in identities if stage == "train") == list(range(1, 20, 2))
    assert sorted(step for step, stage in identities if stage == "val") == [9, 19]
    assert not list(run_dir.rglob(".*.tmp"))
    return summary


@pytest.mark.slow
def test_killed_during_training(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", *SETTINGS, f"run_dir={run_dir}", env=fault_env("train-kill:13"))
    assert killed_by_sigkill(result), result.stderr[-3000:]
    step = checkpoint_step(run_dir / "checkpoints" / "last.ckpt")
    assert step == 10  # the checkpoint of step 10 is intact; steps 11-13 are lost and re-run
    kept = [row for row in metric_rows(run_dir) if row_identity(row)[0] < step]
    assert {stage for _, stage in map(row_identity, kept)} == {"train", "val"}
    resume_and_check(run_dir, kept)


@pytest.mark.slow
def test_killed_while_writing_a_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", *SETTINGS, f"run_dir={run_dir}", env=fault_env("checkpoint-kill:12"))
    assert killed_by_sigkill(result), result.stderr[-3000:]
    orphans = list((run_dir / "checkpoints").glob(".last.ckpt.*.tmp"))
    assert len(orphans) == 1, "the kill should leave the half-written temporary file"
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 10
    kept = [row for row in metric_rows(run_dir) if row_identity(row)[0] < 10]
    # Temporary files of other killed saves (summary, metrics.csv header rewrite, best.ckpt) go too.
    planted = [run_dir / ".summary.json.k1ll3d.tmp", run_dir / ".metrics.csv.k1ll3d.tmp", run_dir / "checkpoints" / ".best.ckpt.k1ll3d.tmp"]
    for path in planted:
        path.write_bytes(b"half")
    resume_and_check(run_dir, kept)
    assert not any(path.exists() for path in [*orphans, *planted])


@pytest.mark.slow
def test_disk_full_while_writing_a_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", *SETTINGS, f"run_dir={run_dir}", env=fault_env("checkpoint-enospc:12"))
    assert result.returncode == 2, result.stderr[-3000:]
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("plugformer: error:")]
    assert "disk is full" in error and "last.ckpt" in error and "the previous last.ckpt is intact" in error
    assert "Traceback" not in result.stderr
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 10
    assert not list(run_dir.rglob(".*.tmp"))
    summary = read_summary(run_dir)
    assert summary["status"] == "failed" and "disk is full" in summary["error"]
    kept = [row for row in metric_rows(run_dir) if row_identity(row)[0] < 10]
    resume_and_check(run_dir, kept)


@pytest.mark.slow
def test_corrupt_last_checkpoint_names_it_and_offers_the_best(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", *SETTINGS, "trainer.max_steps=15", f"run_dir={run_dir}", env=fault_env())
    assert result.returncode == 0, result.stderr[-3000:]
    best_step = checkpoint_step(run_dir / "checkpoints" / "best.ckpt")
    last = run_dir / "checkpoints" / "last.ckpt"
    content = last.read_bytes()
    kept = {name: (run_dir / name).read_bytes() for name in ("summary.json", "config.yaml", "metrics.csv")}
    for damaged in (content[: len(content) // 2], os.urandom(4096)):  # truncated, overwritten
        last.write_bytes(damaged)
        refused = run_cli("train", f"resume={run_dir}", "trainer.max_steps=20", env=fault_env())
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert str(last) in refused.stderr and f"resume_checkpoint=best (step {best_step})" in refused.stderr
        assert "Traceback" not in refused.stderr
        for name, data in kept.items():
            assert (run_dir / name).read_bytes() == data, name

    # A damaged config.yaml is named too, and the run directory is left as it was.
    (run_dir / "config.yaml").write_bytes(kept["config.yaml"][: len(kept["config.yaml"]) // 3] + b"\n  [unclosed: {")
    refused = run_cli("train", f"resume={run_dir}", "resume_checkpoint=best", env=fault_env())
    assert refused.returncode == 2 and f"{run_dir / 'config.yaml'} is damaged" in refused.stderr, refused.stderr[-3000:]
    (run_dir / "config.yaml").write_bytes(kept["config.yaml"])

    result = run_cli("train", f"resume={run_dir}", "resume_checkpoint=best", "trainer.max_steps=20", env=fault_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_summary(run_dir)["global_step"] == 20
    assert checkpoint_step(last) == 20
    rows = metric_rows(run_dir)
    assert same_rows([row for row in metric_rows_from(kept["metrics.csv"]) if row_identity(row)[0] < best_step], rows)


def metric_rows_from(content: bytes) -> list[dict[str, str]]:
    import csv
    import io

    return list(csv.DictReader(io.StringIO(content.decode())))


def cache_entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "mqar").iterdir() if not p.name.endswith(".lock")) if (cache / "mqar").exists() else []


@pytest.mark.slow
def test_killed_during_data_preparation(tmp_path: Path) -> None:
    """SIGKILL while the dataset cache is written (its staging folder exists): the next run
    removes the staging folder, builds the cache and trains."""
    cache = tmp_path / "cache"
    run_dir = tmp_path / "run"
    args = ("train", *SETTINGS, "trainer.max_steps=2", "data.train_examples=60000", f"run_dir={run_dir}")
    process = start_cli(*args, env=fault_env(PLUGFORMER_CACHE_DIR=str(cache)))
    deadline = time.time() + 120
    staging: list[Path] = []
    while time.time() < deadline and process.poll() is None and not staging:
        staging = [p for p in cache_entries(cache) if p.name.endswith(".tmp")]
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if not staging:
        pytest.fail("the run finished preparing its data before the kill; make data.train_examples larger")
    assert all(p.name.startswith(".") for p in cache_entries(cache)), "a half-written cache under its final name"

    result = run_cli(*args, env=fault_env(PLUGFORMER_CACHE_DIR=str(cache)))
    assert result.returncode == 0, result.stderr[-3000:]
    entries = cache_entries(cache)
    assert len(entries) == 1 and not entries[0].name.startswith("."), entries


@pytest.mark.slow
def test_damaged_dataset_cache_is_rebuilt(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = fault_env(PLUGFORMER_CACHE_DIR=str(cache))
    args = ("train", *SETTINGS, "trainer.max_steps=2", "trainer.val_check_interval=2")
    assert run_cli(*args, f"run_dir={tmp_path / 'first'}", env=env).returncode == 0
    (entry,) = cache_entries(cache)
    arrow = sorted((entry / "train").glob("*.arrow"))[0]
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 3])

    result = run_cli(*args, f"run_dir={tmp_path / 'second'}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"the dataset cache {entry} is damaged" in result.stderr
    assert read_summary(tmp_path / "second")["metrics"]["val/loss"] == pytest.approx(
        read_summary(tmp_path / "first")["metrics"]["val/loss"], rel=1e-5
    )
    assert cache_entries(cache) == [entry]
