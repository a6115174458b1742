"""The block contract: how a layer wires its sublayers (attention, optional cross-attention,
feed-forward) with residuals and norms. Blocks are components of kind ``block``
(``model/block=standard|parallel|deepnorm|...``); their factory receives the built
sublayers, ``factory(config, ctx, parts)``, so a block never builds an attention itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from plugformer.attention import Attention, AttentionState
from plugformer.components import FeedForward


@dataclass
class BlockParts:
    """The sublayers of one layer: its attention, its feed-forward layer, its
    cross-attention (decoder layers of an encoder–decoder; else None) and a factory of fresh
    norm modules (the run's norm component)."""

    attention: Attention
    ffn: FeedForward
    make_norm: Callable[[], nn.Module]
    cross_attention: Attention | None = None


@dataclass(frozen=True)
class StepInputs:
    """What every layer of a stack sees in one forward pass: the padding ``mask`` and
    ``positions`` of its tokens, the encoder output ``context`` with ``context_mask`` for
    cross-attention, and the objective's ``extras``."""

    mask: Tensor | None
    positions: Tensor
    context: Tensor | None = None
    context_mask: Tensor | None = None
    extras: Mapping[str, Tensor] = field(default_factory=dict)


@dataclass
class LayerState:
    """The states of one layer's attentions (None where an attention keeps none)."""

    attention: AttentionState | None = None
    cross_attention: AttentionState | None = None

    def states(self) -> list[AttentionState]:
        return [s for s in (self.attention, self.cross_attention) if s is not None]


class Block(nn.Module):
    """One layer: ``forward(x, inputs, state=None)`` → x's shape.

    Subclasses wire the sublayers; :meth:`self_attend` and :meth:`cross_attend` call them with
    everything they need. ``final_norm`` says whether the stack needs a norm after its last
    block (pre-norm wirings do; post-norm ones already end in a norm).
    """

    final_norm: bool = True

    def __init__(self, parts: BlockParts) -> None:
        super().__init__()
        self.attention = parts.attention
        self.ffn = parts.ffn
        self.cross_attention = parts.cross_attention

    def forward(self, x: Tensor, inputs: StepInputs, state: LayerState | None = None) -> Tensor:
        raise NotImplementedError

    def self_attend(self, h: Tensor, inputs: StepInputs, state: LayerState | None) -> Tensor:
        return self.attention(
            h,
            mask=inputs.mask,
            positions=inputs.positions,
            state=state.attention if state is not None else None,
            extras=inputs.extras,
        )

    def cross_attend(self, h: Tensor, inputs: StepInputs, state: LayerState | None) -> Tensor:
        assert self.cross_attention is not None
        return self.cross_attention(
            h,
            mask=inputs.mask,
            positions=inputs.positions,
            context=inputs.context,
            context_mask=inputs.context_mask,
            state=state.cross_attention if state is not None else None,
            extras=inputs.extras,
        )

    def new_state(self, batch_size: int, *, streaming: bool = False) -> LayerState:
        cross = self.cross_attention
        return LayerState(
            attention=self.attention.new_state(batch_size, streaming=streaming),
            cross_attention=cross.new_state(batch_size, streaming=streaming) if cross is not None else None,
        )
