"""Start-up stays light: importing plugformer, `plugformer plugins`, `--help` and a config
error do not import Lightning, W&B, `datasets` or matplotlib (they take seconds to import;
benchmarks/startup.py times the commands); `plugins` and a misspelled group choice do not
import torch either (the built-in components are lazy, tests/test_lazy_components.py), and
`plugformer train` prints its first line before Lightning. Each check runs in a fresh
interpreter, since this test process has imported everything already."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = ("lightning", "pytorch_lightning", "wandb", "datasets", "matplotlib", "pandas")
WITH_TORCH = (*HEAVY, "torch")
STALE = "; if a component module is named, its entry in plugformer_plugins/components.json is out of date: python -m plugformer_plugins.manifest"


# Records, for each HEAVY package, the project file and line that first imported it.
SPY = """
import sys, traceback
HEAVY, FIRST = {heavy!r}, {{}}
class Spy:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in HEAVY and top not in FIRST:
            frames = [f for f in traceback.extract_stack() if "plugformer" in f.filename and "importlib" not in f.filename]
            FIRST[top] = f"{{frames[-1].filename}}:{{frames[-1].lineno}}" if frames else "?"
        return None
sys.meta_path.insert(0, Spy())
"""


def imported_after(code: str, heavy: tuple[str, ...] = HEAVY) -> dict[str, str]:
    """The ``heavy`` packages imported while running ``code`` in a fresh interpreter, each
    with the project file and line that imported it first."""
    script = SPY.format(heavy=heavy) + textwrap.dedent(code) + textwrap.dedent(
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
        """,
        WITH_TORCH,
    )
    assert modules == {}, f"imported (package: first importer): {modules}{STALE}"


def test_a_config_error_is_reported_without_importing_lightning() -> None:
    modules = imported_after(
        """
        import contextlib, io
        from plugformer.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = main(["train", "experiment=no_such_experiment"])
        assert status == 2 and "no_such_experiment" in err.getvalue(), err.getvalue()
        """,
        WITH_TORCH,
    )
    assert modules == {}, f"imported (package: first importer): {modules}{STALE}"


def test_a_value_hydra_refuses_is_reported_without_importing_lightning() -> None:
    # Composing imports the chosen components' modules (their config dataclasses), torch with them.
    modules = imported_after(
        """
        import contextlib, io, os
        from plugformer.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            status = main(["train", "model.d_model=wide"])
        assert status == 2 and "model.d_model=wide" in err.getvalue(), err.getvalue()
        assert "HYDRA_FULL_ERROR" not in os.environ  # set only while Hydra composes
        """
    )
    assert modules == {}, f"imported (package: first importer): {modules}"


def test_train_prints_its_first_line_before_lightning(tmp_path) -> None:
    # Stops the process at its first line of output, reporting what was imported by then.
    modules = imported_after(
        f"""
        import json, os, sys
        class FirstLine:
            def __init__(self, real):
                self.real = real
            def write(self, text):
                if text.strip():
                    imported = {{m: FIRST.get(m, "?") for m in HEAVY if m in sys.modules}}
                    self.real.write(text + "\\nMODULES=" + json.dumps(imported) + "\\n")
                    self.real.flush()
                    os._exit(0)
                return self.real.write(text)
            def __getattr__(self, name):
                return getattr(self.real, name)
        sys.stdout = FirstLine(sys.stdout)
        from plugformer.cli import main
        main(["train", "debug=fast", "logger=csv", "run_dir={tmp_path / 'run'}"])
        """,
        WITH_TORCH,
    )
    assert set(modules) <= {"torch"}, f"imported before the first line (package: first importer): {modules}"


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
