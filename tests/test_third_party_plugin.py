"""A real third-party plugin: a package with an entry point in the `plugformer` group,
pip-installed into a fresh virtual environment, is listed and trains."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import FAST, REPO, read_summary, run_cli
from plugin_venv import install, linked_venv

FIXTURES = Path(__file__).parent / "fixtures"
OTHERS_OFF = {"PLUGFORMER_DISABLE_PLUGINS": "broken,clash"}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv (with --system-site-packages, plus this interpreter's site-packages so torch is
    reused) holding a non-editable install of plugformer and the three fixture plugins."""
    root = tmp_path_factory.mktemp("plugin_env")
    python = linked_venv(root)
    for project in (REPO, *(FIXTURES / name for name in ("toy_plugin", "broken_plugin", "clashing_plugin"))):
        install(python, project, root)
    return python


def test_plugformer_is_the_installed_wheel_not_the_checkout(plugin_env: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [str(plugin_env), "-c", "import plugformer, plugformer.conf as c; print(plugformer.__file__); print(c.__file__)"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.split()
    assert all(str(plugin_env.parents[1]) in path for path in where), where


def test_plugins_lists_the_third_party_attention_under_its_distribution(plugin_env: Path, tmp_path: Path) -> None:
    result = run_cli("plugins", "--json", python=str(plugin_env), env=OTHERS_OFF, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    toy = records[("attention", "toy_cosine")]
    assert toy["distribution"] == "plugformer-toy-attention"
    assert toy["version"] == "0.3.1"
    assert records[("attention", "full")]["distribution"] == "plugformer"
    table = run_cli("plugins", python=str(plugin_env), env=OTHERS_OFF, cwd=tmp_path)
    assert "toy_cosine" in table.stdout and "plugformer-toy-attention 0.3.1" in table.stdout


def test_training_with_the_third_party_attention(plugin_env: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "model/attention=toy_cosine", "trainer.max_steps=8", "trainer.val_check_interval=4",
        "logger=none", f"run_dir={run_dir}", *FAST,
        python=str(plugin_env), env=OTHERS_OFF, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "finished"
    assert summary["components"]["attention"] == "toy_cosine"
    assert summary["global_step"] == 8


def test_a_plugin_that_fails_to_import_stops_the_run_with_its_distribution(plugin_env: Path, tmp_path: Path) -> None:
    result = run_cli("plugins", python=str(plugin_env), env={"PLUGFORMER_DISABLE_PLUGINS": "clash"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "plugformer-broken-plugin" in result.stderr
    assert "a_module_that_does_not_exist" in result.stderr
    assert "PLUGFORMER_DISABLE_PLUGINS=broken" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_plugin_registering_a_taken_name_stops_the_run(plugin_env: Path, tmp_path: Path) -> None:
    result = run_cli("train", "logger=none", python=str(plugin_env), env={"PLUGFORMER_DISABLE_PLUGINS": "broken"}, cwd=tmp_path)
    assert result.returncode == 2
    assert "plugformer-clashing-plugin" in result.stderr
    assert "norm:layernorm" in result.stderr
    assert "PLUGFORMER_DISABLE_PLUGINS=clash" in result.stderr
    assert "Traceback" not in result.stderr


def test_allow_list_loads_only_the_named_plugins(plugin_env: Path, tmp_path: Path) -> None:
    result = run_cli("plugins", "--json", python=str(plugin_env), env={"PLUGFORMER_PLUGINS": "toy_attention"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert {r["name"] for r in json.loads(result.stdout)} == {"toy_cosine"}


def test_the_example_plugin_passes_its_own_conformance_tests(plugin_env: Path, tmp_path: Path) -> None:
    """What docs/plugins.md points plugin authors to: the toy plugin's tests/ run the kit on
    its COMPONENT, against the installed plugin, as in the plugin's own repository."""
    project = tmp_path / "toy_plugin"
    shutil.copytree(FIXTURES / "toy_plugin" / "tests", project / "tests")
    result = subprocess.run(
        [str(plugin_env), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n0", "--rootdir", str(project), str(project / "tests")],
        capture_output=True, text=True, cwd=project, env={**os.environ, "PLUGFORMER_DISABLE_PLUGINS": "broken,clash"}, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "4 passed" in result.stdout
