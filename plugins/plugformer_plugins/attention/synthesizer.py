"""Synthesizer attention (Tay et al. 2021, "Synthesizer: Rethinking Self-Attention for
Transformer Models"): the attention logits are synthesized instead of computed from
query–key dot products; the values come from the shared key/value projection.

- ``dense``: each token predicts its own row of logits with a two-layer MLP,
  B_i = W₂ relu(W₁ x_i + b₁) + b₂ ∈ ℝ^ℓ, per head. The MLP's input is the head's query
  q_i = W_q x_i (the shared query projection is its first linear map).
- ``random``: a matrix R ∈ ℝ^{ℓ×ℓ} of logits per head, the same for every input; learned
  (``trainable``) or a fixed random buffer. The queries play no part, so this variant has no
  query projection.

ℓ = ``max_length``: the logit of query i for key j is column p_j of the row (dense) or entry
(p_i, p_j) of R (random), where p are the tokens' ``positions``, so decoding with a cache,
offsets and left-padded rows with per-example positions all index the same logits as one
full forward. Positions must be below ``max_length`` (a capability the builder checks
against the data). Causal: keys after the query are masked out of the synthesized logits;
padded keys are masked; a query that sees no key returns zeros. The key half of the shared
key/value projection is unused (it keeps the layout every attention has, so caches and
multi-/grouped-query heads work unchanged). Cost: the (Lq × Lk) logits are formed
explicitly, so time and memory are quadratic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import Attention, AttentionState, BuildContext, Capabilities, Component, ConfigError, bounds, causal_allowed

VARIANTS = ("dense", "random")


@dataclass
class SynthesizerConfig:
    """``variant``: dense or random; ``max_length``: ℓ, the longest sequence (positions
    0..ℓ−1); ``hidden``: the dense MLP's hidden width (None: head_dim); ``trainable``:
    random only, learn R (True) or keep it fixed (False)."""

    variant: str = "dense"
    max_length: int = field(default=512, metadata=bounds(ge=1))
    hidden: int | None = field(default=None, metadata=bounds(ge=1))
    trainable: bool = True
    bias: bool = True


class _NoQuery(nn.Module):
    """Stands in for the query projection when the logits do not depend on queries: no
    parameters (which would get no gradient), zeros of the query shape."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        return x.new_zeros(()).expand(*x.shape[:-1], self.features)


class SynthesizerAttention(Attention):
    """Synthesized attention weights over (batch, heads, length, head_dim) values."""

    def __init__(self, config: SynthesizerConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)
        if config.variant not in VARIANTS:
            raise ConfigError(
                f"model.attention.variant={config.variant!r} for the synthesizer.",
                expected=f"one of {', '.join(VARIANTS)}",
                fix="set model.attention.variant=dense or model.attention.variant=random",
            )
        self.variant = config.variant
        self.max_length = config.max_length
        heads, length = self.n_heads, config.max_length
        if self.variant == "dense":
            hidden = config.hidden or self.head_dim
            self.w1 = nn.Parameter(torch.empty(heads, self.head_dim, hidden).uniform_(-1, 1) / self.head_dim**0.5)
            self.b1 = nn.Parameter(torch.zeros(heads, 1, hidden))
            self.w2 = nn.Parameter(torch.empty(length, heads, hidden).uniform_(-1, 1) / hidden**0.5)
            self.b2 = nn.Parameter(torch.zeros(length, heads))
        else:
            self.query = _NoQuery(self.n_heads * self.head_dim)
            logits = torch.randn(heads, length, length)
            if config.trainable:
                self.logits = nn.Parameter(logits)
            else:
                self.register_buffer("logits", logits)

    def projection_weights(self) -> dict[str, Tensor]:
        weights = super().projection_weights() if self.variant == "dense" else None
        if weights is None:  # no query projection: an empty view stands in for it
            kv = self.n_kv_heads * self.head_dim
            key_value = self.key_value.weight
            weights = {"query": key_value[:0], "key": key_value[:kv], "value": key_value[kv:], "output": self.out.weight}
        return weights

    def synthesized_logits(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """(batch or 1, heads, Lq, Lk) logits in at least float32."""
        top = int(torch.maximum(q_positions.max(), k_positions.max()))
        if top >= self.max_length:
            raise ValueError(
                f"the synthesizer was built for positions below max_length={self.max_length} and got position {top}; "
                "raise model.attention.max_length"
            )
        dtype = torch.promote_types(q.dtype, torch.float32)
        k_index = k_positions.clamp(min=0)
        if self.variant == "dense":
            hidden = torch.relu(torch.matmul(q.to(dtype), self.w1.to(dtype)) + self.b1.to(dtype))  # (b, h, Lq, hidden)
            w2 = self.w2.to(dtype)[k_index].permute(0, 2, 3, 1)  # (b or 1, h, hidden, Lk)
            b2 = self.b2.to(dtype)[k_index].transpose(1, 2).unsqueeze(-2)  # (b or 1, h, 1, Lk)
            return torch.matmul(hidden, w2) + b2
        q_index = q_positions.clamp(min=0)
        rows = self.logits.to(dtype)[:, q_index[..., :, None], k_index[..., None, :]]  # (h, b or 1, Lq, Lk)
        return rows.transpose(0, 1)

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
        scores = self.synthesized_logits(q, q_positions, k_positions)
        allowed = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=v.device)
        if self.causal:
            allowed = causal_allowed(q.shape[-2], k.shape[-2], v.device)[None, None]
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :].bool()
        # A finite fill: rows without a visible key get uniform weights, zeroed below.
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = torch.matmul(weights, v)
        return out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)


def capabilities(config: SynthesizerConfig) -> Capabilities:
    return Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "incremental_decoding"},
        max_length=config.max_length,
        cost="quadratic",
    )


COMPONENT = Component(
    kind="attention",
    name="synthesizer",
    factory=SynthesizerAttention,
    config=SynthesizerConfig,
    summary="Synthesizer: attention logits from a per-token MLP (dense) or a learned length × length matrix (random).",
    reference="Tay et al. 2021, Synthesizer: Rethinking Self-Attention for Transformer Models",
    capabilities=capabilities,
)
