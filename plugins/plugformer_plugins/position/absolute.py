"""Absolute position embeddings added to the token embeddings: none, sinusoidal (Vaswani et
al. 2017) and learned (as in GPT-2 and BERT)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, PositionEncoding, bounds


@dataclass
class NoPositionConfig:
    pass


class NoPosition(PositionEncoding):
    """No position information at all (a causal mask alone still leaks order; NoPE)."""

    def __init__(self, config: NoPositionConfig, ctx: BuildContext) -> None:
        super().__init__()


@dataclass
class SinusoidalPositionConfig:
    base: float = field(default=10000.0, metadata=bounds(gt=1.0))


class SinusoidalPosition(PositionEncoding):
    """p(i, 2k) = sin(i / base^(2k/d)), p(i, 2k+1) = cos(i / base^(2k/d))."""

    def __init__(self, config: SinusoidalPositionConfig, ctx: BuildContext) -> None:
        super().__init__()
        half = torch.arange(0, ctx.d_model, 2, dtype=torch.float32)
        self.register_buffer("inv_freq", config.base ** (-half / ctx.d_model), persistent=False)
        self.d_model = ctx.d_model

    def embed(self, positions: Tensor) -> Tensor:
        angles = positions.float()[..., None] * self.inv_freq
        table = torch.zeros(*positions.shape, self.d_model, device=positions.device)
        table[..., 0::2] = torch.sin(angles)
        table[..., 1::2] = torch.cos(angles[..., : self.d_model // 2])
        return table


@dataclass
class LearnedPositionConfig:
    """``max_length``: rows of the table; None (the default) sizes it to the data's longest
    sequence, which the builder then writes into the run's config (a table longer than the
    data would hold rows no step ever trains)."""

    max_length: Optional[int] = field(default=None, metadata=bounds(ge=1))


class LearnedPosition(PositionEncoding):
    """A learned vector per absolute position, up to ``max_length`` (or the data's length)."""

    def __init__(self, config: LearnedPositionConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.table = nn.Embedding(config.max_length or ctx.max_length, ctx.d_model)

    def embed(self, positions: Tensor) -> Tensor:
        return self.table(positions)


NONE = Component(
    kind="position",
    name="none",
    factory=NoPosition,
    config=NoPositionConfig,
    summary="No position encoding (NoPE); order comes only from a causal mask.",
    reference="Kazemnejad et al. 2023, The Impact of Positional Encoding on Length Generalization",
    capabilities=Capabilities(provides={"length_extrapolation"}),
)

SINUSOIDAL = Component(
    kind="position",
    name="sinusoidal",
    factory=SinusoidalPosition,
    config=SinusoidalPositionConfig,
    summary="Fixed sinusoidal embeddings added to the input.",
    reference="Vaswani et al. 2017, Attention Is All You Need",
    capabilities=Capabilities(provides={"input_embedding", "length_extrapolation"}),
)

LEARNED = Component(
    kind="position",
    name="learned",
    factory=LearnedPosition,
    config=LearnedPositionConfig,
    summary="Learned absolute embeddings added to the input, up to max_length positions (default: the data's length).",
    reference="Radford et al. 2019, Language Models are Unsupervised Multitask Learners",
    capabilities=lambda config: Capabilities(provides={"input_embedding"}, max_length=config.max_length),
)
