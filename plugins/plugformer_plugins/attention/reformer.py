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
"""

from __future__ import annotations

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
        buckets (batch, heads, n) in [0, n_buckets)."""
        if n_buckets == 1:
            return torch.zeros(keys.shape[:-1], dtype=torch.long, device=keys.device)
        rotated = torch.einsum("bhnd,hdr->bhnr", keys, rotations)
        return torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)

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
        length = q.shape[-2]
        keys = F.normalize(q, dim=-1)  # shared QK: the keys are the normalized queries
        n_buckets = self.buckets_for(length)
        rotations = self.rotations(n_buckets, keys)
        valid = key_padding_mask.bool()[:, None, :] if key_padding_mask is not None else None
        all_buckets = []
        for r in range(self.n_hashes):
            buckets = self.hash(keys, rotations[r], n_buckets)
            if valid is not None:
                buckets = buckets.masked_fill(~valid, n_buckets)  # padding: a bucket of its own
            all_buckets.append(buckets)

        packed = []
        for buckets in all_buckets:
            out, lse = self._attend_round(q, keys, v, buckets, n_buckets + 1, valid)
            dtype = torch.promote_types(out.dtype, lse.dtype)  # exact for both
            packed.append(torch.cat([out.to(dtype), lse.to(dtype).unsqueeze(-1)], dim=-1))
        packed = torch.stack(packed)  # (rounds, batch, heads, n, head_dim + 1): [out | lse]
        outputs, lses = packed[..., :-1], packed[..., -1]
        if self.n_hashes == 1:
            return outputs[0].to(v.dtype)
        weights = torch.softmax(lses, dim=0)  # (rounds, batch, heads, n)
        return (outputs * weights[..., None]).sum(dim=0).to(v.dtype)

    def _attend_round(
        self, q: Tensor, keys: Tensor, v: Tensor, buckets: Tensor, total_buckets: int, valid: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """One hash round: (output (batch, heads, n, head_dim), logsumexp of the scores (batch, heads, n))."""
        batch, heads, n, head_dim = q.shape
        c = min(self.chunk_size, n)
        # Each bucket takes ceil(count / c) chunks: at most n // c + (non-empty buckets) in all.
        n_chunks = n // c + min(total_buckets, n)
        index = torch.arange(n, device=q.device)
        order = (buckets * n + index).argsort(dim=-1)  # sorted by (bucket, index)
        sorted_buckets = buckets.gather(-1, order)
        counts = torch.zeros(batch, heads, total_buckets, dtype=torch.long, device=q.device)
        counts.scatter_add_(-1, buckets, torch.ones_like(buckets))
        starts = counts.cumsum(-1) - counts
        rank = index - starts.gather(-1, sorted_buckets)  # rank within its bucket
        bucket_chunks = (counts + c - 1) // c
        first_chunk = bucket_chunks.cumsum(-1) - bucket_chunks
        slot_sorted = first_chunk.gather(-1, sorted_buckets) * c + rank
        token_of_slot = torch.full((batch, heads, n_chunks * c), n, dtype=torch.long, device=q.device)
        token_of_slot.scatter_(-1, slot_sorted, order)  # n marks an empty slot

        slots = token_of_slot.view(batch, heads, n_chunks, c)
        empty = torch.full_like(slots[:, :, :1], n)

        def chunk(first: int, last: int) -> Tensor:
            """Sorted chunks first ≤ j < last: (batch, heads, last − first, c, head_dim + 1), [out | lse]."""
            q_index = slots[:, :, first:last]
            previous = slots[:, :, first - 1 : last - 1] if first else torch.cat([empty, slots[:, :, : last - 1]], dim=2)
            k_index = torch.cat([previous, q_index], dim=3)  # each chunk sees the previous one and itself

            def at(x: Tensor, index: Tensor, fill: float | int | bool) -> Tensor:
                """Token values at slot ``index`` (n: an empty slot, given ``fill``): (..., chunks, slots[, hd])."""
                flat = index.flatten(2).clamp_max(n - 1)
                if x.dim() == 4:
                    taken = x.gather(2, flat[..., None].expand(-1, -1, -1, x.shape[-1])).view(*index.shape, x.shape[-1])
                    return taken.masked_fill((index == n)[..., None], fill)
                taken = x.expand(batch, heads, n).gather(2, flat).view(index.shape)
                return taken.masked_fill(index == n, fill)

            q_slots = at(q, q_index, 0.0)
            k_window, v_window = at(keys, k_index, 0.0), at(v, k_index, 0.0)
            q_bucket, k_bucket = at(buckets, q_index, -1), at(buckets, k_index, -1)
            k_real = k_index < n
            if valid is not None:
                k_real = k_real & at(valid, k_index, False)

            allowed = k_real[..., None, :] & (k_bucket[..., None, :] == q_bucket[..., :, None])
            if self.causal:
                allowed = allowed & (k_index[..., None, :] <= q_index[..., :, None])
            itself = k_index[..., None, :] == q_index[..., :, None]
            others = allowed & ~itself
            allowed = others | (allowed & ~others.any(dim=-1, keepdim=True))

            scores = torch.matmul(q_slots * self.scale, k_window.transpose(-1, -2))
            scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
            # The finite fill gives keys outside ``allowed`` exactly zero weight; rows that see
            # nothing get uniform weights and are zeroed at the output.
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            probs = torch.softmax(scores, dim=-1)
            with torch.no_grad():
                lse = torch.logsumexp(scores, dim=-1)
            if self.n_hashes > 1 and scores.requires_grad:
                # d logsumexp / d scores is the softmax: take the gradient through ``probs`` (kept
                # anyway for the product with the values) rather than keep the scores twice more.
                lse = lse + (probs.detach() * (scores - scores.detach())).sum(dim=-1)
            seen = allowed.any(dim=-1)
            weights = probs.to(v.dtype)
            if self.training and self.dropout > 0:
                weights = F.dropout(weights, p=self.dropout)
            out = torch.matmul(weights, v_window).masked_fill(~seen[..., None], 0.0)
            lse = lse.masked_fill(~seen, torch.finfo(lse.dtype).min)
            dtype = torch.promote_types(out.dtype, lse.dtype)  # exact for both
            return torch.cat([out.to(dtype), lse.to(dtype).unsqueeze(-1)], dim=-1)

        # A few sorted chunks at a time, recomputed in backward: no round's sorted keys or
        # (slots × 2c) scores are kept, only its outputs.
        step = chunk_count(n_chunks, batch * heads * c * 2 * c, slices=batch * heads)
        packed = recomputed_chunks(chunk, n_chunks, step, dim=2).flatten(2, 3)

        slot_of_token = torch.empty_like(order).scatter_(-1, order, slot_sorted)
        packed = packed.gather(2, slot_of_token[..., None].expand(-1, -1, -1, head_dim + 1))
        return packed[..., :head_dim], packed[..., head_dim]


COMPONENT = Component(
    kind="attention",
    name="reformer",
    factory=LSHAttention,
    config=ReformerAttentionConfig,
    summary="Reformer LSH attention: shared QK, angular hashing, sorted chunks, several hash rounds; O(n·c).",
    reference="Kitaev et al. 2020, Reformer: The Efficient Transformer",
    capabilities=Capabilities(provides={"causal", "bidirectional", "key_padding_mask"}, cost="n·log n"),
)
