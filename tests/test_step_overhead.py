"""What the training path no longer does at every step, with the same results: clipping reuses
the non-finite guard's gradient norm, objectives skip accuracy on steps that log nothing (and
log it right on the others), tokens are counted without reading the device per step, the
model learns that a mask has no padding from the host, and the progress bar redraws at a rate
but ends on the exact final state."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

import plugformer
from compose import compose_train
from helpers import FAST
from plugformer import hookimpl
from plugformer.components import Objective, batch_token_count
from plugformer.data import CachedDatasetTask
from plugformer.masks import all_true, all_true_on_host, mark_all_true
from plugformer.plugins import load_plugins
from plugformer.training.callbacks import ThroughputMonitor
from plugformer.training.console import TQDMMetricsBar
from plugformer.training.run import train

STEPS = 6
SHORT = ["logger=none", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={STEPS}", "model.dropout=0.0", *FAST]


def _train(tmp_path: Path, plugins, *overrides: str) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = compose_train(*SHORT, *overrides, f"run_dir={tmp_path}")
    return train(cfg, plugins, tmp_path, run_id=f"stp{abs(hash(str(tmp_path))) % 10**5:05d}")


class AccuracyByHand:
    """A plugin whose callback computes each training step's accuracy itself, before the
    optimizer changes the weights: a forward pass of the step's batch, argmax by hand."""

    def __init__(self) -> None:
        self.accuracy: dict[int, float] = {}

    @hookimpl
    def lightning_callbacks(self, cfg):
        import lightning.pytorch as pl

        record = self.accuracy

        class ByHand(pl.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                self.batch = batch

            def on_before_optimizer_step(self, trainer, module, optimizer):
                with torch.no_grad():
                    batch = module.model.objective.prepare_batch(self.batch)
                    logits = module.model(batch).logits
                labels = batch["labels"]
                scored = labels != -100
                record[trainer.global_step] = float((logits.argmax(-1) == labels)[scored].float().mean())

        return [ByHand()]


def test_logged_training_accuracy_matches_an_independent_computation(tmp_path: Path) -> None:
    by_hand = AccuracyByHand()
    _train(tmp_path, load_plugins(extra={"accuracy_by_hand": by_hand}), "trainer.log_every_n_steps=2")
    rows = [row for row in csv.DictReader(open(tmp_path / "metrics.csv")) if row.get("train/loss")]
    logged = {int(row["step"]): float(row["train/accuracy"]) for row in rows}
    assert sorted(logged) == [1, 3, 5]  # every 2nd step (Lightning counts from 1), the last one among them
    assert len(by_hand.accuracy) == STEPS
    for step, value in logged.items():
        assert value == pytest.approx(by_hand.accuracy[step], abs=1e-6), (step, value, by_hand.accuracy)


def test_clipping_reuses_the_guards_norm_and_trains_exactly_as_before(tmp_path: Path, monkeypatch) -> None:
    """Clipping hard (0.05, so every step is clipped) with the guard on (its norm reused) and
    with the guard off (Lightning's clip_grad_norm_) gives bit-identical training."""
    calls = []
    clip_grad_norm = torch.nn.utils.clip_grad_norm_

    def counted(*args, **kwargs):
        calls.append(1)
        return clip_grad_norm(*args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counted)
    plugins = load_plugins()
    clip = ["trainer.gradient_clip_val=0.05", "trainer.log_every_n_steps=1"]
    reused = _train(tmp_path / "guard", plugins, *clip)
    assert calls == []  # the guard's norm was used: no second pass over the gradients
    lightning = _train(tmp_path / "off", plugins, *clip, "callbacks.nonfinite.action=off")
    assert len(calls) == STEPS
    for name in ("train/loss", "val/loss", "val/accuracy"):
        assert reused["metrics"][name] == lightning["metrics"][name], name
    unclipped = _train(tmp_path / "unclipped", plugins, "trainer.gradient_clip_val=0", "trainer.log_every_n_steps=1")
    assert unclipped["metrics"]["val/loss"] != reused["metrics"]["val/loss"]  # the clipping did act


def test_objectives_skip_accuracy_only_when_no_logger_reads_it(tmp_path: Path) -> None:
    for overrides in ([], ["experiment=listops_small", "data.train_examples=64", "data.val_examples=16"]):
        cfg = compose_train(*overrides, "model.dropout=0.0", "model.d_model=32", "model.n_layers=1", f"run_dir={tmp_path}")
        built = plugformer.build(cfg)
        model, objective = built.model.eval(), built.model.objective
        batch = objective.prepare_batch(next(iter(built.data.train_dataloader())))
        with torch.no_grad():
            full = model(batch)
            objective.metrics_due = False
            try:
                lean = model(batch)
            finally:
                objective.metrics_due = True
        assert "accuracy" not in lean.metrics and "accuracy" in full.metrics
        assert torch.equal(lean.loss, full.loss)
        labels = batch["labels"]
        scored = labels != -100
        expected = (full.logits.argmax(-1) == labels)[scored].float().mean()
        assert float(full.metrics["accuracy"]) == pytest.approx(float(expected), abs=1e-6)


def _padded_batch() -> dict[str, torch.Tensor]:
    mask = torch.tensor([[True, True, True], [True, True, False]])
    return {"input_ids": torch.arange(6).view(2, 3), "attention_mask": mask, "labels": torch.zeros(2, 3, dtype=torch.long)}


def test_the_throughput_callback_counts_the_real_tokens_and_logs_the_right_rate() -> None:
    objective = Objective()
    monitor = ThroughputMonitor()
    logged: dict[str, list[float]] = {}
    module = SimpleNamespace(
        model=SimpleNamespace(objective=objective), log=lambda name, value, **_: logged.setdefault(name, []).append(value)
    )
    trainer = SimpleNamespace(global_step=0, world_size=1, log_every_n_steps=2)
    counted = 0
    for step in range(1, 6):
        batch = _padded_batch()
        batch["attention_mask"][0, : step % 3] = False
        trainer.global_step = step
        monitor.on_train_batch_start(trainer, module, batch, step)
        monitor.on_train_batch_end(trainer, module, None, batch, step)
        if step > 1:  # the first step pays for warm-up and is not counted
            counted += int(batch["attention_mask"].sum())
    assert monitor.tokens == counted
    assert monitor.tokens_per_second == pytest.approx(counted / monitor.seconds)
    assert len(logged["train/tokens_per_second"]) == 2 and all(isinstance(v, float) for v in logged["train/tokens_per_second"])
    assert isinstance(batch_token_count(objective, _padded_batch()), torch.Tensor)  # summed where the batch is


def test_an_objective_that_overrides_only_tokens_in_is_counted_with_it() -> None:
    class Old(Objective):
        def tokens_in(self, batch):
            return 7

    class Newer(Old):  # overrides count_tokens below Old's tokens_in: counted with it
        def count_tokens(self, batch):
            return torch.tensor(3)

    class New(Objective):
        def count_tokens(self, batch):
            return torch.tensor(3)

    assert batch_token_count(Old(), _padded_batch()) == 7
    assert int(batch_token_count(Newer(), _padded_batch())) == 3
    assert int(batch_token_count(New(), _padded_batch())) == 3 and New().tokens_in(_padded_batch()) == 3
    assert Objective().tokens_in(_padded_batch()) == 5


def test_the_host_tells_the_model_that_a_mask_has_no_padding(tmp_path: Path) -> None:
    batch = _padded_batch()
    batch["full"] = torch.ones(2, 3, dtype=torch.bool)
    assert all_true_on_host(batch) == {"attention_mask": False, "full": True}
    task = CachedDatasetTask(tmp_path, batch_size=2)
    moved = task.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert all_true(moved["full"]) is True and all_true(moved["attention_mask"]) is False
    # The noted answer is used as given, without reading the mask again.
    lying = mark_all_true({"attention_mask": torch.zeros(2, 3, dtype=torch.bool)}, {"attention_mask": True})
    assert all_true(lying["attention_mask"]) is True
    assert all_true(torch.tensor([True, False])) is False  # nothing noted: computed


def test_a_noted_full_mask_takes_the_no_padding_path(tmp_path: Path) -> None:
    cfg = compose_train("model.dropout=0.0", "model.d_model=32", "model.n_layers=1", f"run_dir={tmp_path}")
    model = plugformer.build(cfg).model.eval()
    ids = torch.randint(0, 8, (2, 6))
    half = torch.tensor([[True] * 3 + [False] * 3] * 2)
    with torch.no_grad():
        plain = model.hidden_states(plugformer.ModelInputs(input_ids=ids))
        padded = model.hidden_states(plugformer.ModelInputs(input_ids=ids, attention_mask=half))
        # A mask noted as all True is not read: the stack runs as without one.
        noted = mark_all_true({"m": half.clone()}, {"m": True})["m"]
        skipped = model.hidden_states(plugformer.ModelInputs(input_ids=ids, attention_mask=noted))
    assert torch.equal(skipped, plain) and not torch.allclose(padded[:, 3:], plain[:, 3:])


class _Bars:
    """A tqdm bar that remembers which training batch ends Lightning's bar was given."""

    def __init__(self, monkeypatch, total: int, interval: float) -> None:
        self.shown: list[int] = []
        monkeypatch.setattr(TQDMProgressBar, "on_train_batch_end", lambda bar, t, m, o, b, i: self.shown.append(i))
        for hook in ("on_validation_start", "on_train_epoch_end", "on_train_end"):
            monkeypatch.setattr(TQDMProgressBar, hook, lambda *args: None)
        self.bar = TQDMMetricsBar(update_interval_s=interval)
        self.trainer = SimpleNamespace(num_training_batches=total, max_epochs=1, max_steps=-1, global_step=0)
        self.bar._trainer = self.trainer

    def steps(self, batch_indices: range) -> None:
        for index in batch_indices:
            self.trainer.global_step += 1
            self.bar.on_train_batch_end(self.trainer, None, None, None, index)


def test_the_progress_bar_updates_at_a_rate_and_ends_on_the_exact_state(monkeypatch) -> None:
    bars = _Bars(monkeypatch, total=10, interval=3600.0)
    bars.steps(range(0, 5))
    assert bars.shown == [0]  # the first batch, then nothing within the interval
    bars.bar.on_validation_start(bars.trainer, None)
    assert bars.shown == [0, 4]  # caught up before validation
    bars.steps(range(5, 10))
    assert bars.shown == [0, 4, 9]  # the epoch's last batch is always shown
    bars.bar.on_train_epoch_end(bars.trainer, None)
    assert bars.shown == [0, 4, 9]  # nothing left to catch up

    run = _Bars(monkeypatch, total=100, interval=3600.0)
    run.trainer.max_steps = 7
    run.steps(range(0, 7))
    assert run.shown == [0, 6]  # the run's last step, mid-epoch

    every = _Bars(monkeypatch, total=4, interval=0.0)
    every.steps(range(0, 4))
    assert every.shown == [0, 1, 2, 3]


def test_a_partial_benchmark_rerun_keeps_the_other_parts_and_the_notes(tmp_path: Path) -> None:
    import importlib.util
    import sys

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    sys.path.insert(0, str(benchmarks))
    try:
        spec = importlib.util.spec_from_file_location("overhead_benchmark", benchmarks / "overhead.py")
        overhead = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(overhead)
    finally:
        sys.path.remove(str(benchmarks))
    meta = {"cores": 2, "torch": "x", "threads": 1, "python": "3", "date": "d", "load": "9.0", "commands": ["first"]}
    ways = [overhead.PLAIN, overhead.DEFAULT, overhead.OFF]

    def part(cpu: list[float]) -> dict:
        times = {name: [value] for name, value in zip(ways, cpu)}
        return {"wall": times, "cpu": times, "losses_agree": True, "overrides": ["o"], "steps": 2, "warmup": 1, "repeats": 1}

    first = {"meta": meta, "model": part([0.300, 0.303, 0.301]), "tiny": part([0.010, 0.016, 0.012]),
             "data": {"steps": 5, "runs": {"run a": {"fraction": 0.02, "tokens_per_second": 100.0}}}}
    out = tmp_path / "BENCHMARKS.md"
    notes = "Notes (written by hand for this measurement): kept."
    out.write_text("# Benchmarks\n\n" + overhead.report(first).replace(overhead.END, notes + "\n\n" + overhead.END) + "\nafter\n")
    earlier = overhead.earlier_section(out)
    again = {"meta": {**meta, "load": "3.0", "commands": ["second"]}, "tiny": part([0.010, 0.013, 0.011])}
    text = overhead.report(again, earlier)
    model_table = earlier["model"].split("\n", 1)[1]
    assert model_table in text and "#### The default run's model" in text and "#### Data wait" in text
    assert "| run a | 2.00 % | 100 |" in text and text.count(notes) == 1
    assert "+1.00 (+1.00–+1.00) %" in text  # the new tiny cost (3 ms) over the kept plain CPU step (300 ms)
    assert "That measurement: 2 cores" in text and "load average 9.0" in text
    overhead.write_section(out, text, overhead.START, overhead.END)
    assert out.read_text().endswith("\nafter\n")  # the rest of the file is untouched
    # A second partial rerun still finds the kept parts (now one level down) and their measurement.
    twice = overhead.earlier_section(out)
    assert twice["model"] == earlier["model"] and twice["data"] == earlier["data"] and "load average 9.0" in twice["model_machine"]
    assert twice["tiny"].split("\n", 1)[1] in text and "load average 3.0" not in twice["model_machine"]


def test_logged_values_average_right_through_the_lightning_fastpaths() -> None:
    """With the fast path installed (as every run installs it), a record that ``log`` finds on
    the value's device is left as it is, and its epoch mean is still the mean of what was
    logged; a move spelled otherwise goes through Lightning's own path, same values."""
    from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection

    from plugformer.training.lightning_fastpaths import install

    install()
    install()  # idempotent: the original is wrapped once
    results = _ResultCollection(training=True)
    values = [1.0, 2.0, 6.0]
    for value in values:
        results.log("training_step", "loss", torch.tensor(value), on_step=False, on_epoch=True, batch_size=2)
    record = results["training_step.loss"]
    assert float(record.compute()) == pytest.approx(sum(values) / len(values))
    assert float(record.to("cpu").compute()) == pytest.approx(sum(values) / len(values))
