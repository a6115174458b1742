"""`plugformer compare` as a study view, on a real multirun of two settings (model.n_layers
1 and 2) times two seeds: groups over seeds with mean ± std, --group-by, smoothed mean
curves with a ±std band, the HTML and Markdown reports (the HTML one opened in a real
headless Chromium), and --wandb: the mapping of W&B runs (checked against the runs' own
offline W&B records, read with W&B's reader) and the clear error when W&B is offline."""

from __future__ import annotations

import base64
import csv
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_cli
from plugformer.cli import main
from plugformer.compare import comparison_table, find_runs, load_run
from plugformer.compare_curves import mean_curve, smooth
from plugformer.compare_groups import format_stat, group_runs, group_table
from plugformer.compare_wandb import run_from_wandb

pytestmark = pytest.mark.slow

TINY = [
    "model.d_model=32",
    "data.vocab_size=64",
    "data.train_examples=256",
    "data.val_examples=32",
    "data.batch_size=32",
    "trainer.max_steps=8",
    "trainer.val_check_interval=2",
    "trainer.log_every_n_steps=2",
    "report.latency_batches=0",
    "callbacks.progress_bar=none",
    "experiment_name=cmpstudy",
]
CHROMIUM = os.environ.get("PLUGFORMER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four finished runs (jobs 0-3: n_layers 1,2 with seed 1, then with seed 2), logged to
    W&B offline as every default run is."""
    runs_dir = tmp_path_factory.mktemp("study")
    result = run_cli("train", "-m", "seed=1,2", "model.n_layers=1,2", *TINY, f"paths.runs_dir={runs_dir}")
    assert result.returncode == 0, result.stderr[-4000:]
    (folder,) = (runs_dir / "cmpstudy").glob("multirun_*")
    return folder


@pytest.fixture(scope="module")
def report(study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output folder of one `plugformer compare` with two curves, smoothing and both reports."""
    out = tmp_path_factory.mktemp("report")
    args = ["compare", str(study), "--out", str(out), "--curve", "val/loss,train/loss", "--smooth", "0.5"]
    assert main([*args, "--report", str(out / "study.html"), "--report", str(out / "md" / "study.md")]) == 0
    return out


def val_losses(run_dir: Path) -> list[tuple[float, float]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [(float(row["step"]), float(row["val/loss"])) for row in csv.DictReader(handle) if row.get("val/loss")]


def final(run_dir: Path, name: str) -> float:
    return json.loads((run_dir / "summary.json").read_text())["metrics"][name]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- smoothing and mean curves (pure functions) ------------------------------------------


def test_smoothing_is_the_debiased_exponential_moving_average() -> None:
    assert smooth([3.0, 1.0, 2.0], 0.0) == [3.0, 1.0, 2.0]
    # m = 0.5 m + 0.5 v, divided by 1 - 0.5^t: 1, 0.25/0.75, 0.125/0.875.
    assert smooth([1.0, 0.0, 0.0], 0.5) == pytest.approx([1.0, 1 / 3, 1 / 7])
    assert smooth([2.0] * 5, 0.99) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    with pytest.raises(ValueError):
        smooth([1.0], 1.0)


def test_mean_curve_interpolates_between_steps_and_never_extrapolates() -> None:
    curve = mean_curve([[(0, 1.0), (2, 3.0)], [(0, 3.0), (1, 5.0), (4, 5.0)]])
    assert curve.steps == [0, 1, 2, 4]
    assert curve.mean == pytest.approx([2.0, 3.5, 4.0, 5.0])  # run 1 at step 1: 2.0 (interpolated)
    assert curve.count == [2, 2, 2, 1]
    assert curve.std[0] == pytest.approx(statistics.stdev([1.0, 3.0])) and curve.std[3] is None


# --- groups --------------------------------------------------------------------------------


def test_runs_differing_only_in_seed_form_one_group_with_mean_and_std(study: Path) -> None:
    runs = [load_run(path) for path in find_runs([study])]
    rows = comparison_table(runs)
    groups = group_runs(runs, rows)
    assert [(g.keys, g.values, g.indices) for g in groups] == [(["model.n_layers"], [1], [0, 2]), (["model.n_layers"], [2], [1, 3])]
    table = group_table(groups, rows)
    for group, row in zip(groups, table):
        losses = [final(study / str(i), "val/loss") for i in group.indices]
        assert row["n"] == 2 and row["status"] == "2 finished" and row["runs"] == ", ".join(str(i) for i in group.indices)
        assert row["val/loss"].mean == pytest.approx(statistics.mean(losses))
        assert row["val/loss"].std == pytest.approx(statistics.stdev(losses))
        assert row["params"].std == 0  # seeds do not change the model's size


def test_mean_curve_of_a_group_is_the_mean_of_its_runs_logged_values(study: Path) -> None:
    curve = mean_curve([val_losses(study / "1"), val_losses(study / "3")])
    by_step = [dict(val_losses(study / "1")), dict(val_losses(study / "3"))]
    assert curve.steps == sorted(by_step[0]) and len(curve.steps) == 4
    for step, mean, std in zip(curve.steps, curve.mean, curve.std):
        assert mean == pytest.approx((by_step[0][step] + by_step[1][step]) / 2)
        assert std == pytest.approx(statistics.stdev([by_step[0][step], by_step[1][step]]))


def test_command_line_groups_by_any_config_key(study: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", str(study), "--out", str(tmp_path), "--group-by", "seed"]) == 0
    printed = capsys.readouterr().out
    assert "in 2 group(s)" in printed and "comparison_groups.csv" in printed
    rows = read_csv(tmp_path / "comparison_groups.csv")
    assert [(row["seed"], row["n"], row["runs"]) for row in rows] == [("1", "2", "0, 1"), ("2", "2", "2, 3")]
    for row, jobs in zip(rows, ((0, 1), (2, 3))):
        losses = [final(study / str(job), "val/loss") for job in jobs]
        assert float(row["val/loss mean"]) == pytest.approx(statistics.mean(losses))
        assert float(row["val/loss std"]) == pytest.approx(statistics.stdev(losses))
        assert row["val/loss n"] == "2"
    markdown = (tmp_path / "comparison_groups.md").read_text()
    assert markdown.startswith("| seed | n | status | runs | val/loss |") and " ± " in markdown
    assert "averages over runs that differ in: model.n_layers" in markdown


def test_a_failed_run_counts_in_its_group_but_not_in_its_means(study: Path, tmp_path: Path) -> None:
    for job in ("0", "2"):
        shutil.copytree(study / job, tmp_path / job)
    # Like a job that failed before logging anything: a summary saying so, no metrics.csv.
    (tmp_path / "2" / "metrics.csv").unlink()
    summary = json.loads((tmp_path / "2" / "summary.json").read_text())
    summary.update(status="failed", metrics={}, best={}, error="NonFiniteError: loss is nan")
    (tmp_path / "2" / "summary.json").write_text(json.dumps(summary))
    runs = [load_run(path) for path in find_runs([tmp_path])]
    rows = comparison_table(runs)
    (row,) = group_table(group_runs(runs, rows), rows)
    assert row["n"] == 2 and row["status"] == "1 finished, 1 failed"
    assert row["val/loss"].count == 1 and row["val/loss"].mean == pytest.approx(final(study / "0", "val/loss"))
    assert format_stat(row["val/loss"], 2).endswith("[1 of 2]")
    assert mean_curve([run.curves.get("val/loss") or [] for run in runs]).mean == pytest.approx([v for _, v in val_losses(study / "0")])


# --- curves and reports ------------------------------------------------------------------


def test_every_curve_gets_a_figure_and_the_markdown_report_references_its_pngs(report: Path) -> None:
    for name in ("curve_val_loss.png", "curve_train_loss.png", "comparison.png", "comparison_groups.csv"):
        assert (report / name).is_file(), name
    markdown = (report / "md" / "study.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert images == ["study_curve_val_loss.png", "study_curve_train_loss.png"]
    for image in images:
        assert (report / "md" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| model.n_layers | n | status | runs |" in markdown and "| run | status | model.n_layers | seed |" in markdown


def test_html_report_is_one_file_with_its_plots_embedded(report: Path) -> None:
    page = (report / "study.html").read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
    for source in sources:
        assert base64.b64decode(source.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "href=" not in page and "<script" not in page  # nothing to fetch, nothing to run


def test_html_report_renders_its_plots_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    """Opens the report in Debian's Chromium (installed by `make test`; see the Makefile)."""
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run `make test` (installs it) or apt-get install chromium"
    from playwright.sync_api import sync_playwright

    fetched: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.on("request", lambda request: fetched.append(request.url))
            page.goto((report / "study.html").as_uri(), wait_until="load")
            images = page.evaluate(
                "Array.from(document.images).map(i => ({complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,"
                " shown: i.getBoundingClientRect().width}))"
            )
            headers = page.evaluate("Array.from(document.querySelectorAll('th')).map(th => th.textContent)")
            page.screenshot(path=str(tmp_path / "study.png"), full_page=True)
        finally:
            browser.close()
    assert len(images) == 2
    for image in images:
        assert image["complete"] and image["width"] > 0 and image["height"] > 0 and image["shown"] > 0, image
    assert "model.n_layers" in headers and "val/loss" in headers
    assert [url for url in fetched if not url.startswith(("file:", "data:"))] == []
    assert (tmp_path / "study.png").stat().st_size > 10_000


# --- W&B ---------------------------------------------------------------------------------


class StandInWandbRun:
    """The attributes of wandb.apis.public.Run that compare reads, filled from a W&B run
    record (``wandb leet inspect``): config, summary, tags, state, name, history()."""

    def __init__(self, record: dict, history: list[dict]) -> None:
        self.config = {k: v for k, v in record["config"].items() if not k.startswith("_")}
        self.summary = record["summary"]
        self.tags, self.state, self.name, self.id = record["tags"], record["state"], record["name"], record["run_id"]
        self._history = history

    def history(self, samples: int = 500, keys: list[str] | None = None, pandas: bool = True) -> list[dict]:
        assert pandas is False and keys is None
        return self._history[:samples]


def leet(*args: str) -> str:
    wandb = Path(sys.executable).with_name("wandb")
    return subprocess.run([str(wandb), "leet", "inspect", *args], capture_output=True, text=True, timeout=120, check=True).stdout


def test_a_wandb_run_maps_to_the_same_run_as_its_run_directory(study: Path) -> None:
    local = load_run(study / "1")
    offline = Path(local.summary["wandb_dir"])
    record = json.loads(leet("--summary", "--json", str(offline)))
    history = [json.loads(line)["history"]["item"] for line in leet("--json", str(offline)).splitlines() if '"type":"history"' in line]
    mapped = run_from_wandb(StandInWandbRun(record, history), project="team/plugformer")
    assert mapped.path is None and mapped.name == "team/plugformer/cmpstudy/1" and mapped.status == "finished"
    assert mapped.components == local.components
    assert {k: v for k, v in mapped.config.items() if not k.startswith("providers")} == {k: v for k, v in local.config.items() if not k.startswith("providers")}
    assert set(mapped.curves) == set(local.curves)
    for name, points in local.curves.items():
        assert [step for step, _ in mapped.curves[name]] == [step for step, _ in points], name
        assert [value for _, value in mapped.curves[name]] == pytest.approx([value for _, value in points]), name
    # One table of the run directory and the W&B run: the same values, no differing config.
    here, there = comparison_table([local, mapped])
    assert list(here) == list(there) and there["run"] == "team/plugformer/cmpstudy/1"
    for column in list(here)[2:]:
        assert there[column] == pytest.approx(here[column]), column
    # A W&B run joins the group of its setting.
    runs = [load_run(path) for path in find_runs([study])] + [mapped]
    groups = group_runs(runs, comparison_table(runs))
    assert [g.indices for g in groups] == [[0, 2], [1, 3, 4]]


@pytest.mark.parametrize(
    "env, reason",
    [
        ({"WANDB_MODE": "offline"}, "WANDB_MODE is 'offline'"),
        ({"WANDB_MODE": "online", "WANDB_API_KEY": ""}, "no W&B API key"),
        ({"WANDB_MODE": "online", "WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}, "127.0.0.1:9 cannot be reached"),
    ],
)
def test_wandb_without_network_or_key_exits_2_with_one_message(env: dict[str, str], reason: str, tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path), "NETRC": str(tmp_path / "no-netrc"), **env}
    result = run_cli("compare", "--wandb", "team/plugformer", "--wandb-group", "cmpstudy", env=env, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("plugformer: error: Cannot read runs from W&B project team/plugformer: " + reason)
    assert "wandb login" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("comparison*"))


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--group-by", "model.n_layer"], "use model.n_layers"),
        (["--smooth", "1"], "--smooth 1 is out of range"),
        (["--report", "study.pdf"], "ending in .html"),
        (["--wandb", "plugformer"], "ENTITY/PROJECT"),
    ],
)
def test_bad_study_options_exit_2_naming_the_problem(args: list[str], problem: str, study: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["compare", str(study), "--out", str(tmp_path), *args]) == 2
    error = capsys.readouterr().err
    assert error.startswith("plugformer: error:") and problem in error, error
