"""T5's bucketed relative position bias (Raffel et al. 2020, "Exploring the Limits of Transfer
Learning with a Unified Text-to-Text Transformer").

No embeddings: each head h adds a learned scalar b[h, bucket(j − i)] to the attention score of
query i and key j. One table of ``num_buckets`` × heads scalars is shared by every layer of a
stack (so :meth:`for_layer` is the default, the module itself).

Buckets of the relative position r = j − i (as in T5 and Hugging Face's
``_relative_position_bucket``):

- bidirectional (encoder): half the buckets are for keys before the query (r ≤ 0), half for
  keys after it (r > 0, offset by ``num_buckets // 2``); the distance is |r|;
- causal (decoder): all buckets for keys before the query, the distance is max(−r, 0) (future
  keys, which the causal mask removes, share bucket 0).

Within a side of n buckets, distances below n/2 have a bucket each; larger ones are binned
logarithmically, n/2 + ⌊log(d / (n/2)) / log(max_distance / (n/2)) · n/2⌋, and every distance
from ``max_distance`` on falls into the last bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, ConfigError, PositionEncoding, bounds


@dataclass
class T5BiasConfig:
    """``num_buckets``: buckets per head (both sides together when bidirectional).
    ``max_distance``: distances from here on share the last bucket."""

    num_buckets: int = field(default=32, metadata=bounds(ge=4))
    max_distance: int = field(default=128, metadata=bounds(ge=2))


def relative_position_bucket(relative_position: Tensor, *, bidirectional: bool, num_buckets: int, max_distance: int) -> Tensor:
    """The bucket (a LongTensor in [0, num_buckets)) of each relative position j − i."""
    relative_position = relative_position.long()
    if bidirectional:
        num_buckets //= 2
        offset = (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        offset = torch.zeros_like(relative_position)
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # float32 as in the reference implementations, so that bucket boundaries agree with them;
    # small distances are clamped only to keep the (unused) logarithm finite.
    ratio = distance.clamp(min=max_exact).float() / max_exact
    logarithmic = max_exact + (torch.log(ratio) / math.log(max_distance / max_exact) * (num_buckets - max_exact)).long()
    logarithmic = logarithmic.clamp(max=num_buckets - 1)
    return offset + torch.where(distance < max_exact, distance, logarithmic)


class T5RelativeBias(PositionEncoding):
    """Contract: ``score_bias(q_positions, k_positions)`` takes position tensors (batch or 1,
    ..., Lq) and (batch or 1, ..., Lk) whose leading dimensions broadcast and returns the bias
    (batch or 1, heads, ..., Lq, Lk) in at least float32. It depends on position values only,
    so blockwise attentions call it per block. The build's ``ctx.causal`` picks causal or
    bidirectional buckets. No input embedding, no query/key transform."""

    def __init__(self, config: T5BiasConfig, ctx: BuildContext) -> None:
        super().__init__()
        self.bidirectional = not ctx.causal
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_distance
        max_exact = (config.num_buckets // 2 if self.bidirectional else config.num_buckets) // 2
        if config.max_distance <= max_exact:
            raise ConfigError(
                f"model.position.max_distance={config.max_distance} for the T5 bias with "
                f"num_buckets={config.num_buckets} ({'bidirectional' if self.bidirectional else 'causal'}).",
                expected=f"max_distance above the {max_exact} distances that get a bucket each",
                fix=f"raise model.position.max_distance above {max_exact}, or lower model.position.num_buckets",
            )
        self.bias = nn.Parameter(torch.empty(config.num_buckets, ctx.n_heads))
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.normal_(self.bias, mean=0.0, std=0.02)

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        relative = k_positions[..., None, :] - q_positions[..., :, None]  # (batch or 1, ..., Lq, Lk)
        buckets = relative_position_bucket(
            relative, bidirectional=self.bidirectional, num_buckets=self.num_buckets, max_distance=self.max_distance
        )
        dtype = torch.promote_types(self.bias.dtype, torch.float32)
        return self.bias.to(dtype).t()[:, buckets].movedim(0, 1)


COMPONENT = Component(
    kind="position",
    name="t5",
    factory=T5RelativeBias,
    config=T5BiasConfig,
    summary="T5 relative bias: a learned per-head scalar per bucketed query–key distance, shared across layers.",
    reference="Raffel et al. 2020, Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer",
    capabilities=Capabilities(provides={"score_bias", "length_extrapolation"}, requires={"attention": {"score_bias"}}),
)
