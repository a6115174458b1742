"""What the short sequence mixers (``short_conv``, ``token_shift``) share: the attention
calling convention without queries and keys, a window over recent tokens, and the decoding
state that holds those tokens.

A mixer's output at index t depends only on the (projected) inputs at indices t − left ..
t + right of the same example: causal mixers have ``right = 0``; bidirectional ones look
ahead too. Positions are indices in the sequence, so a mixer ignores ``positions`` and
works with any position component: it declares ``ignores_positions``, so in its layers
the builder neither checks a position's needs (``score_bias``, ``qk_transform``,
``relative_terms``: ALiBi, RoPE, T5, Shaw) nor hands it the position; input-embedding
positions (learned, sinusoidal) still reach it through the residual stream. A
``[short_conv, full]`` plan with RoPE rotates queries and keys in the attention layer only.

Padding: inputs at padded indices (``mask`` False) are set to zero before mixing, exactly the
zeros that pad the sequence's start, so padding never reaches a real token and a
left-padded prompt gives the outputs it gives alone.

Decoding: :class:`RecentInputs` keeps the last ``left`` mixed inputs of every example (zeros
for padding and for tokens not yet seen); a call with a state prepends them, so token-by-token
decoding, a prefill followed by tokens, and chunks give the outputs of one full forward.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from plugformer import AttentionState, BuildContext, ConfigError


@dataclass
class RecentInputs(AttentionState):
    """The last ``width`` inputs of each example, (batch, width, channels), zeros where a
    token was padding or not seen yet; None before the first call."""

    width: int
    inputs: Tensor | None = None

    def window(self, u: Tensor) -> Tensor:
        """``u`` (batch, length, channels) with the held inputs (or zeros) before it; keeps
        the last ``width`` inputs of the result for the next call."""
        held = self.inputs if self.inputs is not None else u.new_zeros(u.shape[0], self.width, u.shape[-1])
        sequence = torch.cat([held.to(u.dtype), u], dim=1)
        self.inputs = sequence[:, sequence.shape[1] - self.width :]
        return sequence

    def reorder(self, index: Tensor) -> None:
        if self.inputs is not None:
            self.inputs = self.inputs[index]

    def detach(self) -> None:
        if self.inputs is not None:
            self.inputs = self.inputs.detach()

    def reset(self, rows: Tensor) -> None:
        if self.inputs is not None:
            self.inputs = self.inputs * (~rows).to(self.inputs.dtype)[:, None, None]


class SequenceMixer(nn.Module):
    """Base of a mixer over a window of ``left`` earlier (and, bidirectional, ``right``
    later) tokens. Subclasses set the window in ``__init__`` and implement :meth:`inputs`
    (x → the per-token values that are mixed), :meth:`mix` (the padded sequence → one
    output per token) and :meth:`output` (mixed values and x → the layer's output)."""

    def __init__(self, ctx: BuildContext, *, left: int, right: int) -> None:
        super().__init__()
        if ctx.cross:
            raise ConfigError(
                f"{type(self).__name__} mixes a sequence with itself and cannot be a cross-attention.",
                expected="a model/cross_attention that provides cross_attention",
                fix="choose model/cross_attention=full (or another attention that provides cross_attention)",
            )
        self.causal = ctx.causal
        self.left = left
        self.right = 0 if ctx.causal else right

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
        """x (batch, length, d_model) → same shape; ``positions``, ``context`` and ``extras``
        are not used. ``state``: a :class:`RecentInputs` from :meth:`new_state` (causal)."""
        length = x.shape[1]
        u = self.inputs(x)
        if mask is not None:
            u = u * mask[..., None].to(u.dtype)
        if isinstance(state, RecentInputs) and self.left:
            sequence = F.pad(state.window(u), (0, 0, 0, self.right))
        else:
            sequence = F.pad(u, (0, 0, self.left, self.right))
        return self.output(self.mix(sequence, length), x)

    def new_state(self, batch_size: int, *, streaming: bool = False) -> AttentionState | None:
        """For decoding a causal mixer: the last ``left`` inputs. No state across the
        batches of a stream (like a KV cache, nothing is carried between segments)."""
        if streaming or not self.causal:
            return None
        return RecentInputs(width=self.left)

    # --- what a mixer implements --------------------------------------------------------------
    def inputs(self, x: Tensor) -> Tensor:
        """(batch, length, d_model) → (batch, length, channels): what is mixed."""
        raise NotImplementedError

    def mix(self, sequence: Tensor, length: int) -> Tensor:
        """(batch, left + length + right, channels) → (batch, length, channels): output t
        reads ``sequence[:, t : t + left + right + 1]`` (index t of the input is left + t)."""
        raise NotImplementedError

    def output(self, mixed: Tensor, x: Tensor) -> Tensor:
        """The mixed values (batch, length, channels) and x → (batch, length, d_model)."""
        raise NotImplementedError

    def projection_weights(self) -> dict[str, Tensor]:
        """Weights by attention role, for initializations that treat them differently
        (DeepNorm scales ``value`` and ``output`` by β). Roles a mixer lacks are empty
        (0-row) views, so such an initializer leaves nothing out and changes nothing."""
        raise NotImplementedError


def empty_view(weight: Tensor) -> Tensor:
    """A (0, in_features) view of ``weight``: a projection role a mixer does not have."""
    return weight[:0]
