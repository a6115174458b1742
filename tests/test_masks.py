"""plugformer.allowed_keys and no_key_fallback: the causal/padding mask every softmax
attention needs, and the fix for queries that see no key; and the example plugin built on
them passing the kit."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from plugformer import allowed_keys, no_key_fallback
from plugformer.attention import causal_allowed

TOY_PLUGIN = Path(__file__).parent / "fixtures" / "toy_plugin"


def test_causal_mask_puts_the_queries_at_the_end_of_the_keys() -> None:
    allowed = allowed_keys(2, 4, causal=True)
    assert allowed.shape == (1, 1, 2, 4)
    assert allowed[0, 0].tolist() == [[True, True, True, False], [True, True, True, True]]
    assert torch.equal(allowed[0, 0], causal_allowed(2, 4))


def test_padding_mask_is_true_for_real_keys_and_broadcasts_over_heads() -> None:
    mask = torch.tensor([[True, True, False], [False, True, True]])
    allowed = allowed_keys(3, 3, causal=False, key_padding_mask=mask)
    assert allowed.shape == (2, 1, 3, 3)
    assert allowed[0, 0, 1].tolist() == [True, True, False]
    assert allowed[1, 0, 0].tolist() == [False, True, True]
    causal = allowed_keys(3, 3, causal=True, key_padding_mask=mask)
    assert causal[1, 0, 0].tolist() == [False, False, False]  # left padding: sees nothing


def test_fallback_lets_blind_rows_see_everything_and_marks_them() -> None:
    mask = torch.tensor([[False, True, True]])
    allowed = allowed_keys(3, 3, causal=True, key_padding_mask=mask)
    safe, visible = no_key_fallback(allowed)
    assert visible[0, 0, :, 0].tolist() == [False, True, True]
    assert safe[0, 0, 0].tolist() == [True, True, True]
    assert torch.equal(safe[0, 0, 1:], allowed[0, 0, 1:])
    scores = torch.randn(1, 2, 3, 3).masked_fill(~safe, float("-inf"))
    out = (scores.softmax(-1) @ torch.randn(1, 2, 3, 4)) * visible
    assert torch.isfinite(out).all() and not out[0, :, 0].any()


def test_full_attention_returns_zeros_for_a_fully_padded_example(registry) -> None:
    from conftest import small_context

    torch.manual_seed(0)
    attention = registry.get("attention", "full").factory(registry.get("attention", "full").config(), small_context()).eval()
    mask = torch.tensor([[True] * 5, [False] * 5])
    out = attention.attend(*(torch.randn(2, 4, 5, 8) for _ in range(3)), key_padding_mask=mask,
                           q_positions=torch.arange(5)[None], k_positions=torch.arange(5)[None])
    assert torch.isfinite(out).all() and not out[1].any() and out[0].abs().sum() > 0


def test_the_example_plugin_passes_its_own_tests_in_process() -> None:
    """The example plugin's tests, here without installing it (tests/test_third_party_plugin.py
    runs them where it is installed)."""
    sys.path.insert(0, str(TOY_PLUGIN))
    try:
        module = importlib.import_module("plugformer_toy_attention")
        from plugformer.testing import check_component

        check_component(module.COMPONENT)
        check_component(module.COMPONENT, module.CosineAttentionConfig(initial_temperature=1.0))
    finally:
        sys.path.remove(str(TOY_PLUGIN))
        sys.modules.pop("plugformer_toy_attention", None)
