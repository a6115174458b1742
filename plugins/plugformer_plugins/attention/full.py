"""Full softmax attention through ``torch.nn.functional.scaled_dot_product_attention``
(Vaswani et al. 2017, "Attention Is All You Need"), which picks fused flash or
memory-efficient kernels where they exist."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from plugformer import Attention, AttentionState, BuildContext, Capabilities, Component, allowed_keys, no_key_fallback, repeat_kv


@dataclass
class FullAttentionConfig:
    bias: bool = True


class FullAttention(Attention):
    """Softmax over every visible key. Without position terms and padding this is one fused
    SDPA call (grouped-query heads included); otherwise an explicit boolean mask or
    score bias goes to SDPA, and content-dependent relative terms (Shaw) take the explicit
    path of the base class."""

    native_gqa = True

    def __init__(self, config: FullAttentionConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)

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
        q_length, k_length = q.shape[-2], k.shape[-2]
        gqa = k.shape[1] != q.shape[1]
        if self.has_relative_values:
            allowed = self._allowed(q_length, k_length, key_padding_mask, q.device)
            return self.explicit_attend(q, repeat_kv(k, q.shape[1]), repeat_kv(v, q.shape[1]), allowed, q_positions, k_positions)
        bias = self.score_terms(q, q_positions, k_positions)
        dropout = self.dropout if self.training else 0.0
        if bias is None and key_padding_mask is None and (not self.causal or q_length in (1, k_length)):
            causal = self.causal and q_length > 1
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=causal, enable_gqa=gqa)
        # A query with no visible key (a padded row) would give NaN: it sees every key for the
        # kernel's sake and returns zeros, as the contract asks.
        allowed, visible = no_key_fallback(self._allowed(q_length, k_length, key_padding_mask, q.device))
        if bias is None:
            mask = allowed
        else:
            mask = torch.where(allowed, bias.to(q.dtype), float("-inf"))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa)
        return out * visible.to(out.dtype)

    def _allowed(self, q_length: int, k_length: int, key_padding_mask: Tensor | None, device: torch.device) -> Tensor:
        """(batch or 1, 1, Lq, Lk) bool: the keys each query may see (:func:`plugformer.allowed_keys`)."""
        return allowed_keys(q_length, k_length, causal=self.causal, key_padding_mask=key_padding_mask, device=device)


COMPONENT = Component(
    kind="attention",
    name="full",
    factory=FullAttention,
    config=FullAttentionConfig,
    summary="Full softmax attention via torch scaled_dot_product_attention (fused kernels where available).",
    reference="Vaswani et al. 2017, Attention Is All You Need",
    capabilities=Capabilities(
        provides={
            "causal",
            "bidirectional",
            "key_padding_mask",
            "score_bias",
            "qk_transform",
            "relative_terms",
            "cross_attention",
            "incremental_decoding",
        },
        cost="quadratic",
    ),
)
