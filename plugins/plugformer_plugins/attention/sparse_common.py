"""Shared machinery of the Sparse Transformer patterns (Child et al. 2019, "Generating Long
Sequences with Sparse Transformers"): ``sparse_strided`` and ``sparse_fixed``.

Both patterns are the union of two parts that a query sees at once, under one softmax:

- a *local* part, laid out by blocks of ``stride`` queries, each with a few blocks of keys;
- a *long-range* part (strided: the same residue modulo the stride in earlier blocks;
  fixed: the summary positions of earlier blocks), laid out however suits that part.

Each part's scores are formed on gathered keys only, with the position's terms computed from
the gathered positions, and the two score tensors are joined along the key axis for the
softmax. The patterns are defined on indices in the sequence (as ``local``'s window is), so a
cache that holds every earlier token reproduces them during decoding. This module defines no
``COMPONENT``; it is a helper of the two component modules.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from plugformer import Attention, AttentionState, BuildContext, ConfigError
from plugformer.attention import ChunkSource


def pad_to(x: Tensor, dim: int, length: int, fill: float | bool | int) -> Tensor:
    """``x`` padded with ``fill`` at the end of ``dim`` (negative) up to ``length``."""
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_full(shape, fill)], dim=dim)


class SparseAttention(Attention):
    """Softmax attention restricted to a sparse pattern on sequence indices.

    Subclasses implement :meth:`blockwise` (a full forward, Lq = Lk, longer than one
    ``stride``) and :meth:`key_indices` (the keys each query sees, for decoding), and say in
    :meth:`sees` which (query, key) index pairs the pattern contains. ``stride`` is the block
    length ``l`` of both patterns.
    """

    def __init__(self, ctx: BuildContext, *, stride: int, bias: bool, option: str) -> None:
        super().__init__(ctx, bias=bias)
        if stride < 1:
            raise ConfigError(
                f"model.attention.{option}={stride} for {type(self).__name__}.",
                expected=f"{option} ≥ 1",
                fix=f"set model.attention.{option} to a positive integer (about √length)",
            )
        self.stride = stride

    # --- what a pattern implements ----------------------------------------------------------
    def sees(self, query: Tensor, key: Tensor) -> Tensor:
        """Bool, broadcast of ``query`` and ``key`` (index tensors): whether the pattern lets
        the query at that index see the key at that index (causality included)."""
        raise NotImplementedError

    def blockwise(self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, positions: Tensor) -> Tensor:
        """Full forward over a length a multiple of ``stride`` (and more than one stride):
        q/k/v (batch, heads, n, head_dim), valid (batch or 1, n), positions (batch or 1, n)."""
        raise NotImplementedError

    def key_indices(self, query: Tensor) -> tuple[Tensor, Tensor]:
        """For causal decoding: the key indices each query index (Lq,) sees, as (Lq, K) long
        indices and a (Lq, K) bool saying which of them are real (the rest are fill)."""
        raise NotImplementedError

    # --- the attend step --------------------------------------------------------------------
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
        valid = (
            torch.ones(1, k_length, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask.bool()
        )
        if q_length != k_length:
            return self._attend_gathered(q, k, v, valid, q_positions, k_positions)
        if q_length <= self.stride:
            # One block: the pattern is at most stride × stride, formed explicitly.
            index = torch.arange(q_length, device=q.device)
            allowed = self.sees(index[:, None], index[None, :]) & valid[:, None, None, :]
            return self.explicit_attend(q, k, v, allowed, q_positions, k_positions)
        padded = -(-q_length // self.stride) * self.stride
        q, k, v = (pad_to(t, -2, padded, 0.0) for t in (q, k, v))
        out = self.blockwise(q, k, v, pad_to(valid, -1, padded, False), pad_to(q_positions, -1, padded, 0))
        return out[..., :q_length, :]

    def _attend_gathered(
        self, q: Tensor, k: Tensor, v: Tensor, valid: Tensor, q_positions: Tensor, k_positions: Tensor
    ) -> Tensor:
        """Queries that are the last Lq of Lk keys (decoding with a cache of every earlier
        token): each query gathers the keys its pattern names, K = O(stride + Lk / stride)."""
        if not self.causal:
            raise ValueError(f"bidirectional {type(self).__name__} cannot decode incrementally: later keys are not known yet")
        q_length, k_length = q.shape[-2], k.shape[-2]
        query = torch.arange(k_length - q_length, k_length, device=q.device)
        index, real = self.key_indices(query)  # (Lq, K)
        keys, values = k[:, :, index], v[:, :, index]  # (batch, heads, Lq, K, head_dim)
        allowed = real & valid[:, index]  # (batch or 1, Lq, K)
        out = self.explicit_attend(
            q.unsqueeze(-2), keys, values, allowed[:, None, :, None, :], q_positions[..., None], k_positions[:, index]
        )
        return out.squeeze(-2)

    # --- helpers for the patterns -----------------------------------------------------------
    def scores(self, q: Tensor, k: Tensor | ChunkSource, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """q·kᵀ/√d plus the position's terms, in at least float32: (..., Lq, Lk). ``k`` may be a
        :class:`ChunkSource` (every chunk reads all of it; its gradient accumulates in place)."""
        if isinstance(k, ChunkSource):
            scores = k.matmul(q * self.scale, transpose=True)
        else:
            scores = torch.matmul(q * self.scale, k.transpose(-1, -2))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        terms = self.score_terms(q, q_positions, k_positions)
        return scores if terms is None else scores + terms.to(scores.dtype)

    def joint_softmax(self, scores: Sequence[Tensor], allowed: Sequence[Tensor], dtype: torch.dtype) -> tuple[list[Tensor], Tensor]:
        """One softmax over the key axes of several score tensors of the same leading shape
        (..., Lq); keys outside ``allowed`` get zero weight. Returns the weights split back
        into the parts (with dropout, in ``dtype``) and (..., Lq, 1), True where a query sees
        some key."""
        sizes = [s.shape[-1] for s in scores]
        score_shape = torch.broadcast_shapes(*(s.shape[:-1] for s in scores))
        mask_shape = torch.broadcast_shapes(*(a.shape[:-1] for a in allowed))
        joined = torch.cat([s.expand(*score_shape, -1) for s in scores], dim=-1)
        mask = torch.cat([a.expand(*mask_shape, -1) for a in allowed], dim=-1)
        # A finite fill gives masked keys exactly zero weight and rows without any visible key
        # a uniform (not NaN) weight; those rows are zeroed at the output. In place: ``joined``
        # is a fresh tensor that no backward needs, so this saves a copy of all the scores.
        joined.masked_fill_(~mask, torch.finfo(joined.dtype).min)
        weights = torch.softmax(joined, dim=-1).to(dtype)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        return list(weights.split(sizes, dim=-1)), mask.any(dim=-1, keepdim=True)

    def weighted(self, weights: Tensor, v: Tensor | ChunkSource, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        """weights @ v plus the position's relative value term for these weights (``v`` may be
        a :class:`ChunkSource`)."""
        out = v.matmul(weights) if isinstance(v, ChunkSource) else torch.matmul(weights, v)
        values = self.value_terms(weights, q_positions, k_positions)
        return out if values is None else out + values.to(out.dtype)


def blocks(x: Tensor, dim: int, size: int) -> Tensor:
    """Split negative ``dim`` (a multiple of ``size``) into (n / size, size)."""
    return x.unflatten(dim, (-1, size))


def windows(x: Tensor, dim: int, size: int, before: int, after: int, fill: float | bool | int) -> Tensor:
    """For each block c of ``size`` along negative ``dim``: the ``before`` blocks before it,
    itself and the ``after`` blocks after it, concatenated: (..., n_blocks, ..., span) with the
    span axis last, filled with ``fill`` beyond the sequence. Slot s of block c is index
    (c − before)·size + s."""
    span = (before + 1 + after) * size
    shape_before, shape_after = list(x.shape), list(x.shape)
    shape_before[dim], shape_after[dim] = before * size, after * size
    padded = torch.cat([x.new_full(shape_before, fill), x, x.new_full(shape_after, fill)], dim=dim)
    return padded.unfold(dim, span, size)


def windows_of(
    x: Tensor | ChunkSource, dim: int, size: int, before: int, after: int, fill: float | bool | int, first: int, last: int
) -> Tensor:
    """:func:`windows` of the blocks ``first`` ≤ c < ``last`` only, built from the slice of
    ``x`` they reach (no padded copy of the whole sequence): (..., last − first, ..., span)."""
    length = x.shape[dim]
    lo, hi = (first - before) * size, (last + after) * size
    start, stop = max(0, lo), min(length, hi)
    part = x.narrow(dim, start, stop - start)
    pieces = []
    for missing in (start - lo, hi - stop):
        shape = list(part.shape)
        shape[dim] = missing
        pieces.append(part.new_full(shape, fill) if missing else None)
    if pieces[0] is not None or pieces[1] is not None:
        part = torch.cat([p for p in (pieces[0], part, pieces[1]) if p is not None], dim=dim)
    return part.unfold(dim, (before + 1 + after) * size, size)
