"""Training in-process through the public pieces: hooks and techniques take part in a real
Lightning run, and a failing run still leaves its summary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest

from compose import compose_train
from helpers import FAST
from plugformer import Component, ConfigError, hookimpl
from plugformer.plugins import load_plugins
from plugformer.training.optim import lr_multiplier
from plugformer.training.run import train


@dataclass
class ProbeConfig:
    weight: float = 0.25
    reject: bool = False


class Probe:
    """A technique implementing every run hook, recording the calls."""

    def __init__(self, config: ProbeConfig, ctx) -> None:
        self.config = config
        self.ctx = ctx
        self.calls: list[str] = []

    @hookimpl
    def validate_config(self, cfg, registry):
        self.calls.append("validate_config")
        if self.config.reject:
            raise ConfigError("technique.probe.reject is set", fix="unset it")

    @hookimpl
    def model_built(self, model, cfg):
        self.calls.append("model_built")
        model.probe_marker = True

    @hookimpl
    def extra_losses(self, model, batch, outputs, stage):
        self.calls.append(f"extra_losses:{stage}")
        return {"probe": outputs.loss.new_tensor(self.config.weight)}

    @hookimpl
    def lightning_callbacks(self, cfg):
        probe = self

        class Seen(pl.Callback):
            def on_train_start(self, trainer, module):
                probe.calls.append("callback:on_train_start")

        return [Seen()]


    @hookimpl
    def run_summary(self, trainer, module):
        self.calls.append("run_summary")
        return {"probe/steps": trainer.global_step}

    @hookimpl
    def tracking_tags(self, cfg):
        self.calls.append("tracking_tags")
        return ["probe-tag"]


class ProbePlugin:
    instances: list[Probe] = []

    @hookimpl
    def register_components(self, registry):
        def factory(config, ctx):
            probe = Probe(config, ctx)
            ProbePlugin.instances.append(probe)
            return probe

        registry.add(Component(kind="technique", name="probe", factory=factory, config=ProbeConfig, summary="probe"))


@pytest.fixture
def probe_plugins():
    ProbePlugin.instances.clear()
    return load_plugins(extra={"probe_plugin": ProbePlugin()})


def test_every_run_hook_takes_part(probe_plugins, tmp_path: Path) -> None:
    cfg = compose_train("+technique=probe", "logger=none", "trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", f"run_dir={tmp_path}", *FAST)
    summary = train(cfg, probe_plugins, tmp_path, run_id="probe0001")
    probe = ProbePlugin.instances[-1]
    for call in (
        "validate_config", "model_built", "extra_losses:train", "extra_losses:val", "callback:on_train_start",
        "tracking_tags", "run_summary",
    ):
        assert call in probe.calls, call
    assert summary["status"] == "finished"
    assert summary["metrics"]["train/loss_probe"] == pytest.approx(0.25)
    assert summary["metrics"]["val/loss_probe"] == pytest.approx(0.25)
    assert summary["extra"]["probe/steps"] == 6
    # Beside the per-run report every run gets (docs/compression.md).
    assert set(summary["extra"]) - {"probe/steps"} <= {"report/params", "report/nonzero_params", "report/model_bytes", "report/cpu_latency_per_token_s", "report/latency_threads"}
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert "train/loss_probe" in header


def test_a_run_rejected_by_a_hook_still_writes_its_summary(probe_plugins, tmp_path: Path) -> None:
    cfg = compose_train("+technique=probe", "techniques.probe.reject=true", "logger=none", f"run_dir={tmp_path}", *FAST)
    with pytest.raises(ConfigError):
        train(cfg, probe_plugins, tmp_path, run_id="probe0002")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "technique.probe.reject" in summary["error"]
    assert summary["components"]["attention"] == "full"


def test_the_optimized_loss_includes_the_extra_terms(probe_plugins, tmp_path: Path) -> None:
    """A constant extra term has no gradient, so two seeded runs have the same objective loss
    (``val/loss``) and optimized losses (``val/total_loss``) that differ by exactly its weight."""
    losses, totals = {}, {}
    for weight in (0.0, 0.25):
        run_dir = tmp_path / str(weight)
        cfg = compose_train(
            "+technique=probe", f"techniques.probe.weight={weight}", "logger=none", "trainer.max_steps=3",
            "trainer.val_check_interval=3", f"run_dir={run_dir}", *FAST,
        )
        metrics = train(cfg, probe_plugins, run_dir, run_id=f"probe{int(weight * 100):04d}")["metrics"]
        losses[weight], totals[weight] = metrics["val/loss"], metrics["val/total_loss"]
    assert losses[0.25] == pytest.approx(losses[0.0], abs=1e-6)
    assert totals[0.0] == pytest.approx(losses[0.0], abs=1e-6)
    assert totals[0.25] - totals[0.0] == pytest.approx(0.25, abs=1e-5)


def test_learning_rate_schedule() -> None:
    kwargs = dict(warmup_steps=10, total_steps=110, min_ratio=0.1)
    assert lr_multiplier(0, schedule="cosine", **kwargs) == pytest.approx(0.1)
    assert lr_multiplier(9, schedule="cosine", **kwargs) == pytest.approx(1.0)
    assert lr_multiplier(60, schedule="cosine", **kwargs) == pytest.approx(0.55)
    assert lr_multiplier(110, schedule="cosine", **kwargs) == pytest.approx(0.1)
    assert lr_multiplier(60, schedule="linear", **kwargs) == pytest.approx(0.55)
    assert lr_multiplier(60, schedule="constant", **kwargs) == 1.0
