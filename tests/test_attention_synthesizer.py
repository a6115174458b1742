"""Synthesizer attention (dense and random) against dense references written here, its
positions and maximum length, grouped-query heads and the random variants' conformance."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from conftest import small_context
from plugformer import ConfigError
from plugformer.testing import check_component
from plugformer_plugins.attention.synthesizer import SynthesizerAttention, SynthesizerConfig


def build(causal: bool, seed: int = 0, n_kv_heads: int | None = None, **options) -> SynthesizerAttention:
    torch.manual_seed(seed)
    ctx = small_context(causal=causal, d_model=32, n_heads=4, n_kv_heads=n_kv_heads)
    return SynthesizerAttention(SynthesizerConfig(**options), ctx).double().eval()


def mask_of(batch: int, length: int) -> Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :2] = False
    mask[1, -3:] = False
    return mask


def reference(logits: Tensor, v: Tensor, causal: bool, mask: Tensor) -> Tensor:
    """softmax over the visible keys of an explicit (L × L) logits matrix; zeros for a query that sees none."""
    length = v.shape[-2]
    allowed = mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    weights = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num()
    return weights @ v


def inputs(length: int) -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, length, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_dense_equals_a_per_token_mlp_over_the_first_columns(causal: bool) -> None:
    module = build(causal, max_length=16)
    with torch.no_grad():  # non-zero biases, so that they are tested too
        module.b1.normal_()
        module.b2.normal_()
    q, k, v = inputs(11)
    mask = mask_of(2, 11)
    hidden = torch.relu(torch.einsum("bhld,hde->bhle", q, module.w1) + module.b1)
    rows = torch.einsum("bhle,mhe->bhlm", hidden, module.w2) + module.b2.T[None, :, None, :]  # (b, h, L, max_length)
    expected = reference(rows[..., :11], v, causal, mask)
    positions = torch.arange(11)[None, :]
    got = module.attend(q, k, v, key_padding_mask=mask, q_positions=positions, k_positions=positions)
    real = mask[:, None, :, None]
    torch.testing.assert_close(got * real, expected * real)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("offset", [0, 5])
def test_random_reads_the_matrix_at_the_positions(causal: bool, offset: int) -> None:
    module = build(causal, variant="random", max_length=16)
    q, k, v = inputs(9)
    mask = mask_of(2, 9)
    positions = torch.arange(offset, offset + 9)[None, :]
    expected = reference(module.logits[None, :, offset : offset + 9, offset : offset + 9], v, causal, mask)
    got = module.attend(q, k, v, key_padding_mask=mask, q_positions=positions, k_positions=positions)
    real = mask[:, None, :, None]
    torch.testing.assert_close(got * real, expected * real)
    assert torch.equal(got, module.attend(q * 7, k * 7, v, key_padding_mask=mask, q_positions=positions, k_positions=positions)), (
        "the random synthesizer's weights must not depend on queries or keys"
    )


def test_dense_weights_depend_on_queries_but_not_keys() -> None:
    module = build(False)
    q, k, v = inputs(6)
    positions = torch.arange(6)[None, :]
    base = module.attend(q, k, v, key_padding_mask=None, q_positions=positions, k_positions=positions)
    other_keys = module.attend(q, 3 * k, v, key_padding_mask=None, q_positions=positions, k_positions=positions)
    other_queries = module.attend(3 * q, k, v, key_padding_mask=None, q_positions=positions, k_positions=positions)
    assert torch.equal(base, other_keys)
    assert not torch.allclose(base, other_queries)


@pytest.mark.parametrize("variant", ["dense", "random"])
def test_a_position_beyond_max_length_is_an_error(variant: str) -> None:
    module = build(True, variant=variant, max_length=8)
    module(torch.randn(1, 8, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_length=8"):
        module(torch.randn(1, 9, 32, dtype=torch.float64))


def test_capabilities_declare_the_maximum_length_and_quadratic_cost(registry) -> None:
    component = registry.get("attention", "synthesizer")
    capabilities = component.capabilities_for(SynthesizerConfig(max_length=128))
    assert capabilities.max_length == 128 and capabilities.cost == "quadratic"
    assert {"causal", "bidirectional", "key_padding_mask", "incremental_decoding"} <= capabilities.provides
    assert not {"score_bias", "qk_transform", "relative_terms"} & capabilities.provides


def test_random_has_no_query_projection_and_a_fixed_matrix_is_a_saved_buffer() -> None:
    learned = build(False, variant="random", max_length=8)
    assert not any(name.startswith("query") for name, _ in learned.named_parameters())
    assert "logits" in dict(learned.named_parameters())
    assert learned.projection_weights()["query"].numel() == 0
    fixed = build(False, variant="random", max_length=8, trainable=False)
    assert "logits" not in dict(fixed.named_parameters()) and "logits" in fixed.state_dict()


def test_an_unknown_variant_is_refused() -> None:
    with pytest.raises(ConfigError, match="variant"):
        build(False, variant="factorized")


@pytest.mark.parametrize("variant", ["dense", "random"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_heads_equal_repeated_key_value_heads(variant: str, kv_heads: int) -> None:
    grouped = build(True, variant=variant, n_kv_heads=kv_heads, max_length=16)
    full = build(True, variant=variant, max_length=16)
    assert grouped.key_value.out_features == 2 * kv_heads * 8
    with torch.no_grad():
        full.load_state_dict({n: t for n, t in grouped.state_dict().items() if not n.startswith("key_value")}, strict=False)
        weight, bias = grouped.key_value.weight.view(2, kv_heads, 8, 32), grouped.key_value.bias.view(2, kv_heads, 8)
        full.key_value.weight.copy_(weight.repeat_interleave(4 // kv_heads, dim=1).reshape(-1, 32))
        full.key_value.bias.copy_(bias.repeat_interleave(4 // kv_heads, dim=1).reshape(-1))
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(grouped(x), full(x))


@pytest.mark.parametrize(
    "config",
    [SynthesizerConfig(variant="random", max_length=24), SynthesizerConfig(variant="random", max_length=24, trainable=False),
     SynthesizerConfig(max_length=24, hidden=5)],
    ids=["random learned", "random fixed", "dense narrow"],
)
def test_other_variants_conform(registry, config: SynthesizerConfig) -> None:
    check_component(registry.get("attention", "synthesizer"), config)
