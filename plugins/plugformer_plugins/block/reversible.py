"""The reversible block (RevNet, Gomez et al. 2017, as used by the Reformer, Kitaev et al.
2020): on a pair of streams, y1 = x1 + Attention(LN(x2)), y2 = x2 + FFN(LN(y1)).

Consecutive reversible blocks of a stack form one reversible sequence
(:func:`plugformer.run_reversible`): the residual stream enters duplicated (x1 = x2 = x) and
leaves averaged, and every activation is recomputed in the backward pass from the outputs,
so activation memory does not grow with depth. ``ffn_chunks`` runs the feed-forward branch on
that many pieces of the sequence, forward and in the recomputation, bounding its hidden
activations (4·d_model wide in an MLP) to one piece: the Reformer's chunked feed-forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from plugformer import (
    BlockParts,
    BuildContext,
    Capabilities,
    Component,
    ConfigError,
    FeedForward,
    LayerState,
    ReversibleBlock,
    StepInputs,
    bounds,
)


@dataclass
class ReversibleBlockConfig:
    """``ffn_chunks``: pieces of the sequence the feed-forward branch runs on, one at a time."""

    ffn_chunks: int = field(default=1, metadata=bounds(ge=1))


class RevNetBlock(ReversibleBlock):
    """Pre-norm attention and feed-forward branches of a reversible coupling. No
    cross-attention; the feed-forward must report no auxiliary losses (they would be
    computed without a graph, so a mixture of experts' router would get no balance gradient)."""

    def __init__(self, config: ReversibleBlockConfig, ctx: BuildContext, parts: BlockParts) -> None:
        super().__init__(parts)
        if parts.cross_attention is not None:
            raise ConfigError(
                "model/block=reversible has no cross-attention sublayer.",
                expected="a block that provides cross_attention in the decoder of an encoder–decoder",
                fix="choose model/block=standard for the decoder (model.plan.block) or a decoder-only objective",
            )
        if type(parts.ffn).aux_losses is not FeedForward.aux_losses:
            raise ConfigError(
                f"model/block=reversible with the feed-forward {type(parts.ffn).__name__}, which reports auxiliary "
                "losses: the reversible forward pass runs without a graph, so they would get no gradient.",
                expected="a feed-forward without auxiliary losses (mlp, glu)",
                fix="choose model/ffn=mlp or glu, or model/block=standard",
            )
        self.g_chunks = config.ffn_chunks
        self.attention_norm = parts.make_norm()
        self.ffn_norm = parts.make_norm()
        self.drop = nn.Dropout(ctx.dropout)

    def f(self, x: Tensor, inputs: StepInputs, state: LayerState | None) -> Tensor:
        return self.drop(self.self_attend(self.attention_norm(x), inputs, state))

    def g(self, x: Tensor) -> Tensor:
        return self.drop(self.ffn(self.ffn_norm(x)))


COMPONENT = Component(
    kind="block",
    name="reversible",
    factory=RevNetBlock,
    config=ReversibleBlockConfig,
    summary="Reversible residual coupling (RevNet/Reformer): activations recomputed in backward; chunked feed-forward.",
    reference="Gomez et al. 2017, The Reversible Residual Network; Kitaev et al. 2020, Reformer",
    capabilities=Capabilities(),
)
