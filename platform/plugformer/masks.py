"""The keys each query may see, for attentions that form (or hand a kernel) a boolean mask.

Every softmax attention needs the same two steps, and each used to write them itself:

1. :func:`allowed_keys`: combine causality (query i is the token of key index
   i + (Lk − Lq), so a cache can hold the earlier keys) with the key padding mask into one
   ``(batch or 1, 1, Lq, Lk)`` boolean tensor, True where query i may see key j;
2. :func:`no_key_fallback`: a query that sees no key at all (a padded query of a causal
   model, left padding, a fully padded example) would make softmax over only −inf scores
   NaN, and that NaN reaches real tokens through the next layer. Let such rows see every key
   (any finite result will do) and zero their outputs afterwards, which is what the contract
   asks: "a query that sees no key returns zeros".

Use::

    allowed = allowed_keys(q.shape[-2], k.shape[-2], causal=self.causal,
                           key_padding_mask=key_padding_mask, device=q.device)
    safe, visible = no_key_fallback(allowed)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)
    return out * visible            # or: out.masked_fill(~visible, 0.0)

``Attention.explicit_attend`` already does both for the explicit (scores) path.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["all_true", "all_true_on_host", "allowed_keys", "causal_allowed", "mark_all_true", "no_key_fallback"]


_ALL_TRUE = "_plugformer_all_true"


def all_true(mask: Tensor) -> bool:
    """Whether every entry of ``mask`` is True (no padding), without reading an accelerator's
    memory when the answer was noted on the host before the batch was moved there
    (:func:`mark_all_true`); otherwise computed (on a GPU that waits for the device). A noted
    answer belongs to the tensor as moved: a mask changed in place afterwards must not keep it."""
    known = getattr(mask, _ALL_TRUE, None)
    return bool(mask.all()) if known is None else known


def all_true_on_host(batch: object) -> dict[str, bool]:
    """For a batch mapping still on the CPU: whether each of its boolean tensors (the padding
    masks) is all True, by key. Anything else: nothing."""
    if not isinstance(batch, dict):
        return {}
    return {
        key: bool(value.all())
        for key, value in batch.items()
        if isinstance(value, Tensor) and value.dtype == torch.bool and value.device.type == "cpu"
    }


def mark_all_true(batch: object, known: dict[str, bool]) -> object:
    """Notes ``known`` (from :func:`all_true_on_host` before the transfer) on the moved
    batch's tensors, for :func:`all_true`; returns the batch."""
    if isinstance(batch, dict):
        for key, value in known.items():
            tensor = batch.get(key)
            if isinstance(tensor, Tensor) and tensor.dtype == torch.bool:
                setattr(tensor, _ALL_TRUE, value)
    return batch


def causal_allowed(q_length: int, k_length: int, device: torch.device | str | None = None) -> Tensor:
    """(Lq, Lk) bool: query i sees key j when j ≤ i + (Lk − Lq), i.e. the queries are the last
    Lq of the keys' tokens (a cache holds the earlier ones)."""
    offset = k_length - q_length
    i = torch.arange(q_length, device=device)[:, None]
    j = torch.arange(k_length, device=device)[None, :]
    return j <= i + offset


def allowed_keys(
    q_length: int,
    k_length: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Which keys each query may see: ``(batch, 1, Lq, Lk)`` bool with a key padding mask,
    ``(1, 1, Lq, Lk)`` without, True where query i may see key j (broadcasts over heads).

    - ``causal``: query i sees keys j ≤ i + (Lk − Lq) (:func:`causal_allowed`); otherwise all;
    - ``key_padding_mask``: (batch, Lk), True for real keys (its polarity throughout
      plugformer: True means "a token", never "masked out"); False keys are never seen.

    Rows may be all False (a query with no visible key): pass the result through
    :func:`no_key_fallback` before a softmax or a fused kernel.
    """
    if key_padding_mask is not None and key_padding_mask.shape[-1] != k_length:
        raise ValueError(f"key_padding_mask has {key_padding_mask.shape[-1]} keys, expected {k_length}")
    if device is None and key_padding_mask is not None:
        device = key_padding_mask.device
    if causal:
        allowed = causal_allowed(q_length, k_length, device)
    else:
        allowed = torch.ones(q_length, k_length, dtype=torch.bool, device=device)
    allowed = allowed[None, None]
    if key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :].bool()
    return allowed


def no_key_fallback(allowed: Tensor) -> tuple[Tensor, Tensor]:
    """``(safe, visible)`` for a boolean ``allowed`` mask (..., Lq, Lk): ``visible``
    (..., Lq, 1) is True for queries that see at least one key; ``safe`` equals ``allowed``
    except that rows without any visible key see every key, so a softmax (or SDPA with
    ``attn_mask=safe``) stays finite. Multiply the attention output by ``visible`` (or
    ``masked_fill(~visible, 0)``) so those queries return zeros."""
    visible = allowed.any(dim=-1, keepdim=True)
    return allowed | ~visible, visible
