"""plugformer.attention.recomputed_chunks and the attentions built on it: many small chunks give
the same outputs and gradients as one chunk, and nothing a chunk computes is kept for backward."""

from __future__ import annotations

import importlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import plugformer.attention as attention_module
from conftest import small_context
from plugformer.attention import chunk_count, recomputed_chunks
from reference_biases import AlibiLikeBias


class LearnedAlibi(AlibiLikeBias):
    """ALiBi's formula with learned slopes: its gradient must cross the recomputed chunks."""

    def __init__(self, heads: int) -> None:
        super().__init__(heads)
        slopes = self.slopes
        del self.slopes
        self.slopes = nn.Parameter(slopes.clone())


#: Every attention whose attend step runs through recomputed_chunks, with settings that give
#: several blocks at length 40 (and the modes it supports).
CHUNKED = {
    "local": {"window": 5},
    "longformer": {"window": 5, "global_tokens": [0, 7]},
    "linear": {},
    "performer": {"num_features": 16},
    "linformer": {"max_length": 64, "k": 12},
    "sinkhorn": {"block_size": 8, "max_blocks": 8},
    "sparse_strided": {"stride": 8},
    "sparse_fixed": {"block": 8, "summary": 2},
    "bigbird": {"block_size": 8},
    "reformer": {"chunk_size": 4, "n_hashes": 2},
}


def _component(name: str):  # the module's COMPONENT: no registry (and its config store) per run
    return importlib.import_module(f"plugformer_plugins.attention.{name}").COMPONENT


def _mask(length: int) -> Tensor:
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, :3] = False
    mask[1, -4:] = False
    return mask


def _run(name: str, causal: bool, budget: int, monkeypatch: pytest.MonkeyPatch, *, bias: bool) -> list[Tensor]:
    """Output, input gradient and every parameter gradient (the bias's included) with chunks of
    about ``budget`` score elements."""
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", budget)
    component = _component(name)
    config = component.config(**CHUNKED[name])
    torch.manual_seed(0)
    position = LearnedAlibi(4).double() if bias else None
    attention = component.factory(config, replace(small_context(causal=causal, d_model=32, n_heads=4), position=position)).double()
    attention.eval()  # reformer: the fixed evaluation rotations, so both runs hash alike
    x = torch.randn(2, 40, 32, dtype=torch.double, requires_grad=True)
    out = attention(x, mask=_mask(40))
    out.backward(torch.randn_like(out))
    grads = [p.grad for p in attention.parameters()] + ([position.slopes.grad] if bias else [])
    return [out.detach(), x.grad, *(g for g in grads if g is not None)]


@pytest.mark.parametrize("name", sorted(CHUNKED))
def test_many_chunks_equal_one_chunk(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    provides = _component(name).capabilities_for().provides
    for causal in (False, True):
        if ("causal" if causal else "bidirectional") not in provides:
            continue
        bias = "score_bias" in provides
        whole = _run(name, causal, 2**30, monkeypatch, bias=bias)
        pieces = _run(name, causal, 1, monkeypatch, bias=bias)  # one block, row or round per chunk
        assert len(whole) == len(pieces)
        for a, b in zip(whole, pieces):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)
        if bias:
            assert pieces[-1].abs().sum() > 0  # the learned bias got a gradient through the chunks


def test_chunk_intermediates_are_not_kept() -> None:
    """Autograd keeps only what lies outside the chunks: no (rows × keys) scores."""
    q = torch.randn(64, 8, requires_grad=True)
    k = torch.randn(64, 8, requires_grad=True)
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.numel())
        return t

    def rows(start: int, stop: int) -> Tensor:
        return torch.softmax(q[start:stop] @ k.T, dim=-1) @ k

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain = torch.softmax(q @ k.T, dim=-1) @ k
    assert max(saved) == 64 * 64  # the plain computation keeps its scores
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        chunked = recomputed_chunks(rows, 64, 16, dim=0)
    assert saved == []
    torch.testing.assert_close(chunked, plain)
    (g_plain_q, g_plain_k), (g_q, g_k) = (torch.autograd.grad(y.sum(), (q, k)) for y in (plain, chunked))
    torch.testing.assert_close(g_q, g_plain_q)
    torch.testing.assert_close(g_k, g_plain_k)


def test_sum_mode_and_dropout_replay() -> None:
    x = torch.randn(30, 4, requires_grad=True)
    total = recomputed_chunks(lambda a, b: x[a:b].square().sum(dim=0), 30, 7, dim=None)
    torch.testing.assert_close(total, x.square().sum(dim=0))
    # The recomputation replays the same dropout mask: the gradient is exactly mask/(1 − p).
    torch.manual_seed(3)
    out = recomputed_chunks(lambda a, b: F.dropout(x[a:b], p=0.5), 30, 7, dim=0)
    (grad,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(grad, (out != 0).to(grad.dtype) * 2.0)
    with torch.no_grad():
        assert recomputed_chunks(lambda a, b: x[a:b] * 2, 30, 7, dim=0).grad_fn is None


def test_chunk_count_bounds() -> None:
    assert chunk_count(100, 10, budget=35) == 3
    assert chunk_count(100, 1000, budget=35) == 1  # at least one item
    assert chunk_count(5, 1, budget=1000) == 5  # at most all of them
    # The budget is per (batch, head) slice: 8 slices, each item 8× larger, the same chunk length.
    assert chunk_count(100, 8 * 10, slices=8, budget=35) == 3
    with pytest.raises(ValueError, match="step ≥ 1"):
        recomputed_chunks(lambda a, b: torch.zeros(1), 3, 0, dim=0)
