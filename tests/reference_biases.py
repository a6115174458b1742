"""A position bias for attention tests: ALiBi's formula, for any position shapes."""

from __future__ import annotations

import torch
from torch import Tensor

from plugformer import PositionEncoding


class AlibiLikeBias(PositionEncoding):
    """−slope_h · |i − j| for position shapes (batch or 1, ..., Lq), (batch or 1, ..., Lk):
    (batch or 1, heads, ..., Lq, Lk)."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", 2.0 ** (-torch.arange(1, heads + 1, dtype=torch.float32)))

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        distance = (q_positions[..., :, None] - k_positions[..., None, :]).abs().float()
        return -self.slopes.view(-1, *[1] * (distance.dim() - 1)) * distance.unsqueeze(1)
