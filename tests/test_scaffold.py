"""``plugformer new plugin``: every kind generates a package whose component passes the
conformance kit as generated; the attention package, installed into a fresh venv, is listed,
passes its own tests (and ``pytest --plugformer-conformance``) and trains."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import FAST, read_summary, run_cli
from plugin_venv import create_venv, install, venv_env

from plugformer.cli import main
from plugformer.scaffold import SCAFFOLD_KINDS, ScaffoldError, create_plugin
from plugformer.testing import check_component, check_data_task, check_objective_training


def import_generated(folder: Path, package: str):
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module(package)
    finally:
        sys.path.remove(str(folder))


@pytest.mark.parametrize("kind", SCAFFOLD_KINDS)
def test_every_kind_generates_a_conforming_component(kind: str, tmp_path: Path) -> None:
    name = f"scaffolded_{kind}"
    folder = create_plugin(name, kind, tmp_path, check_installed=False)
    assert folder == tmp_path / f"plugformer-scaffolded-{kind}"
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == ["README.md", f"plugformer_{name}/__init__.py", "pyproject.toml", f"tests/test_{name}.py"]
    pyproject = (folder / "pyproject.toml").read_text()
    assert f'{name} = "plugformer_{name}"' in pyproject and "[project.entry-points.plugformer]" in pyproject
    assert "{{" not in "".join(p.read_text() for p in folder.rglob("*") if p.is_file())
    compile((folder / "tests" / f"test_{name}.py").read_text(), "test", "exec")

    module = import_generated(folder, f"plugformer_{name}")
    component = module.COMPONENT
    assert (component.kind, component.name) == (kind, name)
    check_component(component)
    if kind == "data":
        check_data_task(component)
    if kind == "objective":
        check_objective_training(component, data="mqar")


def test_the_cli_kinds_are_the_scaffold_kinds() -> None:
    from plugformer import cli

    source = Path(cli.__file__).read_text()
    listed = ", ".join(f'"{kind}"' for kind in SCAFFOLD_KINDS)
    assert f"kinds = ({listed})" in source


@pytest.mark.parametrize("bad", ["Talking-Heads", "2heads", "class", "talking heads", ""])
def test_a_bad_name_is_refused_with_the_fix(bad: str, tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError) as error:
        create_plugin(bad, "attention", tmp_path)
    message = str(error.value)
    assert "cannot name a plugin" in message and "Expected:" in message and "Fix: plugformer new plugin" in message
    assert not any(tmp_path.iterdir())


def test_a_name_an_installed_plugin_registers_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError) as error:
        create_plugin("full", "attention", tmp_path)
    assert "already registered by plugformer" in str(error.value) and "Fix: plugformer new plugin my_full" in str(error.value)
    assert not any(tmp_path.iterdir())
    assert create_plugin("full", "norm", tmp_path).is_dir()  # names are per kind


def test_an_existing_folder_is_never_overwritten(tmp_path: Path) -> None:
    folder = create_plugin("mine", "norm", tmp_path)
    (folder / "README.md").write_text("my notes")
    result = run_cli("new", "plugin", "mine", "--kind", "norm", "--dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2
    assert "already exists" in result.stderr and "Fix:" in result.stderr and "Traceback" not in result.stderr
    assert (folder / "README.md").read_text() == "my notes"


# The CLI's main in this process: a subprocess paid ~30 s of imports under load for nothing
# this checks (the console entry refuses above, and the venv's own `plugformer new` makes the
# project of the end-to-end tests below).
def test_the_command_prints_the_next_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    status = main(["new", "plugin", "talking_heads", "--kind", "attention"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert (tmp_path / "plugformer-talking-heads" / "plugformer_talking_heads" / "__init__.py").is_file()
    assert "pip install -e ." in out and "model/attention=talking_heads" in out


# --- end to end: as a plugin author, in a fresh virtual environment ----------------------------

NAME = "scaffold_probe"


@pytest.fixture(scope="module")
def author(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(venv python, generated project): the project made by the venv's own ``plugformer new
    plugin`` (templates read from the installed wheel) and installed non-editable."""
    root = tmp_path_factory.mktemp("scaffold_env")
    python = create_venv(root)
    work = root / "work"
    work.mkdir()
    made = subprocess.run(
        [str(python.parent / "plugformer"), "new", "plugin", NAME, "--kind", "attention"],
        capture_output=True, text=True, cwd=work, env=venv_env(python), timeout=300,
    )
    assert made.returncode == 0, made.stderr
    project = work / "plugformer-scaffold-probe"
    install(python, project, root)
    return python, project


@pytest.mark.slow
def test_the_generated_plugin_is_listed_under_its_distribution(author: tuple[Path, Path], tmp_path: Path) -> None:
    python, _ = author
    result = run_cli("plugins", "--json", python=str(python), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    records = {(r["kind"], r["name"]): r for r in json.loads(result.stdout)}
    assert records[("attention", NAME)]["distribution"] == "plugformer-scaffold-probe"
    assert records[("attention", NAME)]["version"] == "0.1.0"


@pytest.mark.slow
def test_the_generated_plugin_passes_its_own_tests_and_the_pytest_plugin(author: tuple[Path, Path]) -> None:
    python, project = author
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--plugformer-conformance"],
        capture_output=True, text=True, cwd=project, env=venv_env(python), timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    # Two tests of its own, and one conformance item the pytest plugin adds for its component.
    assert "3 passed" in result.stdout, result.stdout[-2000:]
    assert "plugformer_conformance[attention:scaffold_probe]" in subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--plugformer-conformance", "--collect-only"],
        capture_output=True, text=True, cwd=project, env=venv_env(python), timeout=600,
    ).stdout


@pytest.mark.slow
def test_the_fixture_lists_a_named_distributions_components(author: tuple[Path, Path], tmp_path: Path) -> None:
    """From another folder, --plugformer-conformance=<distribution> picks the distribution;
    the plugformer_components fixture lists its components."""
    python, _ = author
    (tmp_path / "test_fixture.py").write_text(
        "def test_components(plugformer_components):\n"
        f"    assert [c.qualified_name for c in plugformer_components] == ['attention:{NAME}']\n"
    )
    result = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", "--rootdir", str(tmp_path),
         "--plugformer-conformance=plugformer_scaffold_probe", "-k", "components", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path, env=venv_env(python), timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout and "deselected" in result.stdout, result.stdout[-2000:]


@pytest.mark.slow
def test_the_generated_plugin_trains(author: tuple[Path, Path], tmp_path: Path) -> None:
    python, _ = author
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", f"model/attention={NAME}", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "logger=none", f"run_dir={run_dir}", *FAST, python=str(python), cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["global_step"] == 2
    assert summary["components"]["attention"] == NAME
