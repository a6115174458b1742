"""Causal linear and Performer attention in groups of chunks with a carried state (memory
linear in the length): equal to the unchunked quadratic formula, outputs and gradients."""

from __future__ import annotations

import importlib

import pytest
import torch

import plugformer.attention as attention_module
from conftest import small_context
from plugformer_plugins.attention.linear import feature_map


def _quadratic(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, *, eps: float) -> torch.Tensor:
    """Σ_{j≤i} (φq_i·φk_j) v_j / (Σ_{j≤i} φq_i·φk_j + eps), the n × n matrix formed explicitly."""
    weights = (phi_q @ phi_k.transpose(-1, -2)).tril()
    return (weights @ v) / (weights.sum(dim=-1, keepdim=True) + eps)


@pytest.mark.parametrize("name", ["linear", "performer"])
def test_grouped_causal_equals_quadratic(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A budget of a few tokens per group: 37 tokens in chunks of 4 give many groups and a
    # ragged last chunk and group.
    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 250)  # per (batch, head) slice
    component = importlib.import_module(f"plugformer_plugins.attention.{name}").COMPONENT
    config = component.config(chunk_size=4, **({"num_features": 16} if name == "performer" else {}))
    torch.manual_seed(0)
    attention = component.factory(config, small_context(causal=True, d_model=32, n_heads=4)).double()
    q, k, v = (torch.randn(2, 4, 37, 8, dtype=torch.double, requires_grad=True) for _ in range(3))
    positions = torch.arange(37)[None]
    out = attention.attend(q, k, v, key_padding_mask=None, q_positions=positions, k_positions=positions)
    if name == "linear":  # float32 features (feature_map's contract), eps added to the normalizer
        reference = _quadratic(feature_map(q), feature_map(k), v.float(), eps=config.eps).to(out.dtype)
    else:
        phi_q, phi_k = attention.feature_maps(q, k, None)
        reference = _quadratic(phi_q, phi_k, v, eps=0.0)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(out)
    mine = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(reference, (q, k, v), grad)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
