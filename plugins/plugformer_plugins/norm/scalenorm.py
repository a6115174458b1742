"""ScaleNorm (Nguyen & Salazar 2019, "Transformers without Tears: Improving the
Normalization of Self-Attention"): y = g · x / max(‖x‖, eps), one learned scalar g."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer import BuildContext, Component, bounds


@dataclass
class ScaleNormConfig:
    """``eps``: the smallest norm divided by (1e-5 as in the paper's code). ``init``: the
    initial gain g; None for √d_model, as in the paper."""

    eps: float = field(default=1e-5, metadata=bounds(gt=0.0))
    init: float | None = field(default=None, metadata=bounds(gt=0.0))


class ScaleNorm(nn.Module):
    """y = g · x / max(‖x‖₂, eps) over the last dimension (d_model), with a single learned
    scalar g (a 0-dim parameter, so no weight decay). Computed in at least float32; the output
    has the input's dtype. An all-zero token stays zero."""

    def __init__(self, config: ScaleNormConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.eps = config.eps
        initial = config.init if config.init is not None else math.sqrt(ctx.d_model)
        self.gain = nn.Parameter(torch.tensor(float(initial)))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        norm = torch.linalg.vector_norm(wide, dim=-1, keepdim=True).clamp(min=self.eps)
        return (wide * (self.gain.to(wide.dtype) / norm)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


COMPONENT = Component(
    kind="norm",
    name="scalenorm",
    factory=ScaleNorm,
    config=ScaleNormConfig,
    summary="ScaleNorm: scale each token to length g, one learned scalar g initialized to √d.",
    reference="Nguyen & Salazar 2019, Transformers without Tears",
)
