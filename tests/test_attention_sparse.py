"""Sparse Transformer attention (strided and fixed) against a dense reference: an explicit
(length × length) boolean mask of the paper's pattern, built here from its definition."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from conftest import small_context
from plugformer import KVCache, PositionEncoding
from plugformer.testing import check_component
from plugformer_plugins.attention import sparse_fixed, sparse_strided
from reference_biases import AlibiLikeBias


def strided_pattern(length: int, stride: int, causal: bool) -> Tensor:
    """Child et al. 2019, strided: A(1) = {j: |i − j| < l}, A(2) = {j: (i − j) mod l = 0}."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    pattern = ((i - j).abs() < stride) | ((i - j) % stride == 0)
    return pattern & (j <= i) if causal else pattern


def fixed_pattern(length: int, block: int, summary: int, causal: bool) -> Tensor:
    """Child et al. 2019, fixed: A(1) = {j: ⌊j/l⌋ = ⌊i/l⌋}, A(2) = {j: j mod l ≥ l − c}."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None, :]
    pattern = (i // block == j // block) | (j % block >= block - summary)
    return pattern & (j <= i) if causal else pattern


def dense_attention(module, x: Tensor, mask: Tensor | None, pattern: Tensor, positions: Tensor, bias=None) -> Tensor:
    """The module's own projections, then softmax over the explicit pattern (n × n)."""
    batch, length, d_model = x.shape
    heads, head_dim, kv_heads = module.n_heads, module.head_dim, module.n_kv_heads
    q = module.query(x).view(batch, length, heads, head_dim).transpose(1, 2)
    k, v = module.key_value(x).view(batch, length, 2, kv_heads, head_dim).permute(2, 0, 3, 1, 4)
    k, v = k.repeat_interleave(heads // kv_heads, dim=1), v.repeat_interleave(heads // kv_heads, dim=1)
    allowed = pattern[None, None] & (mask[:, None, None, :] if mask is not None else True)
    scores = q @ k.transpose(-1, -2) / head_dim**0.5
    if bias is not None:
        scores = scores + bias.score_bias(positions, positions)
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    out = (weights @ v).transpose(1, 2).reshape(batch, length, d_model)
    return module.out(out)


def padding(batch: int, length: int) -> Tensor:
    """Example 0 unpadded; 1 left-padded by 3 and right-padded by 4; 2 with a hole in the
    middle (index 5 to 12): with a small stride some queries see no real key at all."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, -4:] = False
    mask[2, 5:13] = False
    return mask


def build(component, config, *, causal: bool, position: PositionEncoding | None = None, n_kv_heads: int | None = None):
    ctx = replace(small_context(causal=causal, d_model=32, n_heads=4, n_kv_heads=n_kv_heads), position=position)
    return component.factory(config, ctx).eval().double()


CASES = [
    pytest.param(sparse_strided.COMPONENT, sparse_strided.StridedSparseConfig(stride=s), id=f"strided-l{s}")
    for s in (1, 3, 4, 6)
] + [
    pytest.param(sparse_fixed.COMPONENT, sparse_fixed.FixedSparseConfig(block=b, summary=c), id=f"fixed-l{b}-c{c}")
    for b, c in ((1, 1), (4, 1), (5, 2), (6, 6))
]


def pattern_for(config, length: int, causal: bool) -> Tensor:
    if isinstance(config, sparse_strided.StridedSparseConfig):
        return strided_pattern(length, config.stride, causal)
    return fixed_pattern(length, config.block, config.summary, causal)


@pytest.mark.parametrize(("component", "config"), CASES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [5, 23, 24])
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_sparse_matches_the_dense_pattern(component, config, causal, length, n_kv_heads):
    torch.manual_seed(0)
    bias = AlibiLikeBias(4).double()
    module = build(component, config, causal=causal, position=bias, n_kv_heads=n_kv_heads)
    x = torch.randn(3, length, 32, dtype=torch.float64)
    mask = padding(3, length)
    positions = torch.arange(length)[None, :] + 7  # the bias follows positions; the pattern follows indices
    with torch.no_grad():
        got = module(x, mask=mask, positions=positions)
        expected = dense_attention(module, x, mask, pattern_for(config, length, causal), positions, bias)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("component", "config"), CASES)
def test_a_query_that_sees_no_key_returns_zeros_and_gradients_stay_finite(component, config):
    torch.manual_seed(1)
    module = build(component, config, causal=True).train()
    x = torch.randn(3, 24, 32, dtype=torch.float64, requires_grad=True)
    mask = padding(3, 24)
    mask[0] = False  # an example without any real token
    out = module(x, mask=mask)
    torch.testing.assert_close(out[0], module.out.bias.expand(24, -1))  # zeros before the output projection
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in module.parameters())


@pytest.mark.parametrize(("component", "config"), CASES)
def test_causal_outputs_ignore_later_tokens(component, config):
    torch.manual_seed(2)
    module = build(component, config, causal=True)
    x = torch.randn(2, 24, 32, dtype=torch.float64)
    with torch.no_grad():
        reference = module(x)
        for cut in (1, 9, 17):
            changed = x.clone()
            changed[:, cut:] = torch.randn(2, 24 - cut, 32, dtype=torch.float64)
            torch.testing.assert_close(module(changed)[:, :cut], reference[:, :cut])


@pytest.mark.parametrize(("component", "config"), CASES)
@pytest.mark.parametrize("n_kv_heads", [None, 1])
def test_decoding_token_by_token_equals_the_full_forward(component, config, n_kv_heads):
    torch.manual_seed(3)
    module = build(component, config, causal=True, n_kv_heads=n_kv_heads)
    x = torch.randn(2, 26, 32, dtype=torch.float64)
    with torch.no_grad():
        full = module(x)
        cache = module.new_state(2)
        assert isinstance(cache, KVCache) and cache.limit is None  # the strided keys reach back to the start
        prompt = module(x[:, :7], positions=torch.arange(7), state=cache)
        steps = [module(x[:, t : t + 1], positions=torch.tensor([t]), state=cache) for t in range(7, 26)]
    torch.testing.assert_close(torch.cat([prompt, *steps], dim=1), full)


def test_a_single_block_is_plain_attention_with_that_mask():
    """Sequences no longer than the stride: strided is causal full attention, fixed too."""
    torch.manual_seed(4)
    for component, config in ((sparse_strided.COMPONENT, sparse_strided.StridedSparseConfig(stride=16)),
                              (sparse_fixed.COMPONENT, sparse_fixed.FixedSparseConfig(block=16, summary=4))):
        module = build(component, config, causal=True)
        x = torch.randn(2, 16, 32, dtype=torch.float64)
        causal = torch.ones(16, 16, dtype=torch.bool).tril()
        with torch.no_grad():
            torch.testing.assert_close(module(x), dense_attention(module, x, None, causal, torch.arange(16)[None]))


@pytest.mark.parametrize(
    ("component", "config", "keys_per_query"),
    [
        (sparse_strided.COMPONENT, sparse_strided.StridedSparseConfig(stride=32), lambda n: 2 * 32 + n // 32),
        (sparse_fixed.COMPONENT, sparse_fixed.FixedSparseConfig(block=32, summary=4), lambda n: 32 + 4 * n // 32),
    ],
)
def test_no_tensor_saved_for_backward_grows_as_length_squared(component, config, keys_per_query):
    """At length 2048 an n × n score tensor per head would hold 4.2M entries; every saved
    tensor must stay within heads · n · (keys a query may see) (a small constant factor)."""
    torch.manual_seed(5)
    module = build(component, config, causal=True).float().train()
    length = 2048
    largest = 0

    def keep_size(tensor: Tensor) -> Tensor:
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    x = torch.randn(1, length, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep_size, lambda t: t):
        module(x).sum().backward()
    budget = module.n_heads * length * keys_per_query(length)
    assert largest <= 1.5 * budget, (largest, budget)
    assert largest < module.n_heads * length * length / 4


@pytest.mark.parametrize(
    ("component", "config"),
    [
        (sparse_strided.COMPONENT, sparse_strided.StridedSparseConfig(stride=4)),
        (sparse_strided.COMPONENT, sparse_strided.StridedSparseConfig(stride=6)),
        (sparse_fixed.COMPONENT, sparse_fixed.FixedSparseConfig(block=4, summary=2)),
        (sparse_fixed.COMPONENT, sparse_fixed.FixedSparseConfig(block=6, summary=1)),
    ],
)
def test_conformance_with_blocks_shorter_than_the_kits_sequences(component, config):
    """The kit's sequences (20 tokens) are shorter than the default stride; run it again with
    strides that make the blockwise path and the gathered decoding path do the work."""
    check_component(component, config)


def test_options_are_checked():
    from plugformer import ConfigError

    with pytest.raises(ConfigError, match="summary"):
        build(sparse_fixed.COMPONENT, sparse_fixed.FixedSparseConfig(block=4, summary=5), causal=True)
    with pytest.raises(ConfigError, match="stride"):
        build(sparse_strided.COMPONENT, sparse_strided.StridedSparseConfig(stride=0), causal=True)


def test_capabilities_are_declared():
    for component in (sparse_strided.COMPONENT, sparse_fixed.COMPONENT):
        provides = component.capabilities_for().provides
        assert {"causal", "bidirectional", "key_padding_mask", "score_bias", "qk_transform", "incremental_decoding"} <= provides
