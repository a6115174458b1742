"""The Transformer's two-layer position-wise feed-forward network (Vaswani et al. 2017)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from torch import Tensor, nn

from plugformer import BuildContext, Component, FeedForward, mark_residual_projection, bounds


class Activation(str, Enum):
    """``gelu`` is the exact erf form; ``gelu_tanh`` the tanh approximation GPT-2 used
    (Hugging Face's ``gelu_new``)."""

    relu = "relu"
    gelu = "gelu"
    gelu_tanh = "gelu_tanh"


_ACTIVATIONS = {
    Activation.relu: nn.ReLU,
    Activation.gelu: nn.GELU,
    Activation.gelu_tanh: lambda: nn.GELU(approximate="tanh"),
}


@dataclass
class MLPConfig:
    expansion: float = field(default=4.0, metadata=bounds(gt=0.0))
    # The hidden width; None: expansion·d_model (GPT-2's n_inner).
    hidden: Optional[int] = field(default=None, metadata=bounds(ge=1))
    activation: Activation = Activation.gelu
    bias: bool = True
    # Dropout on the hidden activations before the output projection; GPT-2 has none there
    # (only on the residual branch, which the block applies), so its equivalent sets false.
    hidden_dropout: bool = True


class MLP(FeedForward):
    """d_model → expansion·d_model → activation → d_model, with dropout before the output
    (unless ``hidden_dropout`` is false)."""

    def __init__(self, config: MLPConfig, ctx: BuildContext) -> None:
        super().__init__()
        hidden = config.hidden or int(config.expansion * ctx.d_model)
        self.up = nn.Linear(ctx.d_model, hidden, bias=config.bias)
        self.activation = _ACTIVATIONS[Activation(config.activation)]()
        self.drop = nn.Dropout(ctx.dropout if config.hidden_dropout else 0.0)
        self.down = mark_residual_projection(nn.Linear(hidden, ctx.d_model, bias=config.bias))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.drop(self.activation(self.up(x))))


COMPONENT = Component(
    kind="ffn",
    name="mlp",
    factory=MLP,
    config=MLPConfig,
    summary="Two-layer feed-forward network with ReLU, GELU or GELU (tanh approximation).",
    reference="Vaswani et al. 2017, Attention Is All You Need",
)
