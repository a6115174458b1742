"""Factorized embedding parameterization (Lan et al. 2020, "ALBERT"): a V×E token table and
an E→d_model projection (V·E + E·d parameters) instead of one V×d table, with E < d_model.
A head tied to the embedding goes through the same factorization: logits = (h·P)·Tᵀ."""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn


class FactorizedEmbedding(nn.Module):
    """``forward(ids)`` = ``projection(table(ids))``: (…,) ids → (…, d_model).

    ``table`` is an ``nn.Embedding(V, E)``, ``projection`` an ``nn.Linear(E, d_model)``
    without bias. ``num_embeddings`` and ``embedding_dim`` (= d_model) read like an
    ``nn.Embedding`` 's; ``weight`` is the effective V×d_model matrix ``table·Pᵀ``, computed
    on each access (not a Parameter)."""

    def __init__(self, num_embeddings: int, embedding_size: int, d_model: int) -> None:
        super().__init__()
        self.table = nn.Embedding(num_embeddings, embedding_size)
        self.projection = nn.Linear(embedding_size, d_model, bias=False)
        self.num_embeddings = num_embeddings
        self.embedding_size = embedding_size
        self.embedding_dim = d_model
        self.padding_idx = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # The table as GPT-2 initializes embeddings, N(0, 0.02); the projection N(0, 1/√E), so an
        # effective embedding row table·Pᵀ also has a standard deviation of about 0.02.
        nn.init.normal_(self.table.weight, std=0.02)
        nn.init.normal_(self.projection.weight, std=1.0 / math.sqrt(self.embedding_size))

    def forward(self, ids: Tensor) -> Tensor:
        return self.projection(self.table(ids))

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self.table.weight @ self.projection.weight.t()


class FactorizedHead(nn.Module):
    """The output head tied to a :class:`FactorizedEmbedding`: ``forward(h)`` =
    ``(h·P)·Tᵀ + bias`` with the embedding's own P and T (shared Parameters, not copies).
    ``weight`` is the effective V×d_model matrix; ``in_features``/``out_features`` as an
    ``nn.Linear`` 's."""

    def __init__(self, embedding: FactorizedEmbedding, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.embedding = embedding
        self.bias = bias
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    def forward(self, hidden: Tensor) -> Tensor:
        reduced = F.linear(hidden, self.embedding.projection.weight.t())
        return F.linear(reduced, self.embedding.table.weight, self.bias)

    @property
    def weight(self) -> Tensor:
        return self.embedding.weight


def factorize_embeddings(model: nn.Module, embedding_size: int) -> int:
    """Replace ``model.token_embedding`` with a :class:`FactorizedEmbedding` of width
    ``embedding_size`` and every module of ``model.objective`` whose ``weight`` is the old
    embedding's weight (a tied head) with a :class:`FactorizedHead`. Returns how many heads
    were tied through the factorization."""
    old = model.token_embedding
    if isinstance(old, FactorizedEmbedding):
        return 0
    factorized = FactorizedEmbedding(old.num_embeddings, embedding_size, old.embedding_dim).to(old.weight.device)
    tied = [
        name for name, module in model.objective.named_modules()
        if name and getattr(module, "weight", None) is old.weight
    ]
    for name in tied:
        parent_name, _, child = name.rpartition(".")
        parent = model.objective.get_submodule(parent_name) if parent_name else model.objective
        bias = getattr(getattr(parent, child), "bias", None)
        setattr(parent, child, FactorizedHead(factorized, bias if isinstance(bias, nn.Parameter) else None))
    model.token_embedding = factorized
    return len(tied)
