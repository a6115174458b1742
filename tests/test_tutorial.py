"""docs/tutorial.md cannot rot: every bash block marked ``<!-- tutorial:run -->`` runs, in
order and in one shell, in an empty folder of a fresh virtual environment (plugformer
installed from its wheel), with ``QUICK`` set to tiny runs."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from helpers import FAST, REPO
from plugin_venv import create_venv, venv_env

TUTORIAL = REPO / "docs" / "tutorial.md"
MARK = "<!-- tutorial:run -->"
BLOCK = re.compile(re.escape(MARK) + r"\s*\n```bash\n(.*?)\n```", re.S)

#: Tiny runs: a few steps of a one-layer model on a small MQAR task, no W&B.
QUICK = " ".join([*FAST, "data.train_examples=256", "trainer.max_steps=4", "trainer.val_check_interval=4", "logger=none"])


def tutorial_blocks(text: str) -> list[str]:
    """The marked bash blocks, in order."""
    return BLOCK.findall(text)


def test_every_marked_block_is_found() -> None:
    text = TUTORIAL.read_text()
    blocks = tutorial_blocks(text)
    assert len(blocks) == text.count(MARK) >= 6
    assert any("plugformer new plugin" in b for b in blocks) and any("plugformer compare" in b for b in blocks)


@pytest.mark.slow
def test_the_tutorial_runs_from_an_empty_folder(tmp_path: Path) -> None:
    python = create_venv(tmp_path)
    work = tmp_path / "empty"
    work.mkdir()
    script = "set -euo pipefail\n" + "\n".join(tutorial_blocks(TUTORIAL.read_text())) + "\n"
    # Offline: pip builds the plugin with the setuptools already installed and finds plugformer
    # installed; nothing is downloaded.
    env = venv_env(python, QUICK=QUICK, PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=work, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + "\n--- stderr ---\n" + result.stderr[-4000:]
    assert "2 passed" in result.stdout  # the plugin's own tests: the kit, and the registration
    for name in ("cosine", "full", "local"):
        assert re.search(rf"\b{name}\b", (work / "comparison" / "comparison.md").read_text()), name
    assert len(list((work / "runs" / "study").glob("*/summary.json"))) == 3
