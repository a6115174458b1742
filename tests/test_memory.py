"""The memory preflight: its estimate is within a factor of 2 of the measured peak of real
training steps, and a run that cannot fit (ListOps at LRA's sizes on a 24 GB machine) is
refused before data or model are built, with one message and a failed summary.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import plugformer
from plugformer.api import _session_plugins
from plugformer.memory import GIB, InsufficientMemoryError, check_memory, estimate
from plugformer.model.builder import check_components, choose_components

# Each worker builds the model and data of a config, then measures how far two training
# steps (forward, backward, AdamW) raise the process's peak resident memory (VmHWM, reset
# through /proc/self/clear_refs) above its resident memory before them; the parameters,
# already resident then, are added. glibc returns freed blocks at 64 KiB (as in
# benchmarks/attention_scaling.py), so the peak is not hidden in malloc's arenas.
WORKER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import plugformer
    from plugformer.api import _session_plugins
    from plugformer.config import optim_config
    from plugformer.memory import estimate
    from plugformer.model.builder import check_components, choose_components
    from plugformer.training.optim import build_optimizer

    def status_kib(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])

    cfg = plugformer.compose(json.loads(sys.argv[1]))
    registry = _session_plugins().registry
    chosen = choose_components(cfg, registry)
    found = estimate(cfg, chosen, check_components(cfg, chosen, registry))
    built = plugformer.build(cfg)
    model = built.model.train()
    batch = model.objective.prepare_batch(next(iter(built.data.train_dataloader())))
    optimizer, _ = build_optimizer(model, optim_config(cfg), 10)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    for _ in range(2):
        model(batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = (status_kib("VmHWM") - before) * 1024 + 4 * sum(p.numel() for p in model.parameters())
    print("RESULT=" + json.dumps({
        "measured": measured, "estimated": found.per_process - found.parts["framework"],
        "length": int(batch["input_ids"].shape[1]), "parts": found.parts,
    }))
    """
)

CONFIGS = {
    # Padded classification with full attention and dropout (SDPA's explicit path on CPU):
    # the batch × heads × n × n scores dominate.
    "listops, full attention, padded, dropout": [
        "experiment=listops_small", "data.min_length=300", "data.max_length=512", "data.max_depth=10", "data.train_examples=64",
        "data.val_examples=8", "data.test_examples=0", "data.batch_size=16", "data.bucket_by_length=false",
        "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.dropout=0.1",
    ],
    # The same without dropout: the fused kernel takes the padding mask, activations dominate.
    "listops, full attention, padded": [
        "experiment=listops_small", "data.min_length=300", "data.max_length=512", "data.max_depth=10", "data.train_examples=64",
        "data.val_examples=8", "data.test_examples=0", "data.batch_size=16", "data.bucket_by_length=false",
        "model.d_model=128", "model.n_layers=2", "model.n_heads=4", "model.dropout=0.0",
    ],
    # A causal LM: the layers' activations and the logits dominate.
    "mqar, causal LM": [
        "experiment=plain", "data.seq_len=256", "data.vocab_size=512", "data.num_pairs=8", "data.train_examples=64",
        "data.val_examples=8", "data.batch_size=32", "model.d_model=256", "model.n_layers=2", "model.n_heads=4",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_estimate_is_within_a_factor_of_two_of_the_measured_peak(name: str, tmp_path: Path) -> None:
    overrides = [*CONFIGS[name], f"paths.cache_dir={tmp_path}", "logger=none"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(overrides)], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    values = json.loads([line for line in result.stdout.splitlines() if line.startswith("RESULT=")][-1][7:])
    ratio = values["estimated"] / values["measured"]
    assert 0.5 <= ratio <= 2.0, values
    assert values["measured"] > 100 * 2**20, values  # the configs are big enough to mean something


def _estimate_for(overrides: list[str]):
    cfg = plugformer.compose(overrides)
    registry = _session_plugins().registry
    chosen = choose_components(cfg, registry)
    return cfg, chosen, check_components(cfg, chosen, registry)


@pytest.fixture
def a_24_gb_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("plugformer.memory.available", lambda device: (20 * GIB, "CPU RAM (MemAvailable)"))


def test_listops_at_lra_sizes_is_refused_on_a_24_gb_machine(a_24_gb_machine: None) -> None:
    cfg, chosen, plan = _estimate_for(["experiment=listops_lra"])
    with pytest.raises(InsufficientMemoryError) as refused:
        check_memory(cfg, chosen, plan)
    message = refused.value.message()
    assert "20.0 GiB are available" in message and "32 × 8 heads × 2000² scores per layer (dropout on CPU)" in message
    assert "data.batch_size=" in message and "trainer.accumulate_grad_batches=" in message  # what to change
    assert refused.value.estimate.total > 40 * GIB


def test_memory_check_warn_and_off(a_24_gb_machine: None) -> None:
    cfg, chosen, plan = _estimate_for(["experiment=listops_lra", "memory_check=warn"])
    with pytest.warns(UserWarning, match="memory_check=warn"):
        found, line = check_memory(cfg, chosen, plan)
    assert found is not None and "over" in line
    cfg, chosen, plan = _estimate_for(["experiment=listops_lra", "memory_check=off"])
    assert check_memory(cfg, chosen, plan) == (None, "memory check off")


def test_ddp_ranks_on_cpu_share_the_memory() -> None:
    cfg, chosen, plan = _estimate_for(["experiment=listops_small"])
    one, two = estimate(cfg, chosen, plan, processes=1), estimate(cfg, chosen, plan, processes=2)
    assert two.total == 2 * one.total


def test_a_refused_run_stops_before_building_and_says_so_in_its_summary(a_24_gb_machine: None, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    cfg = plugformer.compose(["experiment=listops_lra", "logger=none", f"paths.cache_dir={tmp_path / 'cache'}"])
    try:
        with pytest.raises(InsufficientMemoryError):
            plugformer.train(cfg, run_dir=tmp_path / "run")
    finally:
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "InsufficientMemoryError" in summary["error"]
    assert summary["memory"]["estimate_bytes"] > summary["memory"]["available_bytes"] == 20 * GIB
    assert not (tmp_path / "cache").exists()  # no data was built
