"""The Transformer's two-layer position-wise feed-forward network (Vaswani et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from torch import Tensor, nn

from plugformer import BuildContext, Component, FeedForward, mark_residual_projection, bounds


class Activation(str, Enum):
    relu = "relu"
    gelu = "gelu"


@dataclass
class MLPConfig:
    expansion: float = field(default=4.0, metadata=bounds(gt=0.0))
    activation: Activation = Activation.gelu
    bias: bool = True


class MLP(FeedForward):
    """d_model → expansion·d_model → activation → d_model, with dropout before the output."""

    def __init__(self, config: MLPConfig, ctx: BuildContext) -> None:
        super().__init__()
        hidden = int(config.expansion * ctx.d_model)
        self.up = nn.Linear(ctx.d_model, hidden, bias=config.bias)
        self.activation = nn.GELU() if Activation(config.activation) is Activation.gelu else nn.ReLU()
        self.drop = nn.Dropout(ctx.dropout)
        self.down = mark_residual_projection(nn.Linear(hidden, ctx.d_model, bias=config.bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.drop(self.activation(self.up(x))))


COMPONENT = Component(
    kind="ffn",
    name="mlp",
    factory=MLP,
    config=MLPConfig,
    summary="Two-layer feed-forward network with ReLU or GELU.",
    reference="Vaswani et al. 2017, Attention Is All You Need",
)
