"""Gated linear unit feed-forward networks (Shazeer 2020, "GLU Variants Improve Transformer"):
SwiGLU, GEGLU and ReGLU."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import BuildContext, Component, ConfigError, FeedForward, mark_residual_projection, bounds


class GateActivation(str, Enum):
    """The activation on the gate: swish (SwiGLU), gelu (GEGLU) or relu (ReGLU)."""

    swish = "swish"
    gelu = "gelu"
    relu = "relu"


_ACTIVATIONS = {GateActivation.swish: F.silu, GateActivation.gelu: F.gelu, GateActivation.relu: F.relu}


@dataclass
class GLUConfig:
    """``hidden``: the width of the gated layer; by default 8/3·d_model rounded up to a
    multiple of ``multiple_of``, so that the three matrices hold about as many parameters as
    the two of a 4·d_model MLP. ``bias``: off by default, as in the paper."""

    activation: GateActivation = GateActivation.swish
    hidden: int | None = field(default=None, metadata=bounds(ge=1))
    multiple_of: int = field(default=64, metadata=bounds(ge=1))
    bias: bool = False


def glu_hidden_size(d_model: int, multiple_of: int = 64) -> int:
    """8/3·d_model rounded up to a multiple of ``multiple_of``."""
    return multiple_of * -(-8 * d_model // (3 * multiple_of))


class GLU(FeedForward):
    """(act(x W) ⊙ x V) W2, with dropout before W2. W and V are one fused projection."""

    def __init__(self, config: GLUConfig, ctx: BuildContext) -> None:
        super().__init__()
        for option in ("hidden", "multiple_of"):
            value = getattr(config, option)
            if value is not None and value < 1:
                raise ConfigError(
                    f"model.ffn.{option}={value} for the GLU feed-forward network.",
                    expected=f"{option} ≥ 1" + (" (or null for 8/3·d_model)" if option == "hidden" else ""),
                    fix=f"set model.ffn.{option} to a positive integer",
                )
        hidden = config.hidden if config.hidden is not None else glu_hidden_size(ctx.d_model, config.multiple_of)
        self.hidden = hidden
        self.activation = _ACTIVATIONS[GateActivation(config.activation)]
        self.gate_and_value = nn.Linear(ctx.d_model, 2 * hidden, bias=config.bias)
        self.drop = nn.Dropout(ctx.dropout)
        self.down = mark_residual_projection(nn.Linear(hidden, ctx.d_model, bias=config.bias))

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.gate_and_value(x).chunk(2, dim=-1)
        return self.down(self.drop(self.activation(gate) * value))


COMPONENT = Component(
    kind="ffn",
    name="glu",
    factory=GLU,
    config=GLUConfig,
    summary="Gated feed-forward network: SwiGLU (default), GEGLU or ReGLU.",
    reference="Shazeer 2020, GLU Variants Improve Transformer",
)
