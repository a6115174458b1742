"""Longformer attention: a sliding window plus global tokens (Beltagy et al. 2020,
"Longformer: The Long-Document Transformer").

Every query sees its window, exactly as in ``local`` (``window``, ``dilation``), and the
global tokens; a global token sees every token. Global tokens are the union of

- fixed indices: ``global_tokens`` (sequence indices, default ``[0]``, the CLS token of a
  classification task) and the first ``global_first`` tokens;
- tokens an objective or data task marks per example: a (batch, length) bool tensor under
  ``extras["global_mask"]`` (the key is ``extras_key``), see docs/plugins.md.

Padded tokens are never global. Causal: the window is causal, a global token is seen only
by itself and later positions, and a global query sees every earlier key.

The g global keys are gathered and appended to each block of window keys, and the g global
queries attend to all n keys separately, so time and memory are O(n·(w + g)); g is the
largest number of global tokens of an example in the batch. With ``global_projections`` the
global queries use their own query, key and value projections (the paper's Q_g, K_g, V_g,
used as in Hugging Face's implementation: only for the rows of the global tokens).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer import AttentionState, BuildContext, Capabilities, Component, ConfigError, bounds, repeat_kv
from plugformer.attention import ChunkSource

from plugformer_plugins.attention.local import ExtraKeys, LocalAttentionConfig, SlidingWindowAttention

#: The extras key under which an objective marks global tokens: (batch, length) bool.
GLOBAL_MASK = "global_mask"


@dataclass
class LongformerConfig(LocalAttentionConfig):
    """``window``/``dilation``/``bias`` as in ``local``. ``global_tokens``: sequence indices that
    are global in every example; ``global_first``: also the first that many tokens.
    ``extras_key``: the extras entry that marks further global tokens per example.
    ``global_projections``: separate projections for the global tokens' own attention."""

    global_tokens: list[int] = field(default_factory=lambda: [0])
    global_first: int = field(default=0, metadata=bounds(ge=0))
    extras_key: str = GLOBAL_MASK
    global_projections: bool = False


class LongformerAttention(SlidingWindowAttention):
    """Sliding-window attention with symmetric global attention, O(n·(w + g))."""

    def __init__(self, config: LongformerConfig, ctx: BuildContext) -> None:
        super().__init__(config, ctx)
        if any(int(i) < 0 for i in config.global_tokens):
            raise ConfigError(
                f"model.attention.global_tokens={list(config.global_tokens)} has a negative index.",
                expected="sequence indices ≥ 0",
                fix="list indices from the start of the sequence, e.g. model.attention.global_tokens=[0]",
            )
        self.fixed = sorted({int(i) for i in config.global_tokens} | set(range(config.global_first)))
        self.extras_key = config.extras_key
        if config.global_projections:
            self.global_query = nn.Linear(ctx.d_model, ctx.n_heads * ctx.head_dim, bias=config.bias)
            self.global_key_value = nn.Linear(ctx.d_model, 2 * self.n_kv_heads * ctx.head_dim, bias=config.bias)
        else:
            self.global_query = self.global_key_value = None
        self._marked: Tensor | None = None
        self._x: Tensor | None = None

    @property
    def cache_limit(self) -> int | None:  # type: ignore[override]
        """Fixed global tokens are seen by every later query, so their keys must stay: the cache
        keeps everything then (indices in it are sequence indices), else only the window."""
        return None if self.fixed else super().cache_limit

    def forward(self, x: Tensor, *, extras: Mapping[str, Tensor] | None = None, **kwargs: object) -> Tensor:  # type: ignore[override]
        """The base's forward; ``extras[extras_key]`` (batch, length) bool marks global tokens."""
        self._marked = None if extras is None else extras.get(self.extras_key)
        self._x = x if self.global_query is not None else None
        try:
            return super().forward(x, extras=extras, **kwargs)  # type: ignore[arg-type]
        finally:
            self._marked = self._x = None

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
            return self._attend_cached_global(q, k, v, key_padding_mask, q_positions, k_positions)
        batch, length = q.shape[0], q.shape[-2]
        valid = (
            torch.ones(batch, length, dtype=torch.bool, device=q.device)
            if key_padding_mask is None
            else key_padding_mask.bool().expand(batch, -1)
        )
        is_global = self.global_mask(batch, length, q.device) & valid
        count = int(is_global.sum(dim=-1).max()) if length else 0
        if count == 0:
            return self.attend_sliding(q, k, v, key_padding_mask=key_padding_mask, positions=q_positions)
        # Global tokens first, in sequence order (a stable sort of "not global").
        index = torch.sort((~is_global).to(torch.int8), dim=-1, stable=True).indices[:, :count]  # (batch, g)
        slot_valid = is_global.gather(-1, index)
        positions = q_positions.expand(batch, -1)
        global_positions = positions.gather(-1, index)
        # One gradient buffer per tensor for the window chunks, the global keys and the global
        # queries' attention to every key: no full-size temporaries in the backward pass.
        q_src, k_src, v_src = (ChunkSource(t) for t in (q, k, v))
        extra = ExtraKeys(k_src.rows(index), v_src.rows(index), index, slot_valid, global_positions)
        out = self.attend_sliding(q_src, k_src, v_src, key_padding_mask=key_padding_mask, positions=q_positions, extra=extra)

        allowed = valid[:, None, None, :]
        if self.causal:
            allowed = allowed & (torch.arange(length, device=q.device)[None, None, None, :] <= index[:, None, :, None])
        if self.global_query is None or self._x is None:
            global_q, all_k, all_v = q_src.rows(index), k_src, v_src
        else:
            own_q, all_k, all_v = self._global_qkv(q, k, v, positions)
            global_q = _rows(own_q, index)
        global_out = self.explicit_attend(global_q, all_k, all_v, allowed, global_positions, k_positions)
        rows = index[:, None, :, None].expand(-1, out.shape[1], -1, out.shape[-1])
        global_out = torch.where(slot_valid[:, None, :, None], global_out, out.gather(-2, rows))
        return out.scatter(-2, rows, global_out)

    def global_mask(self, batch: int, length: int, device: torch.device) -> Tensor:
        """(batch, length) bool: the fixed global indices and those marked in the extras."""
        mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
        fixed = [i for i in self.fixed if i < length]
        if fixed:
            mask[:, fixed] = True
        if self._marked is not None:
            marked = self._marked.to(device=device, dtype=torch.bool)
            if marked.shape[-1] != length:
                raise ValueError(
                    f"extras[{self.extras_key!r}] has length {marked.shape[-1]}, the sequence {length}: "
                    "it must mark every token of the sequence (batch, length)"
                )
            mask = mask | marked
        return mask

    def _global_qkv(self, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries of every token and keys/values for the global tokens' own attention."""
        if self.global_query is None or self._x is None:
            return q, k, v
        x = self._x
        batch, length, _ = x.shape
        global_q = self.global_query(x).view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        global_k, global_v = self._split_kv(self.global_key_value(x))
        global_q, global_k = self.transform_qk(global_q, global_k, positions)
        return global_q, repeat_kv(global_k, self.n_heads), repeat_kv(global_v, self.n_heads)

    def _attend_cached_global(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, q_positions: Tensor, k_positions: Tensor
    ) -> Tensor:
        """Decoding with a cache: the window band, the fixed global keys seen by later queries,
        and global queries seeing every earlier key, formed over the Lq × Lk cached keys."""
        if not self.causal:
            raise ValueError("bidirectional Longformer attention cannot decode incrementally: later keys are not known yet")
        if self._marked is not None or self.global_query is not None:
            raise ValueError(
                "Longformer attention decodes incrementally only with fixed global tokens and without "
                "global projections: tokens marked in extras are not kept in the cache"
            )
        if not self.fixed:
            return self._attend_cached(q, k, v, key_padding_mask, q_positions, k_positions)
        q_length, k_length = q.shape[-2], k.shape[-2]
        query_index = torch.arange(q_length, device=q.device)[:, None] + (k_length - q_length)
        key_index = torch.arange(k_length, device=q.device)[None, :]
        distance = query_index - key_index
        band = (distance >= 0) & (distance <= (self.window - 1) * self.dilation) & (distance % self.dilation == 0)
        fixed = torch.tensor(self.fixed, device=q.device)
        key_global = torch.isin(key_index, fixed)
        query_global = torch.isin(query_index, fixed)
        allowed = (band | ((key_global | query_global) & (distance >= 0)))[None, None]
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :].bool()
        return self.explicit_attend(q, k, v, allowed, q_positions, k_positions)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    """(batch, heads, n, hd) → (batch, heads, g, hd): the rows ``index`` (batch, g) of each example."""
    return x.gather(-2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


COMPONENT = Component(
    kind="attention",
    name="longformer",
    factory=LongformerAttention,
    config=LongformerConfig,
    summary="Sliding window plus symmetric global attention (fixed or marked per example in extras), O(n·(w + g)).",
    reference="Beltagy et al. 2020, Longformer: The Long-Document Transformer",
    capabilities=Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "score_bias", "qk_transform", "relative_terms", "incremental_decoding"},
        cost="n·w",
    ),
)
