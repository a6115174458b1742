"""Attention.masked_attend: torch's fused SDPA where nothing needs the explicit scores, with
explicit_attend's values and gradients (extra block dimensions, a broadcast mask, queries
that see no key); the explicit path whenever the position adds terms or dropout is active."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import small_context
from plugformer_plugins.attention.local import LocalAttentionConfig, SlidingWindowAttention
from reference_biases import AlibiLikeBias


def _module(**context) -> SlidingWindowAttention:
    return SlidingWindowAttention(LocalAttentionConfig(window=4), small_context(causal=False, **context)).double()


def _inputs() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    # (batch, heads, blocks, rows, head_dim) queries; keys/values of 7 slots per block.
    q = torch.randn(2, 4, 3, 5, 8, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 4, 3, 7, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    allowed = torch.rand(2, 1, 3, 5, 7, generator=generator) > 0.4  # broadcast over heads
    allowed[1, 0, 2, 3] = False  # a query that sees no key: zeros
    q_positions = torch.arange(15).view(1, 3, 5)
    k_positions = torch.arange(21).view(1, 3, 7)
    return [q, k, v], allowed, q_positions, k_positions


def _both(module: SlidingWindowAttention) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    (q, k, v), allowed, q_positions, k_positions = _inputs()
    results = []
    for method in (module.masked_attend, module.explicit_attend):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = method(*leaves, allowed, q_positions, k_positions)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
        results.append([out.detach(), *(t.grad for t in leaves)])
    return results[0], results[1]


def test_fused_path_equals_explicit_attend(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    fused, explicit = _both(_module().eval())
    assert calls, "no position terms, no dropout: the fused kernel runs"
    for a, b in zip(fused, explicit):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert fused[0][1, :, 2, 3].abs().max() == 0


sdpa = F.scaled_dot_product_attention


@pytest.mark.parametrize("case", ["score_bias", "dropout"])
def test_explicit_path_when_scores_are_needed(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: pytest.fail("fused path taken"))
    if case == "score_bias":
        module = SlidingWindowAttention(
            LocalAttentionConfig(window=4), replace(small_context(causal=False), position=AlibiLikeBias(4).double())
        ).double().eval()
        fused, explicit = _both(module)
        for a, b in zip(fused, explicit):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    else:
        module = _module(dropout=0.5).train()
        (q, k, v), allowed, q_positions, k_positions = _inputs()
        torch.manual_seed(1)
        out = module.masked_attend(q, k, v, allowed, q_positions, k_positions)
        torch.manual_seed(1)
        torch.testing.assert_close(out, module.explicit_attend(q, k, v, allowed, q_positions, k_positions), rtol=0, atol=0)
