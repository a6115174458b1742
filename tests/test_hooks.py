"""Plugin loading and the hooks: selection by environment, every hook documented, and hooks
that really take part in a run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from plugformer import hookimpl, hookspecs
from plugformer.plugins import load_plugins

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"


def hook_names() -> list[str]:
    return sorted(name for name in dir(hookspecs) if hasattr(getattr(hookspecs, name), "plugformer_spec"))


def test_the_design_hooks_exist() -> None:
    assert set(hook_names()) == {
        "register_components", "validate_config", "model_built", "extra_losses",
        "lightning_callbacks", "run_summary", "tracking_tags", "evaluation_metrics", "cli_commands",
    }


@pytest.mark.parametrize("name", hook_names())
def test_every_hook_is_documented(name: str) -> None:
    text = DOCS.read_text()
    section = re.search(rf"### `{name}\((.*?)\)`\n(.*?)(?=\n### |\Z)", text, re.S)
    assert section, f"docs/plugins.md has no section for hook {name}"
    arguments, body = section.groups()
    spec_args = getattr(hookspecs, name).__code__.co_varnames[: getattr(hookspecs, name).__code__.co_argcount]
    assert [a.strip() for a in arguments.split(",") if a.strip()] == list(spec_args)
    for part in ("**Arguments:**", "**Returns:**", "**Called:**"):
        assert part in body, f"{name}: {part} missing"
    assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"


def test_disable_list_removes_a_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGFORMER_DISABLE_PLUGINS", "plugformer.norm")
    plugins = load_plugins()
    assert plugins.registry.names("norm") == []
    assert plugins.registry.names("attention")


def test_allow_list_by_distribution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PLUGFORMER_PLUGINS", "plugformer")
    assert "full" in load_plugins().registry.names("attention")
    monkeypatch.setenv("PLUGFORMER_PLUGINS", "nothing-installed")
    assert len(load_plugins().registry) == 0


class RecordingTechnique:
    """A run-level plugin recording which hooks fired."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def extra_losses(self, model, batch, outputs, stage):
        self.calls.append(f"extra_losses:{stage}")
        return {"probe": outputs.loss * 0 + 0.5}


def test_run_plugins_only_join_their_run(plugins) -> None:
    technique = RecordingTechnique()
    run = plugins.run_manager({"recorder": technique})
    other = plugins.run_manager()
    assert technique in run.get_plugins() and technique not in other.get_plugins()
    results = run.hook.extra_losses(model=None, batch={}, outputs=type("O", (), {"loss": torch.tensor(1.0)})(), stage="train")
    assert any(r and "probe" in r for r in results)
