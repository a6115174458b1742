"""Sliding-window (local) softmax attention, computed block by block so that time and memory
grow as n·w rather than n² (Beltagy et al. 2020, "Longformer: The Long-Document Transformer").

Which keys a query at index i sees (indices in the sequence, not values of ``positions``):

- causal: j with 0 ≤ i − j ≤ (window − 1)·dilation and i − j a multiple of ``dilation``, that is
  ``window`` keys counting the query itself;
- bidirectional: j with |i − j| ≤ (window − 1)·dilation, a multiple of ``dilation``, that is
  ``window`` keys on each side counting the query itself (2·window − 1 in all). The causal
  window is the left half of the bidirectional one.

Dilation spreads the window as in Longformer: with ``dilation`` d a query sees every d-th
position and its receptive field is (window − 1)·d + 1 wide, at the cost of a window of
``window`` keys. Padded keys (``key_padding_mask`` False) are never seen; a query that sees
no key at all returns zeros. The position's additive score bias is computed per block from
the gathered positions, so ALiBi-style biases work unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from plugformer import Attention, AttentionState, BuildContext, Capabilities, Component, ConfigError, bounds
from plugformer.attention import ChunkSource, chunk_count, recomputed_chunks


@dataclass
class LocalAttentionConfig:
    """``window``: keys a query sees on its side (causal: the previous ones, itself included;
    bidirectional: that many on each side). ``dilation``: see every d-th position."""

    window: int = field(default=64, metadata=bounds(ge=1))
    dilation: int = field(default=1, metadata=bounds(ge=1))
    bias: bool = True


def _pad(x: Tensor, dim: int, before: int, after: int, fill: float | bool) -> Tensor:
    """``x`` with ``before``/``after`` entries of ``fill`` added along ``dim`` (any dtype)."""
    if before == after == 0:
        return x
    parts = []
    for size in (before, after):
        shape = list(x.shape)
        shape[dim] = size
        parts.append(x.new_full(shape, fill) if size else None)
    return torch.cat([p for p in (parts[0], x, parts[1]) if p is not None], dim=dim)


def _split_residues(x: Tensor, dim: int, dilation: int, fill: float | bool) -> Tensor:
    """(..., n, ...) along negative ``dim`` → (..., dilation, ceil(n / dilation), ...), where
    entry [r, m] is position m·dilation + r; the tail is padded with ``fill``."""
    length = x.shape[dim]
    x = _pad(x, dim, 0, -length % dilation, fill)
    return x.unflatten(dim, (-1, dilation)).transpose(dim - 1, dim)


def _residue_source(x: Tensor | ChunkSource, dilation: int) -> ChunkSource:
    """:func:`_split_residues` of a tensor or source along the length, as a source; a view of
    the given source (sharing its gradient buffer) when no padding is needed."""
    if isinstance(x, ChunkSource):
        if x.shape[-2] % dilation == 0:
            return x.view(lambda t: _split_residues(t, -2, dilation, 0.0))
        x = x.tensor
    return ChunkSource(_split_residues(x, -2, dilation, 0.0))


@dataclass
class ExtraKeys:
    """Keys that every query may see besides its window (Longformer's global tokens).

    ``keys``/``values`` (batch, heads, g, head_dim); ``index`` (batch, g) their sequence
    indices; ``valid`` (batch, g) False for unused slots; ``positions`` (batch or 1, g). A query
    at index i sees extra key j when it is valid, not already in i's window (so no key counts
    twice in the softmax) and, when causal, j ≤ i.
    """

    keys: Tensor
    values: Tensor
    index: Tensor
    valid: Tensor
    positions: Tensor


class SlidingWindowAttention(Attention):
    """Local attention over (batch, heads, length, head_dim), in blocks of ``window`` queries.

    Each block of queries gathers only the keys of its own block and the previous one (and
    the next one when bidirectional), so the score tensor is (length × 2 or 3 · block).
    Positions i and j can only meet under dilation d when i ≡ j (mod d), so the sequence is
    first split into d interleaved subsequences, in each of which the window is a plain one.
    """

    def __init__(self, config: LocalAttentionConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)
        for option in ("window", "dilation"):
            if getattr(config, option) < 1:
                raise ConfigError(
                    f"model.attention.{option}={getattr(config, option)} for local attention.",
                    expected=f"{option} ≥ 1",
                    fix=f"set model.attention.{option} to a positive integer",
                )
        self.window = config.window
        self.dilation = config.dilation

    @property
    def cache_limit(self) -> int:  # type: ignore[override]
        """A causal query sees at most (window − 1)·dilation earlier keys: the cache keeps those."""
        return (self.window - 1) * self.dilation

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
            return self._attend_cached(q, k, v, key_padding_mask, q_positions, k_positions)
        return self.attend_sliding(q, k, v, key_padding_mask=key_padding_mask, positions=q_positions)

    def attend_sliding(
        self, q: Tensor | ChunkSource, k: Tensor | ChunkSource, v: Tensor | ChunkSource, *,
        key_padding_mask: Tensor | None, positions: Tensor, extra: ExtraKeys | None = None,
    ) -> Tensor:
        """The window attention of a whole sequence (Lq = Lk), each query also seeing the
        ``extra`` keys; O(n·(w + g)) time and memory. q/k/v may be :class:`ChunkSource` s
        that a caller also reads elsewhere (one gradient buffer each)."""
        length = q.shape[-2]
        d = self.dilation
        if key_padding_mask is None:
            valid = torch.ones(1, length, dtype=torch.bool, device=q.device)
        else:
            valid = key_padding_mask.bool()
        q, k, v = (_residue_source(t, d) for t in (q, k, v))  # (batch, heads, d, m, head_dim)
        out = self._attend_windows(
            q, k, v, valid=_split_residues(valid, -1, d, False), positions=_split_residues(positions, -1, d, 0),
            extra=extra,
        )
        return out.transpose(-3, -2).flatten(-3, -2)[..., :length, :]

    def _attend_cached(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, q_positions: Tensor, k_positions: Tensor
    ) -> Tensor:
        """Queries that are the last Lq of Lk keys (decoding with a cache holding at most the
        window): the band by index distance, formed explicitly over those few keys."""
        q_length, k_length = q.shape[-2], k.shape[-2]
        distance = (
            torch.arange(q_length, device=q.device)[:, None] + (k_length - q_length) - torch.arange(k_length, device=q.device)[None, :]
        )
        band = (distance >= 0) & (distance <= (self.window - 1) * self.dilation) & (distance % self.dilation == 0)
        if not self.causal:
            raise ValueError("bidirectional local attention cannot decode incrementally: later keys are not known yet")
        allowed = band[None, None]
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :].bool()
        return self.explicit_attend(q, k, v, allowed, q_positions, k_positions)

    def _attend_windows(
        self, q: ChunkSource, k: ChunkSource, v: ChunkSource, *, valid: Tensor, positions: Tensor,
        extra: ExtraKeys | None = None,
    ) -> Tensor:
        """Undilated window attention; q/k/v (..., m, head_dim), valid (batch, R, m), positions (batch or 1, R, m).

        The blocks of queries run a few at a time through :func:`recomputed_chunks`: each chunk
        slices (and pads) just the keys its windows reach, and its scores are recomputed in
        the backward pass, so no (length × span) tensor is ever kept."""
        m = q.shape[-2]
        block = min(self.window, m)
        n_blocks = -(-m // block)
        ahead = 0 if self.causal else block  # bidirectional windows also reach into the next block
        span = 2 * block + ahead
        keys = span + (0 if extra is None else extra.keys.shape[-2])
        slices = math.prod(q.shape[:-2])
        step = chunk_count(n_blocks, slices * block * keys, slices=slices)  # score elements of one block of queries

        def chunk(first: int, last: int) -> Tensor:
            return self._window_chunk(q, k, v, valid, positions, extra, first, last, block=block, ahead=ahead)

        out = recomputed_chunks(chunk, n_blocks, step, dim=-3)
        return out.flatten(-3, -2)[..., :m, :]

    def _window_chunk(
        self, q: ChunkSource, k: ChunkSource, v: ChunkSource, valid: Tensor, positions: Tensor, extra: ExtraKeys | None,
        first: int, last: int, *, block: int, ahead: int,
    ) -> Tensor:
        """Blocks ``first`` ≤ c < ``last`` of queries: (..., last − first, block, head_dim)."""
        m = q.shape[-2]
        span = 2 * block + ahead
        # Key slot s of block c is index (c − 1)·block + s: this chunk reaches keys lo ≤ j < hi.
        lo, hi = (first - 1) * block, last * block + ahead
        before, after = max(0, -lo), max(0, hi - m)

        def windows(x: Tensor | ChunkSource, dim: int, fill: float | bool) -> Tensor:
            # The unfolded axis goes last.
            part = x.narrow(dim, lo + before, hi - after - lo - before)
            return _pad(part, dim, before, after, fill).unfold(dim, span, block)

        q_stop = min(m, last * block)
        q_blocks = _pad(q.narrow(-2, first * block, q_stop - first * block), -2, 0, last * block - q_stop, 0.0).unflatten(-2, (-1, block))
        k_windows = windows(k, -2, 0.0).transpose(-1, -2)  # (..., nc, span, hd)
        v_windows = windows(v, -2, 0.0).transpose(-1, -2)  # (..., nc, span, hd)
        key_valid = windows(valid, -1, False)  # (batch, R, nc, span)

        # i − j for query row t and key slot s of the same block: t + block − s.
        offset = (
            torch.arange(block, device=q.device)[:, None] + block - torch.arange(span, device=q.device)[None, :]
        )
        band = (offset >= 0) & (offset < self.window) if self.causal else offset.abs() < self.window
        allowed = band & key_valid[:, None, :, :, None, :]  # (batch, 1, R, nc, block, span)
        p_stop = min(m, last * block)
        q_positions = _pad(positions[..., first * block : p_stop], -1, 0, last * block - p_stop, 0).unflatten(-1, (-1, block))
        k_positions = windows(positions, -1, 0)
        if extra is not None:
            k_windows, v_windows, allowed, k_positions = self._append_extra(
                extra, k_windows, v_windows, allowed, k_positions, block, first=first
            )
        return self.masked_attend(q_blocks, k_windows, v_windows, allowed, q_positions, k_positions)

    def _append_extra(
        self, extra: ExtraKeys, k_windows: Tensor, v_windows: Tensor, allowed: Tensor, k_positions: Tensor, block: int,
        *, first: int = 0,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each block's window keys followed by the g extra keys (the same for every block);
        the windows are those of blocks ``first``, ``first`` + 1, ..."""
        residues, n_blocks = k_windows.shape[2], k_windows.shape[3]
        # Sequence index of query row t of block c in residue r: (c·block + t)·d + r.
        rows = torch.arange(first * block, (first + n_blocks) * block, device=k_windows.device).view(n_blocks, block)
        query_index = rows * self.dilation + torch.arange(residues, device=rows.device)[:, None, None]
        distance = query_index[None, ..., None] - extra.index[:, None, None, None, :]  # (batch, R, nb, block, g)
        reach = (self.window - 1) * self.dilation
        in_window = (distance % self.dilation == 0) & (distance.abs() <= reach)
        if self.causal:
            in_window = in_window & (distance >= 0)
        seen = extra.valid[:, None, None, None, :] & ~in_window
        if self.causal:
            seen = seen & (distance >= 0)

        def per_block(x: Tensor) -> Tensor:  # (batch, heads, g, hd) → (batch, heads, R, nb, g, hd)
            return x[:, :, None, None].expand(-1, -1, residues, n_blocks, -1, -1)

        batch = max(allowed.shape[0], seen.shape[0])
        allowed = torch.cat([allowed.expand(batch, -1, -1, -1, -1, -1), seen[:, None]], dim=-1)
        extra_positions = extra.positions[:, None, None, :].expand(-1, residues, n_blocks, -1)
        batch = max(k_positions.shape[0], extra_positions.shape[0])
        k_positions = torch.cat(
            [k_positions.expand(batch, -1, -1, -1), extra_positions.expand(batch, -1, -1, -1)], dim=-1
        )
        return (
            torch.cat([k_windows, per_block(extra.keys)], dim=-2),
            torch.cat([v_windows, per_block(extra.values)], dim=-2),
            allowed,
            k_positions,
        )


COMPONENT = Component(
    kind="attention",
    name="local",
    factory=SlidingWindowAttention,
    config=LocalAttentionConfig,
    summary="Sliding-window softmax attention (optionally dilated), computed blockwise in O(n·w).",
    reference="Beltagy et al. 2020, Longformer: The Long-Document Transformer",
    capabilities=Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "score_bias", "qk_transform", "relative_terms", "incremental_decoding"},
        cost="n·w",
    ),
)
