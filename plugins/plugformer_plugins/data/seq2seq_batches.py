"""Batches of source/target pairs for the ``seq2seq`` objective, shared by the data tasks that
produce them (``algorithmic``, ``pairs``).

A task stores each example as ``input_ids`` (the source) and ``labels`` (the target followed
by the end token), without start or padding tokens; :meth:`Seq2SeqTask.collate` pads them
into the batch format documented in :mod:`plugformer_plugins.objective.seq2seq`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from plugformer.data import IGNORE_INDEX, CachedDatasetTask, pad_sequences


def collate_pairs(sources: list[Tensor], targets: list[Tensor], *, pad_id: int, start_id: int) -> dict[str, Tensor]:
    """The seq2seq batch for sources and targets (each target ending with its end token):
    ``input_ids``, ``attention_mask``, ``decoder_input_ids`` (start token, then the target
    but its last token; padding where ``labels`` is -100), ``decoder_attention_mask`` and
    ``labels`` (-100 on padding)."""
    input_ids = pad_sequences(sources, pad_id)
    source_lengths = torch.tensor([len(s) for s in sources])
    attention_mask = torch.arange(input_ids.shape[1])[None, :] < source_lengths[:, None]
    labels = pad_sequences(targets, IGNORE_INDEX)
    decoder_attention_mask = labels != IGNORE_INDEX
    decoder_input_ids = torch.full_like(labels, pad_id)
    decoder_input_ids[:, 0] = start_id
    decoder_input_ids[:, 1:] = labels[:, :-1].masked_fill(~decoder_attention_mask[:, 1:], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "decoder_input_ids": decoder_input_ids,
        "decoder_attention_mask": decoder_attention_mask,
        "labels": labels,
    }


class Seq2SeqTask(CachedDatasetTask):
    """A cached task of source/target pairs: splits with ``input_ids`` and ``labels`` (target
    + end token) columns. Subclasses set ``start_id``, ``eos_id`` and ``pad_id`` and
    implement ``cache_key``, ``build_splits`` and ``describe``."""

    start_id: int
    eos_id: int

    def collate(self, rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return collate_pairs(
            [row["input_ids"] for row in rows], [row["labels"] for row in rows], pad_id=self.pad_id, start_id=self.start_id
        )

    @property
    def facts(self) -> dict[str, Any]:
        """The special tokens, for the objective (deriving decoder inputs) and for generation."""
        return {"start_id": self.start_id, "eos_id": self.eos_id, "pad_id": self.pad_id}
