"""Which distribution and version provided each component is recorded in summary.json,
config.yaml and the W&B config; reading a run back without one names the missing
distribution."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from helpers import FAST, read_summary, run_cli
from plugformer import Component, Provider, Registry, UnknownComponentError
from plugformer.provenance import check_providers_installed, component_providers

@dataclass
class EmptyConfig:
    pass


PLUGFORMER = {"distribution": "plugformer", "plugin": "plugformer.attention"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with a layer plan (full and local attention) and W&B offline."""
    directory = tmp_path_factory.mktemp("provenance") / "run"
    result = run_cli(
        "train", *FAST, "model.n_layers=2", "model/attention=full", "model.plan.attention=[local,full]",
        "trainer.max_steps=4", "trainer.val_check_interval=4", f"run_dir={directory}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


def test_summary_names_the_provider_of_every_component_the_run_uses(run_dir: Path) -> None:
    providers = read_summary(run_dir)["providers"]
    assert set(providers["attention"]) == {"full", "local"}  # the plan's local attention too
    assert providers["attention"]["full"].items() >= PLUGFORMER.items()
    assert providers["attention"]["full"]["version"]  # the installed plugformer's version
    for kind in ("position", "norm", "ffn", "block", "objective", "data"):
        assert len(providers[kind]) == 1 and next(iter(providers[kind].values()))["distribution"] == "plugformer", kind


def test_config_yaml_and_the_wandb_config_hold_the_same_record(run_dir: Path) -> None:
    summary = read_summary(run_dir)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["providers"] == summary["providers"]
    wandb = Path(sys.executable).with_name("wandb")
    inspected = subprocess.run(
        [str(wandb), "leet", "inspect", "--summary", "--json", summary["wandb_dir"]], capture_output=True, text=True, timeout=120
    )
    assert json.loads(inspected.stdout)["config"]["providers"] == summary["providers"]


def test_a_resume_without_the_providing_distribution_names_it(run_dir: Path, tmp_path: Path) -> None:
    """As if the run had used a plugin's attention that has since been uninstalled."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["model"]["attention"] = {"name": "talking_heads", "mix_heads": True}
    cfg["providers"]["attention"]["talking_heads"] = {"distribution": "plugformer-talking-heads", "version": "0.2.0", "plugin": "talking_heads"}
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
    result = run_cli("train", f"resume={copy}", "trainer.max_steps=6")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "attention 'talking_heads' from plugformer-talking-heads 0.2.0" in result.stderr
    assert "pip install 'plugformer-talking-heads==0.2.0'" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_check_passes_for_installed_components_and_old_configs() -> None:
    registry = Registry(ConfigStore())
    with registry.providing(Provider("mine", "my-dist", "1.0")):
        registry.add(Component(kind="ffn", name="mine", factory=lambda c, x: None, config=EmptyConfig, summary="s"))
    record = component_providers(registry.components())
    assert record == {"ffn": {"mine": {"distribution": "my-dist", "version": "1.0", "plugin": "mine"}}}
    check_providers_installed(OmegaConf.create({"providers": record}), registry)
    check_providers_installed(OmegaConf.create({"model": {}}), registry)  # a run from before the record
    with pytest.raises(UnknownComponentError, match="PLUGFORMER_PLUGINS"):
        check_providers_installed(OmegaConf.create({"providers": {"norm": {"gone": {"distribution": "d", "version": "2"}}}}), registry)
