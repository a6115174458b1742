"""Attention with linear biases, ALiBi (Press et al. 2022, "Train Short, Test Long: Attention
with Linear Biases Enables Input Length Extrapolation").

No embeddings: each head h adds −m_h · distance to the attention score of query i and key j.

- Causal models use the paper's distance i − j. Only j ≤ i is ever seen; the future part,
  which the causal mask removes, holds the positive values −m_h·(i − j) without clamping.
- Bidirectional models (not covered by the paper) use |i − j|, the symmetric extension, so
  that keys on either side are penalized alike.

The slopes m_h form a geometric sequence starting at 2^(−8/n) with that same ratio for n
heads (1/2, 1/4, …, 1/256 for 8 heads). For n not a power of two, the paper takes the slopes
of the closest smaller power of two c, then adds the first n − c of every other slope of the
sequence for 2c heads, which fall between the ones already taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from plugformer import BuildContext, Capabilities, Component, PositionEncoding, bounds


@dataclass
class AlibiConfig:
    """``max_bias``: the 8 of 2^(−8/n); the slopes run from 2^(−max_bias/n) down to 2^(−max_bias)."""

    max_bias: float = field(default=8.0, metadata=bounds(gt=0.0))


def alibi_slopes(n_heads: int, max_bias: float = 8.0) -> list[float]:
    """The per-head slopes m_h for ``n_heads`` heads, in head order."""

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-max_bias / n)
        return [start ** (h + 1) for h in range(n)]

    closest = 2 ** math.floor(math.log2(n_heads))
    if closest == n_heads:
        return geometric(n_heads)
    return geometric(closest) + geometric(2 * closest)[0::2][: n_heads - closest]


class AlibiPosition(PositionEncoding):
    """Contract: ``score_bias(q_positions, k_positions)`` takes position tensors of shapes
    (batch or 1, ..., Lq) and (batch or 1, ..., Lk) whose leading dimensions broadcast, and
    returns the bias (batch or 1, heads, ..., Lq, Lk) in float32 (float64 in a float64 model). It never assumes the
    positions are a whole sequence, so blockwise attentions call it per block. No input
    embedding, no query/key transform."""

    def __init__(self, config: AlibiConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.causal = ctx.causal
        # Not persistent: the slopes follow from the config, so checkpoints need not carry them.
        slopes = torch.tensor(alibi_slopes(ctx.n_heads, config.max_bias), dtype=torch.float32)
        self.register_buffer("slopes", slopes, persistent=False)

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        distance = q_positions[..., :, None] - k_positions[..., None, :]
        if not self.causal:
            distance = distance.abs()
        # At least float32 even in a bf16 model: bf16 holds integer distances exactly only up to 256.
        dtype = torch.promote_types(self.slopes.dtype, torch.float32)
        slopes = self.slopes.to(dtype).view(-1, *([1] * (distance.dim() - 1)))
        return -slopes * distance.to(dtype).unsqueeze(1)


COMPONENT = Component(
    kind="position",
    name="alibi",
    factory=AlibiPosition,
    config=AlibiConfig,
    summary="ALiBi: a per-head linear penalty on query–key distance added to attention scores.",
    reference="Press et al. 2022, Train Short, Test Long: Attention with Linear Biases Enables Input Length Extrapolation",
    capabilities=Capabilities(provides={"score_bias", "length_extrapolation"}, requires={"attention": {"score_bias"}}),
)
