"""Every class of bad input ends with one message and exit status 2, before any training:
unknown experiment/debug/group names, sizes and rates outside their declared bounds (the
core's and plugins' alike), unusable text files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import FAST, read_summary, run_cli
from plugformer import ConfigError, bounds, check_bounds


def assert_one_message(result, *needles: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("plugformer: error:") == 1, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) <= 4, result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


# --- the bounds API ----------------------------------------------------------------------------


@dataclass
class WindowConfig:
    window: int = field(default=64, metadata=bounds(ge=1))
    dropout: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata=bounds(ge=0.0, lt=1.0))
    hidden: int | None = field(default=None, metadata=bounds(gt=0))
    free: int = -5  # no bounds declared: not checked


def test_values_in_range_pass() -> None:
    check_bounds(WindowConfig(), "model.attention")
    check_bounds(WindowConfig(window=1, dropout=0.5, betas=[0.0, 0.99], hidden=3), "model.attention")


def test_every_value_out_of_range_is_named_in_one_message() -> None:
    with pytest.raises(ConfigError) as caught:
        check_bounds(WindowConfig(window=0, dropout=float("nan"), betas=[0.9, 1.0], hidden=-1), "model.attention")
    message = caught.value.message()
    assert "model.attention.window=0: expected an integer ≥ 1" in message
    assert "model.attention.dropout=nan: expected a number in [0, 1)" in message
    assert "model.attention.betas[1]=1.0: expected a number in [0, 1)" in message
    assert "model.attention.hidden=-1: expected an integer > 0" in message
    assert "model.attention.window=64 (the default)" in message


def test_infinity_is_out_of_any_range() -> None:
    with pytest.raises(ConfigError, match="dropout=inf"):
        check_bounds(WindowConfig(dropout=float("inf")), "x")


# --- end to end: the real command --------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("debug=fsat", ["debug=fsat", "fast, overfit"]),
        ("trainer=gpus", ["trainer=gpus", "did you mean 'gpu'", "cpu"]),
        ("model/attention=locl", ["model/attention=locl", "local", "plugformer plugins"]),
    ],
)
def test_unknown_group_option_lists_the_choices(plugins, override: str, needles: list[str]) -> None:
    from plugformer.config import store_core_configs
    from plugformer.overrides import check_group_choices

    store_core_configs()
    with pytest.raises(ConfigError) as caught:
        check_group_choices([override])
    for needle in needles:
        assert needle in caught.value.message(), caught.value.message()
    check_group_choices(["experiment=mqar_small", "debug=fast", "model.d_model=64", "logger=[wandb,tensorboard]", "~logger"])


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("model.d_model=wide", ["model.d_model=wide", "could not be converted to Integer", "a value of the option's type"]),
        ("model.d_modl=64", ["Could not override 'model.d_modl'", "Key 'd_modl' not in 'ModelConfig'", "+key=value"]),
        ("optim.schedule=cosin", ["expected one of [cosine, linear, constant]"]),
        ("trainer.max_steps", ["Error parsing override 'trainer.max_steps'"]),
    ],
)
def test_hydras_refusals_become_one_plugformer_error(plugins, override: str, needles: list[str]) -> None:
    from plugformer.config import store_core_configs
    from plugformer.overrides import check_composes

    store_core_configs()
    with pytest.raises(ConfigError) as caught:
        check_composes([override])
    for needle in needles:
        assert needle in caught.value.message(), caught.value.message()
    check_composes(["+trainer.extra_key=1", "tags=[a,b]", "experiment=mqar_small", "hydra.run.dir=/tmp/x", "-m", "x=1,2"])


@pytest.mark.slow
def test_a_badly_typed_value_ends_the_command_with_status_2(tmp_path: Path) -> None:
    result = run_cli("train", "model.d_model=wide", f"run_dir={tmp_path}", "logger=none")
    assert_one_message(result, "model.d_model=wide", "could not be converted to Integer")


@pytest.mark.slow
def test_unknown_experiment_fails_with_the_choices_and_trains_nothing(tmp_path: Path) -> None:
    result = run_cli("train", "experiment=mqar_smal", f"run_dir={tmp_path}", "logger=none")
    assert_one_message(result, "experiment=mqar_smal", "mqar_small", "listops_small", "did you mean 'mqar_small'")
    assert not (tmp_path / "metrics.csv").exists() and not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_unknown_experiment_in_a_sweep_is_refused_before_any_job(tmp_path: Path) -> None:
    result = run_cli("train", "-m", "experiment=mqar_small,nope", f"paths.runs_dir={tmp_path}", "logger=none")
    assert_one_message(result, "experiment=nope", "mqar_small")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["model.d_model=0", "optim.lr=-1"], ["model.d_model=0: expected an integer ≥ 1", "optim.lr=-1.0: expected a number > 0"]),
        (["model/attention=local", "model.attention.window=0"], ["model.attention.window=0: expected an integer ≥ 1", "window=64 (the default)"]),
    ],
)
def test_out_of_range_values_end_the_command_with_status_2(tmp_path: Path, overrides: list[str], needles: list[str]) -> None:
    result = run_cli("train", *FAST, *overrides, f"run_dir={tmp_path}", "logger=none")
    assert_one_message(result, *needles)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("overrides", "needles"),
    [
        (["model.n_heads=-2", "model.dropout=1.5"], ["model.n_heads=-2: expected an integer ≥ 1", "model.dropout=1.5: expected a number in [0, 1)"]),
        (["data.batch_size=0"], ["data.batch_size=0: expected an integer ≥ 1"]),
        (["data=listops", "objective=classification", "model/attention=full", "data.max_length=2"], ["data.max_length=2: expected an integer ≥ 3"]),
        (["model/position=rope", "model.position.fraction=0"], ["model.position.fraction=0.0: expected a number in (0, 1]"]),
        (["optim.betas=[0.9,1.5]"], ["optim.betas[1]=1.5: expected a number in [0, 1)"]),
        (["trainer.max_steps=-5", "trainer.val_check_interval=0"], ["trainer.max_steps=-5: expected an integer ≥ -1", "trainer.val_check_interval=0"]),
    ],
)
def test_out_of_range_values_are_refused_when_components_are_chosen(registry, overrides: list[str], needles: list[str]) -> None:
    from compose import compose_train
    from plugformer.model.builder import choose_components

    with pytest.raises(ConfigError) as caught:
        choose_components(compose_train(*overrides), registry)
    for needle in needles:
        assert needle in caught.value.message(), caught.value.message()


# --- text files ----------------------------------------------------------------------------------


def text_task(tmp_path: Path, *train_files: str, **options):
    from plugformer import DataContext
    from plugformer_plugins.data.text import TextConfig, TextTask

    config = TextConfig(train_files=list(train_files), block_size=8, **options)
    return TextTask(config, DataContext(cache_dir=tmp_path / "cache"))


@pytest.mark.parametrize(
    ("content", "needles"),
    [
        (b"", ["empty.txt is empty", "remove it from data.train_files"]),
        (b"  \n\n \n", ["empty.txt is empty (only whitespace)"]),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ["looks binary", "NUL byte at offset 8"]),
        ("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 20, ["is not valid utf-8 text", "offset 3", "data.encoding=latin-1", "iconv"]),
    ],
)
def test_unusable_text_files_are_named_with_the_fix(tmp_path: Path, content: bytes, needles: list[str]) -> None:
    from plugformer import DataError

    (tmp_path / "good.txt").write_text("some text\n" * 50)
    (tmp_path / "empty.txt").write_bytes(content)
    with pytest.raises(DataError) as caught:
        text_task(tmp_path, str(tmp_path / "*.txt")).prepare()
    message = caught.value.message()
    assert str(tmp_path / "empty.txt") in message
    for needle in needles:
        assert needle in message, message


def test_a_declared_encoding_reads_the_file(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 30)
    task = text_task(tmp_path, str(tmp_path / "latin.txt"), encoding="latin-1")
    task.prepare()
    assert "\u00e9" in task.tokenizer.chars


def test_a_file_named_twice_or_through_a_symlink_counts_once(tmp_path: Path) -> None:
    from plugformer_plugins.data.text import resolve_files

    (tmp_path / "a.txt").write_text("alpha\n" * 50)
    (tmp_path / "b.txt").write_text("beta\n" * 50)
    (tmp_path / "link.txt").symlink_to(tmp_path / "a.txt")
    files = resolve_files([str(tmp_path / "*.txt"), str(tmp_path / "a.txt")], "data.train_files")
    assert files == [tmp_path.resolve() / "a.txt", tmp_path.resolve() / "b.txt"]
    twice = text_task(tmp_path, str(tmp_path / "*.txt"), str(tmp_path / "a.txt"))
    once = text_task(tmp_path / "other", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"))
    twice.prepare(), once.prepare()
    assert len(twice.splits["train"]) == len(once.splits["train"])


# --- W&B online without credentials or network -----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({"WANDB_API_KEY": ""}, "no W&B API key"),
        ({"WANDB_API_KEY": "x" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9"}, "127.0.0.1:9 cannot be reached"),
    ],
)
def test_online_wandb_that_cannot_work_falls_back_to_offline_quickly(tmp_path: Path, env: dict[str, str], reason: str) -> None:
    import time

    run_dir = tmp_path / "run"
    started = time.monotonic()
    result = run_cli(
        "train", "trainer.max_steps=4", "trainer.val_check_interval=4", "data.train_examples=256", "data.val_examples=32",
        *FAST, f"run_dir={run_dir}",
        env={"WANDB_MODE": "online", "HOME": str(tmp_path), "NETRC": str(tmp_path / "no-netrc"), **env},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    assert "W&B online logging is not possible" in result.stderr and reason in result.stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and Path(summary["wandb_dir"]).name.startswith("offline-run-")
    assert elapsed < 120, elapsed  # a blocked wandb.init retries for minutes
