"""The per-run report every run gets: parameters (total and non-zero), weight bytes and CPU
latency per token, in summary.json, the W&B summary and `plugformer compare`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from plugformer.compare import comparison_table, load_run
from plugformer.plugins import Plugins
from plugformer.training.run import _flat_summary, train
from plugformer_plugins.technique.report import parameter_counts, weight_bytes

from compose import compose_train
from helpers import FAST

TINY = [*FAST, "logger=none", "data.train_examples=320", "data.val_examples=64", "trainer.max_steps=4", "trainer.val_check_interval=4"]


def test_counts_see_pruned_zeros_and_shared_weights_once() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 4, bias=False))
    model[1].weight = nn.Parameter(model[0].weight.detach().t().clone())
    extra = nn.Linear(4, 5)
    extra.weight = model[0].weight  # shared: counted once
    model.append(extra)
    total, nonzero = parameter_counts(model)
    assert total == 20 + 5 + 20 + 5 and nonzero == total
    prune.l1_unstructured(model[0], "weight", amount=8)
    total, nonzero = parameter_counts(model)
    assert total == 50 and nonzero == 50 - 8
    assert weight_bytes(model) == 4 * 50  # the mask is not a weight


def test_every_run_reports_its_size_and_cpu_latency(tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train(*TINY, "+technique=prune", "techniques.prune.sparsity=0.5", "techniques.prune.end_step=2", f"run_dir={tmp_path / 'pruned'}")
    pruned = train(cfg, plugins, tmp_path / "pruned", run_id="report1")
    cfg = compose_train(*TINY, "report.latency_batches=0", f"run_dir={tmp_path / 'dense'}")
    dense = train(cfg, plugins, tmp_path / "dense", run_id="report2")
    for summary in (pruned, dense):
        assert summary["status"] == "finished", summary.get("error")
        assert summary["extra"]["report/params"] == summary["params"]
        assert summary["extra"]["report/model_bytes"] == pytest.approx(4 * summary["params"], rel=0.01)
    report = pruned["extra"]
    assert report["report/nonzero_params"] < report["report/params"]
    assert report["report/cpu_latency_per_token_s"] > 0 and report["report/latency_threads"] >= 1
    assert dense["extra"]["report/nonzero_params"] == dense["extra"]["report/params"]
    assert dense["extra"]["report/cpu_latency_per_token_s"] is None  # timing turned off
    # What reaches W&B's summary, and what `plugformer compare` shows.
    assert _flat_summary(pruned)["report/nonzero_params"] == report["report/nonzero_params"]
    rows = comparison_table([load_run(tmp_path / "pruned"), load_run(tmp_path / "dense")])
    assert rows[0]["report/nonzero_params"] == report["report/nonzero_params"]
    assert rows[1]["report/cpu_latency_per_token_s"] is None and rows[1]["report/params"] == dense["params"]
