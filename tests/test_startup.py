"""Start-up stays light: importing plugformer, `plugformer plugins`, `--help` and a config
error do not import Lightning, W&B, `datasets` or matplotlib (they take seconds to import;
benchmarks/startup.py times the commands). Each check runs in a fresh interpreter, since
this test process has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("lightning", "pytorch_lightning", "wandb", "datasets", "matplotlib", "pandas")


# Records, for each HEAVY package, the project file and line that first imported it.
SPY = f"""
import sys, traceback
HEAVY, FIRST = {HEAVY!r}, {{}}
class Spy:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in HEAVY and top not in FIRST:
            frames = [f for f in traceback.extract_stack() if "plugformer" in f.filename and "importlib" not in f.filename]
            FIRST[top] = f"{{frames[-1].filename}}:{{frames[-1].lineno}}" if frames else "?"
        return None
sys.meta_path.insert(0, Spy())
"""


def imported_after(code: str) -> dict[str, str]:
    """The HEAVY packages imported while running ``code`` in a fresh interpreter, each with
    the project file and line that imported it first."""
    script = SPY + textwrap.dedent(code) + textwrap.dedent(
        """
        import json
        print("MODULES=" + json.dumps({m: FIRST.get(m, "?") for m in HEAVY if m in sys.modules}))
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("MODULES=")][-1]
    return json.loads(line.removeprefix("MODULES="))


def test_importing_plugformer_imports_neither_torch_nor_lightning() -> None:
    modules = imported_after(
        """
        import sys
        import plugformer
        from plugformer import ConfigError, bounds
        assert callable(bounds) and "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
        """
    )
    assert modules == {}, f"imported (package: first importer): {modules}"


def test_plugins_listing_and_help_stay_light() -> None:
    modules = imported_after(
        """
        import contextlib, io, json, sys
        from plugformer.cli import main
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["plugins", "--json"]) == 0
            try:
                main(["--help"])
            except SystemExit:
                pass
        listed = json.loads(out.getvalue().split("\\nusage:")[0])
        assert {"attention", "position", "norm", "ffn", "block", "objective", "data"} <= {c["kind"] for c in listed}
        assert all("capabilities" in c for c in listed)
        assert "hydra" not in sys.modules  # a listing stores no config groups
        """
    )
    assert modules == {}, f"imported (package: first importer): {modules}"


def test_a_config_error_is_reported_without_importing_lightning() -> None:
    modules = imported_after(
        """
        import contextlib, io
        from plugformer.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = main(["train", "experiment=no_such_experiment"])
        assert status == 2 and "no_such_experiment" in err.getvalue(), err.getvalue()
        """
    )
    assert modules == {}, f"imported (package: first importer): {modules}"


def test_every_component_is_still_listed_with_its_capabilities() -> None:
    from plugformer.plugins import load_plugins

    registry = load_plugins().registry
    for kind in ("attention", "position", "norm", "ffn", "block", "objective", "data"):
        assert registry.names(kind), kind
    assert registry.get("attention", "full").capabilities_for().cost == "quadratic"


def test_a_data_task_is_a_lightning_data_module_once_created(tmp_path) -> None:
    import lightning.pytorch as pl

    from plugformer import DataContext
    from plugformer.plugins import load_plugins

    component = load_plugins().registry.get("data", "mqar")
    task = component.factory(component.config(), DataContext(cache_dir=tmp_path))
    assert isinstance(task, pl.LightningDataModule)
    assert task.trainer is None  # LightningDataModule.__init__ ran
