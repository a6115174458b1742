"""A plugin that misbehaves at run time is named: a hook that raises or returns the wrong
type, or a component whose code raises, stops the run with a PluginError naming the plugin,
its distribution and how to disable it; summary.json is still written, and the original
error is never hidden by a later one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from compose import compose_train
from helpers import FAST, read_summary
from plugformer import Component, PluginError, hookimpl
from plugformer.plugins import call_hook, load_plugins
from plugformer.training.run import train

SHORT = ["logger=none", "trainer.max_steps=4", "trainer.val_check_interval=2", *FAST]


@dataclass
class FragileNormConfig:
    pass


class FragileNorm(nn.Module):
    """A LayerNorm that raises once training has run a few forward passes."""

    calls = 0
    fail_after: int | None = None

    def __init__(self, config: FragileNormConfig, ctx) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(ctx.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FragileNorm.calls += 1
        if FragileNorm.fail_after is not None and FragileNorm.calls > FragileNorm.fail_after:
            raise ValueError("kaboom inside the norm")
        return self.norm(x)


class Faulty:
    """An installed-style plugin whose hooks misbehave as ``mode`` says."""

    mode: str = ""

    @hookimpl
    def register_components(self, registry):
        registry.add(Component(kind="norm", name="fragile", factory=FragileNorm, config=FragileNormConfig, summary="raises"))

    @hookimpl
    def extra_losses(self, model, batch, outputs, stage):
        if self.mode == "extra_losses raises":
            raise RuntimeError("boom in extra_losses")
        if self.mode == "extra_losses returns a list":
            return [outputs.loss * 0]
        return None

    @hookimpl
    def model_built(self, model, cfg):
        if self.mode == "model_built raises":
            raise AttributeError("no such submodule")

    @hookimpl
    def tracking_tags(self, cfg):
        return [42] if self.mode == "tracking_tags returns a number" else None

    @hookimpl
    def lightning_callbacks(self, cfg):
        return ["not a callback"] if self.mode == "lightning_callbacks returns a string" else None

    @hookimpl
    def run_summary(self, trainer, module):
        if "run_summary raises" in self.mode:
            raise KeyError("missing metric")
        return None


@pytest.fixture(scope="module")
def faulty_plugins():
    return load_plugins(extra={"faulty": FAULTY})


FAULTY = Faulty()


@pytest.fixture(autouse=True)
def reset():
    FAULTY.mode = ""
    FragileNorm.calls, FragileNorm.fail_after = 0, None
    yield
    FAULTY.mode = ""


def assert_names_the_plugin(message: str, hook: str) -> None:
    assert "'faulty'" in message and "<in-process>" in message, message
    assert hook in message and "PLUGFORMER_DISABLE_PLUGINS=faulty" in message, message


@pytest.mark.parametrize(
    ("mode", "hook", "detail"),
    [
        ("extra_losses raises", "extra_losses", "RuntimeError: boom in extra_losses"),
        ("extra_losses returns a list", "extra_losses", "returned a list"),
        ("tracking_tags returns a number", "tracking_tags", "of type int"),
        ("lightning_callbacks returns a string", "lightning_callbacks", "of type str"),
        ("model_built raises", "model_built", "AttributeError: no such submodule"),
    ],
)
def test_a_misbehaving_hook_stops_the_run_naming_its_plugin(faulty_plugins, tmp_path: Path, mode: str, hook: str, detail: str) -> None:
    FAULTY.mode = mode
    cfg = compose_train(*SHORT, f"run_dir={tmp_path}")
    with pytest.raises(PluginError) as caught:
        train(cfg, faulty_plugins, tmp_path, run_id="fault001")
    message = caught.value.message()
    assert_names_the_plugin(message, hook)
    assert detail in message
    summary = read_summary(tmp_path)
    assert summary["status"] == "failed" and "'faulty'" in summary["error"]


def test_a_failing_run_summary_still_writes_the_summary(faulty_plugins, tmp_path: Path) -> None:
    FAULTY.mode = "run_summary raises"
    cfg = compose_train(*SHORT, f"run_dir={tmp_path}")
    with pytest.raises(PluginError) as caught:
        train(cfg, faulty_plugins, tmp_path, run_id="fault002")
    assert_names_the_plugin(caught.value.message(), "run_summary")
    summary = read_summary(tmp_path)
    assert summary["global_step"] == 4 and "val/loss" in summary["metrics"]  # the run itself got through
    assert summary["status"] == "failed" and "run_summary" in summary["error"] and "missing metric" in summary["error"]


def test_a_component_that_raises_is_named(faulty_plugins, tmp_path: Path) -> None:
    FragileNorm.fail_after = 20  # past the sanity check, inside training
    cfg = compose_train("model/norm=fragile", *SHORT, f"run_dir={tmp_path}")
    with pytest.raises(PluginError) as caught:
        train(cfg, faulty_plugins, tmp_path, run_id="fault003")
    message = caught.value.message()
    assert "norm component 'fragile'" in message and "kaboom inside the norm" in message
    assert "PLUGFORMER_DISABLE_PLUGINS=faulty" in message
    assert isinstance(caught.value.__cause__, ValueError)
    assert "fragile" in read_summary(tmp_path)["error"]


def test_a_later_failure_never_hides_the_first(faulty_plugins, tmp_path: Path) -> None:
    FragileNorm.fail_after = 20
    FAULTY.mode = "run_summary raises"
    cfg = compose_train("model/norm=fragile", *SHORT, f"run_dir={tmp_path}")
    with pytest.raises(PluginError, match="kaboom inside the norm"):
        train(cfg, faulty_plugins, tmp_path, run_id="fault004")
    summary = read_summary(tmp_path)
    assert "kaboom" in summary["error"] and "missing metric" in summary["extra"]["run_summary_error"]


def test_call_hook_passes_good_results_in_pluggy_order(faulty_plugins) -> None:
    hooks = faulty_plugins.run_manager()
    assert call_hook(hooks, "tracking_tags", expect=list, items=str, cfg=None) == []
    FAULTY.mode = "tracking_tags returns a number"
    with pytest.raises(PluginError, match="tracking_tags"):
        call_hook(hooks, "tracking_tags", expect=list, items=str, cfg=None)
