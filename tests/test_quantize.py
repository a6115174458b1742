"""The quantize technique: dynamic int8 linear layers evaluated against the float model
(loss delta, size, CPU latency), and quantization-aware training with fake-quantized
weights, alone and together with pruning."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.ao.nn.qat import dynamic as qat_dynamic
from torch.ao.nn.quantized import dynamic as quantized_dynamic

import plugformer
from plugformer.plugins import Plugins
from plugformer.training.run import train
from plugformer_plugins.technique.quantize import INT8_MODEL_FILE, REPORT_FILE, quantize_model

from compose import compose_train
from helpers import FAST

TINY = [
    *FAST, "logger=none", "data.train_examples=320", "data.val_examples=64", "model.n_heads=4", "model.n_layers=2",
    "trainer.max_steps=6", "trainer.val_check_interval=6", "techniques.quantize.eval_batches=2", "techniques.quantize.latency_batches=1",
]
LINEARS = 2 * 5 + 1  # per layer query, key_value, out, up, down; and the head


def test_post_training_dynamic_int8_is_evaluated_against_float(tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train("+technique=quantize", *TINY, f"run_dir={tmp_path}")
    summary = train(cfg, plugins, tmp_path, run_id="quant1")
    assert summary["status"] == "finished", summary.get("error")
    report = json.loads((tmp_path / REPORT_FILE).read_text())
    assert {f"quantize/{k}": v for k, v in report.items()} == {k: v for k, v in summary["extra"].items() if k.startswith("quantize/")}
    assert report["int8_modules"] == LINEARS and report["qat"] is False
    assert report["int8/bytes"] < report["fp32/bytes"] and report["size_ratio"] < 1
    assert report["fp32/latency_per_token_s"] > 0 and report["int8/latency_per_token_s"] > 0
    assert report["delta/loss"] == pytest.approx(report["int8/loss"] - report["fp32/loss"])
    assert abs(report["delta/loss"]) < 0.05 and report["int8/loss"] != report["fp32/loss"]
    # The int8 model on disk loads into the quantized structure of the run's model.
    quantized = quantize_model(plugformer.load_run(tmp_path, checkpoint="last").model)
    quantized.load_state_dict(torch.load(tmp_path / INT8_MODEL_FILE, weights_only=False))
    assert sum(isinstance(m, quantized_dynamic.Linear) for m in quantized.modules()) == LINEARS


def test_quantization_aware_training_with_pruning(tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train(
        "+technique=[quantize,prune]", *TINY, "techniques.quantize.qat=true", "techniques.prune.sparsity=0.5",
        "techniques.prune.end_step=2", "techniques.prune.frequency=1", f"run_dir={tmp_path}",
    )
    summary = train(cfg, plugins, tmp_path, run_id="quant2")
    assert summary["status"] == "finished", summary.get("error")
    extra = summary["extra"]
    assert extra["quantize/qat"] is True and extra["quantize/int8_modules"] == LINEARS
    assert extra["prune/sparsity"] == pytest.approx(0.5, abs=1e-3)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    # Fake-quantized layers (their weight observers are saved), with pruning masks on them.
    assert "model.stacks.decoder.blocks.0.ffn.up.weight_fake_quant.scale" in state
    assert "model.stacks.decoder.blocks.0.ffn.up.weight_mask" in state
    loaded = plugformer.load_run(tmp_path, checkpoint="last").model
    fake = [m for m in loaded.modules() if isinstance(m, qat_dynamic.Linear)]
    assert len(fake) == LINEARS and loaded.objective.head.weight is loaded.token_embedding.weight
    # The pruned zeros survive conversion to int8.
    quantized = quantize_model(loaded)
    up = quantized.stacks.decoder.blocks[0].ffn.up.weight()
    assert float((up.int_repr() == up.q_zero_point()).float().mean()) > 0.3
