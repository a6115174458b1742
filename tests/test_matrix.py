"""Every built-in attention × position pair either trains a step or is refused before
training with a message naming both components and the missing capability."""

from __future__ import annotations

from pathlib import Path

import pytest

from compose import compose_train
from helpers import FAST
from plugformer import CapabilityError
from plugformer.plugins import load_plugins
from plugformer.training.run import train

PLUGINS = load_plugins()
REGISTRY = PLUGINS.registry
PAIRS = [(a, p) for a in REGISTRY.names("attention") for p in REGISTRY.names("position")]

#: An attention without a causal mode (linformer) cannot serve the default causal LM task;
#: it runs in an encoder on a small ListOps classification instead.
ENCODER_TASK = [
    "data=listops", "objective=classification", "data.min_length=10", "data.max_length=30", "data.max_depth=2",
    "data.train_examples=64", "data.val_examples=16", "data.test_examples=0", "data.batch_size=16",
]


def task_for(attention: str) -> list[str]:
    causal = "causal" in REGISTRY.get("attention", attention).capabilities_for().provides
    return [] if causal else ENCODER_TASK


def compatible(attention: str, position: str) -> bool:
    """The attention provides what the position needs, or orders tokens itself
    (``ignores_positions``: the position's terms skip its layers)."""
    needs = REGISTRY.get("position", position).capabilities_for().requires.get("attention", frozenset())
    provides = REGISTRY.get("attention", attention).capabilities_for().provides
    return needs <= provides or "ignores_positions" in provides


@pytest.mark.parametrize(("attention", "position"), PAIRS, ids=[f"{a}-{p}" for a, p in PAIRS])
def test_pair_trains_or_is_refused(attention: str, position: str, tmp_path: Path) -> None:
    cfg = compose_train(
        f"model/attention={attention}", f"model/position={position}", "logger=none",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        f"run_dir={tmp_path}", *FAST, *task_for(attention),
    )
    if compatible(attention, position):
        summary = train(cfg, PLUGINS, tmp_path, run_id="matrix00")
        assert summary["status"] == "finished" and summary["global_step"] == 2
        return
    with pytest.raises(CapabilityError) as error:
        train(cfg, PLUGINS, tmp_path, run_id="matrix00")
    message = str(error.value)
    assert f"'{attention}'" in message and f"'{position}'" in message
    assert "Fix: choose" in message
    assert not (tmp_path / "checkpoints").exists(), "refused only after training started"


def test_the_matrix_has_refusals_and_successes() -> None:
    results = {compatible(a, p) for a, p in PAIRS}
    assert results == {True, False} or len(REGISTRY.names("attention")) == 1
