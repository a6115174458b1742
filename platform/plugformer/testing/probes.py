"""The test positions and padding patterns the attention and block checks run with."""

from __future__ import annotations

import torch
from torch import Tensor

from plugformer.components import PositionEncoding


def _expect_positions(probe: str, positions: Tensor, what: str) -> None:
    """Position tensors reach a position as (batch or 1, ..., length): anything else is the
    attention's mistake, reported as such."""
    if positions.dim() < 2 or positions.is_floating_point():
        raise AssertionError(
            f"the attention passed {what} of shape {tuple(positions.shape)} ({positions.dtype}) to the "
            f"position's {probe}; the contract is an integer tensor (batch or 1, ..., length)"
        )


class ScoreBiasProbe(PositionEncoding):
    """A test position that contributes only a score bias: −strength·m_h·|i − j| with fixed
    slopes m_h from 0.3 to 1.2. For position tensors (batch or 1, ..., Lq) and
    (batch or 1, ..., Lk) it returns (batch or 1, heads, ..., Lq, Lk), as the contract of
    :meth:`plugformer.PositionEncoding.score_bias` says. Set ``strength`` to 0 to switch it off."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", torch.linspace(0.3, 1.2, n_heads), persistent=False)
        self.strength = 1.0

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        _expect_positions("score_bias", q_positions, "query positions")
        _expect_positions("score_bias", k_positions, "key positions")
        distance = (q_positions[..., :, None] - k_positions[..., None, :]).abs().to(self.slopes.dtype)
        slopes = self.slopes.view(-1, *([1] * (distance.dim() - 1)))
        return -self.strength * slopes * distance.unsqueeze(1)


class QKTransformProbe(PositionEncoding):
    """A test position that contributes only a query/key transform: each pair of head
    dimensions of the token at position p is rotated by strength·p·ω_k, ω_k from 1 down to
    0.1. q and k are (batch, heads, length, head_dim) and positions (batch or 1, length).
    Set ``strength`` to 0 to make it the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.strength = 1.0

    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        _expect_positions("transform_qk", positions, "positions")
        pairs = q.shape[-1] // 2
        frequencies = torch.linspace(1.0, 0.1, pairs, dtype=q.dtype, device=q.device)
        # (batch or 1, 1, ..., length, pairs): one angle per token and pair, shared by the heads.
        angles = (self.strength * positions.to(q.dtype)).unsqueeze(1).unsqueeze(-1) * frequencies
        cos, sin = angles.cos(), angles.sin()

        def rotate(x: Tensor) -> Tensor:
            even, odd = x[..., 0 : 2 * pairs : 2], x[..., 1 : 2 * pairs : 2]
            turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
            return torch.cat((turned, x[..., 2 * pairs :]), dim=-1)

        return rotate(q), rotate(k)


def padding_mask(batch: int, length: int) -> Tensor:
    """Key padding mask (batch, length), True for real tokens: example 0 unpadded, example 1
    padded at the end, example 2 at the start and in the middle (the contract allows any
    pattern; left padding is what tests a causal attention's mask), the rest unpadded."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, length - max(2, length // 4) :] = False
    mask[2, : max(1, length // 5)] = False
    mask[2, length // 2] = False
    return mask


def left_padding_mask(batch: int, length: int) -> Tensor:
    """A batch of left-padded prompts (batch, length): example 0 unpadded, example 1 padded
    by 3, example 2 by half the length, the rest by 1."""
    pads = [0, min(3, length - 1), length // 2] + [1] * (batch - 3)
    return torch.arange(length)[None, :] >= torch.tensor(pads)[:, None]


def positions_of(mask: Tensor) -> Tensor:
    """Per-example positions (batch, length) of left-padded rows: each real token's index among
    the real tokens of its row (cumsum of the mask − 1); padded tokens get 0."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class RelativeTermsProbe(PositionEncoding):
    """A test position that contributes only content-dependent relative terms, as Shaw et al.
    2018 do: a score term strength·0.1·(Σ_d q_d)·clip(j − i) and a value term
    strength·Σ_j α_ij·e[clip(j − i)] from a fixed table e, the offset clipped to ±4. Shapes
    follow :meth:`plugformer.PositionEncoding.relative_scores` and ``relative_values``;
    extra dimensions between the batch and the length (blocks) are allowed. Set
    ``strength`` to 0 to switch it off."""

    clip = 4

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        table = torch.linspace(-1.0, 1.0, (2 * self.clip + 1) * head_dim).view(2 * self.clip + 1, head_dim).sin()
        self.register_buffer("table", table, persistent=False)
        self.strength = 1.0

    def _offsets(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """clip(j − i), (batch or 1, ..., Lq, Lk)."""
        _expect_positions("relative terms", q_positions, "query positions")
        _expect_positions("relative terms", k_positions, "key positions")
        return (k_positions[..., None, :] - q_positions[..., :, None]).clamp(-self.clip, self.clip)

    def relative_scores(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        offsets = self._offsets(q_positions, k_positions).unsqueeze(1).to(q.dtype)
        return self.strength * 0.1 * q.sum(dim=-1, keepdim=True) * offsets

    def relative_values(self, weights: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        embeddings = self.table.to(weights.dtype)[self._offsets(q_positions, k_positions) + self.clip]
        return self.strength * (weights.unsqueeze(-1) * embeddings.unsqueeze(1)).sum(dim=-2)
