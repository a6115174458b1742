"""The generic Transformer: token embedding, position component, N blocks, final norm and
the objective's head. It never names a specific component; it receives built modules."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from plugformer.components import Attention, FeedForward, Objective, ObjectiveOutput, PositionEncoding
from plugformer.config import Placement


class Block(nn.Module):
    """Attention and feed-forward sublayers with residuals, norms placed by ``placement``."""

    def __init__(
        self,
        attention: Attention,
        ffn: FeedForward,
        make_norm: Callable[[], nn.Module],
        placement: Placement,
        dropout: float,
    ) -> None:
        super().__init__()
        self.attention = attention
        self.ffn = ffn
        self.placement = Placement(placement)
        self.attention_norm = make_norm()
        self.ffn_norm = make_norm()
        if self.placement is Placement.sandwich:
            self.attention_out_norm = make_norm()
            self.ffn_out_norm = make_norm()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, *, mask: Tensor | None, positions: Tensor) -> Tensor:
        def attend(h: Tensor) -> Tensor:
            return self.attention(h, mask=mask, positions=positions)

        if self.placement is Placement.pre:
            x = x + self.drop(attend(self.attention_norm(x)))
            return x + self.drop(self.ffn(self.ffn_norm(x)))
        if self.placement is Placement.post:
            x = self.attention_norm(x + self.drop(attend(x)))
            return self.ffn_norm(x + self.drop(self.ffn(x)))
        x = x + self.drop(self.attention_out_norm(attend(self.attention_norm(x))))
        return x + self.drop(self.ffn_out_norm(self.ffn(self.ffn_norm(x))))


class Transformer(nn.Module):
    """Token embedding → position → blocks → final norm → objective.

    ``forward(batch)`` returns the objective's :class:`ObjectiveOutput`; ``encode(input_ids,
    mask)`` returns the final hidden states (batch, length, d_model).
    """

    def __init__(
        self,
        token_embedding: nn.Embedding,
        position: PositionEncoding,
        blocks: list[Block],
        final_norm: nn.Module,
        objective: Objective,
        dropout: float,
    ) -> None:
        super().__init__()
        self.token_embedding = token_embedding
        self.position = position
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.objective = objective

    def encode(self, input_ids: Tensor, mask: Tensor | None = None) -> Tensor:
        length = input_ids.shape[1]
        positions = torch.arange(length, device=input_ids.device)
        if mask is not None and bool(mask.all()):
            mask = None  # no padding: lets attention take its fastest path
        x = self.token_embedding(input_ids)
        added = self.position.embed(positions)
        if added is not None:
            x = x + added.to(x.dtype)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x, mask=mask, positions=positions)
        return self.final_norm(x)

    def forward(self, batch: dict[str, Tensor]) -> ObjectiveOutput:
        hidden = self.encode(batch["input_ids"], batch.get("attention_mask"))
        return self.objective(hidden, batch)

    def feed_forward_layers(self) -> list[FeedForward]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, FeedForward)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def initialize(model: nn.Module, n_layers: int) -> None:
    """GPT-2 initialization: N(0, 0.02) for linear and embedding weights, zero biases, and
    N(0, 0.02/√(2·n_layers)) for the last projection of each residual branch. A module with
    an ``init_weights()`` method is then given the last word over its own parameters."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layers) if getattr(module, "scale_init_by_depth", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
    for module in model.modules():
        init_weights = getattr(module, "init_weights", None)
        if callable(init_weights):
            init_weights()
