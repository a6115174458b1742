"""The moe feed-forward component: routing, capacity, auxiliary losses, noisy gating,
gradients, configuration, layer plans, the expert metrics of a training run (and under DDP)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import plugformer
from conftest import small_context
from helpers import FAST, read_summary, run_cli
from plugformer import ConfigError, FeedForward
from plugformer_plugins.block.deepnorm import DeepNormBlock
from plugformer_plugins.ffn.moe import (
    MixtureOfExperts,
    MoEConfig,
    balance_loss,
    expert_capacity,
    within_capacity,
    z_loss,
)
from plugformer_plugins.ffn.moe_metrics import moe_layers

E = 4


class Marker(FeedForward):
    """An expert whose output is the unit vector of its own index: the MoE's output then
    shows, per token, the gate each expert received (0 where it was not used)."""

    def __init__(self, index: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("unit", torch.eye(d_model)[index])

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x) + self.unit


def marked_moe(registry, **options) -> MixtureOfExperts:
    """An MoE on d_model = E whose router is the identity (logits = x) and whose experts are
    :class:`Marker`s."""
    moe = registry.get("ffn", "moe").factory(MoEConfig(num_experts=E, **options), small_context(d_model=E, n_heads=1))
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(E))
    moe.experts = nn.ModuleList(Marker(i, E) for i in range(E))
    return moe


def routed(moe: MixtureOfExperts, logits: Tensor) -> Tensor:
    """The (T, E) gates the MoE gives tokens whose router logits are ``logits``."""
    return moe(logits[None])[0]


# --- routing ----------------------------------------------------------------------------------
def test_top1_sends_each_token_to_its_highest_scoring_expert_with_its_probability(registry) -> None:
    moe = marked_moe(registry, capacity_factor=None).eval()
    logits = torch.randn(16, E, generator=torch.Generator().manual_seed(0))
    gates = routed(moe, logits)
    probs = logits.softmax(-1)
    best = logits.argmax(-1)
    expected = torch.zeros(16, E).scatter(1, best[:, None], probs.gather(1, best[:, None]))
    torch.testing.assert_close(gates, expected)


def test_top2_picks_the_two_best_experts_and_renormalizes_their_gates(registry) -> None:
    moe = marked_moe(registry, top_k=2, capacity_factor=None).eval()
    logits = torch.randn(16, E, generator=torch.Generator().manual_seed(1))
    gates = routed(moe, logits)
    top = logits.topk(2, dim=-1).indices
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.equal(gates.topk(2, dim=-1).indices.sort(-1).values, top.sort(-1).values)
    torch.testing.assert_close(gates.sum(-1), torch.ones(16))
    probs = logits.softmax(-1).gather(1, top)
    torch.testing.assert_close(gates.gather(1, top), probs / probs.sum(-1, keepdim=True))
    unnormalized = marked_moe(registry, top_k=2, capacity_factor=None, normalize_gates=False).eval()
    torch.testing.assert_close(routed(unnormalized, logits).gather(1, top), probs)


# --- capacity ---------------------------------------------------------------------------------
def test_capacity_drops_the_overflow_tokens_which_get_zero_output(registry) -> None:
    """Every token prefers expert 0; capacity 1.0 · 8 / 4 = 2: tokens 0 and 1 are routed,
    the other six dropped (zero output), and the dropped fraction is 6/8."""
    moe = marked_moe(registry, capacity_factor=1.0).train()
    logits = torch.zeros(8, E)
    logits[:, 0] = 5.0
    logits[:, 1] = torch.linspace(0, 1, 8)  # different tokens, same preference
    moe.record_next_call()
    gates = routed(moe, logits)
    assert (gates[:2, 0] > 0.9).all() and (gates[:2, 1:] == 0).all()
    assert (gates[2:] == 0).all(), "tokens over capacity must output zero (they pass through the residual)"
    statistics = moe.take_statistics()
    metrics = statistics.metrics()
    assert metrics["dropped_fraction"] == pytest.approx(6 / 8)
    assert metrics["expert_load_0"] == pytest.approx(1.0), "load counts routing before capacity"
    assert moe.take_statistics() is None, "statistics are taken once"


def test_first_choices_take_precedence_over_second_choices() -> None:
    # Token 0 chooses expert 1 second; tokens 1 and 2 choose expert 1 first; capacity 2.
    expert_index = torch.tensor([[0, 1], [1, 2], [1, 3]])
    kept = within_capacity(expert_index, 4, capacity=2)
    assert kept.tolist() == [[True, False], [True, True], [True, True]]
    assert expert_capacity(tokens=10, num_experts=4, top_k=2, factor=1.25) == math.ceil(1.25 * 2 * 10 / 4)


def test_eval_drops_nothing_unless_an_eval_capacity_is_set_but_reports_what_training_would(registry) -> None:
    logits = torch.zeros(8, E)
    logits[:, 0] = 5.0
    moe = marked_moe(registry, capacity_factor=1.0).eval()
    moe.record_next_call()
    assert (routed(moe, logits)[:, 0] > 0.9).all(), "no token dropped in eval mode"
    assert moe.take_statistics().metrics()["dropped_fraction"] == pytest.approx(6 / 8)
    strict = marked_moe(registry, capacity_factor=1.0, eval_capacity_factor=2.0).eval()
    assert (routed(strict, logits)[4:] == 0).all(), "eval capacity 2.0 · 8 / 4 = 4 tokens"


# --- auxiliary losses -------------------------------------------------------------------------
def test_balance_loss_is_one_for_uniform_routing_and_grows_with_imbalance() -> None:
    uniform_index = torch.arange(8)[:, None] % E  # every expert gets 2 of 8 tokens
    assert balance_loss(torch.full((8, E), 1 / E), uniform_index, E).item() == pytest.approx(1.0)
    skewed_probs = torch.softmax(torch.randn(8, E, generator=torch.Generator().manual_seed(2)), -1)
    assert balance_loss(skewed_probs, uniform_index, E).item() == pytest.approx(1.0), "f uniform: E·Σ(1/E)·P_i = 1"
    values = []
    for p in (0.25, 0.5, 0.75, 1.0):
        probs = torch.tensor([p] + [(1 - p) / (E - 1)] * (E - 1)).expand(8, E)
        values.append(balance_loss(probs, torch.zeros(8, 1, dtype=torch.long), E).item())
    assert values == pytest.approx([E * p for p in (0.25, 0.5, 0.75, 1.0)]), "all to expert 0: E·P_0"
    assert values == sorted(values) and values[-1] == pytest.approx(E)
    # By hand: f = (3/4, 1/4, 0, 0), P = (0.5, 0.3, 0.1, 0.1) → 4 · (0.375 + 0.075) = 1.8
    probs = torch.tensor([0.5, 0.3, 0.1, 0.1]).expand(4, E)
    assert balance_loss(probs, torch.tensor([[0], [0], [0], [1]]), E).item() == pytest.approx(1.8)


def test_z_loss_of_known_logits() -> None:
    assert z_loss(torch.zeros(5, E)).item() == pytest.approx(math.log(E) ** 2)
    logits = torch.tensor([[0.0, math.log(3.0)], [2.0, 2.0]])  # logsumexp: log 4, 2 + log 2
    assert z_loss(logits).item() == pytest.approx((math.log(4) ** 2 + (2 + math.log(2)) ** 2) / 2)


def test_aux_losses_are_weighted_and_named(registry) -> None:
    moe = marked_moe(registry, balance_weight=0.5, z_loss_weight=0.25).train()
    logits = torch.randn(12, E, generator=torch.Generator().manual_seed(3))
    routed(moe, logits)
    losses = moe.aux_losses()
    assert set(losses) == {"moe_balance", "moe_z"}
    probs = logits.softmax(-1)
    assert losses["moe_balance"].item() == pytest.approx(0.5 * balance_loss(probs, probs.argmax(-1, keepdim=True), E).item())
    assert losses["moe_z"].item() == pytest.approx(0.25 * z_loss(logits).item())
    assert marked_moe(registry, balance_weight=0.0, z_loss_weight=0.0).train().aux_losses() == {}


# --- noisy gating and gradients ---------------------------------------------------------------
def test_noisy_gating_adds_noise_in_training_only(registry) -> None:
    torch.manual_seed(4)
    moe = marked_moe(registry, noisy_gating=True, capacity_factor=None)
    logits = torch.randn(64, E, generator=torch.Generator().manual_seed(5))
    moe.eval()
    clean = routed(moe, logits)
    assert torch.equal(routed(moe, logits), clean)
    torch.testing.assert_close(clean, routed(marked_moe(registry, capacity_factor=None).eval(), logits))
    moe.train()
    first, second = routed(moe, logits), routed(moe, logits)
    assert not torch.equal(first, second) and not torch.equal(first, clean)


@pytest.mark.parametrize("options", [{}, {"balance_weight": 0.0, "z_loss_weight": 0.0}, {"top_k": 2, "noisy_gating": True}])
def test_gradients_reach_the_router_and_every_expert(registry, options) -> None:
    torch.manual_seed(6)
    moe = registry.get("ffn", "moe").factory(MoEConfig(**options), small_context()).train()
    x = torch.randn(2, 16, 32)
    loss = (moe(x) * torch.randn(2, 16, 32)).sum() + sum(moe.aux_losses().values())
    loss.backward()
    for name, parameter in moe.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_an_expert_without_tokens_still_takes_part_in_backward(registry) -> None:
    """DDP (without find_unused_parameters) needs every parameter in the graph on every rank."""
    moe = registry.get("ffn", "moe").factory(MoEConfig(), small_context())
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0] = 1.0  # with positive inputs, every token prefers expert 0
    moe(torch.rand(1, 6, 32)).sum().backward()
    for name, parameter in moe.experts[1:].named_parameters():
        assert parameter.grad is not None and not parameter.grad.any(), name


def test_the_router_computes_in_float32_under_autocast(registry) -> None:
    moe = registry.get("ffn", "moe").factory(MoEConfig(), small_context())
    x = torch.randn(2, 5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, routing = moe._router_logits(x.reshape(-1, 32))
        out = moe(x)
    assert logits.dtype == routing.dtype == torch.float32 and out.shape == x.shape


# --- configuration, plans, init ---------------------------------------------------------------
SMALL = ["experiment=plain", "model.d_model=32", "data.train_examples=64", "data.val_examples=32", "data.batch_size=16", "logger=none"]


def test_experts_are_any_registered_ffn_with_their_own_options() -> None:
    built = plugformer.build(plugformer.compose([*SMALL, "model/ffn=moe", "model.ffn.expert=glu", "model.ffn.num_experts=3", "+model.ffn.expert_options.hidden=24"]))
    moe = built.model.decoder.blocks[0].ffn
    assert isinstance(moe, MixtureOfExperts) and len(moe.experts) == 3
    assert all(type(e).__name__ == "GLU" and e.hidden == 24 for e in moe.experts)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.ffn.top_k=5"], "top_k=5 of num_experts=4"),
        (["model.ffn.expert=nonesuch"], "expert='nonesuch' is not a registered ffn"),
        (["model.ffn.expert=moe"], "would be moe layers themselves"),
        (["+model.ffn.expert_options.expansion=0"], "model.ffn.expert_options.expansion=0"),
        (["+model.ffn.expert_options.nonesuch=1"], "do not fit ffn 'mlp'"),
    ],
)
def test_bad_moe_configs_are_refused_before_building(overrides, message) -> None:
    from plugformer.model.builder import check_components, choose_components
    from plugformer.plugins import load_plugins

    registry = load_plugins().registry
    cfg = plugformer.compose([*SMALL, "model/ffn=moe", *overrides])
    with pytest.raises(ConfigError, match=message):
        check_components(cfg, choose_components(cfg, registry), registry)


def test_a_plan_puts_moe_in_every_second_layer_with_plan_options() -> None:
    built = plugformer.build(plugformer.compose([*SMALL, "model.n_layers=4", "model.plan.ffn=[mlp,moe]", "+model.plan.options.ffn.moe.num_experts=2"]))
    assert [layer["ffn"] for layer in built.plan.describe()["decoder"]] == ["mlp", "moe"] * 2
    layers = moe_layers(built.model)
    assert [layer.layer_name for layer in layers] == ["decoder_1", "decoder_3"]
    assert all(len(layer.experts) == 2 for layer in layers)


def test_deepnorm_scales_the_experts_but_not_the_router() -> None:
    built = plugformer.build(plugformer.compose([*SMALL, "model/block=deepnorm", "model/ffn=moe", "model.n_layers=4", "model.d_model=64"]))
    block = built.model.decoder.blocks[0]
    assert isinstance(block, DeepNormBlock)
    expert = block.ffn.experts[0].up
    xavier = math.sqrt(2.0 / (expert.in_features + expert.out_features))
    assert expert.weight.std().item() == pytest.approx(block.beta * xavier, rel=0.15)
    assert block.ffn.router.weight.std().item() == pytest.approx(0.02, rel=0.3)


# --- training -----------------------------------------------------------------------------------
def val_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("val/loss")]


@pytest.mark.slow
def test_training_logs_the_expert_metrics_each_validation(tmp_path: Path) -> None:
    """Two MoE layers (a plan) train; every validation logs pooled and per-layer loads,
    the dropped fraction and the router entropy; the loads match the checkpoint's routing
    of the validation set recomputed afterwards."""
    run_dir = tmp_path / "run"
    summary = plugformer.train(
        [*FAST, "logger=csv", "model.n_layers=2", "model.plan.ffn=[moe]", "model/ffn=moe", "trainer.max_steps=30",
         "trainer.val_check_interval=15", "data.train_examples=512"],
        run_dir=run_dir,
    )
    assert summary["status"] == "finished"
    rows = val_rows(run_dir)
    assert len(rows) == 2
    for row in rows:
        loads = [float(row[f"val/moe/expert_load_{i}"]) for i in range(E)]
        assert sum(loads) == pytest.approx(1.0, abs=1e-6)
        assert 0.0 <= float(row["val/moe/dropped_fraction"]) <= 1.0
        assert 0.0 < float(row["val/moe/router_entropy"]) <= math.log(E) + 1e-6
        assert float(row["val/moe/decoder_1/expert_load_0"]) >= 0.0
        assert float(row["val/loss_moe_balance"]) > 0 and float(row["val/loss_moe_z"]) > 0
    train_rows = [row for row in csv.DictReader(open(run_dir / "metrics.csv")) if row.get("train/loss_moe_balance")]
    assert train_rows, "the balance loss is logged in training"

    run = plugformer.load_run(run_dir, checkpoint="last")
    layers = moe_layers(run.model)
    total = torch.zeros(E + 3, dtype=torch.float64)
    with torch.no_grad():
        for batch in run.data.val_dataloader():
            for layer in layers:
                layer.record_next_call()
            run.model(batch)
            for layer in layers:
                total += layer.take_statistics().vector()
    loads = total[:E] / total[:E].sum()
    metrics = summary["metrics"]
    assert [metrics[f"val/moe/expert_load_{i}"] for i in range(E)] == pytest.approx(loads.tolist(), abs=1e-6)


@pytest.mark.slow
def test_moe_trains_under_ddp_on_two_cpu_processes(tmp_path: Path) -> None:
    """Each rank routes its own tokens (every expert is called, so DDP finds every parameter
    used); the expert counts are summed over both ranks before logging."""
    run_dir = tmp_path / "run"
    result = run_cli(
        "train", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", f"run_dir={run_dir}", "model/ffn=moe",
        "model.ffn.num_experts=8", "trainer.max_steps=8", "trainer.val_check_interval=8", "logger=csv", *FAST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = read_summary(run_dir)["metrics"]
    assert sum(metrics[f"val/moe/expert_load_{i}"] for i in range(8)) == pytest.approx(1.0, abs=1e-6)
    assert "val/moe/dropped_fraction" in metrics and "train/loss_moe_balance" in metrics
