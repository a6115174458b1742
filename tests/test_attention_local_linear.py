"""Local (sliding-window) and linear attention against full attention and naive references."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import small_context
from plugformer import KVCache, PositionEncoding
from plugformer.testing import check_component
from plugformer_plugins.attention import full, linear, local
from reference_biases import AlibiLikeBias


def padding_mask(batch: int, length: int) -> Tensor:
    """Sample 0 unpadded, sample 1 left-padded by 3 and right-padded by 4."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, -4:] = False
    return mask


def context(causal: bool, position: PositionEncoding | None = None):
    return replace(small_context(causal=causal, d_model=32, n_heads=4), position=position)


def naive_local(q, k, v, *, window, dilation, causal, mask, positions, bias_module) -> Tensor:
    """Explicit (length × length) band mask, softmax, zero rows without a visible key."""
    length = q.shape[-2]
    index = torch.arange(length)
    offset = index[:, None] - index[None, :]
    distance = offset if causal else offset.abs()
    allowed = (distance >= 0) & (distance % dilation == 0) & (distance // dilation < window)
    allowed = allowed & (mask[:, None, None, :] if mask is not None else True)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias_module is not None:
        scores = scores + bias_module.score_bias(positions, positions)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return weights @ v


def naive_linear(q, k, v, *, causal, mask, eps) -> Tensor:
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    if mask is not None:
        phi_k = phi_k * mask[:, None, :, None]
    scores = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        scores = scores.tril()
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_local_with_a_window_covering_the_sequence_equals_full(causal, padded, with_bias):
    torch.manual_seed(0)
    ctx = context(causal, AlibiLikeBias(4) if with_bias else None)
    reference = full.COMPONENT.factory(full.FullAttentionConfig(), ctx).eval()
    windowed = local.COMPONENT.factory(local.LocalAttentionConfig(window=40), ctx).eval()
    windowed.load_state_dict(reference.state_dict())
    x = torch.randn(2, 21, 32)
    mask = padding_mask(2, 21) if padded else None
    expected = reference(x, mask=mask)
    got = windowed(x, mask=mask)
    real = mask if mask is not None else torch.ones(2, 21, dtype=torch.bool)
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("window", "dilation"), [(1, 1), (3, 1), (5, 1), (4, 2), (3, 3), (2, 5)])
@pytest.mark.parametrize("length", [23, 24])
def test_local_matches_an_explicit_band_mask(causal, window, dilation, length):
    torch.manual_seed(1)
    bias = AlibiLikeBias(4)
    attention = local.COMPONENT.factory(
        local.LocalAttentionConfig(window=window, dilation=dilation), context(causal, bias)
    ).eval()
    q, k, v = torch.randn(3, 2, 4, length, 8).unbind(0)
    mask = padding_mask(2, length)
    positions = torch.arange(length)[None, :] + 7  # bias must follow positions, masks follow indices
    got = attention.attend(q, k, v, key_padding_mask=mask, q_positions=positions, k_positions=positions)
    expected = naive_local(
        q, k, v, window=window, dilation=dilation, causal=causal, mask=mask, positions=positions, bias_module=bias
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_local_padding_gives_no_nan_and_finite_gradients():
    torch.manual_seed(2)
    attention = local.COMPONENT.factory(local.LocalAttentionConfig(window=4, dilation=2), context(True)).train()
    x = torch.randn(2, 19, 32, requires_grad=True)
    mask = padding_mask(2, 19)
    mask[0] = False  # a sample with no real token at all
    out = attention(x, mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in attention.parameters())


def test_local_applies_dropout_only_in_training():
    torch.manual_seed(3)
    attention = local.COMPONENT.factory(local.LocalAttentionConfig(window=4), replace(context(True), dropout=0.5))
    x = torch.randn(1, 16, 32)
    attention.eval()
    torch.testing.assert_close(attention(x), attention(x))
    attention.train()
    assert not torch.allclose(attention(x), attention.eval()(x))


@pytest.mark.parametrize(("length", "chunk_size"), [(64, 16), (50, 16), (13, 64), (130, 64), (7, 1)])
@pytest.mark.parametrize("padded", [False, True])
def test_linear_causal_chunks_match_the_quadratic_form(length, chunk_size, padded):
    torch.manual_seed(4)
    config = linear.LinearAttentionConfig(chunk_size=chunk_size)
    attention = linear.COMPONENT.factory(config, context(True))
    q, k, v = torch.randn(3, 2, 4, length, 8).unbind(0)
    mask = padding_mask(2, length) if padded else None
    positions = torch.arange(length)[None, :]
    got = attention.attend(q, k, v, key_padding_mask=mask, q_positions=positions, k_positions=positions)
    expected = naive_linear(q, k, v, causal=True, mask=mask, eps=config.eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded", [False, True])
def test_linear_bidirectional_matches_the_quadratic_form(padded):
    torch.manual_seed(5)
    config = linear.LinearAttentionConfig()
    attention = linear.COMPONENT.factory(config, context(False))
    q, k, v = torch.randn(3, 2, 4, 37, 8).unbind(0)
    mask = padding_mask(2, 37) if padded else None
    positions = torch.arange(37)[None, :]
    got = attention.attend(q, k, v, key_padding_mask=mask, q_positions=positions, k_positions=positions)
    expected = naive_linear(q, k, v, causal=False, mask=mask, eps=config.eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [13, 40])
def test_linear_with_rotary_follows_roformer(causal, length):
    """RoFormer eq. 19: rotated features in the numerator, unrotated in the normalizer."""
    from plugformer_plugins.position import rope

    torch.manual_seed(6)
    position = rope.COMPONENT.factory(rope.COMPONENT.config(), context(causal))
    config = linear.LinearAttentionConfig(chunk_size=16)
    attention = linear.COMPONENT.factory(config, context(causal, position))
    q, k, v = torch.randn(3, 2, 4, length, 8).unbind(0)
    positions = torch.arange(length)[None, :]
    mask = padding_mask(2, length)
    got = attention.attend(q, k, v, key_padding_mask=mask, q_positions=positions, k_positions=positions)

    phi_q, phi_k = F.elu(q) + 1, (F.elu(k) + 1) * mask[:, None, :, None]
    rotated_q, rotated_k = position.transform_qk(phi_q, phi_k, positions)
    numerator, normalizer = rotated_q @ rotated_k.transpose(-1, -2), phi_q @ phi_k.transpose(-1, -2)
    if causal:
        numerator, normalizer = numerator.tril(), normalizer.tril()
    expected = (numerator @ v) / (normalizer.sum(-1, keepdim=True) + config.eps)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_linear_padding_gives_no_nan_and_finite_gradients(causal):
    torch.manual_seed(6)
    attention = linear.COMPONENT.factory(linear.LinearAttentionConfig(chunk_size=8), context(causal))
    x = torch.randn(2, 21, 32, requires_grad=True)
    mask = padding_mask(2, 21)
    mask[0] = False
    out = attention(x, mask=mask)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_capabilities_say_what_each_supports(registry):
    local_caps = registry.get("attention", "local").capabilities_for()
    linear_caps = registry.get("attention", "linear").capabilities_for()
    assert {"causal", "bidirectional", "key_padding_mask", "score_bias", "qk_transform"} <= local_caps.provides
    assert local_caps.cost == "n·w"
    assert "score_bias" not in linear_caps.provides and "qk_transform" in linear_caps.provides
    assert linear_caps.cost == "linear"


@pytest.mark.parametrize(
    "config",
    [local.LocalAttentionConfig(window=3, dilation=2), local.LocalAttentionConfig(window=4)],
    ids=["window 3, dilation 2", "window 4"],
)
def test_local_with_a_short_window_conforms(config):
    """The registered default window (64) covers the kit's sequences; a short one makes the
    kit's decoding checks run with a cache that drops tokens."""
    check_component(local.COMPONENT, config)


def test_linear_with_short_chunks_conforms():
    check_component(linear.COMPONENT, linear.LinearAttentionConfig(chunk_size=3))


@pytest.mark.parametrize(("window", "dilation"), [(3, 1), (3, 2), (1, 1)])
def test_local_cache_keeps_only_the_window(window, dilation):
    torch.manual_seed(7)
    attention = local.COMPONENT.factory(local.LocalAttentionConfig(window=window, dilation=dilation), context(True)).eval()
    state = attention.new_state(2)
    assert isinstance(state, KVCache) and state.limit == (window - 1) * dilation
    x = torch.randn(2, 9, 32)
    expected = attention(x)
    steps = []
    for t in range(9):
        steps.append(attention(x[:, t : t + 1], positions=torch.tensor([[t]]), state=state))
        assert state.length == min(t + 1, state.limit)
    torch.testing.assert_close(torch.cat(steps, dim=1), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_full_cache_counts_tokens_and_holds_only_key_value_heads(kv_heads):
    attention = full.COMPONENT.factory(full.FullAttentionConfig(), replace(context(True), n_kv_heads=kv_heads)).eval()
    state = attention.new_state(3)
    x = torch.randn(3, 5, 32)
    for t in range(5):
        attention(x[:, t : t + 1], positions=torch.tensor([[t]]), state=state)
    assert state.length == 5 and state.limit is None
    assert state.keys.shape == state.values.shape == (3, kv_heads or 4, 5, 8)
