"""A short depthwise convolution over the sequence, usable in place of attention in any layer
(Zoology's BaseConv, Arora et al. 2023; the short convolutions of H3, Fu et al. 2023).

    u = W_in x,    c_t = b + Σ_{m=0}^{k−1} w_m ⊙ u_{t−m}    (causal; per channel),
    y = W_out c,    or with ``gate``: y = W_out (c ⊙ W_gate x)  (BaseConv's multiplicative gate)

with kernel size k = ``kernel_size`` (3 or 4 in Zoology and H3). Bidirectional (an encoder),
the window is centred instead: taps t − ⌈(k−1)/2⌉ .. t + ⌊(k−1)/2⌋. Cost is O(n·k·d) in time
and O(n·d) in memory. A short convolution gives every token its neighbours' content, which
attention needs to find "the token after this key": beside an attention layer it lets a
2-layer model learn multi-query associative recall in a few hundred steps. Padding,
positions and decoding: see :mod:`plugformer_plugins.attention.sequence_mixer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer import BuildContext, Capabilities, Component, bounds, mark_residual_projection
from plugformer_plugins.attention.sequence_mixer import SequenceMixer, empty_view


@dataclass
class ShortConvConfig:
    """``kernel_size``: tokens each output reads (itself and k − 1 earlier ones); ``gate``:
    multiply the convolution by a projection of the input (BaseConv). Off by default: in the
    default run's 2-layer MQAR hybrid the gated form learned several times slower
    (docs/attention.md, "Sequence mixers"). ``bias``: biases of the projections and the
    convolution."""

    kernel_size: int = field(default=4, metadata=bounds(ge=2))
    gate: bool = False
    bias: bool = True


class ShortConv(SequenceMixer):
    """Input projection, depthwise convolution, optional gate, output projection."""

    def __init__(self, config: ShortConvConfig, ctx: BuildContext) -> None:
        k = config.kernel_size
        super().__init__(ctx, left=k - 1 if ctx.causal else k // 2, right=(k - 1) // 2)
        d = ctx.d_model
        self.kernel_size = k
        self.in_proj = nn.Linear(d, d, bias=config.bias)
        self.gate = nn.Linear(d, d, bias=config.bias) if config.gate else None
        # weight[m] multiplies the input m taps before the window's last one (tap 0: the newest).
        self.weight = nn.Parameter(torch.empty(k, d).uniform_(-1 / math.sqrt(k), 1 / math.sqrt(k)))
        self.bias = nn.Parameter(torch.zeros(d)) if config.bias else None
        self.out = mark_residual_projection(nn.Linear(d, d, bias=config.bias))

    def inputs(self, x: Tensor) -> Tensor:
        return self.in_proj(x)

    def mix(self, sequence: Tensor, length: int) -> Tensor:
        k = self.kernel_size
        out = sequence[:, k - 1 : k - 1 + length] * self.weight[0]
        for m in range(1, k):
            out = out + sequence[:, k - 1 - m : k - 1 - m + length] * self.weight[m]
        return out if self.bias is None else out + self.bias

    def output(self, mixed: Tensor, x: Tensor) -> Tensor:
        if self.gate is not None:
            mixed = mixed * self.gate(x)
        return self.out(mixed)

    def projection_weights(self) -> dict[str, Tensor]:
        query = self.gate.weight if self.gate is not None else empty_view(self.in_proj.weight)
        return {"query": query, "key": empty_view(self.in_proj.weight), "value": self.in_proj.weight, "output": self.out.weight}


COMPONENT = Component(
    kind="attention",
    name="short_conv",
    factory=ShortConv,
    config=ShortConvConfig,
    summary="Short depthwise convolution over the sequence (kernel 3–4) with input/output projections and a gate.",
    reference="Arora et al. 2023, Zoology (BaseConv); Fu et al. 2023, Hungry Hungry Hippos (H3)",
    capabilities=Capabilities(
        provides={"causal", "bidirectional", "key_padding_mask", "incremental_decoding", "ignores_positions"},
        cost="linear",
    ),
)
