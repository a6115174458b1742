"""`plugformer eval` and `plugformer generate` on finished runs: eval reproduces the
checkpoint's validation loss, scores other lengths (refusing untrained positions), records
eval.json and logs to the run's own W&B run; generation works for every objective."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import plugformer
from helpers import run_cli
from plugformer import CapabilityError, ConfigError
from plugformer.cli import main

pytestmark = pytest.mark.slow

TINY = ["model.d_model=32", "model.n_layers=1", "model.n_heads=2", "callbacks.progress_bar=none", "trainer.max_steps=20", "trainer.val_check_interval=20"]
MQAR = ["experiment=plain", "data.vocab_size=32", "data.seq_len=16", "data.num_pairs=3", "data.train_examples=400", "data.val_examples=64", "data.batch_size=32"]
RUNS = {
    "learned": [*MQAR, "model/position=learned", "model.position.max_length=24", "logger=none"],
    "alibi": [*MQAR, "model/position=alibi", "logger=wandb"],
    "rope": [*MQAR, "model/position=rope", "logger=none"],
    "seq2seq": ["experiment=reverse_small", "data.train_examples=300", "data.val_examples=32", "data.test_examples=0", "logger=none"],
    "lm": ["experiment=lm_small", "data.block_size=32", "model.dropout=0.0", "logger=none"],
    "t5": ["experiment=t5_small", "data.block_size=32", "logger=none"],
    "mlm": ["experiment=mlm_small", "data.block_size=32", "logger=none"],
    "classification": [
        "experiment=listops_small", "data.train_examples=300", "data.val_examples=32", "data.test_examples=0",
        "data.min_length=10", "data.max_length=30", "data.max_depth=2", "logger=none",
    ],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    for name, overrides in RUNS.items():
        cfg = plugformer.compose([*overrides, *TINY, f"paths.cache_dir={root / 'cache'}"])
        plugformer.train(cfg, run_dir=root / name)
    return {name: root / name for name in RUNS}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.parametrize("name", ["learned", "seq2seq", "classification", "lm", "t5", "mlm"])
def test_eval_as_trained_reproduces_the_checkpoints_validation_metrics(runs: dict[str, Path], name: str) -> None:
    entry = plugformer.evaluate(runs[name], track=False)
    trained = summary(runs[name])["metrics"]  # one validation, at the last step: the best checkpoint's
    assert entry["metrics"]["loss"] == pytest.approx(trained["val/loss"], rel=1e-5)
    assert entry["metrics"]["accuracy"] == pytest.approx(trained["val/accuracy"], abs=1e-6)
    assert entry["metrics"]["perplexity"] == pytest.approx(torch.tensor(trained["val/loss"]).exp().item(), rel=1e-5)
    assert entry["max_length"] == entry["trained_max_length"]


@pytest.mark.parametrize("name", ["alibi", "rope"])
def test_eval_at_twice_the_training_length(runs: dict[str, Path], name: str) -> None:
    entry = plugformer.evaluate(runs[name], ["data.seq_len=32"], track=False)
    assert entry["max_length"] == 2 * entry["trained_max_length"] == 32
    assert torch.isfinite(torch.tensor(entry["metrics"]["loss"]))
    recorded = json.loads((runs[name] / "eval.json").read_text())["evaluations"]
    assert [e["overrides"] for e in recorded].count(["data.seq_len=32"]) == 1


def test_learned_positions_refuse_untrained_lengths_unless_allowed(runs: dict[str, Path]) -> None:
    with pytest.raises(CapabilityError, match="never trained") as error:
        plugformer.evaluate(runs["learned"], ["data.seq_len=24"], track=False)
    assert "--allow-untrained-positions" in str(error.value.message())
    entry = plugformer.evaluate(runs["learned"], ["data.seq_len=24"], allow_untrained_positions=True, track=False)
    assert entry["max_length"] == 24
    # The table has model.position.max_length=24 rows: beyond them nothing can be scored.
    with pytest.raises(CapabilityError, match="at most 24 positions") as error:
        plugformer.evaluate(runs["learned"], ["data.seq_len=32"], allow_untrained_positions=True, track=False)
    assert "train with a larger model.position.max_length" in error.value.message()


def test_eval_takes_data_overrides_only(runs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="data overrides only"):
        plugformer.evaluate(runs["rope"], ["model.d_model=64"], track=False)


def test_eval_logs_to_the_runs_own_wandb_run_after_its_last_step(runs: dict[str, Path]) -> None:
    run_dir = runs["alibi"]
    run_id = summary(run_dir)["run_id"]
    before = set((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    entry = plugformer.evaluate(run_dir, ["data.seq_len=24"])
    added = set((run_dir / "wandb").glob(f"offline-run-*-{run_id}")) - before
    assert len(added) == 1
    wandb = Path(sys.executable).with_name("wandb")
    records = subprocess.run([str(wandb), "leet", "inspect", "--json", str(added.pop())], capture_output=True, text=True, timeout=120, check=True)
    history = [json.loads(line)["history"]["item"] for line in records.stdout.splitlines() if '"type":"history"' in line]
    assert len(history) == 1
    assert history[0]["eval/loss"] == pytest.approx(entry["metrics"]["loss"])
    assert history[0]["eval/max_length"] == 24
    assert history[0]["_step"] > summary(run_dir)["global_step"]


def test_eval_sweeps_lengths_and_keeps_going_past_a_refusal(runs: dict[str, Path]) -> None:
    result = run_cli("eval", str(runs["rope"]), str(runs["learned"]), "-m", "data.seq_len=16,48", "--limit-batches", "1")
    assert result.returncode == 1, result.stderr  # learned at 48 is refused; the other three ran
    lines = [line for line in result.stdout.splitlines() if "(length" in line]
    assert len(lines) == 3, result.stdout
    assert "never trained" in result.stderr
    lengths = {e["max_length"] for e in json.loads((runs["rope"] / "eval.json").read_text())["evaluations"]}
    assert {16, 48} <= lengths
    single = run_cli("eval", str(runs["rope"]), "data.seq_len=16,48")
    assert single.returncode != 0 and "add -m" in single.stderr


def test_generate_from_the_command_line_with_each_strategy(runs: dict[str, Path]) -> None:
    run_dir = str(runs["rope"])
    result = run_cli(
        "generate", run_dir, "--prompt", "1 2 17 18", "--prompt", "3 4 19", "--max-new-tokens", "5", "--strategy", "beam", "--beams", "3", "--json"
    )
    assert result.returncode == 0, result.stderr
    outputs = [json.loads(line) for line in result.stdout.splitlines()]
    assert [len(o["ids"]) for o in outputs] == [5, 5]
    run = plugformer.load_run(run_dir)
    beam = run.generate(torch.tensor([[1, 2, 17, 18]]), 5, strategy="beam", num_beams=3)
    assert outputs[0]["ids"] == beam[0].tolist()
    sampled = run.complete(["1 2 17 18"], 6, strategy="sample", seed=3, top_p=0.9)
    assert sampled == run.complete(["1 2 17 18"], 6, strategy="sample", seed=3, top_p=0.9)


def test_generate_refuses_text_for_a_run_without_a_tokenizer(runs: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    # The CLI's main in this process (the test above ran the console entry in a subprocess).
    status = main(["generate", str(runs["rope"]), "--prompt", "hello"])
    assert status != 0 and "token ids" in capsys.readouterr().err


def test_generate_for_an_encoder_decoder_and_a_classifier(runs: dict[str, Path]) -> None:
    translated = plugformer.load_run(runs["seq2seq"])
    source = "3 4 5 6"
    (target,) = translated.complete([source], 8)
    assert target and all(0 <= int(t) < translated.data.vocab_size for t in target.split())
    classifier = plugformer.load_run(runs["classification"])
    expression = next(iter(classifier.data.val_dataloader()))
    ids = expression["input_ids"][0][expression["attention_mask"][0]].tolist()
    (label,) = classifier.complete([" ".join(map(str, ids))])
    assert label.startswith("class ") and 0 <= int(label.split()[1]) < classifier.data.facts["num_classes"]


def test_text_runs_generate_text_for_every_text_objective(runs: dict[str, Path]) -> None:
    lm = plugformer.load_run(runs["lm"])
    (continued,) = lm.complete(["The "], 20, strategy="sample", top_k=5, seed=0)
    assert isinstance(continued, str) and continued
    t5 = plugformer.load_run(runs["t5"])
    (spans,) = t5.complete(["The <extra_id_0> sat on the <extra_id_1>."], 12)
    assert isinstance(spans, str)
    mlm = plugformer.load_run(runs["mlm"])
    (filled,) = mlm.complete(["The c<mask>t sat on the m<mask>t."])
    assert len(filled) == len("The cXt sat on the mXt.") and "<mask>" not in filled
    assert filled.startswith("The c") and filled.endswith("t.")
    with pytest.raises(ConfigError, match="mask"):
        mlm.complete(["no masks here"])


def test_eval_on_a_local_file_reads_it_with_the_runs_tokenizer(runs: dict[str, Path], tmp_path: Path) -> None:
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("A held-out letter, with characters such as \u00e9 and \u00df that training never saw.\n" * 20)
    entry = plugformer.evaluate(runs["lm"], [f"data.validation_files=[{held_out}]"], track=False)
    assert entry["metrics"]["loss"] > 0 and entry["batches"] >= 1
    trained = summary(runs["lm"])["metrics"]["val/loss"]
    assert entry["metrics"]["loss"] != pytest.approx(trained)
    assert json.loads((runs["lm"] / "tokenizer.json").read_text())  # the run's own tokenizer, saved at training


def test_eval_in_process_leaves_logging_as_it_was_for_a_later_training(runs: dict[str, Path], tmp_path: Path) -> None:
    """evaluate() quiets Lightning's notices and the datasets progress bars only while it
    runs: afterwards logger levels, warnings filters and the progress-bar switch are as they
    were, and a train() in the same process still writes Lightning's notices to train.log."""
    import logging
    import warnings

    import datasets

    watched = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    for logger in watched:
        logger.setLevel(logging.NOTSET)
    datasets.enable_progress_bars()
    filters = list(warnings.filters)
    plugformer.evaluate(runs["rope"], track=False)
    assert [logger.level for logger in watched] == [logging.NOTSET] * 3
    assert not datasets.are_progress_bars_disabled()
    assert warnings.filters == filters
    cache = f"paths.cache_dir={runs['rope'].parent / 'cache'}"
    plugformer.train(plugformer.compose([*RUNS["rope"], *TINY, "trainer.max_steps=2", "trainer.val_check_interval=2", cache]), run_dir=tmp_path / "run")
    assert "GPU available" in (tmp_path / "run" / "train.log").read_text()
