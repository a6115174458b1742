"""Full softmax attention through ``torch.nn.functional.scaled_dot_product_attention``
(Vaswani et al. 2017, "Attention Is All You Need"), which picks fused flash or
memory-efficient kernels where they exist."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from plugformer import Attention, BuildContext, Capabilities, Component


@dataclass
class FullAttentionConfig:
    bias: bool = True


class FullAttention(Attention):
    def __init__(self, config: FullAttentionConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, *, key_padding_mask: Tensor | None, positions: Tensor) -> Tensor:
        bias = self.score_bias(positions, positions)
        dropout = self.dropout if self.training else 0.0
        if bias is None and key_padding_mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        length = q.shape[-2]
        allowed = torch.ones(length, length, dtype=torch.bool, device=q.device)
        if self.causal:
            allowed = allowed.tril()
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :].bool()
        # A query with no visible key (a padded row) would give NaN: let it see every key
        # for the kernel's sake, then return zeros for it, as the other attentions do.
        visible = allowed.any(dim=-1, keepdim=True)
        allowed = allowed | ~visible
        if bias is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        else:
            scores_bias = torch.where(allowed, bias.to(q.dtype), float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=scores_bias, dropout_p=dropout)
        return out * visible.to(out.dtype)


COMPONENT = Component(
    kind="attention",
    name="full",
    factory=FullAttention,
    config=FullAttentionConfig,
    summary="Full softmax attention via torch scaled_dot_product_attention (fused kernels where available).",
    reference="Vaswani et al. 2017, Attention Is All You Need",
    capabilities=Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "score_bias", "qk_transform"},
        cost="quadratic",
    ),
)
