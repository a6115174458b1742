"""Layer normalization (Ba et al. 2016)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from plugformer import BuildContext, Component, bounds


@dataclass
class LayerNormConfig:
    eps: float = field(default=1e-5, metadata=bounds(gt=0.0))
    bias: bool = True


def layer_norm(config: LayerNormConfig, ctx: BuildContext) -> nn.LayerNorm:
    return nn.LayerNorm(ctx.d_model, eps=config.eps, bias=config.bias)


COMPONENT = Component(
    kind="norm",
    name="layernorm",
    factory=layer_norm,
    config=LayerNormConfig,
    summary="LayerNorm: subtract the mean, divide by the standard deviation, scale and shift.",
    reference="Ba et al. 2016, Layer Normalization",
)
