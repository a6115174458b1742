"""Rotary and ALiBi positions, RMSNorm and GLU feed-forward networks: their formulas."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from plugformer import ConfigError
from plugformer.testing import check_component
from plugformer_plugins.attention import full
from plugformer_plugins.ffn import glu, mlp
from plugformer_plugins.norm import rmsnorm
from plugformer_plugins.position import alibi, rope
from conftest import small_context


def rotary(**config) -> rope.RotaryPosition:
    return rope.COMPONENT.factory(rope.RotaryConfig(**config), small_context())


def positions(length: int) -> torch.Tensor:
    """Positions 0..length−1 shared by the batch: (1, length)."""
    return torch.arange(length)[None, :]


def heads(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- RoPE -----------------------------------------------------------------------------------


def test_rope_preserves_norms_and_shapes() -> None:
    q, k = heads(2, 4, 12, 8, seed=0), heads(2, 4, 12, 8, seed=1)
    rq, rk = rotary().transform_qk(q, k, positions(12))
    assert rq.shape == q.shape and rq.dtype == q.dtype
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(rk.norm(dim=-1), k.norm(dim=-1))


def test_rope_scores_depend_only_on_the_relative_offset() -> None:
    position = rotary()
    q, k = heads(1, 4, 10, 8, seed=2), heads(1, 4, 10, 8, seed=3)
    near = position.transform_qk(q, k, positions(10))
    far = position.transform_qk(q, k, positions(10) + 37)
    torch.testing.assert_close(near[0] @ near[1].transpose(-1, -2), far[0] @ far[1].transpose(-1, -2))
    # One query vector and one key vector at every position: the scores are constant along diagonals.
    same_q = heads(1, 1, 1, 8, seed=4).expand(1, 1, 10, 8)
    same_k = heads(1, 1, 1, 8, seed=5).expand(1, 1, 10, 8)
    rq, rk = position.transform_qk(same_q, same_k, positions(10))
    scores = (rq @ rk.transpose(-1, -2))[0, 0]
    torch.testing.assert_close(scores[1:, 1:], scores[:-1, :-1])


def test_rope_rotates_pair_k_by_position_times_theta_k() -> None:
    q = heads(1, 1, 6, 8, seed=6)
    rq, _ = rotary(base=100.0).transform_qk(q, q, positions(6))
    torch.testing.assert_close(rq[..., 0, :], q[..., 0, :])  # position 0: no rotation
    pair, position = 2, 5
    angle = position * 100.0 ** (-2 * pair / 8)
    x, y = q[0, 0, position, 2 * pair], q[0, 0, position, 2 * pair + 1]
    expected = torch.stack([x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)])
    torch.testing.assert_close(rq[0, 0, position, 2 * pair : 2 * pair + 2], expected)


def test_partial_rope_rotates_only_the_leading_fraction() -> None:
    q = heads(2, 4, 9, 8, seed=7)
    position = rotary(fraction=0.5)
    assert position.rotary_dim == 4
    rq, _ = position.transform_qk(q, q, positions(9))
    torch.testing.assert_close(rq[..., 4:], q[..., 4:])
    assert not torch.allclose(rq[..., 1:, :4], q[..., 1:, :4])
    torch.testing.assert_close(rq[..., :4].norm(dim=-1), q[..., :4].norm(dim=-1))
    check_component(rope.COMPONENT, rope.RotaryConfig(fraction=0.5))


def test_rope_takes_positions_per_example() -> None:
    q = heads(2, 4, 6, 8, seed=9)
    per_example = torch.stack([torch.arange(6), torch.arange(6) + 11])  # (batch, length)
    rq, _ = rotary().transform_qk(q, q, per_example)
    for row in range(2):
        alone, _ = rotary().transform_qk(q[row : row + 1], q[row : row + 1], per_example[row : row + 1])
        torch.testing.assert_close(rq[row : row + 1], alone)
    assert not torch.allclose(rq[1], rotary().transform_qk(q, q, positions(6))[0][1])


def test_rope_keeps_low_precision_dtypes() -> None:
    q = heads(1, 4, 5, 8, seed=8).to(torch.bfloat16)
    rq, rk = rotary().transform_qk(q, q, positions(5))
    assert rq.dtype == rk.dtype == torch.bfloat16


@pytest.mark.parametrize("fraction", [0.0, 1.5, 0.1])
def test_rope_rejects_a_fraction_that_rotates_nothing(fraction: float) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        rotary(fraction=fraction)


# --- ALiBi ----------------------------------------------------------------------------------


def test_alibi_slopes_for_a_power_of_two() -> None:
    assert alibi.alibi_slopes(8) == [2.0**-i for i in range(1, 9)]
    assert alibi.alibi_slopes(4) == [2.0**-i for i in (2, 4, 6, 8)]


def test_alibi_slopes_for_other_head_counts_follow_the_paper() -> None:
    # 6 heads: the 4-head slopes, then every other slope of the 8-head sequence, first two.
    assert alibi.alibi_slopes(6) == [2.0**-i for i in (2, 4, 6, 8, 1, 3)]
    twelve = alibi.alibi_slopes(12)
    assert twelve[:8] == alibi.alibi_slopes(8)
    assert twelve[8:] == pytest.approx([2.0**-e for e in (0.5, 1.5, 2.5, 3.5)])


def alibi_position(causal: bool, n_heads: int = 8) -> alibi.AlibiPosition:
    return alibi.COMPONENT.factory(alibi.AlibiConfig(), small_context(d_model=64, n_heads=n_heads, causal=causal))


def test_alibi_bias_is_minus_slope_times_distance_on_the_causal_part() -> None:
    bias = alibi_position(causal=True).score_bias(positions(7), positions(7))
    assert bias.shape == (1, 8, 7, 7)
    i, j = torch.arange(7)[:, None], torch.arange(7)[None, :]
    for h, slope in enumerate(alibi.alibi_slopes(8)):
        expected = -slope * (i - j).float()
        torch.testing.assert_close(bias[0, h][j <= i], expected[j <= i])


def test_alibi_bidirectional_bias_is_symmetric_in_distance() -> None:
    bias = alibi_position(causal=False).score_bias(positions(6), positions(6))
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    torch.testing.assert_close(bias[0], -torch.tensor(alibi.alibi_slopes(8))[:, None, None] * (i - j).abs().float())


def test_alibi_bias_works_on_blocks_of_positions() -> None:
    position = alibi_position(causal=True)
    q_positions = torch.tensor([[[4, 5, 6]], [[10, 11, 12]]])  # (batch 2, 1 block, 3)
    k_positions = torch.tensor([[[2, 3, 4, 5, 6]], [[8, 9, 10, 11, 12]]])  # (batch 2, 1 block, 5)
    bias = position.score_bias(q_positions, k_positions)
    assert bias.shape == (2, 8, 1, 3, 5)  # (batch, heads, blocks, Lq, Lk)
    # The same offsets in both rows: the bias depends on positions only through i − j.
    torch.testing.assert_close(bias[0], bias[1])
    assert bias[0, 0, 0, 0, 0].item() == pytest.approx(-0.5 * (4 - 2))


def test_alibi_in_full_attention_matches_explicit_softmax() -> None:
    ctx = small_context(causal=True)
    position = alibi.COMPONENT.factory(alibi.AlibiConfig(), ctx)
    attention = full.COMPONENT.factory(full.FullAttentionConfig(), replace(ctx, position=position)).double()
    x = heads(2, 9, 32, seed=9)
    q = attention.query(x).view(2, 9, 4, 8).transpose(1, 2)
    k, v = attention.key_value(x).view(2, 9, 2, 4, 8).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8) + position.score_bias(positions(9), positions(9)).double()
    scores = scores.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), float("-inf"))
    expected = attention.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(attention(x, positions=positions(9)), expected)


# --- RMSNorm --------------------------------------------------------------------------------


def test_rmsnorm_matches_the_formula() -> None:
    norm = rmsnorm.COMPONENT.factory(rmsnorm.RMSNormConfig(eps=1e-6), small_context()).double()
    with torch.no_grad():
        norm.weight.copy_(heads(32, seed=10))
    x = heads(3, 5, 32, seed=11) * 3 + 1
    expected = x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_rmsnorm_without_scale_has_no_parameters_and_unit_rms() -> None:
    norm = rmsnorm.COMPONENT.factory(rmsnorm.RMSNormConfig(scale=False), small_context())
    assert list(norm.parameters()) == []
    y = norm(heads(2, 4, 32, seed=12).float() * 50)
    torch.testing.assert_close(y.pow(2).mean(dim=-1), torch.ones(2, 4), rtol=1e-4, atol=1e-4)
    check_component(rmsnorm.COMPONENT, rmsnorm.RMSNormConfig(scale=False))


def test_rmsnorm_keeps_bfloat16() -> None:
    norm = rmsnorm.COMPONENT.factory(rmsnorm.RMSNormConfig(), small_context()).to(torch.bfloat16)
    assert norm(torch.randn(2, 3, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- GLU ------------------------------------------------------------------------------------


def test_glu_hidden_size_is_8_3_d_model_rounded_up() -> None:
    assert glu.glu_hidden_size(32, 64) == 128  # 85.3 → 128
    assert glu.glu_hidden_size(96, 64) == 256  # exactly 256
    assert glu.glu_hidden_size(100, 8) == 272  # 266.7 → 272
    assert glu.COMPONENT.factory(glu.GLUConfig(), small_context(d_model=96)).hidden == 256
    assert glu.COMPONENT.factory(glu.GLUConfig(hidden=50), small_context()).hidden == 50


def test_glu_has_as_many_parameters_as_the_mlp_when_no_rounding_is_needed() -> None:
    ctx = small_context(d_model=192)  # 8/3 · 192 = 512, a multiple of 64
    gated = glu.COMPONENT.factory(glu.GLUConfig(), ctx)
    plain = mlp.COMPONENT.factory(mlp.MLPConfig(bias=False), ctx)
    assert sum(p.numel() for p in gated.parameters()) == sum(p.numel() for p in plain.parameters())


@pytest.mark.parametrize(
    ("activation", "function"), [("swish", F.silu), ("gelu", F.gelu), ("relu", F.relu)]
)
def test_glu_activations_match_the_formula(activation: str, function) -> None:
    ffn = glu.COMPONENT.factory(glu.GLUConfig(activation=glu.GateActivation(activation)), small_context()).double()
    x = heads(2, 5, 32, seed=13)
    w, v = ffn.gate_and_value.weight.chunk(2, dim=0)
    expected = (function(x @ w.T) * (x @ v.T)) @ ffn.down.weight.T
    torch.testing.assert_close(ffn(x), expected)
    assert getattr(ffn.down, "scale_init_by_depth", False)
    check_component(glu.COMPONENT, glu.GLUConfig(activation=glu.GateActivation(activation)))


def test_glu_rejects_a_nonpositive_width() -> None:
    with pytest.raises(ConfigError, match="hidden"):
        glu.COMPONENT.factory(glu.GLUConfig(hidden=0), small_context())


def test_the_new_components_are_registered(registry) -> None:
    for kind, name in [("position", "rope"), ("position", "alibi"), ("norm", "rmsnorm"), ("ffn", "glu")]:
        assert registry.get(kind, name).reference
