"""Rotary position embedding (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary
Position Embedding").

Queries and keys are rotated inside attention: head dimensions are taken in adjacent pairs
(2k, 2k+1), and the pair k of the token at position i is rotated by the angle i·θ_k with
θ_k = base^(−2k/d). Rotations preserve norms, and the score q_i·k_j of two rotated vectors
depends on the positions only through i − j, which is how RoPE encodes relative position.

With ``fraction`` < 1 only the first ``fraction``·head_dim dimensions (rounded down to an
even number) are rotated and the rest pass through unchanged (partial rotary, as in GPT-NeoX);
then d above is the number of rotated dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from plugformer import BuildContext, Capabilities, Component, ConfigError, PositionEncoding, bounds


@dataclass
class RotaryConfig:
    """``base``: the wavelength base of the angles. ``fraction``: the share of each head's
    dimensions that is rotated, in (0, 1]."""

    base: float = field(default=10000.0, metadata=bounds(gt=1.0))
    fraction: float = field(default=1.0, metadata=bounds(gt=0.0, le=1.0))


class RotaryPosition(PositionEncoding):
    """Contract: ``transform_qk(q, k, positions)`` takes q and k of shape
    (batch, heads, length, head_dim) and positions (batch or 1, length) and returns the rotated q and k,
    same shapes and dtypes. It contributes no input embedding and no score bias."""

    def __init__(self, config: RotaryConfig, ctx: BuildContext) -> None:
        super().__init__()
        if not 0.0 < config.fraction <= 1.0:
            raise ConfigError(
                f"model.position.fraction={config.fraction} for rotary position embedding.",
                expected="a fraction of the head dimensions in (0, 1]",
                fix="set model.position.fraction to e.g. 1.0 (all dimensions) or 0.25",
            )
        rotary_dim = int(ctx.head_dim * config.fraction) // 2 * 2
        if rotary_dim < 2:
            raise ConfigError(
                f"model.position.fraction={config.fraction} rotates no dimension pair of a "
                f"head of {ctx.head_dim} dimensions.",
                expected=f"fraction · head_dim ≥ 2 (fraction ≥ {2 / ctx.head_dim:g} here)",
                fix="raise model.position.fraction, or use fewer heads",
            )
        self.rotary_dim = rotary_dim
        self.base = config.base

    def _cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of i·θ_k, each (batch or 1, 1, length, rotary_dim / 2), in ``dtype``.

        Recomputed on every call rather than cached: length × rotary_dim/2 values cost little
        next to attention, cannot go stale, and (unlike a buffer) are not cast to bf16 along
        with the model's weights."""
        exponents = torch.arange(0, self.rotary_dim, 2, device=positions.device, dtype=dtype) / self.rotary_dim
        inv_freq = self.base**-exponents
        angles = positions.to(dtype)[:, None, :, None] * inv_freq
        return angles.cos(), angles.sin()

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rotated, passed = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        pairs = rotated.to(cos.dtype).unflatten(-1, (-1, 2))
        even, odd = pairs[..., 0], pairs[..., 1]
        turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        return torch.cat((turned.to(x.dtype), passed), dim=-1)

    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        # Angles and the rotation in at least float32: bf16 angles are off by whole radians
        # at positions in the thousands.
        cos, sin = self._cos_sin(positions, torch.promote_types(q.dtype, torch.float32))
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


COMPONENT = Component(
    kind="position",
    name="rope",
    factory=RotaryPosition,
    config=RotaryConfig,
    summary="Rotary embedding: rotate query/key dimension pairs by position-dependent angles.",
    reference="Su et al. 2021, RoFormer: Enhanced Transformer with Rotary Position Embedding",
    capabilities=Capabilities(provides={"qk_transform", "length_extrapolation"}, requires={"attention": {"qk_transform"}}),
)
