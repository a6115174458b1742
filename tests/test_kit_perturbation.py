"""The kit checks moved weights, not only freshly initialized ones: a leak hidden behind an
identity-initialized mixing matrix passes on fresh weights and is caught once the kit
perturbs the parameters (as training would)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

from plugformer import Attention, BuildContext, Capabilities, Component, allowed_keys, no_key_fallback
from plugformer.testing import _support, check_component


@dataclass
class TokenMixingConfig:
    pass


class TokenMixingAttention(Attention):
    """Causal softmax attention that first mixes the values along the sequence with a learned
    (max_length × max_length) matrix initialized to the identity, "so that it starts as plain
    attention". The mixing is not causal: once the matrix moves off the identity, every
    output sees later tokens. Deliberately broken."""

    def __init__(self, config: TokenMixingConfig, ctx: BuildContext) -> None:
        super().__init__(ctx)
        self.mixing = nn.Parameter(torch.eye(ctx.max_length))

    def init_weights(self) -> None:
        with torch.no_grad():
            self.mixing.copy_(torch.eye(self.mixing.shape[0]))  # the last word after a model's init

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, q_positions: Tensor,
               k_positions: Tensor, state: object = None) -> Tensor:
        length = v.shape[-2]
        v = self.mixing[:length, :length].to(v.dtype) @ v  # the leak: row i mixes every j
        allowed, visible = no_key_fallback(
            allowed_keys(q.shape[-2], k.shape[-2], causal=self.causal, key_padding_mask=key_padding_mask, device=q.device)
        )
        scores = (q * self.scale) @ k.transpose(-1, -2)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        return (weights @ v) * visible


LEAKY = Component(
    kind="attention", name="token_mixing", factory=TokenMixingAttention, config=TokenMixingConfig,
    summary="test: leaks the future through identity-initialized value mixing",
    capabilities=Capabilities(provides={"causal", "key_padding_mask"}),
)


def test_the_leak_passes_on_fresh_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_support, "PERTURBATION", 0.0)
    check_component(LEAKY)  # the kit as it was: nothing moves, nothing leaks


def test_the_leak_is_caught_once_the_kit_perturbs_the_weights() -> None:
    with pytest.raises(AssertionError) as error:
        check_component(LEAKY)
    message = str(error.value)
    assert "attention:token_mixing" in message and "causality" in message


def test_perturbation_moves_trainable_parameters_only_and_is_seeded() -> None:
    module = nn.Linear(3, 3)
    module.weight.requires_grad_(False)
    module.register_buffer("table", torch.zeros(2))
    weight, bias = module.weight.clone(), module.bias.clone()
    with _support.seeded(0):
        _support.perturb_parameters(module, 0.02)
    assert torch.equal(module.weight, weight) and not module.table.any()
    moved = (module.bias - bias).detach()
    assert 0 < float(moved.abs().max()) < 0.2
    again = nn.Linear(3, 3)
    again.weight.requires_grad_(False)
    again.bias.data.copy_(bias)
    with _support.seeded(0):
        _support.perturb_parameters(again, 0.02)
    assert torch.equal(again.bias, module.bias)
