"""Token shift: part of the channels come from the previous token, then a projection
(x-transformers' ``shift_tokens``; the time-mix shift of RWKV, Peng et al. 2023), usable in
place of attention in any layer.

With s = round(``fraction`` · d_model) shifted channels (at least 1),

    causal:        z_t = [x_t[: d − s],  x_{t−1}[d − s :]],        y_t = W z_t
    bidirectional: the s channels split in two: the first ⌈s/2⌉ from x_{t−1}, the
                   other ⌊s/2⌋ from x_{t+1}

(x_{−1} = 0). Cost is O(n·d) plus the projection. The shifted channels put the previous
token's content beside the current one, which is what attention needs to find "the token
after this key" in associative recall. Padding, positions and decoding (the state holds the
last token): see :mod:`plugformer_plugins.attention.sequence_mixer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, ConfigError, bounds, mark_residual_projection
from plugformer_plugins.attention.sequence_mixer import SequenceMixer, empty_view


@dataclass
class TokenShiftConfig:
    """``fraction``: share of the channels taken from the neighbouring token; ``bias``: of
    the projection."""

    fraction: float = field(default=0.5, metadata=bounds(gt=0.0, le=1.0))
    bias: bool = True


class TokenShift(SequenceMixer):
    """Shift the last s channels by one token, then project."""

    def __init__(self, config: TokenShiftConfig, ctx: BuildContext) -> None:
        super().__init__(ctx, left=1, right=1)
        d = ctx.d_model
        shifted = max(1, round(config.fraction * d))
        if not ctx.causal and shifted < 2:
            raise ConfigError(
                f"model.attention.fraction={config.fraction} shifts {shifted} of d_model={d} channels; a bidirectional "
                "token shift needs one channel from each side.",
                expected="fraction · d_model ≥ 2 in an encoder",
                fix="raise model.attention.fraction",
            )
        self.kept = d - shifted
        self.from_next = 0 if ctx.causal else shifted // 2
        self.from_previous = shifted - self.from_next
        self.out = mark_residual_projection(nn.Linear(d, d, bias=config.bias))

    def inputs(self, x: Tensor) -> Tensor:
        return x

    def mix(self, sequence: Tensor, length: int) -> Tensor:
        current = sequence[:, 1 : 1 + length, : self.kept]
        previous = sequence[:, :length, self.kept : self.kept + self.from_previous]
        parts = [current, previous]
        if self.from_next:
            parts.append(sequence[:, 2 : 2 + length, self.kept + self.from_previous :])
        return torch.cat(parts, dim=-1)

    def output(self, mixed: Tensor, x: Tensor) -> Tensor:
        return self.out(mixed)

    def projection_weights(self) -> dict[str, Tensor]:
        none = empty_view(self.out.weight)
        return {"query": none, "key": none, "value": none, "output": self.out.weight}


COMPONENT = Component(
    kind="attention",
    name="token_shift",
    factory=TokenShift,
    config=TokenShiftConfig,
    summary="Token shift: a fraction of the channels from the previous token, then a projection.",
    reference="Peng et al. 2023, RWKV: Reinventing RNNs for the Transformer Era; lucidrains/x-transformers shift_tokens",
    capabilities=Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "incremental_decoding", "ignores_positions"},
        cost="linear",
    ),
)
