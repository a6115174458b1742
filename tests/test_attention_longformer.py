"""Longformer attention against a dense reference with an explicit n×n mask (built here only)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from conftest import small_context
from helpers import record_score_shapes
from plugformer import repeat_kv
from plugformer.testing import check_component
from plugformer_plugins.attention import longformer
from plugformer_plugins.attention.longformer import GLOBAL_MASK, LongformerConfig
from reference_biases import AlibiLikeBias


def build(config: LongformerConfig, *, causal: bool, kv_heads: int | None = None, bias: bool = True):
    ctx = replace(
        small_context(causal=causal, d_model=32, n_heads=4, n_kv_heads=kv_heads),
        position=AlibiLikeBias(4) if bias else None,
    )
    return longformer.COMPONENT.factory(config, ctx).eval()


def padding(batch: int, length: int) -> Tensor:
    """Example 0 unpadded; example 1 left-padded by 3 (its fixed global token 0 is padding)
    and right-padded by 4."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, -4:] = False
    return mask


def dense_reference(module, x: Tensor, mask: Tensor, positions: Tensor, is_global: Tensor, *, window: int, dilation: int) -> Tensor:
    """Softmax attention with the Longformer pattern as an explicit (n × n) mask: the band,
    every global key, every key for a global query; padded keys and non-global padded tokens
    excluded; causal keeps j ≤ i."""
    batch, n, _ = x.shape
    heads, hd = module.n_heads, module.head_dim

    def project(query, key_value):
        q = query(x).view(batch, n, heads, hd).transpose(1, 2)
        k, v = module._split_kv(key_value(x))
        return q, repeat_kv(k, heads), repeat_kv(v, heads)

    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    offset = i - j
    band = (offset.abs() <= (window - 1) * dilation) & (offset % dilation == 0)
    is_global = is_global & mask
    allowed = band[None] | is_global[:, None, :] | is_global[:, :, None]  # (batch, n, n)
    if module.causal:
        allowed = allowed & (j <= i)[None]
    allowed = (allowed & mask[:, None, :])[:, None]

    def softmax_attention(q, k, v):
        scores = q @ k.transpose(-1, -2) / hd**0.5 + module.position.score_bias(positions, positions)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
        return weights @ v

    out = softmax_attention(*project(module.query, module.key_value))
    if module.global_query is not None:
        global_out = softmax_attention(*project(module.global_query, module.global_key_value))
        out = torch.where(is_global[:, None, :, None], global_out, out)
    return module.out(out.transpose(1, 2).reshape(batch, n, -1))


CONFIGS = {
    "cls": dict(global_tokens=[0]),
    "fixed-and-first": dict(global_tokens=[11, 0], global_first=2),
    "marked-only": dict(global_tokens=[]),
    "cls-and-marked": dict(global_tokens=[0]),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(("window", "dilation"), [(3, 1), (4, 2), (2, 3)])
@pytest.mark.parametrize("globals_", list(CONFIGS))
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
def test_longformer_matches_a_dense_mask(causal, window, dilation, globals_, kv_heads):
    torch.manual_seed(0)
    length = 23
    module = build(LongformerConfig(window=window, dilation=dilation, **CONFIGS[globals_]), causal=causal, kv_heads=kv_heads)
    x = torch.randn(2, length, 32)
    mask = padding(2, length)
    positions = torch.arange(length)[None, :] + 5  # the bias follows positions, the pattern indices
    fixed = torch.zeros(2, length, dtype=torch.bool)
    fixed[:, module.fixed] = True
    extras = {}
    if "marked" in globals_:
        marked = torch.zeros(2, length, dtype=torch.bool)
        marked[0, [4, 17]] = True
        marked[1, [1, 9, 10, 21]] = True  # 1 and 21 are padding: never global
        extras[GLOBAL_MASK] = marked
        fixed = fixed | marked
    with torch.no_grad():
        got = module(x, mask=mask, positions=positions, extras=extras)
        expected = dense_reference(module, x, mask, positions, fixed, window=window, dilation=dilation)
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("causal", [False, True])
def test_global_projections_serve_the_global_rows(causal):
    torch.manual_seed(1)
    config = LongformerConfig(window=3, global_tokens=[0, 6], global_projections=True)
    module = build(config, causal=causal, kv_heads=2)
    x = torch.randn(2, 19, 32)
    mask = padding(2, 19)
    positions = torch.arange(19)[None, :]
    is_global = torch.zeros(2, 19, dtype=torch.bool)
    is_global[:, [0, 6]] = True
    with torch.no_grad():
        got = module(x, mask=mask, positions=positions)
        expected = dense_reference(module, x, mask, positions, is_global, window=3, dilation=1)
        plain = build(replace(config, global_projections=False), causal=causal, kv_heads=2)
        plain.load_state_dict(module.state_dict(), strict=False)
        without = plain(x, mask=mask, positions=positions)
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
    # The global rows really come from the other projections.
    assert not torch.allclose(got[:, 6], without[:, 6])


def test_no_score_tensor_is_n_by_n(monkeypatch):
    """O(n·(w + g)): every score block has at most 3·w + g keys, except the g global rows."""
    module = build(LongformerConfig(window=4, global_tokens=[0, 50]), causal=False)
    shapes = record_score_shapes(monkeypatch, module)
    n = 256
    with torch.no_grad():
        module(torch.randn(1, n, 32))
    assert shapes == [(4, 3 * 4 + 2), (2, n)]


def test_padded_tokens_marked_global_change_nothing():
    torch.manual_seed(2)
    module = build(LongformerConfig(window=2, global_tokens=[]), causal=False)
    x = torch.randn(2, 16, 32)
    mask = padding(2, 16)
    marked = torch.zeros(2, 16, dtype=torch.bool)
    marked[1, 3] = True
    with torch.no_grad():
        reference = module(x, mask=mask, extras={GLOBAL_MASK: marked})
        marked[1, [0, 14]] = True  # padding
        got = module(x, mask=mask, extras={GLOBAL_MASK: marked})
    torch.testing.assert_close(got[mask], reference[mask])


@pytest.mark.parametrize(
    "config",
    [
        LongformerConfig(window=3, dilation=2, global_tokens=[0, 7]),
        LongformerConfig(window=4, global_tokens=[], global_first=2),
        LongformerConfig(window=3, global_tokens=[]),
    ],
    ids=["dilated-two-globals", "first-two", "no-globals"],
)
def test_small_windows_conform_including_cached_decoding(config):
    check_component(longformer.COMPONENT, config)


def test_marked_tokens_refuse_cached_decoding():
    module = build(LongformerConfig(window=3), causal=True, bias=False)
    state = module.new_state(1)
    x = torch.randn(1, 4, 32)
    marked = {GLOBAL_MASK: torch.tensor([[True, False, False, True]])}
    module(x, state=state, extras=marked)
    with pytest.raises(ValueError, match="fixed global tokens"):
        module(torch.randn(1, 1, 32), positions=torch.tensor([[4]]), state=state, extras={GLOBAL_MASK: marked[GLOBAL_MASK][:, :1]})


def test_fixed_global_tokens_keep_the_whole_cache():
    assert build(LongformerConfig(window=3, global_tokens=[0]), causal=True).cache_limit is None
    assert build(LongformerConfig(window=3, global_tokens=[]), causal=True).cache_limit == 2


def test_negative_global_index_is_a_config_error():
    from plugformer import ConfigError

    with pytest.raises(ConfigError, match="global_tokens"):
        build(LongformerConfig(global_tokens=[-1]), causal=False)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classification_marks_its_cls_token_global(pooling):
    from plugformer_plugins.objective import classification

    ctx = replace(small_context(causal=False), task={"num_classes": 3})
    objective = classification.COMPONENT.factory(classification.ClassificationConfig(pooling=pooling), ctx)
    batch = {"input_ids": torch.ones(2, 7, dtype=torch.long), "attention_mask": torch.ones(2, 7, dtype=torch.bool)}
    extras = objective.model_inputs(batch).extras
    if pooling == "mean":
        assert GLOBAL_MASK not in extras
        return
    expected = torch.zeros(2, 7, dtype=torch.bool)
    expected[:, 0] = True
    assert torch.equal(extras[GLOBAL_MASK], expected)


def test_classification_passes_a_global_mask_from_the_data_on():
    from plugformer_plugins.objective import classification

    ctx = replace(small_context(causal=False), task={"num_classes": 3})
    objective = classification.COMPONENT.factory(classification.ClassificationConfig(pooling="cls"), ctx)
    marked = torch.zeros(2, 7, dtype=torch.bool)
    marked[1, 4] = True
    batch = {"input_ids": torch.ones(2, 7, dtype=torch.long), GLOBAL_MASK: marked}
    expected = marked.clone()
    expected[:, 0] = True
    assert torch.equal(objective.model_inputs(batch).extras[GLOBAL_MASK], expected)
