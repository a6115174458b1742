"""LSH attention (Kitaev et al. 2020, "Reformer: The Efficient Transformer"): queries and keys
are shared, tokens are hashed into buckets by random rotations, and each query attends only
to keys of its own bucket nearby in a sorted order, in O(n·c) time and memory for chunks of
c tokens (plus an O(n log n) sort) instead of O(n²).

Per hash round r, with R_r a random (head_dim × n_buckets/2) matrix per head, the bucket of
token i is h_r(i) = argmax([k̂_i R_r ; −k̂_i R_r]) (angular LSH), k̂ = q/‖q‖. Tokens are sorted
by (bucket, index); each bucket is cut into chunks of ``chunk_size`` tokens, and a query
attends to the keys of its chunk and of the previous chunk of the same bucket. Chunks are
aligned to the start of each bucket rather than cut across the whole sorted sequence as in
the paper: then the keys a query sees depend only on the tokens up to it, so causal
attention is exactly causal (with chunks cut across buckets, a later token moves the chunk
boundaries of earlier ones and changes their outputs), and no chunk mixes buckets.

Masks: a query never sees a padded key (padded tokens are hashed into a bucket of their own,
so they do not move real tokens either), nor in causal mode a later token, nor itself unless
it is the only key it may see (with shared QK a token's key is closest to its own query).
The ``n_hashes`` rounds are combined with weights softmax_r(logsumexp of round r's scores),
which equals one softmax over the union of the rounds' keys when no key is found twice (the
paper's correction for keys found in several rounds is left out).

Shared QK on :class:`plugformer.Attention`: the query projection is the shared one, the keys
are the normalized queries, and the values come from the value half of ``key_value`` (with
``n_kv_heads`` heads, repeated for grouped-query attention). The key half of ``key_value`` is
left unused (it keeps the projection layout every attention on the base has) and receives no
gradient. The rotations are drawn afresh at every forward pass in training, from the global
generator (so a reversible block replays them in its recomputation), and are a fixed draw
from ``seed`` (plus the layer index) in evaluation mode, so evaluation is deterministic.

Memory: each round's sorted chunks run a few at a time through ``recomputed_chunks``; they
read q (normalizing the keys themselves) and v row by row through :class:`_HeadRows`, whose
pieces add their gradients into one buffer per tensor, and hand their outputs to a
:class:`_RoundMerge` that combines the rounds token by token as the chunks come (an online
softmax over rounds). So no round's output, no sorted or gathered copy of q, k or v, and no
normalized keys are kept whole: the backward pass keeps the merged output (which the output
projection reads as a view) and one logsumexp per token and round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from plugformer import Attention, AttentionState, BuildContext, Capabilities, Component, ConfigError, bounds
from plugformer.attention import chunk_count, recomputed_chunks


@dataclass
class ReformerAttentionConfig:
    """``chunk_size``: tokens per chunk (a query sees at most twice as many keys).
    ``n_buckets``: hash buckets, 1 or even; None picks the even number nearest
    length / chunk_size (at least 2) at every call. ``n_hashes``: hash rounds. ``seed``: of
    the rotations used in evaluation mode."""

    chunk_size: int = field(default=64, metadata=bounds(ge=1))
    n_buckets: int | None = field(default=None, metadata=bounds(ge=1))
    n_hashes: int = field(default=2, metadata=bounds(ge=1))
    seed: int = 0
    bias: bool = True


class LSHAttention(Attention):
    """Shared-QK attention within LSH buckets, chunked; see the module docstring."""

    def __init__(self, config: ReformerAttentionConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)
        if config.n_buckets is not None and config.n_buckets > 1 and config.n_buckets % 2:
            raise ConfigError(
                f"model.attention.n_buckets={config.n_buckets} for reformer attention.",
                expected="1 or an even number (angular LSH hashes to ±directions of n_buckets/2 rotations)",
                fix=f"set model.attention.n_buckets={config.n_buckets + 1} (or null to choose from the length)",
            )
        self.chunk_size = config.chunk_size
        self.n_buckets = config.n_buckets
        self.n_hashes = config.n_hashes
        self.seed = config.seed + 1000 * ctx.layer_index

    def buckets_for(self, length: int) -> int:
        """The number of buckets used for a sequence of ``length`` tokens."""
        if self.n_buckets is not None:
            return self.n_buckets
        return 2 * max(1, round(length / (2 * self.chunk_size)))

    def rotations(self, n_buckets: int, like: Tensor) -> Tensor:
        """(n_hashes, heads, head_dim, n_buckets/2) random rotations: fresh in training, a
        fixed draw from the seed in evaluation mode."""
        shape = (self.n_hashes, self.n_heads, self.head_dim, max(1, n_buckets // 2))
        if self.training:
            return torch.randn(shape, device=like.device, dtype=like.dtype)
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(like.device, like.dtype)

    @staticmethod
    def hash(keys: Tensor, rotations: Tensor, n_buckets: int) -> Tensor:
        """keys (batch, heads, n, head_dim), rotations (heads, head_dim, n_buckets/2) →
        buckets (batch, heads, n) in [0, n_buckets): the argmax over [xR, −xR].

        That is the largest |xR|, in the second half where its entry is negative. The keys are
        rotated a chunk of rows at a time: with the default bucket count (length / chunk_size)
        all rotated keys together grow as n², 64 MiB at 16K tokens."""
        if n_buckets == 1:
            return torch.zeros(keys.shape[:-1], dtype=torch.long, device=keys.device)
        batch, heads, n, _ = keys.shape
        half = rotations.shape[-1]
        buckets = torch.empty(keys.shape[:-1], dtype=torch.long, device=keys.device)
        step = chunk_count(n, batch * heads * half, slices=batch * heads)
        for start in range(0, n, step):
            rotated = torch.einsum("bhnd,hdr->bhnr", keys[:, :, start : start + step], rotations)
            top = rotated.abs().argmax(dim=-1, keepdim=True)
            negative = rotated.gather(-1, top) < 0
            buckets[:, :, start : start + step] = (top + negative * half).squeeze(-1)
        return buckets

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
        if q.shape[-2] != k.shape[-2]:
            raise ValueError("reformer attention attends within one call's tokens; it cannot decode with a cache")
        batch, heads, length, head_dim = q.shape
        n_buckets = self.buckets_for(length)
        valid = key_padding_mask.bool()[:, None, :] if key_padding_mask is not None else None
        with torch.no_grad():  # buckets are discrete: hashing needs no gradient, and its keys are not kept
            keys = F.normalize(q, dim=-1)  # shared QK: the keys are the normalized queries
            rotations = self.rotations(n_buckets, keys)
            all_buckets = []
            for r in range(self.n_hashes):
                buckets = self.hash(keys, rotations[r], n_buckets)
                if valid is not None:
                    buckets = buckets.masked_fill(~valid, n_buckets)  # padding: a bucket of its own
                all_buckets.append(buckets)
            del keys

        # Chunks read q (the keys are normalized inside them) and v row by row and add their
        # gradients into one buffer each; every round's chunks hand their outputs straight to
        # the merge, so no round's output is ever held whole.
        q_rows, v_rows = _HeadRows(q), _HeadRows(v)
        merge = _RoundMerge(batch, heads, length, head_dim, self.n_hashes, dtype=_packed_dtype(v.dtype, q.dtype), device=q.device)
        handles = [
            self._attend_round(q_rows, v_rows, buckets, n_buckets + 1, valid, merge, r)
            for r, buckets in enumerate(all_buckets)
        ]
        out = _MergeRead.apply(merge, *handles)  # (batch·length·heads, head_dim)
        # The rows are in (batch, length, heads) order: the base's transpose back and reshape
        # for the output projection are views, so the projection keeps no second copy.
        return out.view(batch, length, heads, head_dim).transpose(1, 2).to(v.dtype)

    def _attend_round(
        self, q: _HeadRows, v: _HeadRows, buckets: Tensor, total_buckets: int, valid: Tensor | None,
        merge: _RoundMerge, round_index: int,
    ) -> Tensor:
        """One hash round, merged into ``merge``; returns the round's (0-dim, zero) handle."""
        batch, heads, n, head_dim = q.shape
        c = min(self.chunk_size, n)
        # Each bucket takes ceil(count / c) chunks: at most n // c + (non-empty buckets) in all.
        n_chunks = n // c + min(total_buckets, n)
        with torch.no_grad():
            index = torch.arange(n, device=buckets.device)
            order = (buckets * n + index).argsort(dim=-1)  # sorted by (bucket, index)
            sorted_buckets = buckets.gather(-1, order)
            counts = torch.zeros(batch, heads, total_buckets, dtype=torch.long, device=buckets.device)
            counts.scatter_add_(-1, buckets, torch.ones_like(buckets))
            starts = counts.cumsum(-1) - counts
            rank = index - starts.gather(-1, sorted_buckets)  # rank within its bucket
            bucket_chunks = (counts + c - 1) // c
            first_chunk = bucket_chunks.cumsum(-1) - bucket_chunks
            slot_sorted = first_chunk.gather(-1, sorted_buckets) * c + rank
            token_of_slot = torch.full((batch, heads, n_chunks * c), n, dtype=torch.long, device=buckets.device)
            token_of_slot.scatter_(-1, slot_sorted, order)  # n marks an empty slot
            slots = token_of_slot.view(batch, heads, n_chunks, c)
            rows = merge.rows(slots)  # each slot's row in the merge (empty slots: its spare row)
            empty = torch.full_like(slots[:, :, :1], n)
            within = torch.arange(c, device=slots.device)
            # Causal: key slot c + u of a chunk is later than its query t when u > t.
            later_keys = torch.cat([torch.zeros(c, c, dtype=torch.bool, device=slots.device), within[None, :] > within[:, None]], dim=1)

        def chunk(first: int, last: int) -> Tensor:
            """Sorted chunks first ≤ j < last, merged; returns their zero handle."""
            q_index = slots[:, :, first:last]
            previous = slots[:, :, first - 1 : last - 1] if first else torch.cat([empty, slots[:, :, : last - 1]], dim=2)
            k_index = torch.cat([previous, q_index], dim=3)  # each chunk sees the previous one and itself

            def at(x: Tensor, index: Tensor, fill: int | bool) -> Tensor:
                """Per-token values (batch, 1 or heads, n) at slot ``index`` (n: an empty slot, given ``fill``)."""
                taken = x.expand(batch, heads, n).gather(2, index.flatten(2).clamp_max(n - 1)).view(index.shape)
                return taken.masked_fill(index == n, fill)

            k_empty, k_tokens = k_index == n, k_index.clamp_max(n - 1)
            # The queries of a chunk are the second half of its keys' slots: read q once.
            # Empty slots read the last token: ``allowed`` gives them exactly zero weight as
            # keys and the merge's spare row (zero gradient) as queries, so nothing they read
            # reaches an output or a gradient.
            q_window = q.take(k_tokens)
            k_window = F.normalize(q_window, dim=-1)
            v_window = v.take(k_tokens)
            q_slots = q_window[..., c:, :]
            # Chunks are aligned to their bucket: every query of a chunk has the bucket of its
            # first slot, the chunk's own keys are in index order and the previous chunk's
            # keys come earlier. So what a query sees is a per-key condition (real, same
            # bucket), the causal order within the chunk, and its own key (key slot c + t of
            # query t) only when it sees no other; an empty query slot (it feeds the merge's
            # spare row) may see anything.
            key_ok = ~k_empty & (at(buckets, k_index, -1) == at(buckets, q_index[..., :1], -1))
            if valid is not None:
                key_ok = key_ok & at(valid, k_index, False)
            own = key_ok[..., c:]  # (…, c): query t's own key
            earlier = key_ok[..., :c].sum(dim=-1, keepdim=True)
            visible = earlier + (own.cumsum(dim=-1) if self.causal else own.sum(dim=-1, keepdim=True))
            alone = visible == own.long()  # no key but its own (or none at all)
            seen = own | ~alone
            blocked = (~key_ok)[..., None, :].expand(*key_ok.shape[:-1], c, 2 * c)
            if self.causal:
                blocked = blocked | later_keys
            else:
                blocked = blocked.clone()
            blocked.diagonal(c, -2, -1).logical_or_(~alone)

            scores = torch.matmul(q_slots * self.scale, k_window.transpose(-1, -2))
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            # The finite fill gives keys outside ``allowed`` exactly zero weight; rows that see
            # nothing get uniform weights and are zeroed at the output.
            scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)
            weights = probs.to(v.dtype)
            if self.training and self.dropout > 0:
                weights = F.dropout(weights, p=self.dropout)
            out = torch.matmul(weights, v_window).masked_fill(~seen[..., None], 0.0)
            if self.n_hashes > 1 and scores.requires_grad:
                lse = _LogSumExp.apply(scores, probs)
                # Times exactly 1: the merge's gradient for these columns (the round weight
                # times the output's) then reaches the logsumexp as weight × (out_grad · out).
                out = out * torch.exp(lse - lse.detach())[..., None].to(out.dtype)
            else:
                with torch.no_grad():
                    lse = _logsumexp(scores, probs)
            lse = lse.masked_fill(~seen, torch.finfo(lse.dtype).min)
            dtype = torch.promote_types(out.dtype, lse.dtype)  # exact for both
            part = torch.cat([out.to(dtype), lse.to(dtype).unsqueeze(-1)], dim=-1)
            return _MergeWrite.apply(part, merge, rows[:, :, first:last], round_index)

        # A few sorted chunks at a time, recomputed in backward: no round's sorted keys or
        # (slots × 2c) scores are kept, and the outputs go to the merge as they come.
        step = chunk_count(n_chunks, batch * heads * c * 2 * c, slices=batch * heads)
        return recomputed_chunks(chunk, n_chunks, step, dim=None)


class _LogSumExp(torch.autograd.Function):
    """logsumexp(scores) over the last dimension, whose gradient (the softmax) is taken from
    ``probs``, the softmax the chunk keeps anyway for the product with the values, rather
    than from a second copy of the scores."""

    @staticmethod
    def forward(ctx, scores: Tensor, probs: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(probs)
        return _logsumexp(scores, probs)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (probs,) = ctx.saved_tensors
        return grad[..., None] * probs, None


def _logsumexp(scores: Tensor, probs: Tensor) -> Tensor:
    """logsumexp(scores) over the last dimension from the softmax ``probs`` already formed:
    s_j − log p_j for the largest score s_j, whose weight p_j ≥ 1/keys keeps the logarithm
    well conditioned (equal to torch.logsumexp to rounding; two reductions instead of its
    several passes over the scores)."""
    return scores.amax(dim=-1) - probs.amax(dim=-1).log()


def _packed_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """The dtype that holds a round's outputs and logsumexps exactly (at least float32)."""
    dtype = torch.float32
    for other in dtypes:
        dtype = torch.promote_types(dtype, other)
    return dtype


class _HeadRows:
    """q or v (batch, heads, n, head_dim), of any strides, read by per-head token indices
    inside the chunks (:meth:`take`); the pieces add their gradients in place into one
    buffer of the tensor's size, which becomes its gradient after the last piece's backward
    (as :class:`plugformer.attention.ChunkSource` does for indices shared by every head).
    Without autograd the pieces are plain gathers.

    Only this object (held by the chunks' closures, so by their checkpoints) refers to the
    tensor; the graph's nodes hold just the :class:`_RowGradient`. The tensor (a view of a
    projection's output) is then freed once the checkpoints are, after the chunks' backward,
    rather than with the whole graph."""

    def __init__(self, x: Tensor) -> None:
        self.shape, self.dtype = x.shape, x.dtype
        self.tracked = torch.is_grad_enabled() and x.requires_grad
        self.gradient = _RowGradient(x)
        self.tensor = _HeadRowsRoot.apply(x, self.gradient) if self.tracked else x

    def take(self, index: Tensor) -> Tensor:
        """Rows ``index`` (batch, heads, ...) of each head: (batch, heads, ..., head_dim)."""
        if not self.tracked:
            return _gather_rows(self.tensor, index)
        return _HeadRowsTake.apply(self.tensor, self.gradient, index)


class _RowGradient:
    """The buffer the pieces of a :class:`_HeadRows` add their gradients into."""

    def __init__(self, like: Tensor) -> None:
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.buffer: Tensor | None = None

    def get(self) -> Tensor:
        if self.buffer is None:
            self.buffer = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        return self.buffer


def _rows_of(x: Tensor) -> tuple[Tensor, Tensor, int] | None:
    """``x`` (batch, heads, n, d) as a (rows, d) view of its memory, the row of token 0 of each
    (batch, head) (batch, heads, 1) and the rows between consecutive tokens; None when its
    rows are not whole d-vectors (then :func:`_gather_rows` gathers element by element)."""
    d = x.shape[-1]
    if x.stride(-1) != 1 or any(stride % d for stride in x.stride()[:-1]):
        return None
    s0, s1, s2 = (stride // d for stride in x.stride()[:-1])
    rows = 1 + sum((size - 1) * stride for size, stride in zip(x.shape[:-1], (s0, s1, s2)))
    flat = x.as_strided((rows, d), (d, 1), x.storage_offset())
    base = (torch.arange(x.shape[0], device=x.device) * s0)[:, None, None] + (torch.arange(x.shape[1], device=x.device) * s1)[None, :, None]
    return flat, base, s2


def _flat_index(index: Tensor, base: Tensor, step: int) -> Tensor:
    """Row numbers of tokens ``index`` (batch, heads, ...) in a :func:`_rows_of` view, flat."""
    flat = index.flatten(2)
    return (flat * step + base if step != 1 else flat + base).reshape(-1)


def _gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """Rows ``index`` (batch, heads, ...) of each head of ``x``: one whole-row copy per token
    (index_select) where the layout allows, else a gather."""
    rows = _rows_of(x)
    if rows is None:
        flat = index.flatten(2)
        return x.gather(2, flat[..., None].expand(*flat.shape, x.shape[-1])).view(*index.shape, x.shape[-1])
    flat_x, base, step = rows
    return flat_x.index_select(0, _flat_index(index, base, step)).view(*index.shape, x.shape[-1])


class _HeadRowsRoot(torch.autograd.Function):
    """Identity whose backward hands on the pieces' accumulated gradient (it runs after them)."""

    @staticmethod
    def forward(ctx, x: Tensor, gradient: _RowGradient) -> Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.gradient = gradient
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, None]:  # type: ignore[override]
        pieces, ctx.gradient.buffer = ctx.gradient.buffer, None
        if grad is None:
            return pieces, None
        return (grad if pieces is None else pieces.add_(grad)), None


class _HeadRowsTake(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, gradient: _RowGradient, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.gradient, ctx.index = gradient, index
        return _gather_rows(x, index)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[None, None, None]:  # type: ignore[override]
        if grad is not None:
            buffer = ctx.gradient.get()  # contiguous: its rows are whole d-vectors
            flat_buffer, base, step = _rows_of(buffer)
            rows = _flat_index(ctx.index, base, step)
            flat_buffer.index_add_(0, rows, grad.reshape(-1, grad.shape[-1]).to(buffer.dtype))
        return None, None, None


class _RoundMerge:
    """The hash rounds' outputs combined token by token as their chunks come, with weights
    softmax_r(lse_r): a running maximum ``top``, ``total`` = Σ_r exp(lse_r − top) and
    ``acc`` = Σ_r exp(lse_r − top)·out_r (the online softmax of flash attention, over rounds).

    Rows are tokens in (batch, length, heads) order, so that the result transposed back for
    the output projection is a view; one spare last row takes the empty slots. Only each
    round's logsumexps (one number per token) are kept for the backward pass, where a chunk's
    gradient is formed from the output's gradient g: out_r gets w_r·g and lse_r gets
    w_r·(g·out_r − g·out), with w_r = exp(lse_r − LSE) (see :class:`_MergeWrite`)."""

    def __init__(self, batch: int, heads: int, length: int, head_dim: int, rounds: int, *, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.batch, self.heads, self.length, self.head_dim = batch, heads, length, head_dim
        count = batch * length * heads + 1
        self.spare = count - 1
        self.acc: Tensor | None = torch.zeros(count, head_dim, dtype=dtype, device=device)
        self.top = torch.full((count,), -math.inf, dtype=dtype, device=device)
        self.total = torch.zeros(count, dtype=dtype, device=device)
        self.lse = torch.zeros(rounds, count, dtype=dtype, device=device)
        self.open = True  # False once read: a checkpoint's recomputation must not write again
        self.writes = 0  # writes whose backward will run
        self.pending = 0
        self.grad: Tensor | None = None
        self.dot: Tensor | None = None

    def rows(self, slots: Tensor) -> Tensor:
        """Merge rows of sorted slots (batch, heads, ...) holding token indices (length: empty)."""
        batch, heads = slots.shape[:2]
        tail = (1,) * (slots.dim() - 2)
        example = torch.arange(batch, device=slots.device).view(batch, 1, *tail)
        head = torch.arange(heads, device=slots.device).view(1, heads, *tail)
        rows = (example * self.length + slots) * self.heads + head
        return rows.masked_fill(slots == self.length, self.spare)

    def add(self, part: Tensor, rows: Tensor, round_index: int) -> None:
        """Merge a chunk's [out | lse] at its rows (each real row once per round)."""
        assert self.acc is not None
        index = rows.reshape(-1)
        part = part.reshape(-1, self.head_dim + 1).to(self.acc.dtype)
        out, lse = part[:, :-1], part[:, -1]
        top = self.top[index]
        new_top = torch.maximum(top, lse)
        keep, weight = torch.exp(top - new_top), torch.exp(lse - new_top)
        self.acc[index] = self.acc[index] * keep[:, None] + out * weight[:, None]
        self.total[index] = self.total[index] * keep + weight
        self.top[index] = new_top
        self.lse[round_index, index] = lse

    def read(self) -> Tensor:
        """The combined output (every row but the spare), normalized in place; closes the merge."""
        assert self.acc is not None
        out = self.acc[: self.spare].div_(self.total[: self.spare, None])
        self.log_total = self.top + self.total.log()  # LSE: logsumexp over the rounds
        self.acc, self.open = None, False
        return out

    def gradient(self, rows: Tensor, round_index: int, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        """The gradient of a chunk's [out | lse] at ``rows`` (see the class docstring)."""
        assert self.grad is not None and self.dot is not None
        index = rows.reshape(-1)
        real = index != self.spare
        clamped = index.clamp_max(self.spare - 1)
        weight = torch.exp(self.lse[round_index, index] - self.log_total[index])
        weight = torch.where(real, weight, torch.zeros_like(weight))  # the spare row may hold anything
        out_grad = self.grad.index_select(0, clamped) * weight[:, None].to(self.grad.dtype)
        lse_grad = -weight * self.dot.index_select(0, clamped)
        return torch.cat([out_grad.to(dtype), lse_grad.to(dtype)[:, None]], dim=-1).view(shape)


class _MergeWrite(torch.autograd.Function):
    """Merges a chunk's [out | lse] (computed with the exact-1 factor exp(lse − lse) on out,
    see ``_attend_round``) and returns a 0-dim handle; the merge's read depends on every
    handle, so this backward runs after it, when the output's gradient is known."""

    @staticmethod
    def forward(ctx, part: Tensor, merge: _RoundMerge, rows: Tensor, round_index: int) -> Tensor:  # type: ignore[override]
        if merge.open:
            merge.add(part, rows, round_index)
            merge.writes += ctx.needs_input_grad[0]
        ctx.merge, ctx.rows, ctx.round_index = merge, rows, round_index
        ctx.shape, ctx.dtype = part.shape, part.dtype
        return part.new_zeros(())

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        merge = ctx.merge
        part_grad = merge.gradient(ctx.rows, ctx.round_index, ctx.shape, ctx.dtype)
        merge.pending -= 1
        if merge.pending == 0:  # the last chunk: the output's gradient is no longer needed
            merge.grad = merge.dot = None
        return part_grad, None, None, None


class _MergeRead(torch.autograd.Function):
    """The merged output (batch·length·heads, head_dim) from the rounds' handles."""

    @staticmethod
    def forward(ctx, merge: _RoundMerge, *handles: Tensor) -> Tensor:  # type: ignore[override]
        out = merge.read()
        ctx.merge, ctx.handles = merge, len(handles)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (out,) = ctx.saved_tensors
        merge = ctx.merge
        merge.grad = grad
        # g·out per row, without a full-size product: one (1 × d)(d × 1) product per row.
        merge.dot = torch.matmul(grad.unsqueeze(-2), out.unsqueeze(-1).to(grad.dtype)).view(-1)
        merge.pending = merge.writes
        zero = grad.new_zeros(())
        return (None, *(zero for _ in range(ctx.handles)))


COMPONENT = Component(
    kind="attention",
    name="reformer",
    factory=LSHAttention,
    config=ReformerAttentionConfig,
    summary="Reformer LSH attention: shared QK, angular hashing, sorted chunks, several hash rounds; O(n·c).",
    reference="Kitaev et al. 2020, Reformer: The Efficient Transformer",
    capabilities=Capabilities(provides={"causal", "bidirectional", "key_padding_mask"}, cost="n·log n"),
)
