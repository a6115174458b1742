"""The incremental-decoding check of an attention that provides "incremental_decoding":
decoding with the state it makes (:meth:`plugformer.Attention.new_state`) must give the
outputs of one forward pass over the whole sequence.

It tests against cache bugs other libraries shipped: a length kept per module instead of
per state (two states decoded in turn), an offset counted in heads instead of tokens (the
cache length after each step), positions that restart at 0 on every call (the test
positions see absolute positions), left-padded prompts with per-example positions, and
beam-search reordering.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from plugformer.attention import AttentionState, KVCache
from plugformer.testing._support import Sizes, Subject, assert_close, randn
from plugformer.testing.probes import left_padding_mask, positions_of

#: What a step of decoding calls: (module, x chunk, mask chunk, positions chunk, state) → output.
Step = Callable[[nn.Module, Tensor, "Tensor | None", Tensor, AttentionState | None], Tensor]


def attention_step(module: nn.Module, x: Tensor, mask: Tensor | None, positions: Tensor, state: object) -> Tensor:
    return module(x, mask=mask, positions=positions, state=state)


def beam_permutation(batch: int) -> Tensor:
    """A reordering as beam search makes one: rows moved and one row duplicated ([2, 0, 0] for 3)."""
    index = torch.arange(batch).roll(1)
    index[-1] = index[1]
    return index


def decode(
    step: Step,
    module: nn.Module,
    x: Tensor,
    *,
    chunks: Sequence[int],
    mask: Tensor | None,
    positions: Tensor,
    state: object,
    after: Callable[[int], None] | None = None,
) -> Tensor:
    """Feed ``x`` chunk by chunk (sizes ``chunks``) with the same state; the outputs joined.
    ``after(tokens_seen)`` runs after each call."""
    outputs, start = [], 0
    for size in chunks:
        end = start + size
        chunk_mask = mask[:, start:end] if mask is not None else None
        outputs.append(step(module, x[:, start:end], chunk_mask, positions[:, start:end], state))
        if after is not None:
            after(end)
        start = end
    return torch.cat(outputs, dim=1)


class DecodingChecks:
    """The incremental-decoding checks of one causal attention setting."""

    #: Tokens decoded: enough for a prefill, a window and a reorder, few enough to stay fast.
    max_length = 12

    def __init__(self, subject: Subject, sizes: Sizes, length: int, *, padding: bool) -> None:
        self.subject = subject
        self.sizes = sizes
        self.length = length = min(length, self.max_length)
        self.padding = padding
        self.x = randn(sizes.batch, length, sizes.d_model, seed=80, dtype=subject.dtype)
        self.other = randn(sizes.batch, length, sizes.d_model, seed=81, dtype=subject.dtype)
        self.positions = sizes.positions(length)

    def run(self, *, all_checks: bool = True) -> None:
        """Every check, or (``all_checks`` False, for variations of a setting already checked)
        token by token and left-padded prompts only."""
        self.token_by_token()
        if all_checks:
            self.prefill_then_tokens()
        if self.padding:
            self.left_padded_prompts()
        if all_checks:
            self.beam_reorder()

    # --- the checks -----------------------------------------------------------------------
    def token_by_token(self) -> None:
        """Two sequences decoded in turn, one token per call, each with its own state and
        positions as (1, 1) tensors, give the full forward's outputs; a KVCache holds one
        entry per token seen (up to its limit) with n_kv_heads heads."""
        s = self.subject
        with s.check("incremental decoding, token by token"):
            module = s.build().eval()
            first, second = self.new_state(module), self.new_state(module)
            outputs: dict[int, list[Tensor]] = {0: [], 1: []}
            with torch.no_grad():
                expected = [module(x, positions=self.positions) for x in (self.x, self.other)]
                for t in range(self.length):
                    for which, (x, state) in enumerate(((self.x, first), (self.other, second))):
                        outputs[which].append(module(x[:, t : t + 1], positions=self.positions[:, t : t + 1], state=state))
                        self.check_cache(module, state, t + 1)
            for which in (0, 1):
                assert_close(
                    s,
                    torch.cat(outputs[which], dim=1),
                    expected[which],
                    "decoding one token per call with the state from new_state(batch) (positions (1, 1) with the "
                    "absolute position; a second sequence decoded in turn with its own state) should give the "
                    f"outputs of one forward pass over the whole sequence (sequence {which + 1} of 2 differs)",
                )

    def prefill_then_tokens(self) -> None:
        """A prompt of several tokens in one call, then single tokens and one chunk of 3
        tokens onto the filled cache (as speculative decoding verifies drafts), with
        per-example positions (batch, n), gives the full forward's outputs."""
        s = self.subject
        prompt = max(2, self.length // 3)
        chunks = [prompt, 1, 3] + [1] * (self.length - prompt - 4)
        with s.check("incremental decoding, prefill then tokens"):
            module = s.build().eval()
            state = self.new_state(module)
            per_example = self.positions.expand(self.sizes.batch, -1)
            with torch.no_grad():
                expected = module(self.x, positions=per_example)
                got = decode(
                    attention_step, module, self.x, chunks=chunks, mask=None, positions=per_example, state=state,
                    after=lambda seen: self.check_cache(module, state, seen),
                )
            assert_close(
                s,
                got,
                expected,
                f"calls of {chunks} tokens (a prefill, then single tokens and a chunk of 3 onto the filled cache; "
                "per-example positions (batch, n)) should give the outputs of one forward pass over the whole sequence",
            )

    def left_padded_prompts(self) -> None:
        """Left-padded rows (a batch of prompts of different lengths), per-example positions
        cumsum(mask) − 1, decoded token by token with the mask of each token, give the full
        forward's outputs at real tokens."""
        s = self.subject
        mask = left_padding_mask(self.sizes.batch, self.length)
        positions = positions_of(mask)
        with s.check("incremental decoding, left-padded prompts"):
            module = s.build().eval()
            state = self.new_state(module)
            with torch.no_grad():
                expected = module(self.x, mask=mask, positions=positions)
                got = decode(attention_step, module, self.x, chunks=[1] * self.length, mask=mask, positions=positions, state=state)
            real = mask[..., None]
            assert_close(
                s,
                got * real,
                expected * real,
                "decoding left-padded rows token by token (key padding mask per token, positions (batch, 1) counting "
                "real tokens only) should give the outputs of one forward pass at the real tokens",
            )

    def beam_reorder(self) -> None:
        """After half the sequence, ``state.reorder(index)`` with a beam-search index (rows
        moved, one duplicated), then decoding the rest of the reordered rows, gives the
        outputs of the reordered batch decoded in one pass."""
        s = self.subject
        index = beam_permutation(self.sizes.batch)
        half = self.length // 2
        mask = left_padding_mask(self.sizes.batch, self.length) if self.padding else None
        positions = positions_of(mask) if mask is not None else self.positions
        with s.check("incremental decoding, beam-search reorder"):
            module = s.build().eval()
            state = self.new_state(module)
            reordered = self.x[index]
            reordered_mask = mask[index] if mask is not None else None
            reordered_positions = positions[index] if positions.shape[0] > 1 else positions
            with torch.no_grad():
                expected = module(reordered, mask=reordered_mask, positions=reordered_positions)
                decode(attention_step, module, self.x, chunks=[half], mask=mask, positions=positions, state=state)
                state.reorder(index)
                rest = reordered[:, half:]
                got = decode(
                    attention_step, module, rest, chunks=[1] * rest.shape[1],
                    mask=reordered_mask[:, half:] if reordered_mask is not None else None,
                    positions=reordered_positions[:, half:], state=state,
                )
            real = reordered_mask[:, half:, None] if reordered_mask is not None else torch.ones(1, 1, 1, dtype=torch.bool)
            assert_close(
                s,
                got * real,
                expected[:, half:] * real,
                f"reordering the state with index {index.tolist()} after {half} tokens (beam search) and decoding on "
                "should give the outputs of the reordered batch decoded in one pass",
            )

    # --- helpers ----------------------------------------------------------------------------
    def new_state(self, module: nn.Module) -> AttentionState:
        state = module.new_state(self.sizes.batch)
        if state is None:
            self.subject.fail(
                "new_state(batch) returned None, but the attention provides 'incremental_decoding': decoding "
                "needs a state that carries the earlier tokens (a KVCache, a recurrent state)"
            )
        if not isinstance(state, AttentionState):
            self.subject.fail(f"new_state(batch) returned a {type(state).__name__}, not a plugformer.AttentionState")
        return state

    def check_cache(self, module: nn.Module, state: object, seen: int) -> None:
        """A KVCache holds min(seen, limit) tokens of every row, with n_kv_heads heads."""
        if not isinstance(state, KVCache) or state.keys is None:
            return
        s = self.subject
        expected = seen if state.limit is None else min(seen, state.limit)
        if state.length != expected:
            s.fail(
                f"after {seen} tokens the KVCache holds {state.length} entries along the token axis; expected "
                f"{expected} (limit {state.limit}): its length must be counted in tokens"
            )
        kv_heads = getattr(module, "n_kv_heads", None)
        shape = tuple(state.keys.shape)
        if shape[0] != self.sizes.batch or (kv_heads is not None and shape[1] != kv_heads) or state.values.shape != state.keys.shape:
            s.fail(
                f"the KVCache holds keys {shape} and values {tuple(state.values.shape)}; expected (batch={self.sizes.batch}, "
                f"n_kv_heads={kv_heads}, tokens, head_dim) for both (the cache must store only the key/value heads)"
            )
