"""The parallel block (GPT-J, Wang & Komatsuzaki 2021; PaLM, Chowdhery et al. 2022):
attention and feed-forward read the same normalized input, x + Attn(LN(x)) + FFN(LN(x))."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from plugformer import Block, BlockParts, BuildContext, Capabilities, Component, LayerState, StepInputs


@dataclass
class ParallelBlockConfig:
    """``shared_norm``: one norm feeds both sublayers (GPT-J); False gives each its own (GPT-NeoX)."""

    shared_norm: bool = True


class ParallelBlock(Block):
    """Both sublayers on the normalized input, their outputs added to the residual together.
    No cross-attention: where it would go in a parallel block is not settled."""

    def __init__(self, config: ParallelBlockConfig, ctx: BuildContext, parts: BlockParts) -> None:
        super().__init__(parts)
        self.attention_norm = parts.make_norm()
        self.ffn_norm = self.attention_norm if config.shared_norm else parts.make_norm()
        self.drop = nn.Dropout(ctx.dropout)

    def forward(self, x: Tensor, inputs: StepInputs, state: LayerState | None = None) -> Tensor:
        attended = self.self_attend(self.attention_norm(x), inputs, state)
        return x + self.drop(attended) + self.drop(self.ffn(self.ffn_norm(x)))


COMPONENT = Component(
    kind="block",
    name="parallel",
    factory=ParallelBlock,
    config=ParallelBlockConfig,
    summary="Attention and feed-forward in parallel on one normalized input (GPT-J, PaLM).",
    reference="Chowdhery et al. 2022, PaLM: Scaling Language Modeling with Pathways",
)
