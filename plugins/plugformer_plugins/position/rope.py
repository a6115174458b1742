"""Rotary position embedding (Su et al. 2021, "RoFormer: Enhanced Transformer with Rotary
Position Embedding").

Queries and keys are rotated inside attention: head dimensions are taken in adjacent pairs
(2k, 2k+1), and the pair k of the token at position i is rotated by the angle i·θ_k with
θ_k = base^(−2k/d). Rotations preserve norms, and the score q_i·k_j of two rotated vectors
depends on the positions only through i − j, which is how RoPE encodes relative position.

With ``fraction`` < 1 only the first ``fraction``·head_dim dimensions (rounded down to an
even number) are rotated and the rest pass through unchanged (partial rotary, as in GPT-NeoX);
then d above is the number of rotated dimensions.

``layout`` says which dimensions form a pair: ``interleaved`` (2k, 2k+1), as in the paper and
in Meta's Llama code, or ``half`` (k, k + d/2), as in Hugging Face's Llama and GPT-NeoX
(``rotate_half``). Both encode the same positions; weights trained in one layout work in the
other only after permuting the query/key projection rows.

``scaling`` stretches the wavelengths for longer contexts: ``linear`` divides every θ_k by
``scaling_factor`` (position interpolation, Chen et al. 2023); ``llama3`` divides only the
low frequencies, leaves the high ones and blends in between (Llama 3.1), as Hugging Face's
``rope_type`` "linear" and "llama3" do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import Tensor

from plugformer import BuildContext, Capabilities, Component, ConfigError, PositionEncoding, bounds


class RotaryLayout(str, Enum):
    interleaved = "interleaved"
    half = "half"


class RotaryScaling(str, Enum):
    none = "none"
    linear = "linear"
    llama3 = "llama3"


@dataclass
class RotaryConfig:
    """``base``: the wavelength base of the angles. ``fraction``: the share of each head's
    dimensions that is rotated, in (0, 1]. ``layout``: which dimensions pair up (see the
    module docstring). ``scaling`` and its options: ``scaling_factor`` (linear and llama3),
    ``low_freq_factor``, ``high_freq_factor`` and ``original_max_length`` (llama3)."""

    base: float = field(default=10000.0, metadata=bounds(gt=1.0))
    fraction: float = field(default=1.0, metadata=bounds(gt=0.0, le=1.0))
    layout: RotaryLayout = RotaryLayout.interleaved
    scaling: RotaryScaling = RotaryScaling.none
    scaling_factor: float = field(default=1.0, metadata=bounds(gt=0.0))
    low_freq_factor: float = field(default=1.0, metadata=bounds(gt=0.0))
    high_freq_factor: float = field(default=4.0, metadata=bounds(gt=0.0))
    original_max_length: int = field(default=8192, metadata=bounds(ge=1))


def inverse_frequencies(config: RotaryConfig, rotary_dim: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """θ_k for k < rotary_dim/2, scaled by ``config.scaling``; computed as Hugging Face
    computes them (1 / base^(2k/d), then the scaling), so imported models match exactly."""
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.int64).to(dtype) / rotary_dim
    inv_freq = 1.0 / (config.base**exponents)
    scaling = RotaryScaling(config.scaling)
    if scaling is RotaryScaling.linear:
        return inv_freq / config.scaling_factor
    if scaling is RotaryScaling.llama3:
        factor, old_length = config.scaling_factor, config.original_max_length
        low_wavelength, high_wavelength = old_length / config.low_freq_factor, old_length / config.high_freq_factor
        wavelength = 2 * math.pi / inv_freq
        scaled = torch.where(wavelength > low_wavelength, inv_freq / factor, inv_freq)
        smooth = (old_length / wavelength - config.low_freq_factor) / (config.high_freq_factor - config.low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelength < high_wavelength) * ~(wavelength > low_wavelength)
        return torch.where(medium, blended, scaled)
    return inv_freq


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
        if RotaryScaling(config.scaling) is RotaryScaling.llama3 and config.high_freq_factor <= config.low_freq_factor:
            raise ConfigError(
                f"model.position.high_freq_factor={config.high_freq_factor} is not above "
                f"low_freq_factor={config.low_freq_factor} (llama3 rotary scaling).",
                expected="high_freq_factor > low_freq_factor (Llama 3.1: 4 and 1)",
                fix="set model.position.high_freq_factor above model.position.low_freq_factor",
            )
        self.rotary_dim = rotary_dim
        self.base = config.base
        self.config = config
        self.half = RotaryLayout(config.layout) is RotaryLayout.half

    def _cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin of i·θ_k, each (batch or 1, 1, length, rotary_dim / 2), in ``dtype``.

        Recomputed on every call rather than cached: length × rotary_dim/2 values cost little
        next to attention, cannot go stale, and (unlike a buffer) are not cast to bf16 along
        with the model's weights."""
        inv_freq = inverse_frequencies(self.config, self.rotary_dim, dtype, positions.device)
        angles = positions.to(dtype)[:, None, :, None] * inv_freq
        return angles.cos(), angles.sin()

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        rotated, passed = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.half:  # pairs (k, k + d/2): Hugging Face's rotate_half
            first, second = rotated.to(cos.dtype).chunk(2, dim=-1)
            turned = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        else:
            pairs = rotated.to(cos.dtype).unflatten(-1, (-1, 2))
            even, odd = pairs[..., 0], pairs[..., 1]
            turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
        if not passed.shape[-1]:  # every dimension rotated: no copy through an empty concatenation
            return turned.to(x.dtype)
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
