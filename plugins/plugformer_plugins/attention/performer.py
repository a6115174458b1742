"""Performer attention with FAVOR+ positive orthogonal random features (Choromanski et al.
2021, "Rethinking Attention with Performers").

softmax(QKᵀ/√d)V is replaced by φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1) with

    φ(x) = exp(−‖x‖²/2)/√m · [exp(w₁ᵀx), …, exp(w_mᵀx)],  x = q·d^−¼ or k·d^−¼,

an unbiased estimate of exp(qᵀk/√d). The m rows w_f are orthogonal in blocks of d (QR of
Gaussian matrices) with norms drawn as those of d-dimensional Gaussian vectors. They are a
persistent buffer: saved in the state_dict, fixed in eval mode (so eval is deterministic),
and redrawn after every ``redraw_interval`` training calls.

Numerical stability: every factor that is the same for all keys a query sees cancels between
numerator and denominator, so the features are computed as

    φ(k)_f ∝ exp(w_fᵀk − ‖k‖²/2 − ‖w_f‖²/2) = exp(−‖k − w_f‖²/2) ≤ 1,
    φ(q)_f ∝ exp(w_fᵀq + ‖w_f‖²/2 − max_g(w_gᵀq + ‖w_g‖²/2)) ≤ 1,

the ‖w_f‖²/2 moved from key to query changes no product φ(q)_f·φ(k)_f. These shifts depend
on nothing but the token itself and the features, so they keep causality, batch
independence and incremental decoding exact. Bidirectional attention also subtracts the
largest key exponent over the real keys (per example and head), against underflow. The
features are computed in at least float32. A query that sees no key returns zeros.

Time and memory are linear in the length: causal prefix sums run chunk by chunk as in
``linear``. A position's query/key transform (rotary) is applied to q and k before the
features, so the features estimate the rotated softmax kernel. There is no score matrix,
hence no score bias and no attention dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from plugformer import Attention, AttentionState, BuildContext, Capabilities, Component, bounds
import plugformer.attention as attention_core
from plugformer.attention import ChunkSource, chunk_count, recomputed_chunks
from plugformer_plugins.attention.favor_bidirectional import favor_bidirectional
from plugformer_plugins.attention.linear import RecurrentState, exclusive_cumsum, group_length


@dataclass
class PerformerConfig:
    """``num_features``: m random features per head (None: round(d·ln d) for head size d,
    the paper's m = Θ(d log d)); ``redraw_interval``: training calls between feature redraws
    (0: never redraw); ``orthogonal``: orthogonal blocks (FAVOR+) or i.i.d. Gaussian rows;
    ``chunk_size``: length of the chunks of the causal prefix sums."""

    num_features: int | None = field(default=None, metadata=bounds(ge=1))
    redraw_interval: int = field(default=1000, metadata=bounds(ge=0))
    orthogonal: bool = True
    chunk_size: int = field(default=64, metadata=bounds(ge=1))
    bias: bool = True


def default_num_features(head_dim: int) -> int:
    """round(d·ln d), at least d."""
    return max(head_dim, round(head_dim * math.log(head_dim))) if head_dim > 1 else 1


def draw_features(num_features: int, dim: int, *, orthogonal: bool, device: torch.device | None = None) -> Tensor:
    """(num_features, dim) random projection rows, from the global RNG. Orthogonal: stacked
    blocks of dim orthonormal rows (Haar-distributed, from the QR of a Gaussian matrix), each row scaled by the norm of
    a fresh Gaussian vector so that rows are marginally Gaussian (Yu et al. 2016)."""
    if not orthogonal:
        return torch.randn(num_features, dim, device=device)
    blocks = []
    for _ in range(-(-num_features // dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim, device=device))
        # Signs of R's diagonal make Q uniformly (Haar) distributed; QR alone does not.
        blocks.append((q * torch.sign(torch.diagonal(r))).T)
    rows = torch.cat(blocks)[:num_features]
    return rows * torch.randn(num_features, dim, device=device).norm(dim=-1, keepdim=True)


def causal_sums(phi_q: Tensor, phi_k: Tensor, values: Tensor, chunk_size: int) -> tuple[Tensor, Tensor]:
    """Σ_{j≤i} (φ(q_i)·φ(k_j)) v_j and Σ_{j≤i} φ(q_i)·φ(k_j) for every i, in O(n): within a
    chunk the masked quadratic form, across chunks the exclusive prefix sums of the chunk
    states (n/chunk states of m × head_dim, never one per token)."""
    length = phi_q.shape[-2]
    chunk = min(chunk_size, length)
    tail = -length % chunk

    def chunks(x: Tensor) -> Tensor:  # (b, h, n, e) → (b, h, n_chunks, chunk, e); zero padding adds nothing
        return (F.pad(x, (0, 0, 0, tail)) if tail else x).unflatten(-2, (-1, chunk))

    phi_q, phi_k, values = chunks(phi_q), chunks(phi_k), chunks(values)
    within = torch.matmul(phi_q, phi_k.transpose(-1, -2)).tril_()  # (b, h, nc, chunk, chunk)
    state = exclusive_cumsum(torch.matmul(phi_k.transpose(-1, -2), values))  # (b, h, nc, m, hd)
    numerator = torch.matmul(within, values) + torch.matmul(phi_q, state)
    normalizer = exclusive_cumsum(phi_k.sum(dim=-2))  # (b, h, nc, m)
    denominator = within.sum(dim=-1) + torch.matmul(phi_q, normalizer.unsqueeze(-1)).squeeze(-1)
    return numerator.flatten(2, 3)[:, :, :length], denominator.flatten(2, 3)[:, :, :length]


class PerformerAttention(Attention):
    """FAVOR+ attention over (batch, heads, length, head_dim); one feature matrix per layer,
    shared by its heads."""

    def __init__(self, config: PerformerConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)
        self.num_features = config.num_features or default_num_features(self.head_dim)
        self.redraw_interval = config.redraw_interval
        self.orthogonal = config.orthogonal
        self.chunk_size = config.chunk_size
        self.register_buffer("features", draw_features(self.num_features, self.head_dim, orthogonal=self.orthogonal))
        # Training calls made with the current features; persistent, so a resumed run keeps the schedule.
        self.register_buffer("calls_since_draw", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor, **kwargs) -> Tensor:  # type: ignore[override]
        if self.training:
            self.step_redraw_schedule()
        return super().forward(x, **kwargs)

    def step_redraw_schedule(self) -> None:
        """Count one training call; the features drawn last serve ``redraw_interval`` calls,
        then the next call redraws them first."""
        if self.redraw_interval > 0 and int(self.calls_since_draw) >= self.redraw_interval:
            self.redraw_features()
        self.calls_since_draw += 1

    @torch.no_grad()
    def redraw_features(self) -> None:
        """Draw new random features from the global RNG (seeded by the run)."""
        fresh = draw_features(self.num_features, self.head_dim, orthogonal=self.orthogonal, device=self.features.device)
        self.features.copy_(fresh)
        self.calls_since_draw.zero_()

    def new_state(self, batch_size: int, *, streaming: bool = False) -> AttentionState | None:
        """Decoding keeps the running sums Σφ(k)vᵀ and Σφ(k), not the keys."""
        if streaming or self.cross:
            return super().new_state(batch_size, streaming=streaming)
        return RecurrentState()

    def feature_maps(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """φ(q) (b, h, Lq, m) and φ(k) (b, h, Lk, m), up to factors that cancel (see the module
        docstring); padded keys get zero features."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        scale = self.head_dim**-0.25
        w = self.features.to(dtype)
        half_norms = 0.5 * (w * w).sum(dim=-1)  # ‖w_f‖²/2, (m,)
        xq, xk = q.to(dtype) * scale, k.to(dtype) * scale
        log_q = torch.matmul(xq, w.T) + half_norms
        log_q = log_q - log_q.amax(dim=-1, keepdim=True).detach()
        log_k = torch.matmul(xk, w.T) - 0.5 * (xk * xk).sum(dim=-1, keepdim=True) - half_norms
        real = None if key_padding_mask is None else key_padding_mask[:, None, :, None].bool()
        if not self.causal:
            # A constant over every key a query sees cancels; the largest real one avoids underflow.
            hidden = log_k if real is None else log_k.masked_fill(~real, float("-inf"))
            top = hidden.amax(dim=(-2, -1), keepdim=True).detach()
            log_k = log_k - torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        phi_k = torch.exp(log_k)
        if real is not None:
            phi_k = phi_k * real.to(dtype)
        return torch.exp(log_q), phi_k

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
            return self._bidirectional(q, k, v, key_padding_mask)
        if state is None and q.shape[-2] == k.shape[-2]:
            return self._causal_grouped(q, k, v, key_padding_mask)
        phi_q, phi_k = self.feature_maps(q, k, key_padding_mask)
        values = v.to(phi_q.dtype)
        if self.causal:
            numerator, denominator = causal_sums(phi_q, phi_k, values, self.chunk_size)
            if isinstance(state, RecurrentState):
                numerator, denominator = state.add_to(numerator, denominator, phi_q, phi_q)
                state.update(phi_k, phi_k, values)
        else:
            numerator = torch.matmul(phi_q, torch.matmul(phi_k.transpose(-1, -2), values))
            denominator = torch.matmul(phi_q, phi_k.sum(dim=-2).unsqueeze(-1)).squeeze(-1)
        # A query that sees no (non-underflowed) key has numerator and denominator 0: output 0.
        tiny = torch.finfo(denominator.dtype).tiny
        return (numerator / denominator.clamp_min(tiny).unsqueeze(-1)).to(v.dtype)

    def _causal_grouped(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """Causal FAVOR+ of a whole sequence in groups of whole chunks through
        :func:`recomputed_chunks` (as ``linear``'s): every group's state [Σφ(k)vᵀ | Σφ(k)],
        then each group's chunkwise sums (:func:`causal_sums`) plus the earlier groups' states
        carried in. Causal features depend only on their own token, so computing them per
        group is exact; memory is linear in the length with one group's constant."""
        length, head_dim = q.shape[-2], v.shape[-1]
        chunk = min(self.chunk_size, length)
        m = self.num_features
        per_token = 2 * chunk + -(-2 * m * head_dim // chunk) + 4 * m + 4 * head_dim  # per (batch, head), as linear's
        group = group_length(length, chunk, per_token, state=m * (head_dim + 1))
        n_groups = -(-length // group)
        q_src, k_src, v_src = (ChunkSource(t) for t in (q, k, v))

        def features(start: int, stop: int) -> tuple[Tensor, Tensor, Tensor]:
            mask = None if key_padding_mask is None else key_padding_mask[:, start:stop]
            phi_q, phi_k = self.feature_maps(q_src.narrow(-2, start, stop - start), k_src.narrow(-2, start, stop - start), mask)
            return phi_q, phi_k, v_src.narrow(-2, start, stop - start).to(phi_q.dtype)

        def group_state(first: int, last: int) -> Tensor:  # (b, h, 1, m, hd + 1) of group ``first``
            _, phi_k, values = features(first * group, min(length, last * group))
            return torch.cat([phi_k.transpose(-1, -2) @ values, phi_k.sum(dim=-2).unsqueeze(-1)], dim=-1).unsqueeze(2)

        incoming = ChunkSource(exclusive_cumsum(recomputed_chunks(group_state, n_groups, 1, dim=2)))  # (b, h, groups, m, hd + 1)

        def group_out(first: int, last: int) -> Tensor:
            phi_q, phi_k, values = features(first * group, min(length, last * group))
            numerator, denominator = causal_sums(phi_q, phi_k, values, self.chunk_size)
            carried = incoming.narrow(2, first, 1).squeeze(2)  # no full-size slice gradient per group
            numerator = numerator + phi_q @ carried[..., :head_dim]
            denominator = denominator + (phi_q @ carried[..., head_dim:]).squeeze(-1)
            # A query that sees no (non-underflowed) key has numerator and denominator 0: output 0.
            tiny = torch.finfo(denominator.dtype).tiny
            return (numerator / denominator.clamp_min(tiny).unsqueeze(-1)).to(v.dtype)

        return recomputed_chunks(group_out, n_groups, 1, dim=-2)

    def _bidirectional(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """The same FAVOR+ sums as :meth:`feature_maps` + attend, chunk by chunk through
        :func:`favor_bidirectional` (a hand-written backward): Σφ(k)vᵀ and Σφ(k) over key
        chunks, then each chunk of queries; the (length × features) feature maps are never
        kept for the backward pass, which recomputes them once."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        length, k_length = q.shape[-2], k.shape[-2]
        slices = q[..., :1, :1].numel()
        # No checkpoint or autograd graph per chunk: chunks of 4× the usual budget (their
        # (tokens × features) intermediates about 1 MiB each at 4 heads, a few alive at once)
        # halve the time of small ones and stay far below the fused full kernel's memory.
        budget = 4 * attention_core.CHUNK_ELEMENTS
        step = chunk_count(max(length, k_length), slices * self.num_features * 2, slices=slices, budget=budget)
        mask = None if key_padding_mask is None else key_padding_mask.bool()
        return favor_bidirectional(q, k, v, self.features.to(dtype), mask, step)


COMPONENT = Component(
    kind="attention",
    name="performer",
    factory=PerformerAttention,
    config=PerformerConfig,
    summary="Performer: FAVOR+ positive orthogonal random features for softmax; causal prefix sums chunkwise in O(n).",
    reference="Choromanski et al. 2021, Rethinking Attention with Performers",
    capabilities=Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "qk_transform", "cross_attention", "incremental_decoding"},
        cost="linear",
    ),
)
