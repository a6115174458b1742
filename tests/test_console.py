"""What `plugformer train` shows: one header, a progress bar with the objective's main metric,
one closing block (also for a failed run), and library noise in train.log instead of the
console, while warnings that concern the user stay on it."""

from __future__ import annotations

import logging
import subprocess
import warnings
from pathlib import Path

import pytest

from helpers import FAST, read_summary, run_cli

# Lightning's and W&B's messages that say nothing about the run.
NOISE = ("litlogger", "limit_val_batches", "Total FLOPs", "Total Flops", "v_num", "anonymous setting", "GPU available")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """A tiny run with the rich progress bar, and log_every_n_steps above the epoch's 62
    batches: Lightning's warning about that misconfiguration must reach the console."""
    run_dir = tmp_path_factory.mktemp("console") / "run"
    settings = [s for s in FAST if not s.startswith("callbacks.progress_bar")]
    result = run_cli(
        "train", "experiment_name=console", "trainer.max_steps=8", "trainer.val_check_interval=4",
        "trainer.log_every_n_steps=100", f"run_dir={run_dir}", *settings,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir, result


def test_header_states_components_sizes_and_where_the_run_goes(finished) -> None:
    run_dir, result = finished
    out = result.stdout
    assert out.count("plugformer: run console, training from scratch") == 1, out
    header = out.split("plugformer: run console, training from scratch", 1)[1].split("plugformer: run finished", 1)[0]
    summary = read_summary(run_dir)
    for fact in (
        "attention=full position=learned norm=layernorm ffn=mlp block=standard",  # components
        "decoder 0     attention=full ffn=mlp block=standard",  # the layer plan
        f"{summary['params']:,}",  # parameters
        "mqar: train 2,000, validation 128 examples", "batch size 32", "sequences up to",  # data sizes
        "causal_lm (main metric val/accuracy, higher is better)",
        "8 steps, validation every 4 steps and at the end",
        f"run dir     {run_dir}",
        "offline, project plugformer, group console", summary["wandb_dir"],  # W&B mode and run
        "cpu x1, strategy SingleDevice (1 process)", "per process (",  # device, strategy, threads
    ):
        assert fact in header, f"{fact!r} not in the header:\n{header}"


def test_progress_bar_shows_the_main_metric_and_the_loss(finished) -> None:
    out = finished[1].stdout
    bar = out[out.index("Epoch 0"):out.index("plugformer: run finished")]
    assert "train/loss:" in bar and "val/loss:" in bar and "val/accuracy:" in bar, bar
    assert "val/perplexity" not in bar and "v_num" not in bar and "/-2" not in bar, bar


def test_closing_block_gives_metrics_speed_and_where_everything_is(finished) -> None:
    run_dir, result = finished
    summary = read_summary(run_dir)
    closing = result.stdout.split("plugformer: run finished", 1)[1]
    assert f"at step 8, {summary['tokens_per_second']:,.0f} tokens/s while training" in closing
    assert f"val/accuracy={summary['metrics']['val/accuracy']:.4g}" in closing
    best = max((row for row in read_history(run_dir)), key=lambda row: row[1])
    assert f"val/accuracy={best[1]:.4g} at step {best[0]}" in closing, closing
    assert f"val/loss={summary['best']['val/loss']:.4g} at step {int(summary['best']['step'])} (the checkpoint's monitor)" in closing
    for where in (run_dir / "checkpoints" / "best.ckpt", run_dir / "summary.json"):
        assert str(where) in closing
    assert f"wandb leet {summary['wandb_dir']}" in closing and f"plugformer compare {run_dir}" in closing


def read_history(run_dir: Path) -> list[tuple[int, float]]:
    """(step, val/accuracy) of every validation in metrics.csv (its step is the global step - 1)."""
    import csv

    with open(run_dir / "metrics.csv") as handle:
        return [(int(row["step"]) + 1, float(row["val/accuracy"])) for row in csv.DictReader(handle) if row.get("val/accuracy")]


def test_library_noise_goes_to_train_log_and_user_warnings_stay(finished) -> None:
    run_dir, result = finished
    console = result.stdout + result.stderr
    for noise in NOISE:
        assert noise not in console, f"{noise!r} on the console:\n{console[-3000:]}"
    log = (run_dir / "train.log").read_text()
    for redirected in ("litlogger", "limit_val_batches", "Total params", "GPU available"):
        assert redirected in log, f"{redirected!r} not in train.log"
    # A misconfiguration the user should see: no training metrics are logged in this epoch.
    assert "smaller than the logging interval" in console


def test_a_failed_run_prints_a_closing_block(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", "+trainer.not_an_argument=1", f"run_dir={run_dir}", *FAST)
    assert result.returncode == 2
    closing = result.stdout.split("plugformer: run failed", 1)[1]
    assert "error      ConfigError: The trainer config is not valid" in closing, closing
    assert f"summary    {run_dir / 'summary.json'}" in closing
    assert read_summary(run_dir)["status"] == "failed"
    assert "plugformer compare" not in closing  # nothing to compare


def test_console_filter_sorts_library_records() -> None:
    from plugformer.training.library_output import shows_on_console

    def record(name: str, level: int, message: str) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, message, None, None)

    assert not shows_on_console(record("lightning.pytorch.utilities.rank_zero", logging.INFO, "💡 Tip: litlogger"))
    assert shows_on_console(record("lightning.pytorch.utilities.rank_zero", logging.WARNING, "precision not supported"))
    assert not shows_on_console(record("py.warnings", logging.WARNING, "x.py:1: PossibleUserWarning: The 'train_dataloader' does not have many workers"))
    assert shows_on_console(record("py.warnings", logging.WARNING, "x.py:1: UserWarning: plugformer: the dataset cache is damaged"))
    assert shows_on_console(record("plugformer.anything", logging.INFO, "a plugformer message"))


def test_routing_is_undone(tmp_path: Path) -> None:
    """A sweep runs several jobs in one process: each job's routing leaves logging as it was."""
    import lightning  # noqa: F401 - attaches Lightning's own console handler

    from plugformer.training.library_output import route_library_output

    root, lit = logging.getLogger(), logging.getLogger("lightning")
    before = (list(root.handlers), root.level, list(lit.handlers), lit.propagate, warnings.showwarning)
    routing = route_library_output(tmp_path)
    assert not [h for h in lit.handlers if type(h) is logging.StreamHandler]
    logging.getLogger("lightning.pytorch.x").info("a library notice")
    routing.restore()
    assert (list(root.handlers), root.level, list(lit.handlers), lit.propagate, warnings.showwarning) == before
    assert "a library notice" in (tmp_path / "train.log").read_text()
