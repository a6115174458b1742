"""DeepNorm (Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers"): post-norm
with the residual up-weighted, x ← LN(α·x + G(x)), and the feed-forward, value and output
projections initialized with Xavier gain β (queries and keys with gain 1).

N encoder and M decoder layers: encoder-only α = (2N)^¼, β = (8N)^−¼; decoder-only
α = (2M)^¼, β = (8M)^−¼; encoder–decoder: encoder α = 0.81(N⁴M)^{1/16}, β = 0.87(N⁴M)^{−1/16},
decoder α = (3M)^¼, β = (12M)^−¼.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer import Block, BlockParts, BuildContext, Capabilities, Component, LayerState, StepInputs, bounds


@dataclass
class DeepNormConfig:
    """``alpha``/``beta``: override the gains (None: from the layer counts, as in the paper)."""

    alpha: float | None = field(default=None, metadata=bounds(gt=0.0))
    beta: float | None = field(default=None, metadata=bounds(gt=0.0))


def deepnorm_gains(stack: str, encoder_layers: int, decoder_layers: int) -> tuple[float, float]:
    """(α, β) for a layer of ``stack`` in a model with these layer counts (0: no such stack)."""
    n, m = encoder_layers, decoder_layers
    if n and m:
        if stack == "encoder":
            return 0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)
        return (3 * m) ** 0.25, (12 * m) ** -0.25
    layers = n or m
    return (2 * layers) ** 0.25, (8 * layers) ** -0.25


class DeepNormBlock(Block):
    """Post-norm sublayers with residual gain α; :meth:`init_weights` applies β."""

    final_norm = False

    def __init__(self, config: DeepNormConfig, ctx: BuildContext, parts: BlockParts) -> None:
        super().__init__(parts)
        encoder_layers, decoder_layers = ctx.encoder_layers, ctx.decoder_layers
        if not (encoder_layers or decoder_layers):  # a context built by hand: this stack alone
            encoder_layers, decoder_layers = (ctx.n_layers, 0) if ctx.stack == "encoder" else (0, ctx.n_layers)
        alpha, beta = deepnorm_gains(ctx.stack, encoder_layers, decoder_layers)
        self.alpha = config.alpha if config.alpha is not None else alpha
        self.beta = config.beta if config.beta is not None else beta
        sublayers = ["attention", "ffn"] + (["cross_attention"] if parts.cross_attention is not None else [])
        self.norms = nn.ModuleDict({name: parts.make_norm() for name in sublayers})
        self.drop = nn.Dropout(ctx.dropout)

    def forward(self, x: Tensor, inputs: StepInputs, state: LayerState | None = None) -> Tensor:
        x = self.norms["attention"](self.alpha * x + self.drop(self.self_attend(x, inputs, state)))
        if self.cross_attention is not None:
            x = self.norms["cross_attention"](self.alpha * x + self.drop(self.cross_attend(x, inputs, state)))
        return self.norms["ffn"](self.alpha * x + self.drop(self.ffn(x)))

    @torch.no_grad()
    def init_weights(self) -> None:
        for attention in (self.attention, self.cross_attention):
            if attention is None:
                continue
            weights = attention.projection_weights()
            for role, gain in (("query", 1.0), ("key", 1.0), ("value", self.beta), ("output", self.beta)):
                nn.init.xavier_normal_(weights[role], gain=gain)
        for module in self.ffn.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight, gain=self.beta)


COMPONENT = Component(
    kind="block",
    name="deepnorm",
    factory=DeepNormBlock,
    config=DeepNormConfig,
    summary="DeepNorm: post-norm with residual gain α and Xavier gain β from the layer counts.",
    reference="Wang et al. 2022, DeepNet: Scaling Transformers to 1,000 Layers",
    capabilities=Capabilities(provides={"cross_attention"}),
)
