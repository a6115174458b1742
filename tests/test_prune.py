"""The prune technique: gradual magnitude pruning reaches its sparsity (global and per layer)
and keeps its masks through resume; heads and feed-forward neurons are removed for real."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import plugformer
from plugformer.plugins import Plugins
from plugformer.training.run import train
from plugformer_plugins.technique import structured
from plugformer_plugins.technique.prune import PRUNED_MODEL_FILE, STRUCTURE_FILE
from plugformer_plugins.technique.sparsity import zhu_gupta_sparsity

from compose import compose_train
from conftest import small_context
from helpers import FAST

TINY = [*FAST, "logger=none", "data.train_examples=320", "data.val_examples=64", "model.n_heads=4", "model.n_layers=2"]


def masks(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value for name, value in state.items() if name.endswith("weight_mask")}


def zeros(tensors) -> float:
    tensors = list(tensors)
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


def test_zhu_gupta_schedule_ramps_cubically_from_initial_to_final() -> None:
    values = [zhu_gupta_sparsity(t, initial=0.1, final=0.9, start=10, end=20) for t in range(0, 25)]
    assert values[:10] == [0.0] * 10 and values[10] == pytest.approx(0.1) and values[20:] == [0.9] * 5
    assert all(a <= b for a, b in zip(values[10:], values[11:]))
    assert values[15] == pytest.approx(0.9 - 0.8 * 0.5**3)


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_gradual_magnitude_pruning_reaches_its_sparsity(scope: str, tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train(
        *TINY, "trainer.max_steps=8", "trainer.val_check_interval=4", "callbacks.checkpoint.last_every_n_steps=4",
        "+technique=prune", "techniques.prune.sparsity=0.6",
        "techniques.prune.end_step=6", "techniques.prune.frequency=2", f"techniques.prune.scope={scope}", f"run_dir={tmp_path}",
    )
    summary = train(cfg, plugins, tmp_path, run_id=f"prune{scope}")
    assert summary["status"] == "finished", summary.get("error")
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    found = masks(state)
    assert len(found) == 2 * 5  # per layer: query, key_value, out, and the MLP's up and down
    assert zeros(found.values()) == pytest.approx(0.6, abs=1e-3)
    if scope == "layer":
        assert all(zeros([m]) == pytest.approx(0.6, abs=2e-3) for m in found.values())
    else:  # one threshold: layers end up unevenly sparse
        assert len({round(zeros([m]), 3) for m in found.values()}) > 1
    # The masked weights are zero in the effective weights the model uses.
    for name, mask in found.items():
        original = state[name.replace("weight_mask", "weight_orig")]
        assert torch.equal((original * mask == 0), (mask == 0) | (original == 0))
    assert summary["extra"]["prune/sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert summary["metrics"]["prune/sparsity"] == pytest.approx(0.6, abs=1e-3)  # logged at validation
    assert any(name.startswith("prune/sparsity/stacks.decoder.blocks.1.") for name in summary["metrics"])
    assert summary["extra"]["prune/nonzero_params"] < summary["extra"]["prune/params"]
    # The final model is saved with the masks applied: plain weights holding the zeros.
    final = torch.load(tmp_path / PRUNED_MODEL_FILE, weights_only=False)["state_dict"]
    assert not any("weight_orig" in n or "weight_mask" in n for n in final)
    pruned = [final[n.removeprefix("model.").replace("_mask", "")] for n in found]
    assert zeros(pruned) == pytest.approx(0.6, abs=1e-3)


def test_masks_survive_resume(tmp_path: Path, plugins: Plugins) -> None:
    common = [*TINY, "+technique=prune", "techniques.prune.sparsity=0.5", "techniques.prune.end_step=2", "techniques.prune.frequency=1"]
    cfg = compose_train(*common, "trainer.max_steps=4", "trainer.val_check_interval=4", f"run_dir={tmp_path}")
    assert train(cfg, plugins, tmp_path, run_id="pruneresume")["status"] == "finished"
    before = masks(torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"])
    assert zeros(before.values()) == pytest.approx(0.5, abs=1e-3)
    # Resumed with a schedule that never prunes again: only the checkpoint can hold the masks.
    resumed = compose_train(*common, "techniques.prune.start_step=1000", "trainer.max_steps=8", "trainer.val_check_interval=4", f"run_dir={tmp_path}")
    summary = train(resumed, plugins, tmp_path, run_id="pruneresume", ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert summary["status"] == "finished" and summary["global_step"] == 8
    after = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(before[name], mask) for name, mask in masks(after).items())
    assert summary["extra"]["prune/sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_removing_a_head_equals_gating_it_off(registry) -> None:
    torch.manual_seed(0)
    ctx = small_context(causal=True)
    attention = registry.get("attention", "full").factory(registry.get("attention", "full").config(), ctx).eval()
    x = torch.randn(2, 7, 32)
    gate = torch.tensor([1.0, 0.0, 1.0, 0.0])
    handle = attention.out.register_forward_pre_hook(structured._gate_hook(gate, attention.head_dim))
    gated = attention(x)
    handle.remove()
    structured.keep_heads(attention, torch.tensor([2, 0]))
    assert attention.n_heads == 2 and attention.query.weight.shape == (16, 32) and attention.out.weight.shape == (32, 16)
    assert attention.key_value.weight.shape == (32, 32)
    assert torch.allclose(attention(x), gated, atol=1e-5)


def test_removing_neurons_equals_gating_them_off(registry) -> None:
    torch.manual_seed(0)
    for name in ("mlp", "glu"):
        component = registry.get("ffn", name)
        ffn = component.factory(component.config(), small_context()).eval()
        width = structured.ffn_width(ffn)
        gate = torch.ones(width)
        gate[::3] = 0
        x = torch.randn(2, 5, 32)
        handle = ffn.down.register_forward_pre_hook(structured._gate_hook(gate, 1))
        gated = ffn(x)
        handle.remove()
        structured.keep_neurons(ffn, torch.nonzero(gate).flatten())
        assert structured.ffn_width(ffn) == int(gate.sum())
        assert torch.allclose(ffn(x), gated, atol=1e-5), name


def test_least_important_units_go_first_and_every_layer_keeps_one() -> None:
    scores = {"a": torch.tensor([0.1, 0.9, 0.2]), "b": torch.tensor([0.05, 0.06])}
    kept = structured.least_important(scores, 3)
    # b0 goes, b1 stays (the last of its layer), then a0 and a2 go.
    assert kept["a"].tolist() == [1] and kept["b"].tolist() == [1]


def test_heads_and_neurons_are_removed_for_real(tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train(
        *TINY, "trainer.max_steps=6", "trainer.val_check_interval=2", "+technique=prune", "techniques.prune.heads=0.5",
        "techniques.prune.ffn_neurons=0.25", "techniques.prune.structured_step=3", "techniques.prune.importance_batches=2",
        f"run_dir={tmp_path}",
    )
    summary = train(cfg, plugins, tmp_path, run_id="pruneheads")
    assert summary["status"] == "finished", summary.get("error")
    assert summary["extra"]["prune/heads"] == 4 and summary["extra"]["prune/ffn_neurons"] == 2 * 128 - 64
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "best-before-structured-pruning.ckpt").is_file()
    for name in ("best.ckpt", "last.ckpt"):
        checkpoint = torch.load(checkpoints / name, weights_only=False)
        state = checkpoint["state_dict"]
        heads = sum(state[f"model.stacks.decoder.blocks.{i}.attention.query.weight"].shape[0] for i in range(2)) // 8
        assert heads == 4, name
        assert sum(state[f"model.stacks.decoder.blocks.{i}.ffn.up.weight"].shape[0] for i in range(2)) == 192
        for i in range(2):
            q = state[f"model.stacks.decoder.blocks.{i}.attention.query.weight"]
            assert state[f"model.stacks.decoder.blocks.{i}.attention.out.weight"].shape == (32, q.shape[0])
            assert state[f"model.stacks.decoder.blocks.{i}.attention.key_value.weight"].shape == (2 * q.shape[0], 32)
    # The optimizer went on with the same parameters, its moments sliced to the new shapes.
    optimizer_state = torch.load(checkpoints / "last.ckpt", weights_only=False)["optimizer_states"][0]["state"]
    shapes = {tuple(v.shape) for v in state.values()}
    assert all(tuple(s["exp_avg"].shape) in shapes for s in optimizer_state.values())
    recorded = json.loads((tmp_path / STRUCTURE_FILE).read_text())
    assert sum(recorded["heads"].values()) == 4
    # The run loads at its pruned sizes (load_run, eval) and still computes.
    loaded = plugformer.load_run(tmp_path)
    attentions = [block.attention for block in loaded.model.stacks["decoder"].blocks]
    assert sum(a.n_heads for a in attentions) == 4
    batch = next(iter(loaded.data.val_dataloader()))
    assert torch.isfinite(loaded.model(batch).loss)


@pytest.mark.parametrize("option", ["end_step=8", "structured_step=8"])
def test_a_schedule_that_ends_at_or_after_the_last_step_is_refused(option: str, plugins: Plugins) -> None:
    from plugformer import ConfigError

    extra = "techniques.prune.sparsity=0.5" if option.startswith("end") else "techniques.prune.heads=0.5"
    cfg = compose_train(*TINY, "trainer.max_steps=8", "+technique=prune", extra, f"techniques.prune.{option}")
    with pytest.raises(ConfigError, match=option.split("=")[0]):
        plugformer.build(cfg, plugins=plugins)
