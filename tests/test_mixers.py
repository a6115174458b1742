"""The short sequence mixers short_conv and token_shift: what they compute, the conformance
kit with non-default options, layer plans with attention, decoding with their state, and
positions in hybrid plans (applied to attention layers, skipped in mixer layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import plugformer
from plugformer import BuildContext, CapabilityError, ConfigError
from plugformer.model.generation import greedy
from plugformer.testing import check_component
from plugformer_plugins.attention import short_conv, token_shift
from plugformer_plugins.attention.sequence_mixer import RecentInputs
from plugformer_plugins.attention.short_conv import ShortConv, ShortConvConfig
from plugformer_plugins.attention.token_shift import TokenShift, TokenShiftConfig

TINY = ["experiment=plain", "model.d_model=32", "model.n_layers=2", "logger=none",
        "data.vocab_size=12", "data.seq_len=8", "data.num_pairs=2", "data.train_examples=32", "data.val_examples=16"]


def context(causal: bool = True, d_model: int = 8) -> BuildContext:
    return BuildContext(d_model=d_model, n_heads=2, n_layers=1, dropout=0.0, causal=causal, max_length=64, vocab_size=16)


@pytest.mark.parametrize(
    "config", [ShortConvConfig(kernel_size=2), ShortConvConfig(kernel_size=3, gate=True, bias=False)], ids=["k2", "k3-gated"]
)
def test_short_conv_conforms_with_options(config: ShortConvConfig) -> None:
    check_component(short_conv.COMPONENT, config)


@pytest.mark.parametrize("fraction", [0.1, 1.0])
def test_token_shift_conforms_with_options(fraction: float) -> None:
    check_component(token_shift.COMPONENT, TokenShiftConfig(fraction=fraction))


@pytest.mark.parametrize("causal", [True, False])
def test_short_conv_is_a_depthwise_convolution(causal: bool) -> None:
    torch.manual_seed(0)
    conv = ShortConv(ShortConvConfig(kernel_size=4, gate=False), context(causal)).eval()
    x = torch.randn(2, 10, 8)
    u = conv.in_proj(x).transpose(1, 2)
    # F.conv1d correlates: kernel slot j meets input t − left + j, the newest tap (weight[0]) last.
    kernel = conv.weight.flip(0).t()[:, None, :]
    left, right = (3, 0) if causal else (2, 1)
    reference = F.conv1d(F.pad(u, (left, right)), kernel, conv.bias, groups=8).transpose(1, 2)
    assert torch.allclose(conv(x), conv.out(reference), atol=1e-6)


def test_token_shift_moves_the_last_channels_by_one_token() -> None:
    shift = TokenShift(TokenShiftConfig(fraction=0.25), context()).eval()
    x = torch.randn(2, 5, 8)
    mixed = shift.mix(F.pad(x, (0, 0, 1, 0)), 5)
    assert torch.equal(mixed[..., :6], x[..., :6])
    assert torch.equal(mixed[:, 1:, 6:], x[:, :-1, 6:]) and (mixed[:, 0, 6:] == 0).all()
    both = TokenShift(TokenShiftConfig(fraction=0.5), context(causal=False)).eval()
    mixed = both.mix(F.pad(x, (0, 0, 1, 1)), 5)
    assert torch.equal(mixed[:, 1:, 4:6], x[:, :-1, 4:6]) and torch.equal(mixed[:, :-1, 6:], x[:, 1:, 6:])


def test_padding_never_reaches_a_real_token_and_left_padding_decodes_as_alone() -> None:
    torch.manual_seed(0)
    conv = ShortConv(ShortConvConfig(kernel_size=3), context()).eval()
    prompt = torch.randn(1, 4, 8)
    padded = torch.cat([torch.randn(1, 3, 8) * 100, prompt], dim=1)
    mask = torch.tensor([[False] * 3 + [True] * 4])
    alone = conv(prompt)
    assert torch.allclose(conv(padded, mask=mask)[:, 3:], alone, atol=1e-5)
    state = conv.new_state(1)
    steps = [conv(padded[:, t : t + 1], mask=mask[:, t : t + 1], state=state) for t in range(7)]
    assert torch.allclose(torch.cat(steps, dim=1)[:, 3:], alone, atol=1e-5)
    assert isinstance(state, RecentInputs) and state.inputs.shape == (1, 2, 8)


def test_the_state_reorders_detaches_and_resets_rows() -> None:
    state = RecentInputs(width=2)
    state.window(torch.arange(12.0).view(3, 2, 2).requires_grad_())
    state.reorder(torch.tensor([2, 0, 0]))
    assert state.inputs[0, 0, 0] == 8 and state.inputs[2, 0, 0] == 0
    state.detach()
    assert not state.inputs.requires_grad
    state.reset(torch.tensor([True, False, False]))
    assert (state.inputs[0] == 0).all() and state.inputs[1].abs().sum() > 0
    assert ShortConv(ShortConvConfig(), context(causal=False)).new_state(2) is None
    assert ShortConv(ShortConvConfig(), context()).new_state(2, streaming=True) is None


def test_hybrid_plans_decode_with_their_state_as_without() -> None:
    for plan in ("[short_conv,full]", "[token_shift,local]"):
        built = plugformer.build(plugformer.compose([*TINY, "model/position=learned", "model.position.max_length=32", f"model.plan.attention={plan}",
                                                     "+model.plan.options.attention.local.window=3"]))
        model = built.model.eval()
        torch.manual_seed(0)
        for parameter in model.parameters():
            parameter.data.add_(torch.randn_like(parameter) * 0.3)
        assert model.incremental_decoding
        prompts = torch.randint(1, 12, (3, 6), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(3, 6, dtype=torch.bool)
        mask[1, :2] = False
        cached = greedy(model, prompts, 8, attention_mask=mask, use_cache=True)
        assert torch.equal(cached, greedy(model, prompts, 8, attention_mask=mask, use_cache=False)), plan


@pytest.mark.parametrize("position", ["alibi", "rope", "t5"])
def test_positions_apply_to_the_attention_layers_of_a_hybrid_plan(position: str) -> None:
    built = plugformer.build(plugformer.compose([*TINY, f"model/position={position}", "model.plan.attention=[short_conv,full]"]))
    mixer, attention = (block.attention for block in built.model.decoder.blocks)
    assert getattr(mixer, "position", None) is None
    assert attention.position is not None
    batch = {"input_ids": torch.randint(1, 12, (2, 10)), "labels": torch.randint(1, 12, (2, 10))}
    before = built.model(batch).logits
    attention.position = None  # the position changes what the attention layer computes
    assert not torch.allclose(before, built.model(batch).logits)


def test_a_hybrid_plan_still_refuses_positions_its_attention_layers_cannot_apply() -> None:
    with pytest.raises(CapabilityError) as refused:
        plugformer.build(plugformer.compose([*TINY, "model/position=alibi", "model.plan.attention=[short_conv,linear]"]))
    message = str(refused.value)
    assert "'alibi' needs score_bias" in message and "'linear'" in message and "layer 1" in message


def test_deepnorm_and_encoders_build_with_mixers() -> None:
    built = plugformer.build(plugformer.compose([*TINY, "model/block=deepnorm", "model.plan.attention=[short_conv,token_shift]"]))
    assert [type(b.attention) for b in built.model.decoder.blocks] == [ShortConv, TokenShift]
    with pytest.raises(ConfigError, match="cross-attention"):
        ShortConv(ShortConvConfig(), BuildContext(d_model=8, n_heads=2, n_layers=1, dropout=0.0, causal=False, max_length=8, vocab_size=8, cross=True))
