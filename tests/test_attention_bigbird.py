"""BigBird attention against a dense reference with an explicit n×n mask (built here only),
using the random blocks the attention reports it drew."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import Tensor

from conftest import small_context
from helpers import record_score_shapes
from plugformer import ConfigError, repeat_kv
from plugformer.testing import check_component
from plugformer_plugins.attention import bigbird
from plugformer_plugins.attention.bigbird import BigBirdConfig
from reference_biases import AlibiLikeBias


def build(config: BigBirdConfig, *, kv_heads: int | None = None, layer_index: int = 0, dropout: float = 0.0):
    ctx = replace(
        small_context(causal=False, d_model=32, n_heads=4, n_kv_heads=kv_heads, layer_index=layer_index, dropout=dropout),
        position=AlibiLikeBias(4),
    )
    return bigbird.COMPONENT.factory(config, ctx).eval()


def padding(batch: int, length: int) -> Tensor:
    """Example 0 unpadded; example 1 left-padded by 3 and right-padded by 4."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, -4:] = False
    return mask


def dense_mask(length: int, config: BigBirdConfig, random: Tensor, random_ok: Tensor) -> Tensor:
    """(n, n) bool: query i sees key j when either is in a global block, their blocks are at
    most window_blocks // 2 apart, or j's block is one of i's random blocks."""
    block = torch.arange(length) // config.block_size
    n_blocks = int(block.max()) + 1
    is_global = block < config.global_blocks
    near = (block[:, None] - block[None, :]).abs() <= config.window_blocks // 2
    random_pairs = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    rows = torch.arange(n_blocks)[:, None].expand_as(random)
    random_pairs[rows[random_ok], random[random_ok]] = True
    return is_global[:, None] | is_global[None, :] | near | random_pairs[block[:, None], block[None, :]]


def dense_reference(module, x: Tensor, mask: Tensor, positions: Tensor, allowed: Tensor) -> Tensor:
    batch, n, _ = x.shape
    heads, hd = module.n_heads, module.head_dim
    q = module.query(x).view(batch, n, heads, hd).transpose(1, 2)
    k, v = module._split_kv(module.key_value(x))
    k, v = repeat_kv(k, heads), repeat_kv(v, heads)
    scores = q @ k.transpose(-1, -2) / hd**0.5 + module.position.score_bias(positions, positions)
    visible = (allowed[None] & mask[:, None, :])[:, None]
    out = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0) @ v
    return module.out(out.transpose(1, 2).reshape(batch, n, -1))


SHAPES = [
    # block_size, window_blocks, global_blocks, random_blocks
    (2, 3, 1, 2),
    (3, 3, 2, 3),
    (4, 1, 0, 1),
    (2, 5, 1, 1),
    (3, 3, 1, 0),
    (5, 3, 2, 3),  # few eligible blocks: some random slots stay empty
    (8, 3, 3, 3),  # every block global: full attention
]


@pytest.mark.parametrize(("block_size", "window_blocks", "global_blocks", "random_blocks"), SHAPES)
@pytest.mark.parametrize("kv_heads", [None, 2, 1])
@pytest.mark.parametrize("length", [23, 24])
def test_bigbird_matches_a_dense_mask(block_size, window_blocks, global_blocks, random_blocks, kv_heads, length):
    torch.manual_seed(0)
    config = BigBirdConfig(block_size=block_size, window_blocks=window_blocks, global_blocks=global_blocks, random_blocks=random_blocks)
    module = build(config, kv_heads=kv_heads)
    x = torch.randn(2, length, 32)
    mask = padding(2, length)
    positions = torch.arange(length)[None, :] + 5
    with torch.no_grad():
        got = module(x, mask=mask, positions=positions)
        n_blocks = -(-length // block_size)
        random, random_ok = module.random_blocks(n_blocks)
        if n_blocks > global_blocks:
            assert module.last_random_blocks is not None
            assert all(torch.equal(a, b) for a, b in zip(module.last_random_blocks, (random, random_ok)))
        expected = dense_reference(module, x, mask, positions, dense_mask(length, config, random, random_ok))
    torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(("n_blocks", "window_blocks", "global_blocks", "random_blocks"), [(12, 3, 2, 3), (7, 5, 1, 2), (5, 3, 2, 3), (30, 1, 0, 4)])
def test_random_blocks_are_distinct_and_never_global_or_in_the_window(n_blocks, window_blocks, global_blocks, random_blocks):
    module = build(BigBirdConfig(block_size=2, window_blocks=window_blocks, global_blocks=global_blocks, random_blocks=random_blocks))
    index, valid = module.random_blocks(n_blocks)
    assert index.shape == valid.shape == (n_blocks, min(random_blocks, n_blocks))
    for c in range(n_blocks):
        chosen = index[c][valid[c]].tolist()
        eligible = [j for j in range(global_blocks, n_blocks) if abs(j - c) > window_blocks // 2]
        assert len(set(chosen)) == len(chosen) == min(random_blocks, len(eligible))
        assert set(chosen) <= set(eligible)


def test_the_fixed_draw_depends_on_seed_and_layer_not_on_the_instance():
    config = BigBirdConfig(block_size=2, global_blocks=1, random_blocks=3)
    first, again = build(config).random_blocks(40), build(config).random_blocks(40)
    other_layer = build(config, layer_index=1).random_blocks(40)
    other_seed = build(replace(config, seed=1)).random_blocks(40)
    assert torch.equal(first[0], again[0])
    assert not torch.equal(first[0], other_layer[0]) and not torch.equal(first[0], other_seed[0])


def test_resample_draws_new_blocks_in_training_only():
    torch.manual_seed(3)
    module = build(BigBirdConfig(block_size=2, global_blocks=1, random_blocks=2, resample=True))
    x = torch.randn(2, 64, 32)
    mask = padding(2, 64)
    positions = torch.arange(64)[None, :]
    fixed = module.random_blocks(32)
    module.train()
    draws = []
    for _ in range(2):
        out = module(x, mask=mask, positions=positions)
        draws.append(module.last_random_blocks)
        with torch.no_grad():
            expected = dense_reference(module, x, mask, positions, dense_mask(64, module_config(module), *draws[-1]))
        torch.testing.assert_close(out[mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert not torch.equal(draws[0][0], draws[1][0])
    module.eval()
    module(x, mask=mask, positions=positions)
    assert torch.equal(module.last_random_blocks[0], fixed[0])


def module_config(module) -> BigBirdConfig:
    return BigBirdConfig(
        block_size=module.block_size, window_blocks=2 * module.half_window + 1,
        global_blocks=module.global_blocks, random_blocks=module.n_random,
    )


def test_no_score_tensor_is_n_by_n(monkeypatch):
    """O(n): every score block has (g + w + r)·b keys, except the g·b global rows."""
    module = build(BigBirdConfig(block_size=4, window_blocks=3, global_blocks=1, random_blocks=2))
    shapes = record_score_shapes(monkeypatch, module)
    n = 256
    with torch.no_grad():
        module(torch.randn(1, n, 32))
    assert shapes == [(4, n), (4, (1 + 3 + 2) * 4)]


@pytest.mark.parametrize(
    "config",
    [
        BigBirdConfig(block_size=2, global_blocks=1, random_blocks=2),
        BigBirdConfig(block_size=3, window_blocks=1, global_blocks=0, random_blocks=1),
        BigBirdConfig(block_size=3, window_blocks=5, global_blocks=2, random_blocks=3),
        BigBirdConfig(block_size=2, random_blocks=2, resample=True),
    ],
    ids=["b2-g1-r2", "b3-w1-g0-r1", "b3-w5-g2-r3", "resample"],
)
def test_small_blocks_conform(config):
    check_component(bigbird.COMPONENT, config)


def test_causal_stacks_are_refused():
    assert "causal" not in bigbird.COMPONENT.capabilities_for().provides
    with pytest.raises(ConfigError, match="causal"):
        bigbird.COMPONENT.factory(BigBirdConfig(), small_context(causal=True))


def test_an_even_window_is_a_config_error():
    with pytest.raises(ConfigError, match="window_blocks"):
        build(BigBirdConfig(window_blocks=2))
