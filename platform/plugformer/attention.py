"""The attention contract: a base class that owns the projections, multi-/grouped-query
heads, cross-attention and the key/value cache, so a variant implements only its attend step.

``Attention.forward(x, *, mask, positions, context=None, context_mask=None, state=None,
extras=None)`` returns a tensor of x's shape:

- ``mask`` (batch, length): True for real tokens of ``x``; ``positions`` (batch or 1,
  length): their absolute positions (offsets when a cache or memory holds earlier tokens);
- ``context``/``context_mask``: keys and values come from the encoder output (cross-attention);
- ``state``: an :class:`AttentionState` the attention made with :meth:`Attention.new_state`
  and updates in place (a :class:`KVCache`, a recurrent state, a memory);
- ``extras``: per-token inputs the objective hands to the model (global-token masks, ...).

Queries have ``n_heads`` heads and keys/values ``n_kv_heads`` (1: multi-query, Shazeer 2019;
g: grouped-query, Ainslie et al. 2023); the cache stores only the key/value heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from plugformer.components import BuildContext, PositionEncoding, mark_residual_projection
from plugformer.chunk_source import ChunkSource  # noqa: F401 - re-exported: plugins import it from here
from plugformer.errors import ConfigError
from plugformer.masks import allowed_keys, causal_allowed, no_key_fallback  # noqa: F401 - re-exported


class AttentionState:
    """What an attention carries from one call to the next. Every tensor it holds has the
    batch as its first dimension, so the model can reorder (beam search), detach (training
    across batches) and reset rows (a new document) without knowing the state's type."""

    def reorder(self, index: Tensor) -> None:
        """Keep the rows ``index`` (a LongTensor over the batch), in that order."""
        raise NotImplementedError

    def detach(self) -> None:
        """Cut the autograd history (between training steps)."""
        raise NotImplementedError

    def reset(self, rows: Tensor) -> None:
        """Forget what rows ``rows`` ((batch,) bool) have seen."""
        raise NotImplementedError


@dataclass
class KVCache(AttentionState):
    """Keys (rotated, if the position rotates) and values of the tokens seen so far, with
    their padding mask and positions. ``limit`` keeps only the last ``limit`` tokens (a
    sliding window needs no more); None keeps all. The length is per cache, so per layer."""

    keys: Tensor | None = None  # (batch, kv_heads, cached, head_dim)
    values: Tensor | None = None
    mask: Tensor | None = None  # (batch, cached) bool
    positions: Tensor | None = None  # (batch or 1, cached)
    limit: int | None = None

    @property
    def length(self) -> int:
        """Tokens held (counted in tokens, not heads or bytes)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def append(self, k: Tensor, v: Tensor, mask: Tensor | None, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Add the new tokens; returns keys, values, mask and positions of everything a query
        of the new tokens may see (the kept cache followed by the new tokens)."""
        batch, length = k.shape[0], k.shape[-2]
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.bool, device=k.device)
        if self.keys is not None:
            k = torch.cat([self.keys, k], dim=-2)
            v = torch.cat([self.values, v], dim=-2)
            mask = torch.cat([self.mask, mask.bool()], dim=-1)
            old = self.positions
            if old.shape[0] != positions.shape[0]:
                old, positions = old.expand(batch, -1), positions.expand(batch, -1)
            positions = torch.cat([old, positions], dim=-1)
        keep = k.shape[-2] if self.limit is None else min(self.limit, k.shape[-2])
        start = k.shape[-2] - keep
        self.keys, self.values = k[..., start:, :], v[..., start:, :]
        self.mask, self.positions = mask[:, start:], positions[:, start:]
        return k, v, mask.bool(), positions

    def reorder(self, index: Tensor) -> None:
        if self.keys is None:
            return
        self.keys, self.values, self.mask = self.keys[index], self.values[index], self.mask[index]
        if self.positions.shape[0] > 1:
            self.positions = self.positions[index]

    def detach(self) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys.detach(), self.values.detach()

    def reset(self, rows: Tensor) -> None:
        if self.mask is not None:
            self.mask = self.mask & ~rows[:, None]

    def nbytes(self) -> int:
        """Bytes held by keys and values."""
        if self.keys is None:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


def repeat_kv(x: Tensor, n_heads: int) -> Tensor:
    """(batch, kv_heads, length, head_dim) → (batch, n_heads, ...): each key/value head
    serves n_heads / kv_heads consecutive query heads."""
    kv_heads = x.shape[1]
    return x if kv_heads == n_heads else x.repeat_interleave(n_heads // kv_heads, dim=1)


#: Elements of one chunk's largest intermediate per (batch, head) slice that
#: :func:`chunk_count` aims for: 2¹⁵, so 512 KiB in float32 at batch 1 with 4 heads.
CHUNK_ELEMENTS = 2**15


def chunk_count(total: int, elements_per_item: int, *, slices: int = 1, budget: int | None = None) -> int:
    """Items per chunk so that a chunk's largest intermediate (``elements_per_item`` per item,
    counted over all its slices, e.g. the scores of one block of queries for every batch
    row and head) stays near ``budget`` elements per slice (default :data:`CHUNK_ELEMENTS`,
    read at each call so tests can lower it); at least 1, at most ``total``.

    ``slices`` is the number of independent (batch, head) slices the chunk computes at once.
    The budget grows with it, so a chunk covers the same stretch of the sequence whatever
    the batch size: each chunk costs a fixed overhead (a checkpoint, a few dozen kernel
    calls), which a training batch of 64 rows × 4 heads would otherwise pay for chunks of
    one or two tokens. A chunk's memory then grows with the batch, as every activation does."""
    budget = (CHUNK_ELEMENTS if budget is None else budget) * max(1, slices)
    return max(1, min(total, budget // max(1, elements_per_item)))


def recomputed_chunks(
    fn: Callable[[int, int], Tensor], total: int, step: int, *, dim: int | None
) -> Tensor:
    """``fn(start, stop)`` over consecutive ranges [start, stop) of ``total`` items, ``step``
    items at a time, joined along ``dim`` (``torch.cat``) or summed when ``dim`` is None.

    The memory contract: while autograd records, each range runs under a non-reentrant
    :func:`torch.utils.checkpoint.checkpoint`, so nothing ``fn`` computes is kept for the
    backward pass: only the outputs are, and each range's intermediates (scores, softmax
    weights, gathered key blocks) are recomputed one range at a time in the backward pass.
    Peak memory is then that of one range instead of all of them, at the cost of running
    ``fn``'s forward twice; when one range covers everything, ``fn`` runs once, plainly
    (short sequences keep their speed). ``fn`` may close over tensors that require grad (the full q, k,
    v): gradients reach them as usual. Dropout inside ``fn`` is replayed identically (the
    RNG state is restored for the recomputation). Without autograd (inference, or no input
    requiring grad) the ranges run plainly, which still bounds the peak to one range.
    """
    if total < 1 or step < 1:
        raise ValueError(f"recomputed_chunks needs total ≥ 1 and step ≥ 1, got total={total}, step={step}")
    if step >= total:  # one range: recomputing it would bound nothing, only cost a forward pass
        return fn(0, total)
    record = torch.is_grad_enabled()
    parts: list[Tensor] = []
    result: Tensor | None = None
    for start in range(0, total, step):
        stop = min(total, start + step)
        if record:
            part = checkpoint(fn, start, stop, use_reentrant=False, preserve_rng_state=True)
        else:
            part = fn(start, stop)
        if dim is None:
            result = part if result is None else result + part
        else:
            parts.append(part)
    if dim is None:
        assert result is not None
        return result
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


class Attention(nn.Module):
    """Multi-head attention with query, key/value and output projections.

    Subclasses implement :meth:`attend` on (batch, heads, length, head_dim) tensors. The base
    applies the position's query/key transform, appends to a :class:`KVCache` state, repeats
    key/value heads for grouped-query attention (unless ``native_gqa``), and offers
    :meth:`score_terms` and :meth:`explicit_attend` for variants that form scores.
    A cross-attention (``ctx.cross``) takes keys and values from ``context=``.
    """

    #: True when :meth:`attend` takes keys/values with fewer heads than queries itself.
    native_gqa: bool = False

    def __init__(self, ctx: BuildContext, *, bias: bool = True) -> None:
        super().__init__()
        if ctx.d_model % ctx.n_heads and ctx.head_size is None:
            raise ConfigError(
                f"model.d_model={ctx.d_model} is not divisible by model.n_heads={ctx.n_heads}.",
                expected="d_model a multiple of n_heads",
                fix="change model.d_model or model.n_heads, or set model.head_dim explicitly",
            )
        if ctx.n_heads % ctx.kv_heads:
            raise ConfigError(
                f"model.n_kv_heads={ctx.kv_heads} does not divide model.n_heads={ctx.n_heads}.",
                expected="n_kv_heads a divisor of n_heads (1: multi-query; n_heads: multi-head)",
                fix="choose model.n_kv_heads among the divisors of n_heads",
            )
        self.n_heads = ctx.n_heads
        self.n_kv_heads = ctx.kv_heads
        self.head_dim = ctx.head_dim
        self.causal = ctx.causal and not ctx.cross
        self.cross = ctx.cross
        self.dropout = ctx.dropout
        self.query = nn.Linear(ctx.d_model, ctx.n_heads * ctx.head_dim, bias=bias)
        self.key_value = nn.Linear(ctx.d_model, 2 * self.n_kv_heads * ctx.head_dim, bias=bias)
        self.out = mark_residual_projection(nn.Linear(ctx.n_heads * ctx.head_dim, ctx.d_model, bias=bias))
        # The position module belongs to the model; keep a reference without re-registering it.
        self.__dict__["position"] = None if ctx.cross else ctx.position

    # --- what the model calls ---------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        positions: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        state: AttentionState | None = None,
        extras: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        batch, length, d_model = x.shape
        if positions is None:
            positions = torch.arange(length, device=x.device)
        if positions.dim() == 1:
            positions = positions[None, :]
        q = self.query(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        if self.cross:
            k, v, key_mask, k_positions = self._context_keys(context, context_mask, state)
            state = None
        else:
            k, v = self._split_kv(self.key_value(x))
            q, k = self.transform_qk(q, k, positions)
            key_mask, k_positions = mask, positions
            if isinstance(state, KVCache):
                k, v, key_mask, k_positions = state.append(k, v, mask, positions)
                state = None
        if not self.native_gqa:
            k, v = repeat_kv(k, self.n_heads), repeat_kv(v, self.n_heads)
        out = self.attend(
            q, k, v, key_padding_mask=key_mask, q_positions=positions, k_positions=k_positions, state=state
        )
        # n_heads·head_dim, not d_model: head pruning may leave fewer heads than d_model/head_dim.
        return self.out(out.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim))

    def new_state(self, batch_size: int, *, streaming: bool = False) -> AttentionState | None:
        """A fresh state: for decoding (``streaming`` False) a :class:`KVCache` limited to
        :attr:`cache_limit`; for training across batches (True) None, unless the variant
        carries memory across segments (then its own state)."""
        if streaming:
            return None
        if self.cross:
            return _ContextCache()
        return KVCache(limit=self.cache_limit)

    #: Tokens a cache must keep (None: all); a sliding window needs only its window.
    cache_limit: int | None = None

    # --- what a variant implements ----------------------------------------------------------
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
        """q (batch, heads, Lq, head_dim), k/v (batch, heads, Lk, head_dim) → (batch, heads,
        Lq, head_dim). ``key_padding_mask`` (batch, Lk), True for real keys. Causal
        (``self.causal``): query i is the token of key index i + (Lk − Lq), and sees keys up to
        it. ``state`` is the variant's own state (a KVCache is handled by the base). A query
        that sees no key returns zeros."""
        raise NotImplementedError

    # --- helpers for variants ---------------------------------------------------------------
    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        """The position's query/key transform; an attention may override where it applies it."""
        return self.position.transform_qk(q, k, positions) if self.position is not None else (q, k)

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """The position's additive score bias for these positions, or None."""
        return self.position.score_bias(q_positions, k_positions) if self.position is not None else None

    def score_terms(self, q: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """Everything the position adds to the scaled scores: its bias plus its
        content-dependent relative scores; None when it adds nothing."""
        if self.position is None:
            return None
        bias = self.position.score_bias(q_positions, k_positions)
        relative = self.position.relative_scores(q, q_positions, k_positions)
        if relative is None:
            return bias
        return relative if bias is None else relative + bias.to(relative.dtype)

    def value_terms(self, weights: Tensor, q_positions: Tensor, k_positions: Tensor) -> Tensor | None:
        """The position's relative value term for these attention weights, or None."""
        return None if self.position is None else self.position.relative_values(weights, q_positions, k_positions)

    @property
    def has_relative_values(self) -> bool:
        return self.position is not None and type(self.position).relative_values is not PositionEncoding.relative_values

    def explicit_attend(
        self, q: Tensor, k: Tensor | ChunkSource, v: Tensor | ChunkSource, allowed: Tensor, q_positions: Tensor,
        k_positions: Tensor,
    ) -> Tensor:
        """Softmax attention with an explicit score tensor: scores = q·kᵀ/√d + the position's
        terms, keys outside ``allowed`` (broadcastable to the scores) removed, dropout, then
        the position's value term. Queries that see no key return zeros. q/k/v may carry
        extra dimensions between heads and length (blocks); positions then carry them too.
        ``k``/``v`` may be :class:`ChunkSource` s of the whole keys/values (a chunk of queries
        that sees every key): their gradients then accumulate in place."""
        return self._explicit(q, k, v, allowed, q_positions, k_positions, self.score_terms(q, q_positions, k_positions))

    def masked_attend(
        self, q: Tensor, k: Tensor | ChunkSource, v: Tensor | ChunkSource, allowed: Tensor, q_positions: Tensor,
        k_positions: Tensor,
    ) -> Tensor:
        """:meth:`explicit_attend`'s contract (the same values, to rounding), through torch's
        fused ``scaled_dot_product_attention`` when nothing needs the explicit scores: the
        position adds no score or value terms, no attention dropout is active and k/v are
        tensors. On CPU the fused kernel is one call forward and one backward instead of a
        dozen, and it keeps only a logsumexp per query row for the backward pass (not the
        scores or weights). q/k/v may carry extra dimensions between heads and length, as in
        :meth:`explicit_attend`; ``allowed`` broadcasts to the scores."""
        terms = self.score_terms(q, q_positions, k_positions)
        explicit = (
            terms is not None or self.has_relative_values or (self.training and self.dropout > 0)
            or isinstance(k, ChunkSource) or isinstance(v, ChunkSource)
        )
        if explicit:
            return self._explicit(q, k, v, allowed, q_positions, k_positions, terms)
        lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
        q_length, k_length = q.shape[-2], k.shape[-2]
        safe, visible = no_key_fallback(allowed)

        def merged(x: Tensor) -> Tensor:  # (*lead, L, e) → (1, prod(lead), L, e): SDPA's fused CPU kernel is 4-D
            return x.expand(*lead, *x.shape[-2:]).reshape(1, -1, *x.shape[-2:])

        out = F.scaled_dot_product_attention(merged(q), merged(k), merged(v), attn_mask=merged(safe), scale=self.scale)
        out = out.view(*lead, q_length, v.shape[-1])
        # Zeroing costs a backward pass over the output; on the CPU it is skipped when every
        # query sees a key (reading the flag there needs no device synchronisation).
        if out.device.type != "cpu" or not bool(visible.all()):
            out = out.masked_fill(~visible, 0.0)
        return out

    def _explicit(
        self, q: Tensor, k: Tensor | ChunkSource, v: Tensor | ChunkSource, allowed: Tensor, q_positions: Tensor,
        k_positions: Tensor, terms: Tensor | None,
    ) -> Tensor:
        """:meth:`explicit_attend` given the position's score terms (None: none)."""
        # In-place steps act on fresh tensors no backward needs, saving copies of the scores.
        if isinstance(k, ChunkSource):
            scores = k.matmul(q * self.scale, transpose=True)
        else:
            scores = torch.matmul(q * self.scale, k.transpose(-1, -2))
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        if terms is not None:
            scores.add_(terms.to(scores.dtype))
        # A finite fill gives masked keys exactly zero weight and rows without any visible key
        # a uniform (not NaN) weight; those rows are zeroed at the output.
        scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1).to(v.dtype)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = v.matmul(weights) if isinstance(v, ChunkSource) else torch.matmul(weights, v)
        values = self.value_terms(weights, q_positions, k_positions)
        if values is not None:
            out = out + values.to(out.dtype)
        return out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)

    def projection_weights(self) -> dict[str, Tensor]:
        """Views of the projection weights by role: query, key, value, output (for
        initializations such as DeepNorm's that treat them differently)."""
        kv = self.n_kv_heads * self.head_dim
        return {
            "query": self.query.weight,
            "key": self.key_value.weight[:kv],
            "value": self.key_value.weight[kv:],
            "output": self.out.weight,
        }

    @property
    def scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    def _split_kv(self, kv: Tensor) -> tuple[Tensor, Tensor]:
        batch, length = kv.shape[:2]
        k, v = kv.view(batch, length, 2, self.n_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def _context_keys(
        self, context: Tensor | None, context_mask: Tensor | None, state: AttentionState | None
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        if isinstance(state, _ContextCache) and state.keys is not None:
            return state.keys, state.values, state.mask, state.positions
        if context is None:
            raise ValueError(f"{type(self).__name__} is a cross-attention and needs context=")
        k, v = self._split_kv(self.key_value(context))
        positions = torch.arange(context.shape[1], device=context.device)[None, :]
        if isinstance(state, _ContextCache):
            state.keys, state.values, state.mask, state.positions = k, v, context_mask, positions
        return k, v, context_mask, positions


@dataclass
class _ContextCache(AttentionState):
    """A cross-attention's projected context keys and values, computed once per sequence."""

    keys: Tensor | None = None
    values: Tensor | None = None
    mask: Tensor | None = None
    positions: Tensor | None = None

    def reorder(self, index: Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[index], self.values[index]
            self.mask = self.mask[index] if self.mask is not None else None

    def detach(self) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys.detach(), self.values.detach()

    def reset(self, rows: Tensor) -> None:
        # The context is per sequence: drop it whole; the next call projects ``context=`` again.
        self.keys = self.values = self.mask = self.positions = None
