"""Shared fixtures: the session's plugins and a small build context."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# The suite runs in parallel workers (pytest-xdist, see pyproject.toml); the runs they start
# in subprocesses take one thread each too, so workers never fight over the cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from plugformer import BuildContext  # noqa: E402
from plugformer.plugins import Plugins, load_plugins  # noqa: E402


# The example plugins under fixtures/ are packages with tests of their own, run in an
# environment where they are installed (tests/test_third_party_plugin.py), not collected here.
collect_ignore_glob = ["fixtures/*"]

# Tiny tensors run many times faster on one thread than on two busy cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def no_shared_wandb_service():
    """A W&B run in a test's own process starts a W&B service and names it in WANDB_SERVICE;
    the runs that later tests start in subprocesses would inherit it and share that service,
    so a run killed there (a resume test) would leave its id "in use" for the resume. Every
    test starts without it."""
    os.environ.pop("WANDB_SERVICE", None)
    yield
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture(scope="session")
def plugins() -> Plugins:
    return load_plugins()


@pytest.fixture(scope="session")
def registry(plugins: Plugins):
    return plugins.registry


def small_context(**overrides) -> BuildContext:
    """A BuildContext for unit tests of single components."""
    values = dict(d_model=32, n_heads=4, n_layers=2, dropout=0.0, causal=True, max_length=64, vocab_size=50)
    values.update(overrides)
    return BuildContext(**values)
