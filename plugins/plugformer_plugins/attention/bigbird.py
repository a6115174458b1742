"""BigBird block-sparse attention, ITC variant (Zaheer et al. 2020, "Big Bird: Transformers for
Longer Sequences").

The sequence is cut into blocks of ``block_size`` tokens (the last one padded). The first
``global_blocks`` blocks are global: their queries see every key and every query sees their
keys. Every other query block sees, besides the global blocks, ``window_blocks`` neighbouring
blocks centred on itself (3: the previous, itself, the next) and ``random_blocks`` blocks
drawn among the rest, without replacement and never a global or window block, so no key
counts twice. Padded keys are never seen. Bidirectional only (BigBird's main setting).

Random blocks are drawn per layer, shared by the heads (so the position's score bias and
relative terms apply on gathered positions, as in ``local``; the paper draws them per head):

- by default fixed: drawn from a generator seeded by ``seed``, the layer index and the number
  of blocks, identical in training and evaluation. Google's original implementation fixes
  them the same way, per layer, when the graph is built;
- with ``resample`` a fresh draw at every training forward (what Hugging Face's
  implementation does while training); evaluation still uses the fixed draw (Hugging Face
  attends to no random blocks in evaluation instead, which changes the model between
  training and evaluation).

:meth:`BigBirdAttention.random_blocks` returns the draw for a number of blocks, and
``last_random_blocks`` the one the last forward used. Each query block sees
(global + window + random)·block_size keys: O(n) time and memory for fixed sizes. The draw
itself ranks (n / block_size)² random numbers, negligible below about a million tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from plugformer import Attention, AttentionState, BuildContext, Capabilities, Component, ConfigError, bounds
from plugformer.attention import ChunkSource, chunk_count, recomputed_chunks


@dataclass
class BigBirdConfig:
    """Sizes in blocks of ``block_size`` tokens (paper's ITC base: 64, 3 window, 2 global,
    3 random). ``window_blocks`` must be odd. ``seed`` fixes the random blocks (with the
    layer index); ``resample`` draws new ones at every training forward."""

    block_size: int = field(default=64, metadata=bounds(ge=1))
    window_blocks: int = field(default=3, metadata=bounds(ge=1))
    global_blocks: int = field(default=2, metadata=bounds(ge=0))
    random_blocks: int = field(default=3, metadata=bounds(ge=0))
    seed: int = 0
    resample: bool = False
    bias: bool = True


class BigBirdAttention(Attention):
    """Block-sparse softmax attention over (batch, heads, length, head_dim): global, sliding
    window and random key blocks per query block, through :meth:`explicit_attend`."""

    def __init__(self, config: BigBirdConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, bias=config.bias)
        if config.window_blocks < 1 or config.window_blocks % 2 == 0:
            raise ConfigError(
                f"model.attention.window_blocks={config.window_blocks} for bigbird attention.",
                expected="an odd number ≥ 1 of blocks (the window is centred on the query's block)",
                fix="set model.attention.window_blocks to 1, 3, 5, ...",
            )
        if self.causal:
            raise ConfigError(
                "bigbird attention was built for a causal (decoder) stack.",
                expected="a bidirectional stack: an encoder objective such as classification or masked_lm",
                fix="choose an encoder objective, or a causal attention such as local or longformer",
            )
        self.block_size = config.block_size
        self.half_window = config.window_blocks // 2
        self.global_blocks = config.global_blocks
        self.n_random = config.random_blocks
        self.seed = config.seed
        self.resample = config.resample
        self.layer_index = ctx.layer_index
        self.last_random_blocks: tuple[Tensor, Tensor] | None = None

    def random_blocks(self, n_blocks: int, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """This layer's fixed draw for ``n_blocks`` blocks: ``index`` (n_blocks, r) long, the
        random key blocks of every query block, and ``valid`` (n_blocks, r) bool, False where
        fewer than r blocks are eligible. Query block c may draw any block that is neither
        global nor within its window. The same for every call (and every instance)."""
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.layer_index * 7_919 + n_blocks) % 2**63)
        return self._top_eligible(torch.rand(n_blocks, n_blocks, generator=generator).to(device))

    def _top_eligible(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """For each row c of (n_blocks, n_blocks) uniform scores, the r eligible blocks with the
        highest scores: a uniform draw without replacement."""
        n_blocks = scores.shape[0]
        block = torch.arange(n_blocks, device=scores.device)
        eligible = (block[None, :] >= self.global_blocks) & ((block[None, :] - block[:, None]).abs() > self.half_window)
        values, index = scores.masked_fill(~eligible, -1.0).topk(min(self.n_random, n_blocks), dim=-1)
        return index, values >= 0

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
            raise ValueError("bigbird attention is bidirectional and cannot decode incrementally")
        batch, length, b = q.shape[0], q.shape[-2], self.block_size
        n_blocks = -(-length // b)
        g = min(self.global_blocks, n_blocks)
        valid = (
            torch.ones(batch, length, dtype=torch.bool, device=q.device)
            if key_padding_mask is None
            else key_padding_mask.bool().expand(batch, -1)
        )
        # One ChunkSource per tensor (padded to whole blocks): every chunk of both parts reads
        # its pieces and adds its gradient into one buffer, with no full-size temporaries.
        tail = n_blocks * b - length
        q, k, v = (_pad(t, -2, tail, 0.0) for t in (q, k, v))
        valid, positions = _pad(valid, -1, tail, False), _pad(q_positions, -1, tail, 0)
        sources = tuple(ChunkSource(t) for t in (q, k, v))
        outputs = []
        if g:
            global_rows = min(g * b, length)
            allowed = valid[:, None, None, :]
            q_src, k_src, v_src = sources

            def global_chunk(first: int, last: int) -> Tensor:  # global query rows first..last−1 see every key
                return self.explicit_attend(
                    q_src.narrow(-2, first, last - first), k_src, v_src, allowed, positions[:, first:last], positions
                )

            step = chunk_count(global_rows, q[..., :1, :1].numel() * k.shape[-2], slices=q[..., :1, :1].numel())
            outputs.append(recomputed_chunks(global_chunk, global_rows, step, dim=-2))
        if n_blocks > g:
            outputs.append(self._attend_sparse(*sources, valid, positions, n_blocks, g))
        return torch.cat(outputs, dim=-2)[..., :length, :]

    def _attend_sparse(
        self, q: ChunkSource, k: ChunkSource, v: ChunkSource, valid: Tensor, positions: Tensor, n_blocks: int, g: int
    ) -> Tensor:
        """Rows of the non-global query blocks g..n_blocks−1, (batch, heads, (n_blocks − g)·b, hd);
        q/k/v, ``valid`` and ``positions`` padded to whole blocks."""
        b = self.block_size
        valid_blocks, position_blocks = valid.unflatten(-1, (n_blocks, b)), positions.unflatten(-1, (n_blocks, b))  # (batch or 1, nb, b)

        queries = torch.arange(g, n_blocks, device=valid.device)
        window = queries[:, None] + torch.arange(-self.half_window, self.half_window + 1, device=valid.device)
        window_ok = (window >= g) & (window < n_blocks)  # global blocks are seen through the global part
        random, random_ok = self._draw(n_blocks, valid.device)
        index = torch.cat([window.clamp(0, n_blocks - 1), random[g:]], dim=-1)  # (m, w + r)
        slot_ok = torch.cat([window_ok, random_ok[g:]], dim=-1)
        m = n_blocks - g
        slots = torch.cat([torch.ones(m, g, dtype=torch.bool, device=valid.device), slot_ok], dim=-1)
        within = torch.arange(b, device=valid.device)

        def chunk(first: int, last: int) -> Tensor:
            """Non-global query blocks g + first ≤ c < g + last: (batch, heads, last − first, b, hd)."""
            rows = index[first:last]
            tokens = (rows[..., None] * b + within).flatten(-2)  # (mc, (w + r)·b) token indices

            def gather(x: ChunkSource) -> Tensor:  # (batch, heads, N, hd) → (batch, heads, mc, (g + w + r)·b, hd)
                chosen = x.take(2, tokens)
                shared = x.narrow(2, 0, g * b)[:, :, None].expand(-1, -1, last - first, -1, -1)
                return torch.cat([shared, chosen], dim=-2)

            def gather_tokens(x: Tensor) -> Tensor:  # (batch or 1, nb, b) → (batch or 1, mc, (g + w + r)·b)
                chosen = x[:, rows].flatten(-2)
                shared = x[:, :g].flatten(-2)[:, None].expand(-1, last - first, -1)
                return torch.cat([shared, chosen], dim=-1)

            key_ok = gather_tokens(valid_blocks) & slots[first:last].repeat_interleave(b, dim=-1)  # (batch, mc, Lk)
            q_part = q.narrow(2, (g + first) * b, (last - first) * b).unflatten(2, (last - first, b))
            return self.masked_attend(
                q_part, gather(k), gather(v), key_ok[:, None, :, None, :],
                position_blocks[:, g + first : g + last], gather_tokens(position_blocks),
            )

        # A few query blocks at a time, recomputed in backward: no gathered keys or scores kept.
        step = chunk_count(m, q.shape[0] * q.shape[1] * b * b * slots.shape[-1], slices=q.shape[0] * q.shape[1])
        return recomputed_chunks(chunk, m, step, dim=-3).flatten(-3, -2)

    def _draw(self, n_blocks: int, device: torch.device) -> tuple[Tensor, Tensor]:
        if self.training and self.resample:
            drawn = self._top_eligible(torch.rand(n_blocks, n_blocks, device=device))
        else:
            drawn = self.random_blocks(n_blocks, device)
        self.last_random_blocks = drawn
        return drawn


def _pad(x: Tensor, dim: int, tail: int, fill: float | bool | int) -> Tensor:
    """``x`` with ``tail`` entries of ``fill`` appended along negative ``dim``."""
    if not tail:
        return x
    shape = list(x.shape)
    shape[dim] = tail
    return torch.cat([x, x.new_full(shape, fill)], dim=dim)


COMPONENT = Component(
    kind="attention",
    name="bigbird",
    factory=BigBirdAttention,
    config=BigBirdConfig,
    summary="Block-sparse attention (ITC): global, sliding-window and random key blocks per query block, O(n).",
    reference="Zaheer et al. 2020, Big Bird: Transformers for Longer Sequences",
    capabilities=Capabilities(
        provides={"bidirectional", "key_padding_mask", "score_bias", "qk_transform", "relative_terms"},
        cost="n·w",
    ),
)
