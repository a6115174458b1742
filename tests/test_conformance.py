"""Every registered component passes the conformance kit (a newly registered plugin is
checked without writing a test), and the kit really catches broken components."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from torch import Tensor, nn

from plugformer import (
    Attention,
    AttentionState,
    Block,
    BuildContext,
    Capabilities,
    Component,
    FeedForward,
    KVCache,
    PositionEncoding,
    causal_allowed,
)
from plugformer.plugins import load_plugins
from plugformer.testing import check_component

COMPONENTS = load_plugins().registry.components()


@pytest.mark.parametrize("component", COMPONENTS, ids=[c.qualified_name for c in COMPONENTS])
def test_registered_component_conforms(component: Component) -> None:
    check_component(component)


# --- Deliberately broken components -------------------------------------------------------


@dataclass
class NoOptions:
    pass


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, *, guard_empty_rows: bool = True) -> Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if guard_empty_rows:
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def visible(q: Tensor, key_padding_mask: Tensor | None, *, causal: bool, padding: bool, k: Tensor | None = None) -> Tensor:
    q_length = q.shape[-2]
    k_length = q_length if k is None else k.shape[-2]
    allowed = causal_allowed(q_length, k_length, q.device) if causal else torch.ones(q_length, k_length, dtype=torch.bool)
    if padding and key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


class FutureLeakingAttention(Attention):
    """Claims to be causal but lets every query see every key."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        return softmax_attention(q, k, v, visible(q, key_padding_mask, causal=False, padding=True))


class MaskIgnoringAttention(Attention):
    """Claims key padding support but attends to padded keys too."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        return softmax_attention(q, k, v, visible(q, key_padding_mask, causal=self.causal, padding=False))


class EmptyRowNaNAttention(Attention):
    """Right about masks, but a query with no visible key (a padded one) gets NaN."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        allowed = visible(q, key_padding_mask, causal=self.causal, padding=True)
        return softmax_attention(q, k, v, allowed, guard_empty_rows=False)


class BiasIgnoringAttention(Attention):
    """Claims score_bias support but never asks the position for a bias."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        return softmax_attention(q, k, v, visible(q, key_padding_mask, causal=self.causal, padding=True))


class CorrectAttention(Attention):
    """Softmax attention that gets everything right, for subclasses to break one thing."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        allowed = visible(q, key_padding_mask, causal=self.causal, padding=True, k=k)
        return self.explicit_attend(q, k, v, allowed[None, None] if allowed.dim() == 2 else allowed, q_positions, k_positions)


class OffsetForgettingAttention(CorrectAttention):
    """Its cache forgets the offset: every call restarts the positions at 0 (right for one
    forward pass over the whole sequence, wrong for token-by-token decoding)."""

    def forward(self, x, *, positions=None, **kwargs):
        return super().forward(x, positions=torch.arange(x.shape[1])[None, :], **kwargs)


class ForgetfulStateAttention(CorrectAttention):
    """Declares incremental decoding, but its state keeps nothing: each call sees only its own tokens."""

    def new_state(self, batch_size, *, streaming=False):
        return None if streaming else _EmptyState()


class _EmptyState(AttentionState):
    def reorder(self, index):
        pass


class SharedLengthAttention(CorrectAttention):
    """Counts the tokens decoded on the module instead of the state (one length for every
    sequence and layer), so two sequences decoded in turn get wrong positions."""

    decoded = 0

    def forward(self, x, *, positions=None, state=None, **kwargs):
        if state is not None:
            positions = torch.arange(self.decoded, self.decoded + x.shape[1])[None, :]
            self.decoded += x.shape[1]
        return super().forward(x, positions=positions, state=state, **kwargs)


class BeamIgnoringAttention(CorrectAttention):
    """Its cache cannot be reordered: beam search continues every row from the wrong history."""

    def new_state(self, batch_size, *, streaming=False):
        return None if streaming else _UnorderedCache()


class _UnorderedCache(KVCache):
    def reorder(self, index):
        pass


class FullHeadedKeyValues(CorrectAttention):
    """Ignores n_kv_heads: projects keys and values to every query head."""

    def __init__(self, ctx):
        super().__init__(replace(ctx, n_kv_heads=None))


class ContextMaskIgnoringAttention(CorrectAttention):
    """As a cross-attention, attends to padded context tokens too."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        return super().attend(q, k, v, key_padding_mask=None if self.cross else key_padding_mask,
                              q_positions=q_positions, k_positions=k_positions)


class CrossIgnoringBlock(Block):
    """Pre-norm, but never calls its cross-attention."""

    def __init__(self, parts):
        super().__init__(parts)
        self.norm1, self.norm2 = parts.make_norm(), parts.make_norm()

    def forward(self, x, inputs, state=None):
        x = x + self.self_attend(self.norm1(x), inputs, state)
        return x + self.ffn(self.norm2(x))


class PositionDroppingBlock(CrossIgnoringBlock):
    """Calls its attention without the positions: right for whole sequences, wrong when decoding."""

    def forward(self, x, inputs, state=None):
        h = self.norm1(x)
        x = x + self.attention(h, mask=inputs.mask, state=state.attention if state is not None else None)
        return x + self.ffn(self.norm2(x))


class MaskDroppingBlock(CrossIgnoringBlock):
    """Calls its attention without the key padding mask."""

    def forward(self, x, inputs, state=None):
        h = self.norm1(x)
        x = x + self.attention(h, positions=inputs.positions, state=state.attention if state is not None else None)
        return x + self.ffn(self.norm2(x))


class TokenMixingFFN(FeedForward):
    """Adds the mean over the sequence: not position-wise (and leaks the future)."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.proj = nn.Linear(ctx.d_model, ctx.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x + x.mean(dim=1, keepdim=True))


class RandomBufferFFN(FeedForward):
    """Draws a random projection it never saves: a checkpoint cannot restore it."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.proj = nn.Linear(ctx.d_model, ctx.d_model)
        self.register_buffer("features", torch.randn(ctx.d_model, ctx.d_model), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x @ self.features)


class DetachedScaleFFN(FeedForward):
    """Uses its scale only through .detach(): the scale never learns."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.proj = nn.Linear(ctx.d_model, ctx.d_model)
        self.scale = nn.Parameter(torch.ones(ctx.d_model))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) * self.scale.detach()


class BatchStatisticsNorm(nn.Module):
    """Normalizes each position with statistics over the batch (as BatchNorm does)."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ctx.d_model))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(dim=0)) / (x.std(dim=0, correction=0) + 1e-5) * self.weight


class IndexBias(PositionEncoding):
    """A score bias from indices 0..L−1 instead of the positions it is given: right for whole
    sequences, wrong for the blocks of a blockwise attention."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.n_heads = ctx.n_heads

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        q = torch.arange(q_positions.shape[-1]).expand(q_positions.shape)
        k = torch.arange(k_positions.shape[-1]).expand(k_positions.shape)
        distance = (q[..., :, None] - k[..., None, :]).abs().float().unsqueeze(1)
        return -distance.expand(distance.shape[0], self.n_heads, *distance.shape[2:])


class UndeclaredEmbedding(PositionEncoding):
    """Adds input embeddings without declaring input_embedding."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.d_model = ctx.d_model

    def embed(self, positions: Tensor) -> Tensor:
        return torch.zeros(positions.shape[0], self.d_model)


def broken(kind: str, name: str, factory, provides=()) -> Component:
    return Component(
        kind=kind,
        name=name,
        factory=factory,
        config=NoOptions,
        summary=f"Deliberately broken: {name}.",
        capabilities=Capabilities(provides=set(provides)),
    )


ATTENTION_FLAGS = {"causal", "bidirectional", "key_padding_mask"}
DECODING_FLAGS = ATTENTION_FLAGS | {"score_bias", "qk_transform", "incremental_decoding"}

BROKEN = {
    "attention leaks the future": (
        broken("attention", "future_leak", lambda config, ctx: FutureLeakingAttention(ctx), {"causal", "key_padding_mask"}),
        "causality",
    ),
    "attention ignores the key padding mask": (
        broken("attention", "mask_ignoring", lambda config, ctx: MaskIgnoringAttention(ctx), ATTENTION_FLAGS),
        "key padding mask",
    ),
    "attention gives NaN for queries without keys": (
        broken("attention", "empty_row_nan", lambda config, ctx: EmptyRowNaNAttention(ctx), ATTENTION_FLAGS),
        "NaN",
    ),
    "attention ignores the score bias": (
        broken("attention", "bias_ignoring", lambda config, ctx: BiasIgnoringAttention(ctx), ATTENTION_FLAGS | {"score_bias"}),
        "score bias is applied",
    ),
    "attention ignores the relative terms": (
        broken("attention", "relative_ignoring", lambda config, ctx: BiasIgnoringAttention(ctx), ATTENTION_FLAGS | {"relative_terms"}),
        "relative terms is applied",
    ),
    "attention cache forgets the position offset": (
        broken("attention", "offset_forgetting", lambda config, ctx: OffsetForgettingAttention(ctx), DECODING_FLAGS),
        "incremental decoding",
    ),
    "attention state keeps nothing": (
        broken("attention", "forgetful_state", lambda config, ctx: ForgetfulStateAttention(ctx), ATTENTION_FLAGS | {"incremental_decoding"}),
        "incremental decoding, token by token",
    ),
    "attention counts decoded tokens on the module": (
        broken("attention", "shared_length", lambda config, ctx: SharedLengthAttention(ctx), DECODING_FLAGS),
        "incremental decoding, token by token",
    ),
    "attention state ignores a beam-search reorder": (
        broken("attention", "beam_ignoring", lambda config, ctx: BeamIgnoringAttention(ctx), ATTENTION_FLAGS | {"incremental_decoding"}),
        "incremental decoding, beam-search reorder",
    ),
    "attention ignores n_kv_heads": (
        broken("attention", "full_headed", lambda config, ctx: FullHeadedKeyValues(ctx), ATTENTION_FLAGS),
        "key/value projection",
    ),
    "cross-attention ignores the context mask": (
        broken("attention", "context_mask_ignoring", lambda config, ctx: ContextMaskIgnoringAttention(ctx), ATTENTION_FLAGS | {"cross_attention"}),
        "cross-attention): context mask",
    ),
    "block ignores its cross-attention": (
        broken("block", "cross_ignoring", lambda config, ctx, parts: CrossIgnoringBlock(parts), {"cross_attention"}),
        "cross-attention",
    ),
    "block drops the positions": (
        broken("block", "position_dropping", lambda config, ctx, parts: PositionDroppingBlock(parts)),
        "incremental decoding",
    ),
    "block drops the key padding mask": (
        broken("block", "mask_dropping", lambda config, ctx, parts: MaskDroppingBlock(parts)),
        "key padding mask",
    ),
    "ffn mixes tokens": (broken("ffn", "token_mixing", lambda config, ctx: TokenMixingFFN(ctx)), "position-wise"),
    "ffn loses state in checkpoints": (
        broken("ffn", "random_buffer", lambda config, ctx: RandomBufferFFN(ctx)),
        "state_dict round trip",
    ),
    "ffn parameter gets no gradient": (
        broken("ffn", "detached_scale", lambda config, ctx: DetachedScaleFFN(ctx)),
        "gradients: parameter 'scale'",
    ),
    "norm uses batch statistics": (
        broken("norm", "batch_statistics", lambda config, ctx: BatchStatisticsNorm(ctx)),
        "batch independence",
    ),
    "score bias ignores the positions it is given": (
        broken("position", "index_bias", lambda config, ctx: IndexBias(ctx), {"score_bias"}),
        "score_bias",
    ),
    "position embeds without declaring it": (
        broken("position", "undeclared_embedding", lambda config, ctx: UndeclaredEmbedding(ctx)),
        "input_embedding",
    ),
}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("standard", {"placement": "post"}),
        ("standard", {"placement": "sandwich"}),
        ("parallel", {"shared_norm": False}),
        ("deepnorm", {"alpha": 1.5, "beta": 0.5}),
    ],
    ids=["standard post", "standard sandwich", "parallel separate norms", "deepnorm given gains"],
)
def test_block_options_conform(registry, name: str, options: dict) -> None:
    """The registered blocks conform with their default options (above) and these."""
    component = registry.get("block", name)
    check_component(component, component.config(**options))


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_kit_catches_a_broken_component(case: str) -> None:
    component, check = BROKEN[case]
    with pytest.raises(AssertionError) as failure:
        check_component(component)
    message = str(failure.value)
    assert component.qualified_name in message and check in message, message


def test_the_kit_leaves_threads_and_random_state_alone(registry) -> None:
    component = registry.get("attention", "full")
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    check_component(component)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)
