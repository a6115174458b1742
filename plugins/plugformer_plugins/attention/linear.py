"""Linear attention with the feature map φ(x) = elu(x) + 1 (Katharopoulos et al. 2020,
"Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention").

out_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + eps), with S_i = Σ_j φ(k_j) v_jᵀ and z_i = Σ_j φ(k_j) over
the non-padded keys j (causal: j ≤ i). There is no score matrix, so no additive score bias
and no attention dropout. A query/key transform (rotary) is applied as in RoFormer (Su et
al. 2021, eq. 19): to the features φ(q), φ(k) in the numerator only, the normalizer keeping
the unrotated features, so scores depend on relative positions and the normalizer stays
positive. A query that sees no key returns zeros. Time and memory are linear in the
length: the causal prefix sums run chunk by chunk (see :class:`LinearAttention`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from plugformer import Attention, AttentionState, BuildContext, Capabilities, Component, ConfigError, bounds
from plugformer.attention import ChunkSource, chunk_count, recomputed_chunks


@dataclass
class LinearAttentionConfig:
    """``chunk_size``: length of the chunks of the causal prefix sums; ``eps``: added to the
    normalizer."""

    chunk_size: int = field(default=64, metadata=bounds(ge=1))
    eps: float = field(default=1e-6, metadata=bounds(gt=0.0))
    bias: bool = True


def feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1, positive everywhere, in float32."""
    return F.elu(x.float()) + 1.0


def exclusive_cumsum(x: Tensor) -> Tensor:
    """Sum over the earlier chunks (dim 2), zero for the first; shifted rather than
    cumsum − x, which would cancel catastrophically on long sequences."""
    return torch.cat([torch.zeros_like(x[:, :, :1]), torch.cumsum(x[:, :, :-1], dim=2)], dim=2)


def group_length(length: int, chunk: int, per_token: int, state: int) -> int:
    """Tokens per group (a multiple of ``chunk``) for causal prefix-sum attention run in groups
    of whole chunks through :func:`recomputed_chunks`, given the elements one token adds to a
    group's intermediates (``per_token``) and the elements of one group's carried state
    (``state``), both per (batch, head) slice. The carried states (one per group) and one
    group's intermediates trade off: groups of about √(length · state / per_token) tokens
    minimise their sum (both then grow as √length); never shorter than the chunk budget allows."""
    balanced = round(math.sqrt(length * state / per_token) / chunk) * chunk
    return max(chunk, balanced, chunk_count(length, per_token) // chunk * chunk)


@dataclass
class RecurrentState(AttentionState):
    """The running sums of causal linear attention over the tokens seen so far:
    S = Σ φ(k_j)v_jᵀ (rotated features when a position rotates) and z = Σ φ(k_j)."""

    sums: Tensor | None = None  # (batch, heads, head_dim, head_dim), float32
    normalizer: Tensor | None = None  # (batch, heads, head_dim), float32

    def add_to(self, numerator: Tensor, denominator: Tensor, rotated_q: Tensor, phi_q: Tensor) -> tuple[Tensor, Tensor]:
        if self.sums is None:
            return numerator, denominator
        return numerator + rotated_q @ self.sums, denominator + (phi_q @ self.normalizer.unsqueeze(-1)).squeeze(-1)

    def update(self, rotated_k: Tensor, phi_k: Tensor, values: Tensor) -> None:
        sums, normalizer = rotated_k.transpose(-1, -2) @ values, phi_k.sum(dim=-2)
        self.sums = sums if self.sums is None else self.sums + sums
        self.normalizer = normalizer if self.normalizer is None else self.normalizer + normalizer

    def reorder(self, index: Tensor) -> None:
        if self.sums is not None:
            self.sums, self.normalizer = self.sums[index], self.normalizer[index]

    def detach(self) -> None:
        if self.sums is not None:
            self.sums, self.normalizer = self.sums.detach(), self.normalizer.detach()

    def reset(self, rows: Tensor) -> None:
        if self.sums is not None:
            keep = (~rows).to(self.sums.dtype)
            self.sums, self.normalizer = self.sums * keep[:, None, None, None], self.normalizer * keep[:, None, None]


class LinearAttention(Attention):
    """Kernelized attention over (batch, heads, length, head_dim).

    Causal: the sequence is cut into chunks of ``chunk_size``. Within a chunk the prefix sums
    are the masked quadratic form (φ(Q)φ(K)ᵀ ⊙ lower-triangular)V; across chunks, each chunk
    adds the state (S, z) accumulated by all earlier chunks. The states are per chunk
    ((length / chunk_size) × head_dim × head_dim), never per token.
    """

    def __init__(self, config: LinearAttentionConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)
        if config.chunk_size < 1:
            raise ConfigError(
                f"model.attention.chunk_size={config.chunk_size} for linear attention.",
                expected="chunk_size ≥ 1",
                fix="set model.attention.chunk_size to a positive integer, e.g. 64",
            )
        self.chunk_size = config.chunk_size
        self.eps = config.eps

    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        return q, k  # applied to the features inside attend()

    def new_state(self, batch_size: int, *, streaming: bool = False) -> AttentionState | None:
        """Decoding keeps the O(1) recurrent state (S, z), not the keys."""
        return None if streaming or self.cross else RecurrentState()

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
        if not self.causal:
            return self._bidirectional(q, k, v, key_padding_mask, q_positions, k_positions)
        if state is None and q.shape[-2] == k.shape[-2]:
            return self._causal_grouped(q, k, v, key_padding_mask, q_positions)
        phi_q, phi_k, values = feature_map(q), feature_map(k), v.float()
        if key_padding_mask is not None:
            phi_k = phi_k * key_padding_mask[:, None, :, None].to(phi_k.dtype)
        rotated_q, _ = super().transform_qk(phi_q, phi_q, q_positions)
        _, rotated_k = super().transform_qk(phi_k, phi_k, k_positions)
        numerator, denominator = self._causal_sums(rotated_q, rotated_k, phi_q, phi_k, values)
        if isinstance(state, RecurrentState):
            numerator, denominator = state.add_to(numerator, denominator, rotated_q, phi_q)
            state.update(rotated_k, phi_k, values)
        return (numerator / (denominator.unsqueeze(-1) + self.eps)).to(v.dtype)

    def _bidirectional(
        self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, q_positions: Tensor, k_positions: Tensor
    ) -> Tensor:
        """S = Σ_j rφ(k_j) v_jᵀ and z = Σ_j φ(k_j) over key chunks, then each chunk of queries
        rφ(q_i)ᵀS / (φ(q_i)ᵀz + eps); both through :func:`recomputed_chunks`, so the
        (length × head_dim) features are never kept for the backward pass."""
        length, k_length, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
        slices = q[..., :1, :1].numel()
        rows = chunk_count(length, q[..., :1, :].numel(), slices=slices)  # feature-sized rows
        q_src, k_src, v_src = (ChunkSource(t) for t in (q, k, v))  # no full-size gradient per chunk

        def key_sums(start: int, stop: int) -> Tensor:  # (b, h, hd, hd + 1): [S | z]
            phi_k = feature_map(k_src.narrow(-2, start, stop - start))
            if key_padding_mask is not None:
                phi_k = phi_k * key_padding_mask[:, None, start:stop, None].to(phi_k.dtype)
            _, rotated_k = Attention.transform_qk(self, phi_k, phi_k, k_positions[..., start:stop])
            return torch.cat([rotated_k.transpose(-1, -2) @ v_src.narrow(-2, start, stop - start).float(), phi_k.sum(dim=-2).unsqueeze(-1)], dim=-1)

        sums = recomputed_chunks(key_sums, k_length, chunk_count(k_length, k[..., :1, :].numel(), slices=slices), dim=None)
        kv, z = sums[..., :head_dim], sums[..., head_dim:]

        def queries(start: int, stop: int) -> Tensor:
            phi_q = feature_map(q_src.narrow(-2, start, stop - start))
            rotated_q, _ = Attention.transform_qk(self, phi_q, phi_q, q_positions[..., start:stop])
            numerator, denominator = rotated_q @ kv, phi_q @ z
            return (numerator / (denominator + self.eps)).to(v.dtype)

        return recomputed_chunks(queries, length, rows, dim=-2)

    def _causal_grouped(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, positions: Tensor) -> Tensor:
        """Causal attention of a whole sequence in groups of whole chunks, each group through
        :func:`recomputed_chunks`: first every group's state [S | z] (its keys' Σ rφ(k)vᵀ and
        Σφ(k)), then each group's outputs from its own chunkwise sums (:meth:`_causal_sums`)
        plus the exclusive prefix sum of the earlier groups' states carried in. Nothing of
        length × head_dim² or length × chunk is kept for backward: memory is linear in the
        length with the constant of one group's intermediates."""
        length, head_dim = q.shape[-2], q.shape[-1]
        chunk = min(self.chunk_size, length)
        # Per (batch, head) slice, the elements one token adds to a group's intermediates (its
        # scores within its chunk, its share of the chunk states, its features) and a state's.
        per_token = 2 * chunk + -(-2 * head_dim * head_dim // chunk) + 8 * head_dim
        group = group_length(length, chunk, per_token, state=head_dim * (head_dim + 1))
        n_groups = -(-length // group)
        q_src, k_src, v_src = (ChunkSource(t) for t in (q, k, v))

        def keys(start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
            phi_k = feature_map(k_src.narrow(-2, start, stop - start))
            if key_padding_mask is not None:
                phi_k = phi_k * key_padding_mask[:, None, start:stop, None].to(phi_k.dtype)
            _, rotated_k = Attention.transform_qk(self, phi_k, phi_k, positions[..., start:stop])
            return rotated_k, phi_k, v_src.narrow(-2, start, stop - start).float()

        def group_state(first: int, last: int) -> Tensor:  # (b, h, 1, hd, hd + 1): [S | z] of group ``first``
            rotated_k, phi_k, values = keys(first * group, min(length, last * group))
            return torch.cat([rotated_k.transpose(-1, -2) @ values, phi_k.sum(dim=-2).unsqueeze(-1)], dim=-1).unsqueeze(2)

        incoming = ChunkSource(exclusive_cumsum(recomputed_chunks(group_state, n_groups, 1, dim=2)))  # (b, h, groups, hd, hd + 1)

        def group_out(first: int, last: int) -> Tensor:
            start, stop = first * group, min(length, last * group)
            phi_q = feature_map(q_src.narrow(-2, start, stop - start))
            rotated_q, _ = Attention.transform_qk(self, phi_q, phi_q, positions[..., start:stop])
            rotated_k, phi_k, values = keys(start, stop)
            if rotated_q is phi_q and rotated_k is phi_k:  # no transform: one set of features, as _causal_sums expects
                rotated_q, rotated_k = phi_q, phi_k
            numerator, denominator = self._causal_sums(rotated_q, rotated_k, phi_q, phi_k, values)
            carried = incoming.narrow(2, first, 1).squeeze(2)  # no full-size slice gradient per group
            numerator = numerator + rotated_q @ carried[..., :head_dim]
            denominator = denominator + (phi_q @ carried[..., head_dim:]).squeeze(-1)
            return (numerator / (denominator.unsqueeze(-1) + self.eps)).to(v.dtype)

        return recomputed_chunks(group_out, n_groups, 1, dim=-2)

    def _causal_sums(
        self, rotated_q: Tensor, rotated_k: Tensor, phi_q: Tensor, phi_k: Tensor, values: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Σ_{j≤i} (rq_i·rk_j) v_j and Σ_{j≤i} φ(q_i)·φ(k_j) for every i (rq, rk: the
        rotated features, the same tensors as φ(q), φ(k) without a transform)."""
        length = phi_q.shape[-2]
        chunk = min(self.chunk_size, length)
        tail = -length % chunk

        def chunks(x: Tensor) -> Tensor:  # (b, h, n, e) → (b, h, n_chunks, chunk, e); zero padding adds nothing
            return (F.pad(x, (0, 0, 0, tail)) if tail else x).unflatten(-2, (-1, chunk))

        rotated = rotated_q is not phi_q or rotated_k is not phi_k
        phi_q, phi_k, values = chunks(phi_q), chunks(phi_k), chunks(values)
        rotated_q, rotated_k = (chunks(rotated_q), chunks(rotated_k)) if rotated else (phi_q, phi_k)

        # Within a chunk: the masked quadratic form. Across chunks: the exclusive prefix sum
        # of the chunk states, i.e. what all earlier chunks contributed.
        within = torch.matmul(rotated_q, rotated_k.transpose(-1, -2)).tril_()  # (b, h, nc, chunk, chunk)
        state = exclusive_cumsum(torch.matmul(rotated_k.transpose(-1, -2), values))  # (b, h, nc, hd, hd)
        numerator = torch.matmul(within, values) + torch.matmul(rotated_q, state)
        if rotated:
            within = torch.matmul(phi_q, phi_k.transpose(-1, -2)).tril_()
        norm = exclusive_cumsum(phi_k.sum(dim=-2))  # (b, h, nc, hd)
        denominator = within.sum(dim=-1) + torch.matmul(phi_q, norm.unsqueeze(-1)).squeeze(-1)
        return numerator.flatten(2, 3)[:, :, :length], denominator.flatten(2, 3)[:, :, :length]


COMPONENT = Component(
    kind="attention",
    name="linear",
    factory=LinearAttention,
    config=LinearAttentionConfig,
    summary="Linear attention with φ(x) = elu(x)+1; causal prefix sums computed chunkwise in O(n).",
    reference="Katharopoulos et al. 2020, Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention",
    capabilities=Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "qk_transform", "cross_attention", "incremental_decoding"},
        cost="linear",
    ),
)
