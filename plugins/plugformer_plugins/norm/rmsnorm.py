"""Root mean square layer normalization (Zhang & Sennrich 2019, "Root Mean Square Layer
Normalization")."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer import BuildContext, Component, bounds


@dataclass
class RMSNormConfig:
    """``eps``: added to the mean square; 1e-6 as in T5 and LLaMA. ``scale``: learn the gain g
    (initialized to ones); without it g = 1."""

    eps: float = field(default=1e-6, metadata=bounds(gt=0.0))
    scale: bool = True


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · g over the last dimension (d_model).

    Unlike LayerNorm it neither subtracts the mean nor adds a bias. The statistics are
    computed in at least float32; the output has the input's dtype.
    """

    def __init__(self, config: RMSNormConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.eps = config.eps
        self.weight = nn.Parameter(torch.ones(ctx.d_model)) if config.scale else None

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        y = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, scale={self.weight is not None}"


COMPONENT = Component(
    kind="norm",
    name="rmsnorm",
    factory=RMSNorm,
    config=RMSNormConfig,
    summary="RMSNorm: divide by the root mean square and scale; no centring, no bias.",
    reference="Zhang & Sennrich 2019, Root Mean Square Layer Normalization",
)
