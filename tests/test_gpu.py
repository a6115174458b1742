"""GPU smoke tests: a few real training steps on the GPU, plain (trainer=gpu) and sharded
(trainer=fsdp: bf16 mixed precision, activation checkpointing, a sharded checkpoint that
resumes). They run wherever torch sees a CUDA device and are skipped, with that reason,
everywhere else (the only skip the project allows; issue 13 asks for it).

The GPU benchmark (benchmarks/gpu_throughput.py) is checked here only for what it does
without a GPU: say so, and write nothing."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FAST, REPO, read_summary, run_cli

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU smoke tests run only where torch.cuda.is_available()")
STEPS = ["trainer.max_steps=6", "trainer.val_check_interval=3", "model.n_layers=2", *FAST]


@needs_cuda
@pytest.mark.slow
def test_a_plain_gpu_run_trains(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", "trainer=gpu", *STEPS, f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["global_step"] == 6
    assert math.isfinite(summary["metrics"]["val/loss"])
    assert "precision bf16-mixed" in result.stdout, result.stdout


@needs_cuda
@pytest.mark.slow
def test_fsdp_on_gpus_shards_in_bf16_and_resumes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli("train", "trainer=fsdp", "trainer.fsdp.activation_checkpointing=true", *STEPS, f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["global_step"] == 6
    assert math.isfinite(summary["metrics"]["val/loss"])
    sharding = summary["sharding"]
    assert sharding["mixed_precision"] == "bfloat16" and sharding["activation_checkpointing"] is True
    assert sharding["wrapped_classes"] == ["StandardBlock"]
    ranks = len(sharding["parameters_per_rank"])
    assert ranks == torch.cuda.device_count()
    assert sum(sharding["parameters_per_rank"]) == sharding["parameters"]
    assert (run_dir / "checkpoints" / "last.ckpt" / "meta.pt").is_file()

    resumed = run_cli("train", f"resume={run_dir}", "trainer.max_steps=8")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_summary(run_dir)["global_step"] == 8


def test_the_gpu_benchmark_without_a_gpu_says_so_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "BENCHMARKS.md"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO / "benchmarks", timeout=300,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},  # no GPU, even on a machine that has one
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert "no CUDA device" in done.stderr and "BENCHMARKS.md unchanged" in done.stderr
    assert not out.exists()
