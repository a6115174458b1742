"""The Transformer layer with its norms before the sublayers (pre-norm, GPT-2; Xiong et al.
2020), after the residual additions (post-norm, Vaswani et al. 2017) or both around each
sublayer (sandwich, Ding et al. 2021 "CogView")."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from torch import Tensor, nn

from plugformer import Block, BlockParts, BuildContext, Capabilities, Component, LayerState, StepInputs


class Placement(str, Enum):
    """``pre``: a norm before each sublayer, and a final norm after the stack; ``post``: a
    norm after each residual addition; ``sandwich``: norms before and after each sublayer."""

    pre = "pre"
    post = "post"
    sandwich = "sandwich"


@dataclass
class StandardBlockConfig:
    placement: Placement = Placement.pre


class StandardBlock(Block):
    """x → x + attention → (x + cross-attention) → x + feed-forward, norms by ``placement``."""

    def __init__(self, config: StandardBlockConfig, ctx: BuildContext, parts: BlockParts) -> None:
        super().__init__(parts)
        self.placement = Placement(config.placement)
        self.final_norm = self.placement is not Placement.post
        sublayers = ["attention", "ffn"] + (["cross_attention"] if parts.cross_attention is not None else [])
        self.norms = nn.ModuleDict({name: parts.make_norm() for name in sublayers})
        if self.placement is Placement.sandwich:
            self.out_norms = nn.ModuleDict({name: parts.make_norm() for name in sublayers})
        self.drop = nn.Dropout(ctx.dropout)

    def _residual(self, name: str, x: Tensor, sublayer) -> Tensor:  # noqa: ANN001
        if self.placement is Placement.pre:
            return x + self.drop(sublayer(self.norms[name](x)))
        if self.placement is Placement.post:
            return self.norms[name](x + self.drop(sublayer(x)))
        return x + self.drop(self.out_norms[name](sublayer(self.norms[name](x))))

    def forward(self, x: Tensor, inputs: StepInputs, state: LayerState | None = None) -> Tensor:
        x = self._residual("attention", x, lambda h: self.self_attend(h, inputs, state))
        if self.cross_attention is not None:
            x = self._residual("cross_attention", x, lambda h: self.cross_attend(h, inputs, state))
        return self._residual("ffn", x, self.ffn)


COMPONENT = Component(
    kind="block",
    name="standard",
    factory=StandardBlock,
    config=StandardBlockConfig,
    summary="Residual sublayers with pre-, post- or sandwich norm placement (model.block.placement).",
    reference="Vaswani et al. 2017; Xiong et al. 2020, On Layer Normalization in the Transformer Architecture",
    capabilities=Capabilities(provides={"cross_attention"}),
)
