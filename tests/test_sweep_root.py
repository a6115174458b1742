"""``run_dir=`` under ``-m`` is the sweep's root, one subfolder per job, instead of being
ignored (the sweep used to land under runs/ in the current folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import FAST, read_summary, run_cli
from plugformer import ConfigError
from plugformer.sweep_root import with_sweep_root


def test_a_sweep_with_run_dir_puts_one_job_per_subfolder_and_nothing_in_the_current_folder(tmp_path: Path) -> None:
    root, cwd = tmp_path / "study", tmp_path / "cwd"
    cwd.mkdir()
    result = run_cli(  # -m last: the helper puts experiment=plain first, and Hydra's flags go after overrides
        "train", "seed=1,2", *FAST, "trainer.max_steps=2", "trainer.val_check_interval=2",
        "logger=none", f"run_dir={root}", "-m", cwd=cwd,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job, seed in (("0", 1), ("1", 2)):
        summary = read_summary(root / job)
        assert summary["status"] == "finished" and summary["run_dir"] == str(root / job)
        assert f"seed: {seed}" in (root / job / "config.yaml").read_text()
        assert (root / job / "config.yaml").is_file() and (root / job / "checkpoints" / "last.ckpt").is_file()
    assert (root / "multirun.yaml").is_file()  # Hydra's record of the sweep, at its root
    assert list(cwd.iterdir()) == []  # no runs/ folder where the command was started


def test_a_swept_run_dir_is_refused_before_anything_runs(tmp_path: Path) -> None:
    result = run_cli("train", "model.n_layers=1,2", f"run_dir={tmp_path / 'a'},{tmp_path / 'b'}", "logger=none", "-m", cwd=tmp_path)
    assert result.returncode == 2
    assert "sweep's root" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["-m", "x=1,2", "run_dir=/r"], ["-m", "x=1,2", "run_dir=/r", "hydra.sweep.dir=/r"]),
        (["hydra.mode=MULTIRUN", "run_dir=out/s"], ["hydra.mode=MULTIRUN", "run_dir=out/s", "hydra.sweep.dir=out/s"]),
        (["run_dir=/r"], ["run_dir=/r"]),  # a single run: run_dir is the run's folder, as before
        (["-m", "x=1,2"], ["-m", "x=1,2"]),  # no run_dir: Hydra's default sweep folder
        (["-m", "run_dir=/r", "hydra.sweep.dir=/r"], ["-m", "run_dir=/r", "hydra.sweep.dir=/r"]),
        (["-m", "run_dir=/r/${now:%H}"], ["-m", "run_dir=/r/${now:%H}", "hydra.sweep.dir=/r/${now:%H}"]),
        (["run_dir=/r", "x=1,2", "-m"], ["run_dir=/r", "hydra.sweep.dir=/r", "x=1,2", "-m"]),
    ],
)
def test_with_sweep_root(overrides: list[str], expected: list[str]) -> None:
    assert with_sweep_root(overrides) == expected


@pytest.mark.parametrize("overrides", [["-m", "run_dir=a,b"], ["-m", "run_dir=choice(a,b)"], ["-m", "run_dir=/r", "hydra.sweep.dir=/s"]])
def test_conflicting_or_swept_roots_are_refused(overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match="root"):
        with_sweep_root(overrides)
