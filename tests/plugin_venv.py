"""A fresh virtual environment holding a non-editable install of plugformer and of plugin
projects, for tests that work as a plugin author does (tests/test_scaffold.py,
tests/test_tutorial.py). torch and the other dependencies come from this interpreter's
site-packages (nothing is downloaded); plugformer itself is the wheel built from the checkout."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from helpers import REPO


def linked_venv(root: Path) -> Path:
    """An empty venv in ``root/venv`` that sees this interpreter's site-packages (torch and
    the other dependencies, never downloaded); returns its python."""
    env_dir = root / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=True).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    parents = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in dict.fromkeys(parents))
    (Path(purelib) / "_parent_site_packages.pth").write_text(lines)
    return python


def create_venv(root: Path) -> Path:
    """A venv in ``root/venv`` with plugformer's wheel installed; returns its python."""
    python = linked_venv(root)
    # The venv's own setuptools (ensurepip's, too old to build wheels without the wheel
    # package) would shadow this interpreter's, which a `pip install -e .` in the venv
    # (offline, without build isolation) then builds with.
    subprocess.run([str(python), "-m", "pip", "uninstall", "--quiet", "--yes", "setuptools"], check=True, capture_output=True)
    install(python, REPO, root)
    return python


def install(python: Path, project: Path, root: Path) -> None:
    """Build ``project``'s wheel with this interpreter's setuptools and install it into the
    venv of ``python``, as ``pip install <project>`` would (no index, no dependencies)."""
    wheels = root / "wheels" / project.name
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(project)],
        check=True, capture_output=True, cwd=root,
    )
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", *map(str, wheels.glob("*.whl"))],
        check=True, capture_output=True, cwd=root,
    )


def venv_env(python: Path, **extra: str) -> dict[str, str]:
    """The environment of a command run in the venv: its bin/ first on PATH (so ``plugformer``
    and ``pytest`` are the venv's), W&B offline and quiet, one thread per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "PYTEST_ADDOPTS", "PYTEST_XDIST_WORKER")}
    env.update(
        PATH=f"{python.parent}{os.pathsep}{env.get('PATH', '')}", VIRTUAL_ENV=str(python.parents[1]),
        WANDB_MODE="offline", WANDB_SILENT="true", OMP_NUM_THREADS="1", **extra,
    )
    return env
