"""Sparse Sinkhorn attention (Tay et al. 2020, "Sparse Sinkhorn Attention"): sorted block
attention for bidirectional self-attention.

The sequence is cut into blocks of ``block_size`` (the last one padded). A meta sorting
network maps each block's summary (the mean of its real keys, per head) through a two-layer
ReLU MLP to logits over the blocks, R ∈ ℝ^{N_B×N_B}; Sinkhorn normalisation in log space
(``sinkhorn_iterations`` rounds of column then row normalisation of R/τ, Gumbel noise added
in training if ``gumbel_noise``) relaxes it to a doubly stochastic P, rows last so that
each row sums to 1. Query block i then attends, in one softmax, to the keys of its own block
and to its sorted block: slot s of that block is the P_i·-weighted mixture of slot s of every
block, over their real keys only,

    k̃_i[s] = Σ_j P_ij m_j[s] k_j[s] / μ_i[s],  ṽ likewise,  μ_i[s] = Σ_j P_ij m_j[s],

with log μ_i[s] added to its score (a slot that is mostly padding weighs little; one that is
only padding is masked). With a hard permutation this is attention to the own block and
block π(i). Padded keys contribute nothing; a query that sees no key returns zeros.

Cost per head: scores n·2b, the sorting matrix (n/b)², the soft mixing of blocks
(n/b)²·b·d time and n·d memory; memory is O(n·b + (n/b)²). P is never kept whole: the
Sinkhorn rounds keep only their offsets (vectors), and each chunk of query blocks forms its
rows of P = exp(x − C − R) from the sorting network's hidden layer, so the (n/b)² terms are
transient, one chunk's rows or one round's state at a time. The sorting network addresses at
most ``max_blocks`` blocks, so the longest sequence is ``block_size · max_blocks``. A
position's query/key transform (rotary) is applied to q and k before the blocks are formed,
so sorted keys carry their own rotation. Not causal (the causal Sinkhorn balancing of the
paper is not implemented), so no incremental decoding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import Attention, AttentionState, BuildContext, Capabilities, Component, bounds
from plugformer.attention import ChunkSource, chunk_count, recomputed_chunks


@dataclass
class SinkhornConfig:
    """``block_size``: tokens per block; ``max_blocks``: blocks the sorting network
    addresses (longest sequence block_size · max_blocks); ``sinkhorn_iterations`` and
    ``temperature`` τ of the normalisation; ``gumbel_noise``: perturb the sorting logits
    with Gumbel noise in training; ``sort_hidden``: hidden width of the sorting MLP (None:
    head_dim)."""

    block_size: int = field(default=16, metadata=bounds(ge=1))
    max_blocks: int = field(default=256, metadata=bounds(ge=1))
    sinkhorn_iterations: int = field(default=7, metadata=bounds(ge=1))
    temperature: float = field(default=0.75, metadata=bounds(gt=0.0))
    gumbel_noise: bool = False
    sort_hidden: int | None = field(default=None, metadata=bounds(ge=1))
    bias: bool = True


def sinkhorn(log_p: Tensor, iterations: int) -> Tensor:
    """Log-space Sinkhorn normalisation over the last two dimensions: each round normalises
    columns, then rows; returns exp, whose rows sum to 1 and columns approach 1. (The
    attention itself uses the same rounds through :class:`_SinkhornOffsets`.)"""
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    return log_p.exp()


def _normalised_logits(hidden: Tensor, w2: Tensor, noise: Tensor | None, temperature: float) -> Tensor:
    """x = (hidden · W2 + noise) / τ for some rows of blocks: (b, h, rows, N_B)."""
    logits = torch.matmul(hidden, w2)
    if noise is not None:
        logits = logits + noise
    return logits / temperature


class _SinkhornOffsets(torch.autograd.Function):
    """The total column and row offsets C (b, h, 1, N_B) and R (b, h, N_B, 1) that Sinkhorn's
    rounds subtract from x = (hidden · W2 + noise) / τ, so that P = exp(x − C − R) equals
    :func:`sinkhorn` (x) up to rounding. Only hidden, W2, the noise and the per-round offsets
    (vectors) are kept; no (N_B × N_B) tensor is kept for the backward pass.

    Backward: half-round t maps y to y − lse_d(y), whose backward is g ↦ g − s_t ⊙ Σ_d g with
    s_t = exp(x − C_t − R_t) (the offsets up to t). Writing the gradient at step t as g + E_t,
    with g = ∂L/∂P ⊙ P (which reaches x directly, through P's rows), Σ_d g is known from the
    offsets' own gradients (∂L/∂C = −Σ_rows g, ∂L/∂R = −Σ_columns g), so E_0, the offsets'
    contribution to ∂L/∂x, is built one (N_B × N_B) state at a time without g itself."""

    @staticmethod
    def forward(ctx, hidden: Tensor, w2: Tensor, noise: Tensor | None, temperature: float, iterations: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        log_p = _normalised_logits(hidden, w2, noise, temperature)
        columns, rows = [], []
        for _ in range(iterations):
            columns.append(torch.logsumexp(log_p, dim=-2, keepdim=True))
            log_p = log_p - columns[-1]
            rows.append(torch.logsumexp(log_p, dim=-1, keepdim=True))
            log_p = log_p - rows[-1]
        column_sums, row_sums = torch.stack(columns).cumsum(0), torch.stack(rows).cumsum(0)
        ctx.save_for_backward(hidden, w2, noise, column_sums, row_sums)
        ctx.temperature = temperature
        return column_sums[-1], row_sums[-1]

    @staticmethod
    def backward(ctx, grad_columns: Tensor, grad_rows: Tensor) -> tuple[Tensor | None, Tensor | None, None, None, None]:  # type: ignore[override]
        hidden, w2, noise, column_sums, row_sums = ctx.saved_tensors
        with torch.enable_grad():
            hidden_, w2_ = hidden.detach().requires_grad_(), w2.detach().requires_grad_()
            x = _normalised_logits(hidden_, w2_, noise, ctx.temperature)
        sums = {-2: -grad_columns, -1: -grad_rows}  # Σ over rows and over columns of g
        correction = torch.zeros_like(x)
        # One (N_B × N_B) buffer for every half-round's state: assigning a fresh one would hold
        # the previous state until the new one exists (one more at the peak).
        state = torch.empty_like(x, requires_grad=False)
        for t in range(2 * column_sums.shape[0], 0, -1):
            dim = -2 if t % 2 else -1  # odd half-rounds normalise columns
            torch.sub(x.detach(), column_sums[(t - 1) // 2], out=state)  # the state after half-round t
            if t // 2:
                state.sub_(row_sums[t // 2 - 1])
            total = sums[dim] + correction.sum(dim=dim, keepdim=True)
            correction.sub_(state.exp_().mul_(total))
        del state  # an (N_B × N_B) temporary: not alive through the gradient's products below
        grad_hidden, grad_w2 = torch.autograd.grad(x, (hidden_, w2_), correction)
        return grad_hidden, grad_w2, None, None, None


class _SoftPermutation:
    """P = exp(x − C − R), x = (hidden · W2 + noise) / τ, formed a few rows at a time (a chunk's
    rows of blocks) from hidden (b, h, N_B, hidden) and the offsets, so the whole (N_B × N_B) P
    and its gradient never exist at once."""

    def __init__(self, hidden: Tensor, w2: Tensor, noise: Tensor | None, temperature: float, columns: Tensor, rows: Tensor) -> None:
        self.hidden = ChunkSource(hidden)
        self.w2, self.noise, self.temperature = w2, noise, temperature
        self.columns, self.row_offsets = columns, rows
        self.n_blocks = columns.shape[-1]

    def rows(self, first: int, last: int) -> Tensor:
        """Rows first ≤ i < last of P: (b, h, last − first, N_B)."""
        noise = None if self.noise is None else self.noise[:, :, first:last]
        x = _normalised_logits(self.hidden.narrow(2, first, last - first), self.w2, noise, self.temperature)
        return torch.exp(x - self.columns - self.row_offsets[:, :, first:last])

    def dense(self) -> Tensor:
        return self.rows(0, self.n_blocks)


class _DensePermutation:
    """A given P (b, h, N_B, N_B) read by rows (a fixed permutation, a reference)."""

    def __init__(self, permutation: Tensor) -> None:
        self.permutation = permutation

    def rows(self, first: int, last: int) -> Tensor:
        return self.permutation[:, :, first:last]

    def dense(self) -> Tensor:
        return self.permutation


class SinkhornAttention(Attention):
    """Sorted block attention over (batch, heads, length, head_dim); one sorting network
    per head."""

    def __init__(self, config: SinkhornConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)
        self.block_size = config.block_size
        self.max_blocks = config.max_blocks
        self.iterations = config.sinkhorn_iterations
        self.temperature = config.temperature
        self.gumbel_noise = config.gumbel_noise
        hidden = config.sort_hidden or self.head_dim
        heads = self.n_heads
        self.sort_w1 = nn.Parameter(torch.empty(heads, self.head_dim, hidden).uniform_(-1, 1) / self.head_dim**0.5)
        self.sort_b1 = nn.Parameter(torch.zeros(heads, 1, hidden))
        # No output bias: a bias per column is removed by the column normalisation.
        self.sort_w2 = nn.Parameter(torch.empty(heads, hidden, config.max_blocks).uniform_(-1, 1) / hidden**0.5)

    def soft_permutation(self, k_blocks: Tensor | ChunkSource, real: Tensor) -> _SoftPermutation | _DensePermutation:
        """The soft permutation P (batch, heads, N_B, N_B), read by rows (``.rows(first, last)``,
        ``.dense()``), from keys (batch, heads, N_B, b, head_dim; a tensor or a
        :class:`ChunkSource` of one, whose gradient is then added in place) and their mask
        (batch, 1, N_B, b); row i says which blocks block i attends to."""
        batch, heads, n_blocks, block, _ = k_blocks.shape
        weights = real.to(k_blocks.dtype)
        # The mean of each block's real keys as one (1 × b) @ (b × head_dim) product per block.
        average = (weights / weights.sum(dim=-1, keepdim=True).clamp_min(1.0)).unsqueeze(-2)
        average = average.expand(batch, heads, n_blocks, 1, block)
        if isinstance(k_blocks, ChunkSource):
            summary = k_blocks.matmul(average)
        else:
            summary = torch.matmul(average, k_blocks)
        summary = summary.squeeze(-2)
        hidden = torch.relu(torch.matmul(summary, self.sort_w1.to(summary.dtype)) + self.sort_b1.to(summary.dtype))
        w2 = self.sort_w2[..., :n_blocks].to(summary.dtype)
        noise = None
        if self.training and self.gumbel_noise:
            uniform = torch.rand(batch, heads, n_blocks, n_blocks, dtype=summary.dtype, device=summary.device)
            noise = -torch.log(-torch.log(uniform.clamp(1e-9, 1.0 - 1e-9)))
        columns, rows = _SinkhornOffsets.apply(hidden, w2, noise, self.temperature, self.iterations)
        return _SoftPermutation(hidden, w2, noise, self.temperature, columns, rows)

    def sort_blocks(self, k_blocks: Tensor | ChunkSource, real: Tensor) -> Tensor:
        """The soft permutation P (batch, heads, N_B, N_B) as one tensor (see
        :meth:`soft_permutation`)."""
        return self.soft_permutation(k_blocks, real).dense()

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
        batch, heads, length, head_dim = q.shape
        out_dtype = v.dtype
        if k.shape[-2] != length:
            raise ValueError("sinkhorn attention is bidirectional self-attention: queries and keys must be the same tokens")
        block = self.block_size
        n_blocks = -(-length // block)
        if n_blocks > self.max_blocks:
            raise ValueError(
                f"sinkhorn attention got {length} tokens, {n_blocks} blocks of {block}; its sorting network addresses "
                f"max_blocks={self.max_blocks} (raise model.attention.max_blocks or block_size)"
            )
        tail = n_blocks * block - length
        valid = torch.ones(batch, length, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask.bool()
        valid = torch.cat([valid, valid.new_zeros(batch, tail)], dim=-1)
        real = valid.view(batch, 1, n_blocks, block)
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = (_blocks(t.to(dtype), tail, n_blocks) for t in (q, k, v))
        if key_padding_mask is not None or tail:
            k = k * real[..., None].to(dtype)  # padded keys and values never enter a mixture
            v = v * real[..., None].to(dtype)
        else:
            # Keys and values are views into the fused key/value projection: one contiguous
            # copy each, so every chunk's mixing matmul reads them without copying them, and
            # the projection's output is freed after the forward pass.
            k, v = k.contiguous(), v.contiguous()
        # Every chunk mixes all blocks and reads its own: one gradient buffer per tensor, added
        # to in place (see ChunkSource), instead of a full-size gradient per chunk.
        q_src, k_src, v_src = (ChunkSource(t) for t in (q, k, v))
        k_flat, v_flat = (t.view(lambda x: x.flatten(-2)) for t in (k_src, v_src))  # (b, h, nb, block·hd)

        permutation = self.soft_permutation(k_src, real)  # P (b, h, nb, nb), formed by rows in each chunk
        real_f = real.to(dtype)
        tiny = torch.finfo(dtype).tiny

        def chunk(first: int, last: int) -> Tensor:
            """Blocks first ≤ c < last of queries: (b, h, last − first, block, head_dim)."""
            rows = permutation.rows(first, last)  # (b, h, c, nb)
            mass = torch.matmul(rows, real_f)  # μ, (b, h, c, block)
            present = mass > 0  # some block has a real key in this slot
            inverse = torch.where(present, 1.0 / mass.clamp_min(tiny), torch.zeros_like(mass)).unsqueeze(-1)
            sorted_k = k_flat.matmul(rows).unflatten(-1, (block, head_dim)) * inverse
            sorted_v = v_flat.matmul(rows).unflatten(-1, (block, head_dim)) * inverse
            q_chunk = q_src.narrow(2, first, last - first) * self.scale
            own = torch.matmul(q_chunk, k_src.narrow(2, first, last - first).transpose(-1, -2))  # (b, h, c, block, block)
            mixed = torch.matmul(q_chunk, sorted_k.transpose(-1, -2)) + torch.log(mass.clamp_min(tiny)).unsqueeze(-2)
            scores = torch.cat([own, mixed], dim=-1)
            allowed = torch.cat([real[:, :, first:last].expand(batch, heads, -1, -1), present], dim=-1).unsqueeze(-2)
            # A finite fill: rows without a visible key get uniform weights, zeroed below.
            scores.masked_fill_(~allowed, torch.finfo(dtype).min)  # in place: cat's output, needed by no backward
            weights = torch.softmax(scores, dim=-1)
            if self.training and self.dropout > 0:
                weights = F.dropout(weights, p=self.dropout)
            out = torch.matmul(weights[..., :block], v_src.narrow(2, first, last - first)) + torch.matmul(weights[..., block:], sorted_v)
            return out.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)

        # Blocks of queries a few at a time, recomputed in backward: no (length × 2·block) scores
        # kept. A block's largest intermediates are its sorted keys and values (2·block·head_dim
        # together), its scores (block·2·block) and its row of P (N_B), per (batch, head).
        per_block = max(2 * block * head_dim, 2 * block * block, n_blocks)
        step = chunk_count(n_blocks, batch * heads * per_block, slices=batch * heads)
        out = recomputed_chunks(chunk, n_blocks, step, dim=2)
        return out.flatten(2, 3)[:, :, :length].to(out_dtype)


def _blocks(x: Tensor, tail: int, n_blocks: int) -> Tensor:
    """(b, h, n, hd) padded with ``tail`` zero rows → (b, h, n_blocks, block, hd)."""
    return (F.pad(x, (0, 0, 0, tail)) if tail else x).unflatten(-2, (n_blocks, -1))


def capabilities(config: SinkhornConfig) -> Capabilities:
    return Capabilities(
        provides={"bidirectional", "key_padding_mask", "qk_transform"},
        max_length=config.block_size * config.max_blocks,
        cost="n·w",
    )


COMPONENT = Component(
    kind="attention",
    name="sinkhorn",
    factory=SinkhornAttention,
    config=SinkhornConfig,
    summary="Sparse Sinkhorn attention: each block attends to itself and a block sorted to it by a Sinkhorn-normalised sorting network.",
    reference="Tay et al. 2020, Sparse Sinkhorn Attention",
    capabilities=capabilities,
)
