"""Sparse Sinkhorn attention against small dense references written here: a hard block
permutation equals softmax attention under an explicit block mask, and the soft permutation
equals a slot-by-slot loop over the mixtures; the Sinkhorn normalisation itself, Gumbel
noise, limits and grouped-query heads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from conftest import small_context
from plugformer.testing import check_component
from plugformer_plugins.attention.sinkhorn import (
    SinkhornAttention,
    SinkhornConfig,
    _DensePermutation,
    _normalised_logits,
    sinkhorn,
)


def build(seed: int = 0, n_kv_heads: int | None = None, **options) -> SinkhornAttention:
    torch.manual_seed(seed)
    ctx = small_context(causal=False, d_model=32, n_heads=4, n_kv_heads=n_kv_heads)
    return SinkhornAttention(SinkhornConfig(**options), ctx).double().eval()


def inputs(length: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(5)
    return [torch.randn(2, 4, length, 8, generator=generator, dtype=torch.float64) for _ in range(3)]


def padding(length: int) -> Tensor:
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, 9] = False
    mask[1, -2:] = False
    return mask


def attend(module: SinkhornAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    positions = torch.arange(q.shape[-2])[None, :]
    return module.attend(q, k, v, key_padding_mask=mask, q_positions=positions, k_positions=positions)


def test_a_hard_block_permutation_is_attention_to_the_own_and_the_permuted_block() -> None:
    block, length = 5, 22  # 5 blocks, the last one 2 real tokens and 3 of padding
    n_blocks = 5
    target = torch.tensor([3, 0, 4, 1, 2])  # block i attends to block target[i]; no fixed point
    module = build(block_size=block)
    module.soft_permutation = lambda k, real: _DensePermutation(torch.eye(n_blocks, dtype=k.dtype)[target].expand(2, 4, -1, -1))
    q, k, v = inputs(length)
    mask = padding(length)
    block_of = torch.arange(length) // block
    allowed = (block_of[None, :] == block_of[:, None]) | (block_of[None, :] == target[block_of][:, None])
    allowed = allowed[None, None] & mask[:, None, None, :]
    scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    expected = (scores.softmax(dim=-1) @ v).nan_to_num()
    torch.testing.assert_close(attend(module, q, k, v, mask), expected)


def loop_reference(module: SinkhornAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Slot by slot: sorted key s of block i is Σ_j P_ij m_j[s] k_j[s] / μ_i[s], weighted by μ_i[s]."""
    batch, heads, length, dim = q.shape
    b = module.block_size
    n_blocks = -(-length // b)
    pad = n_blocks * b - length
    m = torch.cat([mask, torch.zeros(batch, pad, dtype=torch.bool)], dim=-1).view(batch, n_blocks, b)
    qb, kb, vb = (torch.cat([t, t.new_zeros(batch, heads, pad, dim)], dim=-2).view(batch, heads, n_blocks, b, dim) for t in (q, k, v))
    permutation = module.sort_blocks(kb * m[:, None, :, :, None], m[:, None])
    out = torch.zeros_like(qb)
    for n in range(batch):
        for h in range(heads):
            for i in range(n_blocks):
                keys, values, log_weights = [], [], []
                for s in range(b):
                    if m[n, i, s]:
                        keys.append(kb[n, h, i, s]), values.append(vb[n, h, i, s]), log_weights.append(torch.tensor(0.0, dtype=q.dtype))
                for s in range(b):
                    mass = sum(permutation[n, h, i, j] * m[n, j, s] for j in range(n_blocks))
                    if mass > 0:
                        keys.append(sum(permutation[n, h, i, j] * m[n, j, s] * kb[n, h, j, s] for j in range(n_blocks)) / mass)
                        values.append(sum(permutation[n, h, i, j] * m[n, j, s] * vb[n, h, j, s] for j in range(n_blocks)) / mass)
                        log_weights.append(torch.log(mass))
                if not keys:
                    continue
                scores = torch.stack(keys) @ qb[n, h, i].T / math.sqrt(dim) + torch.stack(log_weights)[:, None]
                out[n, h, i] = scores.softmax(dim=0).T @ torch.stack(values)
    return out.view(batch, heads, -1, dim)[:, :, :length]


@pytest.mark.parametrize(("block", "length"), [(4, 16), (5, 22), (3, 7)])
def test_the_soft_permutation_matches_a_slot_by_slot_reference(block: int, length: int) -> None:
    module = build(block_size=block, temperature=2.0, sinkhorn_iterations=3)
    q, k, v = inputs(length)
    mask = padding(length) if length > 12 else torch.ones(2, length, dtype=torch.bool)
    real = mask[:, None, :, None]
    torch.testing.assert_close(attend(module, q, k, v, mask) * real, loop_reference(module, q, k, v, mask) * real)


@pytest.mark.parametrize("gumbel", [False, True])
def test_the_row_by_row_permutation_has_the_gradients_of_autograd_through_the_dense_rounds(gumbel: bool, monkeypatch) -> None:
    """attend forms P a chunk of rows at a time from the Sinkhorn offsets (their own backward);
    the reference runs sinkhorn() on the whole logits under plain autograd."""
    monkeypatch.setattr("plugformer.attention.CHUNK_ELEMENTS", 16)  # many chunks
    module = build(block_size=4, temperature=0.5, sinkhorn_iterations=4, gumbel_noise=gumbel).train()
    q, k, v = (t.requires_grad_() for t in inputs(22))
    mask = padding(22)
    weights = torch.randn(2, 4, 22, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    factored = module.soft_permutation

    def dense(k_blocks, real):
        perm = factored(k_blocks, real)
        x = _normalised_logits(perm.hidden.tensor, perm.w2, perm.noise, perm.temperature)
        return _DensePermutation(sinkhorn(x, module.iterations))

    results = []
    for patch in (False, True):
        if patch:
            monkeypatch.setattr(module, "soft_permutation", dense)
        torch.manual_seed(3)  # the same Gumbel noise
        out = attend(module, q, k, v, mask)
        params = [module.sort_w1, module.sort_b1, module.sort_w2]
        results.append([out, *torch.autograd.grad((out * weights).sum(), [q, k, v, *params])])
    assert results[0][-1].abs().sum() > 0  # the sorting network gets a gradient
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected)


def test_sinkhorn_rows_sum_to_one_and_columns_converge() -> None:
    logits = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    errors = []
    for iterations in (1, 5, 50):
        p = sinkhorn(logits, iterations)
        torch.testing.assert_close(p.sum(-1), torch.ones(3, 6, dtype=torch.float64))
        errors.append(float((p.sum(-2) - 1).abs().max()))
    assert errors[2] < errors[1] < errors[0] and errors[2] < 1e-3, errors


def test_a_low_temperature_approaches_the_best_permutation() -> None:
    target = torch.tensor([2, 0, 3, 1])
    logits = torch.eye(4, dtype=torch.float64)[target] + 0.1 * torch.randn(4, 4, dtype=torch.float64)
    p = sinkhorn(logits / 0.05, 30)
    assert torch.equal(p.argmax(dim=-1), target) and float(p.max(dim=-1).values.min()) > 0.99


def test_gumbel_noise_only_in_training() -> None:
    q, k, v = inputs(12)
    noisy = build(block_size=4, gumbel_noise=True)
    plain = build(block_size=4)
    noisy.train(), plain.train()
    assert not torch.equal(attend(noisy, q, k, v, None), attend(noisy, q, k, v, None))
    assert torch.equal(attend(plain, q, k, v, None), attend(plain, q, k, v, None))
    noisy.eval()
    assert torch.equal(attend(noisy, q, k, v, None), attend(noisy, q, k, v, None))


def test_capabilities_and_the_block_limit(registry) -> None:
    capabilities = registry.get("attention", "sinkhorn").capabilities_for(SinkhornConfig(block_size=8, max_blocks=4))
    assert capabilities.max_length == 32 and capabilities.cost == "n·w"
    assert capabilities.provides == {"bidirectional", "key_padding_mask", "qk_transform"}
    module = build(block_size=8, max_blocks=4)
    module(torch.randn(1, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_blocks=4"):
        module(torch.randn(1, 33, 32, dtype=torch.float64))


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_heads_equal_repeated_key_value_heads(kv_heads: int) -> None:
    grouped = build(n_kv_heads=kv_heads, block_size=4)
    full = build(block_size=4)
    assert grouped.key_value.out_features == 2 * kv_heads * 8
    with torch.no_grad():
        full.load_state_dict({n: t for n, t in grouped.state_dict().items() if not n.startswith("key_value")}, strict=False)
        weight, bias = grouped.key_value.weight.view(2, kv_heads, 8, 32), grouped.key_value.bias.view(2, kv_heads, 8)
        full.key_value.weight.copy_(weight.repeat_interleave(4 // kv_heads, dim=1).reshape(-1, 32))
        full.key_value.bias.copy_(bias.repeat_interleave(4 // kv_heads, dim=1).reshape(-1))
    x = torch.randn(2, 18, 32, dtype=torch.float64)
    torch.testing.assert_close(grouped(x), full(x))


@pytest.mark.parametrize(
    "config",
    [SinkhornConfig(block_size=4), SinkhornConfig(block_size=6, gumbel_noise=True), SinkhornConfig(block_size=3, sinkhorn_iterations=1)],
    ids=["5 blocks", "a padded tail and Gumbel noise", "one Sinkhorn round"],
)
def test_several_blocks_conform(registry, config: SinkhornConfig) -> None:
    check_component(registry.get("attention", "sinkhorn"), config)
