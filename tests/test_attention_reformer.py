"""Reformer LSH attention against dense references built here with explicit n×n masks:
one bucket and one chunk is full shared-QK attention without self-attention; one bucket and
small chunks is attention within the chunk and the previous one; several buckets and rounds
follow the bucket, chunk, causal, padding and self rules with logsumexp round weights.
Also: exact causality with many buckets, padding, fresh rotations in training and fixed ones
in eval, no n×n tensor at a long length."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import small_context
from plugformer import ConfigError
from plugformer_plugins.attention.reformer import COMPONENT, LSHAttention, ReformerAttentionConfig

D_MODEL, HEADS, BATCH = 32, 4, 2


def build(causal: bool = True, **options) -> LSHAttention:
    torch.manual_seed(0)
    ctx = small_context(causal=causal, d_model=D_MODEL, n_heads=HEADS)
    return COMPONENT.factory(ReformerAttentionConfig(**options), ctx).double().eval()


def padding(length: int) -> torch.Tensor:
    mask = torch.ones(BATCH, length, dtype=torch.bool)
    mask[0, -3:] = False  # right padding
    mask[1, :2] = False  # left padding
    return mask


def projections(module: LSHAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, shared keys (normalized queries) and values, (batch, heads, n, head_dim)."""
    batch, n, _ = x.shape
    head_dim = D_MODEL // HEADS
    q = module.query(x).view(batch, n, HEADS, head_dim).transpose(1, 2)
    v = module.key_value(x)[..., D_MODEL:].view(batch, n, HEADS, head_dim).transpose(1, 2)
    return q, F.normalize(q, dim=-1), v


def dense_round(q, k, v, allowed):
    """Explicit softmax over ``allowed`` with the self rule: (output, logsumexp)."""
    n = q.shape[-2]
    itself = torch.eye(n, dtype=torch.bool)
    others = allowed & ~itself
    allowed = others | (allowed & itself & ~others.any(-1, keepdim=True))
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v, lse


def output(module: LSHAttention, heads_out: torch.Tensor) -> torch.Tensor:
    batch, _, n, _ = heads_out.shape
    return module.out(heads_out.transpose(1, 2).reshape(batch, n, D_MODEL))


def base_mask(n: int, causal: bool, mask: torch.Tensor | None) -> torch.Tensor:
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        allowed = torch.tril(allowed)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :]
    return allowed


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "padding"])
def test_one_bucket_one_chunk_is_full_attention_without_self(causal: bool, masked: bool) -> None:
    n = 12
    module = build(causal, n_buckets=1, chunk_size=n, n_hashes=2)
    x = torch.randn(BATCH, n, D_MODEL, dtype=torch.float64)
    mask = padding(n) if masked else None
    with torch.no_grad():
        got = module(x, mask=mask)
        q, k, v = projections(module, x)
        expected = output(module, dense_round(q, k, v, base_mask(n, causal, mask))[0])
    real = mask[..., None] if mask is not None else torch.ones(1, n, 1, dtype=torch.bool)
    torch.testing.assert_close(got * real, expected * real)
    if causal and not masked:
        # The first token sees only itself: its output is its own value.
        torch.testing.assert_close(got[:, 0], output(module, v)[:, 0])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_one_bucket_attends_within_the_chunk_and_the_previous_one(causal: bool) -> None:
    n, chunk = 14, 4
    module = build(causal, n_buckets=1, chunk_size=chunk, n_hashes=1)
    x = torch.randn(BATCH, n, D_MODEL, dtype=torch.float64)
    block = torch.arange(n) // chunk
    distance = block[:, None] - block[None, :]
    near = (distance == 0) | (distance == 1)
    with torch.no_grad():
        got = module(x)
        q, k, v = projections(module, x)
        expected = output(module, dense_round(q, k, v, base_mask(n, causal, None) & near)[0])
    torch.testing.assert_close(got, expected)


def dense_lsh(module: LSHAttention, x: torch.Tensor, mask: torch.Tensor | None, causal: bool, chunk: int,
              n_buckets: int, rounds: int) -> torch.Tensor:
    """The bucket, chunk, causal, padding and self rules with explicit n×n masks, rounds
    combined by softmax over their logsumexps."""
    n = x.shape[1]
    real = mask if mask is not None else torch.ones(x.shape[:2], dtype=torch.bool)
    q, k, v = projections(module, x)
    rotations = module.rotations(n_buckets, k)
    outputs, lses = [], []
    for r in range(rounds):
        rotated = torch.einsum("bhnd,hdr->bhnr", k, rotations[r])
        buckets = torch.cat([rotated, -rotated], -1).argmax(-1)  # (batch, heads, n)
        same = buckets[..., :, None] == buckets[..., None, :]
        # Rank of each token among the real tokens of its bucket, in sequence order.
        member = same & real[:, None, None, :]
        rank = (member & torch.tril(torch.ones(n, n, dtype=torch.bool), -1)).sum(-1)
        distance = rank[..., :, None] // chunk - rank[..., None, :] // chunk
        near = (distance == 0) | (distance == 1)
        out, lse = dense_round(q, k, v, base_mask(n, causal, mask) & same & near)
        outputs.append(out)
        lses.append(lse)
    weights = torch.softmax(torch.stack(lses), 0).nan_to_num(0.0)
    return output(module, (torch.stack(outputs) * weights[..., None]).sum(0))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_buckets_chunks_and_rounds_match_a_dense_reference(causal: bool) -> None:
    n, chunk, n_buckets, rounds = 24, 3, 4, 3
    module = build(causal, n_buckets=n_buckets, chunk_size=chunk, n_hashes=rounds)
    x = torch.randn(BATCH, n, D_MODEL, dtype=torch.float64)
    mask = padding(n)
    with torch.no_grad():
        got = module(x, mask=mask)
        expected = dense_lsh(module, x, mask, causal, chunk, n_buckets, rounds)
    real = mask[..., None]
    torch.testing.assert_close(got * real, expected * real)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gradients_match_the_dense_reference(causal: bool) -> None:
    """Including the gradient through the round weights (each round's logsumexp)."""
    n, chunk, n_buckets, rounds = 20, 3, 4, 3
    module = build(causal, n_buckets=n_buckets, chunk_size=chunk, n_hashes=rounds)
    x = torch.randn(BATCH, n, D_MODEL, dtype=torch.float64)
    weights = torch.randn(BATCH, n, D_MODEL, dtype=torch.float64)
    params = list(module.parameters())
    got = torch.autograd.grad((module(x.requires_grad_(True)) * weights).sum(), [x, *params], allow_unused=True)
    x = x.detach().requires_grad_(True)
    expected = torch.autograd.grad((dense_lsh(module, x, None, causal, chunk, n_buckets, rounds) * weights).sum(),
                                   [x, *params], allow_unused=True)
    for g, e in zip(got, expected):
        if e is None:  # the unused key rows of key_value
            continue
        torch.testing.assert_close(g, e)


def test_causal_with_many_buckets_is_exactly_causal() -> None:
    """With chunks aligned to buckets, later tokens cannot move earlier tokens' chunks."""
    n = 64
    module = build(True, n_buckets=8, chunk_size=4, n_hashes=2)
    x = torch.randn(BATCH, n, D_MODEL, dtype=torch.float64)
    with torch.no_grad():
        reference = module(x)
        for cut in (5, 20, 40):
            changed = x.clone()
            changed[:, cut:] = torch.randn(BATCH, n - cut, D_MODEL, dtype=torch.float64) * 3
            out = module(changed)
            torch.testing.assert_close(out[:, :cut], reference[:, :cut], rtol=0, atol=1e-12)
            assert not torch.allclose(out[:, cut:], reference[:, cut:])


def test_padded_tokens_change_nothing_at_real_tokens() -> None:
    n = 40
    module = build(False, n_buckets=6, chunk_size=4, n_hashes=3)
    x = torch.randn(BATCH, n, D_MODEL, dtype=torch.float64)
    mask = padding(n)
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 5)
    with torch.no_grad():
        out_a, out_b = module(x, mask=mask), module(noisy, mask=mask)
    assert torch.isfinite(out_a).all()
    real = mask[..., None]
    torch.testing.assert_close(out_a * real, out_b * real, rtol=0, atol=1e-12)


def test_rotations_are_fresh_in_training_and_fixed_in_eval() -> None:
    module = build(True, n_buckets=8, chunk_size=4)
    like = torch.zeros(1, dtype=torch.float64)
    assert torch.equal(module.rotations(8, like), module.rotations(8, like))
    module.train()
    assert not torch.equal(module.rotations(8, like), module.rotations(8, like))
    other_layer = COMPONENT.factory(ReformerAttentionConfig(), small_context(layer_index=1)).eval()
    assert not torch.equal(other_layer.rotations(8, like.float()), build().float().rotations(8, like.float()))


def test_odd_bucket_count_is_refused() -> None:
    with pytest.raises(ConfigError, match="n_buckets=3"):
        build(n_buckets=3)


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_no_tensor_grows_as_n_squared(causal: bool) -> None:
    n, chunk = 2048, 32
    module = build(causal, chunk_size=chunk, n_hashes=2).float().train()
    x = torch.randn(1, n, D_MODEL, requires_grad=True)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, -5:] = False
    with LargestTensor() as probe:
        module(x, mask=mask).sum().backward()
    # Scores per round: heads × (at most 2n slots) × 2·chunk keys; n² per head would be 64× more.
    assert probe.largest <= HEADS * 2 * n * 2 * chunk * 2
    assert probe.largest < HEADS * n * n / 8
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_backward_keeps_the_merged_output_not_the_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside the recomputed chunks autograd keeps one full-size tensor besides the input: the
    merged output, which the output projection reads as a view (the rounds' outputs, and the
    sorted or gathered q, k and v, are never kept whole); with retain_graph a second backward
    through the chunks gives the same gradient."""
    import plugformer.attention as attention_module

    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 64)  # several recomputed ranges per round
    n = 256
    module = build(False, chunk_size=8, n_hashes=3).float().train()
    x = torch.randn(1, n, D_MODEL, requires_grad=True)
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    known = {x.untyped_storage().data_ptr()} | {p.untyped_storage().data_ptr() for p in module.parameters()}
    large = [size for ptr, size in saved.items() if ptr not in known and size >= n * D_MODEL]
    head_dim = D_MODEL // HEADS
    assert large == [(n * D_MODEL + head_dim) * 4]  # n tokens × heads rows and the merge's spare row
    first = torch.autograd.grad(out.sum(), x, retain_graph=True)[0]
    second = torch.autograd.grad(out.sum(), x)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


@pytest.mark.parametrize("n_buckets", [2, 6, 64])
def test_hashing_a_chunk_of_rows_at_a_time_is_the_argmax_over_both_directions(monkeypatch, n_buckets):
    """Buckets are argmax([xR, −xR]) (Kitaev et al. 2020), found as the largest |xR| and its
    sign over chunks of rows (so the rotated keys are never held whole), zero keys included."""
    monkeypatch.setattr("plugformer.attention.CHUNK_ELEMENTS", 16)  # many chunks of rows
    generator = torch.Generator().manual_seed(3)
    keys = F.normalize(torch.randn(2, 3, 101, 8, generator=generator), dim=-1)
    keys[:, :, :2] = 0  # every direction ties: bucket 0, as argmax takes the first
    rotations = torch.randn(3, 8, n_buckets // 2, generator=generator)
    rotated = torch.einsum("bhnd,hdr->bhnr", keys, rotations)
    expected = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    assert torch.equal(LSHAttention.hash(keys, rotations, n_buckets), expected)
