"""ScaleNorm (Nguyen & Salazar 2019) and the DeepNorm block (Wang et al. 2022) against their
papers: ScaleNorm's formula and initial gain; DeepNorm's x ← LN(α·x + G(x)) in every
sublayer and its β-scaled Xavier initialization in decoder-only and encoder–decoder models."""

from __future__ import annotations

import math

import pytest
import torch

import plugformer
from conftest import small_context
from plugformer import StepInputs
from plugformer.testing import check_component
from plugformer.training.optim import parameter_groups
from plugformer_plugins.block.deepnorm import DeepNormBlock, deepnorm_gains
from plugformer_plugins.norm.scalenorm import COMPONENT as SCALENORM, ScaleNorm, ScaleNormConfig

SMALL = ["experiment=plain", "data.train_examples=64", "data.val_examples=32", "data.batch_size=16", "logger=none"]


# --- ScaleNorm --------------------------------------------------------------------------------
def test_scalenorm_scales_every_token_to_length_g_initialized_to_sqrt_d() -> None:
    norm = ScaleNorm(ScaleNormConfig(), small_context(d_model=32))
    assert norm.gain.shape == () and norm.gain.item() == pytest.approx(math.sqrt(32))
    x = torch.randn(2, 5, 32) * 3 + 1
    y = norm(x)
    torch.testing.assert_close(y, math.sqrt(32) * x / x.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(y.norm(dim=-1), torch.full((2, 5), math.sqrt(32)))
    assert ScaleNorm(ScaleNormConfig(init=2.0), small_context()).gain.item() == 2.0


def test_scalenorm_keeps_zero_tokens_zero_and_low_precision_dtypes() -> None:
    norm = ScaleNorm(ScaleNormConfig(), small_context())
    assert torch.equal(norm(torch.zeros(1, 3, 32)), torch.zeros(1, 3, 32))
    y = norm(torch.randn(1, 3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_scalenorm_conforms_and_trains_in_a_model_without_weight_decay_on_its_gain() -> None:
    check_component(SCALENORM)
    check_component(SCALENORM, ScaleNormConfig(init=1.0, eps=1e-3))
    built = plugformer.build(plugformer.compose([*SMALL, "model.d_model=32", "model/norm=scalenorm"]))
    norms = [m for m in built.model.modules() if isinstance(m, ScaleNorm)]
    assert len(norms) == 2 * built.cfg.model.n_layers + 1, "two per pre-norm block and the final norm"
    no_decay = {id(p) for p in parameter_groups(built.model, 0.1)[1]["params"]}
    assert all(id(norm.gain) in no_decay for norm in norms)


# --- DeepNorm ---------------------------------------------------------------------------------
def xavier_std(weight: torch.Tensor) -> float:
    fan_out, fan_in = weight.shape
    return math.sqrt(2.0 / (fan_in + fan_out))


def test_deepnorm_block_computes_layer_norm_of_alpha_x_plus_the_sublayer() -> None:
    built = plugformer.build(plugformer.compose([*SMALL, "model.d_model=32", "model/block=deepnorm", "model.n_layers=3"]))
    block = built.model.decoder.blocks[1].eval()
    assert isinstance(block, DeepNormBlock) and block.alpha == pytest.approx((2 * 3) ** 0.25)
    x = torch.randn(2, 7, 32)
    inputs = StepInputs(mask=None, positions=torch.arange(7)[None], context=None, context_mask=None, extras={})
    with torch.no_grad():
        h = block.norms["attention"](block.alpha * x + block.self_attend(x, inputs, None))
        expected = block.norms["ffn"](block.alpha * h + block.ffn(h))
        torch.testing.assert_close(block(x, inputs), expected)


def test_deepnorm_initializes_ffn_value_and_output_with_gain_beta_and_query_key_with_gain_one() -> None:
    built = plugformer.build(plugformer.compose([*SMALL, "model.d_model=64", "model/block=deepnorm", "model.n_layers=6"]))
    _, beta = deepnorm_gains("decoder", 0, 6)
    for block in built.model.decoder.blocks:
        assert block.beta == pytest.approx(beta)
        weights = block.attention.projection_weights()
        for role, gain in (("query", 1.0), ("key", 1.0), ("value", beta), ("output", beta)):
            assert weights[role].std().item() == pytest.approx(gain * xavier_std(weights[role]), rel=0.15), role
        for linear in (block.ffn.up, block.ffn.down):  # both FFN matrices, the residual one unscaled by depth
            assert linear.weight.std().item() == pytest.approx(beta * xavier_std(linear.weight), rel=0.15)


def test_deepnorm_encoder_decoder_uses_each_stacks_gains_and_scales_the_cross_attention() -> None:
    n = m = 2
    built = plugformer.build(
        plugformer.compose(
            ["experiment=reverse_small", "model/block=deepnorm", f"model.n_layers={n}", "model.d_model=64",
             "data.train_examples=64", "data.val_examples=16", "data.test_examples=16", "logger=none"]
        )
    )
    assert isinstance(built.model.decoder.final_norm, torch.nn.Identity)
    assert isinstance(built.model.encoder.final_norm, torch.nn.Identity)
    encoder_alpha, encoder_beta = 0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)
    decoder_alpha, decoder_beta = (3 * m) ** 0.25, (12 * m) ** -0.25
    for block in built.model.encoder.blocks:
        assert (block.alpha, block.beta) == pytest.approx((encoder_alpha, encoder_beta))
        assert block.ffn.up.weight.std().item() == pytest.approx(encoder_beta * xavier_std(block.ffn.up.weight), rel=0.15)
    for block in built.model.decoder.blocks:
        assert (block.alpha, block.beta) == pytest.approx((decoder_alpha, decoder_beta))
        assert set(block.norms) == {"attention", "cross_attention", "ffn"}, "a post-norm after each sublayer"
        weights = block.cross_attention.projection_weights()
        for role, gain in (("query", 1.0), ("value", decoder_beta), ("output", decoder_beta)):
            assert weights[role].std().item() == pytest.approx(gain * xavier_std(weights[role]), rel=0.15), role
