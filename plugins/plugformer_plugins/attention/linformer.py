"""Linformer attention (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity").

Keys and values are projected along the length before the softmax:

    out = softmax(Q (E K)ᵀ / √d) (F V),    E, F ∈ ℝ^{k × max_length},

so every query scores ``k`` projected slots instead of n keys: time and memory O(n·k), linear
in the length. A sequence of n ≤ ``max_length`` tokens uses the first n columns of E and F
(the same as padding it to ``max_length``, as the authors' fairseq code does); longer
sequences are refused before training through the ``max_length`` capability.

Padded keys (``key_padding_mask`` False) are zeroed before the projection, so they add
nothing to E K or F V; a query of an example without a real token returns zeros. Every
projected slot mixes all positions, so Linformer is bidirectional only (it is not causal), and
there are no per-key scores for a position's bias or query/key transform to act on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import Attention, AttentionState, BuildContext, Capabilities, Component, ConfigError, bounds
from plugformer.attention import ChunkSource, chunk_count, recomputed_chunks, repeat_kv


class Sharing(str, Enum):
    """Which projections are shared (the paper's §4 variants; layer-wise sharing across
    layers is not offered: each layer owns its projections)."""

    none = "none"  # an E and an F per head
    headwise = "headwise"  # one E and one F per layer, shared by its heads
    key_value = "key_value"  # one projection per layer for keys and values (E = F), shared by heads


@dataclass
class LinformerConfig:
    """``max_length``: n in the paper, the longest sequence (the projections' width);
    ``k``: the projected length; ``sharing``: see :class:`Sharing`."""

    max_length: int = field(default=512, metadata=bounds(ge=1))
    k: int = field(default=128, metadata=bounds(ge=1))
    sharing: Sharing = Sharing.headwise
    bias: bool = True


class LinformerAttention(Attention):
    """Softmax attention over length-projected keys and values, on (batch, heads, n, head_dim)."""

    # Keys and values arrive with n_kv_heads heads; shared projections act on those before
    # they are repeated for the query heads (per-head projections repeat them first).
    native_gqa = True

    def __init__(self, config: LinformerConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)
        if ctx.causal and not ctx.cross:
            raise ConfigError(
                "model/attention=linformer in a causal (decoder) self-attention.",
                expected="a bidirectional (encoder) self-attention: each projected slot mixes every position",
                fix="use linformer with an encoder objective (e.g. objective=classification), or choose a causal attention",
            )
        for option in ("max_length", "k"):
            if getattr(config, option) < 1:
                raise ConfigError(
                    f"model.attention.{option}={getattr(config, option)} for linformer.",
                    expected=f"{option} ≥ 1",
                    fix=f"set model.attention.{option} to a positive integer",
                )
        self.sharing = Sharing(config.sharing)
        self.max_length = config.max_length
        shape = (self.n_heads, config.k, config.max_length) if self.sharing is Sharing.none else (config.k, config.max_length)
        self.key_projection = nn.Parameter(_xavier(shape))
        self.value_projection = None if self.sharing is Sharing.key_value else nn.Parameter(_xavier(shape))

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        q_positions: Tensor,
        k_positions: Tensor,
        state: AttentionState | None = None,
    ) -> Tensor:
        length = k.shape[-2]
        if length > self.max_length:
            raise ValueError(
                f"linformer got {length} keys but its projections cover max_length={self.max_length}; "
                f"raise model.attention.max_length"
            )
        if key_padding_mask is not None:
            real = key_padding_mask[:, None, :, None].to(k.dtype)
            k, v = k * real, v * real
        e = self.key_projection[..., :length].to(k.dtype)
        f = e if self.value_projection is None else self.value_projection[..., :length].to(v.dtype)
        if self.sharing is Sharing.none:
            k, v = repeat_kv(k, self.n_heads), repeat_kv(v, self.n_heads)
            projected_k, projected_v = torch.matmul(e, k), torch.matmul(f, v)  # (batch, heads, k, head_dim)
        else:
            projected_k = repeat_kv(torch.matmul(e, k), self.n_heads)
            projected_v = repeat_kv(torch.matmul(f, v), self.n_heads)
        q_src = ChunkSource(q)  # each chunk's query gradient added into one buffer

        def queries(start: int, stop: int) -> Tensor:
            scores = torch.matmul(q_src.narrow(-2, start, stop - start) * self.scale, projected_k.transpose(-1, -2))
            weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(v.dtype)
            if self.training and self.dropout > 0:
                weights = F.dropout(weights, p=self.dropout)
            return torch.matmul(weights, projected_v)

        # Rows of queries a few at a time, recomputed in backward: the (n × k) scores are never kept.
        q_length = q.shape[-2]
        return recomputed_chunks(queries, q_length, chunk_count(q_length, q[..., :1, :1].numel() * projected_k.shape[-2], slices=q[..., :1, :1].numel()), dim=-2)


def _xavier(shape: tuple[int, ...]) -> Tensor:
    """Xavier-uniform over (k, max_length) with gain 1/√2, as the authors' fairseq code
    initializes its compression layers."""
    weight = torch.empty(shape)
    for matrix in weight.view(-1, *shape[-2:]):
        nn.init.xavier_uniform_(matrix, gain=1 / math.sqrt(2))
    return weight


COMPONENT = Component(
    kind="attention",
    name="linformer",
    factory=LinformerAttention,
    config=LinformerConfig,
    summary="Linformer: keys and values projected along the length to k slots, softmax(Q(EK)ᵀ/√d)(FV) in O(n·k); bidirectional only.",
    reference="Wang et al. 2020, Linformer: Self-Attention with Linear Complexity",
    capabilities=lambda config: Capabilities(
        provides={"bidirectional", "key_padding_mask"}, max_length=config.max_length, cost="linear"
    ),
)
