"""`plugformer compare` on real run directories: it finds the runs of a multirun, reports
only the config keys that were changed, writes comparison.csv/.md/.png, and refuses bad input
with exit status 2 and a message naming the problem."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from helpers import run_cli
from plugformer.cli import main
from plugformer.compare import comparison_table, compare_command, differing_config, find_runs, load_run

pytestmark = pytest.mark.slow

# A tiny model and task: the runs only need a few validation points.
TINY = [
    "model.d_model=32",
    "data.vocab_size=64",
    "data.train_examples=512",
    "data.val_examples=64",
    "data.batch_size=32",
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "logger=none",
    "callbacks.progress_bar=none",
    "experiment_name=cmp",
]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One multirun (one process, two runs) that changes model.n_layers and nothing else."""
    runs_dir = tmp_path_factory.mktemp("compare")
    result = run_cli("train", "-m", "model.n_layers=1,2", *TINY, f"paths.runs_dir={runs_dir}")
    assert result.returncode == 0, result.stderr[-4000:]
    (folder,) = (runs_dir / "cmp").glob("multirun_*")
    return folder


def test_find_runs_discovers_the_runs_below_a_parent_folder(sweep_dir: Path) -> None:
    assert find_runs([sweep_dir.parent.parent]) == [sweep_dir / "0", sweep_dir / "1"]
    assert find_runs([str(sweep_dir / "1")]) == [sweep_dir / "1"]


def test_differing_config_is_exactly_the_overridden_key(sweep_dir: Path) -> None:
    runs = [load_run(path) for path in find_runs([sweep_dir])]
    assert differing_config(runs) == {"model.n_layers": [1, 2]}


def test_table_has_one_row_per_run_with_config_and_metrics(sweep_dir: Path) -> None:
    rows = comparison_table([load_run(path) for path in find_runs([sweep_dir])])
    assert [row["run"] for row in rows] == ["0", "1"]
    assert [row["model.n_layers"] for row in rows] == [1, 2]
    for run_name, row in zip(("0", "1"), rows):
        assert row["status"] == "finished"
        with open(sweep_dir / run_name / "metrics.csv") as handle:
            history = [float(r["val/loss"]) for r in csv.DictReader(handle) if r.get("val/loss")]
        assert row["best/val/loss"] == pytest.approx(min(history), rel=1e-6)
        assert row["val/loss"] == pytest.approx(history[-1], rel=1e-6)
        assert row["params"] > 0 and row["wall_time_s"] > 0 and row["tokens_per_second"] > 0


def test_writes_csv_markdown_and_png(sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert compare_command([str(sweep_dir)], out=str(tmp_path), metric="val/accuracy") == 0
    with open(tmp_path / "comparison.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    metrics = ("val/loss", "val/accuracy", "best/val/loss", "params", "wall_time_s", "tokens_per_second")
    for column in ("run", "status", "model.n_layers", *metrics):
        assert column in rows[0], column
    markdown = (tmp_path / "comparison.md").read_text()
    assert markdown.startswith("| run | status | model.n_layers |") and "| --- |" in markdown
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(tmp_path / "comparison.csv") in capsys.readouterr().out


def test_default_output_folder_is_the_runs_common_parent(sweep_dir: Path) -> None:
    assert compare_command([str(sweep_dir / "0"), str(sweep_dir / "1")], out=None, metric="val/loss") == 0
    assert (sweep_dir / "comparison.csv").is_file()


def test_failed_runs_are_listed_with_their_status(sweep_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(sweep_dir / "0", tmp_path / "ok")
    shutil.copytree(sweep_dir / "1", tmp_path / "broken")
    # Like a refused combination: a summary, but no metrics.csv.
    (tmp_path / "broken" / "metrics.csv").unlink()
    summary_path = tmp_path / "broken" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary.update(status="failed", metrics={}, best={}, error="CapabilityError: refused")
    summary_path.write_text(json.dumps(summary))
    rows = comparison_table([load_run(path) for path in find_runs([tmp_path])])
    assert [(row["run"], row["status"]) for row in rows] == [("broken", "failed"), ("ok", "finished")]
    assert rows[0]["val/loss"] is None and rows[1]["val/loss"] > 0


def test_command_line_prints_the_table(sweep_dir: Path, tmp_path: Path) -> None:
    result = run_cli("compare", str(sweep_dir), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "model.n_layers" in result.stdout and "val/loss" in result.stdout
    assert "comparison.png" in result.stdout


@pytest.mark.parametrize(
    "case, problem",
    [("empty", "No run directories found"), ("missing", "does not exist"), ("metric", "'val/bleu'")],
)
def test_bad_input_exits_2_naming_the_problem(
    case: str, problem: str, sweep_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = {
        "empty": [str(tmp_path)],
        "missing": [str(tmp_path / "no_such_folder")],
        "metric": [str(sweep_dir), "--metric", "val/bleu", "--out", str(tmp_path)],
    }[case]
    assert main(["compare", *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("plugformer: error:") and problem in error
    assert "Traceback" not in error
    if case == "metric":
        assert "val/loss" in error and "val/accuracy" in error


def test_eval_results_become_columns(sweep_dir: Path, tmp_path: Path) -> None:
    import plugformer

    copy = tmp_path / "sweep"
    shutil.copytree(sweep_dir, copy)
    entry = plugformer.evaluate(copy / "1", ["data.val_examples=32"], track=False)
    rows = comparison_table([load_run(path) for path in find_runs([copy])], eval_metrics=("loss", "accuracy"))
    length = entry["max_length"]
    assert list(rows[1])[-2:] == [f"eval/validation@{length}/loss", f"eval/validation@{length}/accuracy"]
    assert rows[1][f"eval/validation@{length}/loss"] == pytest.approx(entry["metrics"]["loss"])
    assert rows[0][f"eval/validation@{length}/loss"] is None  # run 0 was never evaluated
