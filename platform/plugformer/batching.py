"""Length-grouped batching: batches of examples of similar length, so a padded batch does not
pay for the longest example of the whole split.

Training order (:class:`LengthGroupedSampler`, as Hugging Face's ``group_by_length``): shuffle
the indices, cut them into groups of ``batch_size × group_batches``, sort each group by
length (longest first), cut it into batches and shuffle the batches. Every epoch draws a new
order from ``seed + epoch``, every example is visited once per epoch, and batch composition
stays random beyond the group. Evaluation order (``shuffle=False``) sorts the whole split by
length, which changes no metric that is averaged per example or per token.

The sampler yields single indices in that order and the DataLoader cuts them into batches
of ``batch_size``; under DDP, Lightning's distributed wrapper hands every rank a strided
share of the order, so the sampler sorts units of ``batch_size × world size`` and each
rank's batches are still of similar lengths.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Indices of ``lengths`` grouped into runs of ``batch_size`` of similar length.

    ``shuffle=False``: all indices sorted by length (longest first, ties by index).
    ``shuffle=True``: the group-sort-shuffle order above, different every epoch
    (:meth:`set_epoch`, which Lightning calls, or one more epoch per iteration).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, *, shuffle: bool, seed: int = 0, group_batches: int = 50) -> None:
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size and group_batches must be ≥ 1, got {batch_size} and {group_batches}")
        self.lengths = torch.as_tensor(list(lengths), dtype=torch.long)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_size = batch_size * group_batches
        self.epoch = 0
        self._epoch_set = False

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._epoch_set = True

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            yield from _longest_first(self.lengths, torch.arange(len(self.lengths))).tolist()
            return
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self._epoch_set:
            self.epoch += 1  # no one sets epochs: still a new order next time
        self._epoch_set = False
        # Under DDP each rank takes every world-th index of this order, so a unit of
        # world × batch_size consecutive indices becomes one batch on every rank.
        unit = self.batch_size * _world_size()
        order = torch.randperm(len(self.lengths), generator=generator)
        units = []
        for group in order.split(self.group_size * _world_size()):
            units.extend(_longest_first(self.lengths, group).split(unit))
        # A short unit (the split's tail) stays last: anywhere else it would shift every
        # later batch boundary.
        tail = [units.pop()] if units and len(units[-1]) < unit else []
        for index in torch.randperm(len(units), generator=generator).tolist():
            yield from units[index].tolist()
        for short in tail:
            yield from short.tolist()


def _world_size() -> int:
    distributed = torch.distributed
    return distributed.get_world_size() if distributed.is_available() and distributed.is_initialized() else 1


def _longest_first(lengths: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``indices`` sorted by their length, longest first; a stable sort keeps ties in order."""
    order = torch.sort(lengths[indices], descending=True, stable=True).indices
    return indices[order]


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The fraction of a padded batch's cells that are padding, over ``batches`` of indices
    into ``lengths`` (each batch padded to its longest example)."""
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    real = sum(lengths[i] for batch in batches for i in batch)
    return 1 - real / padded if padded else 0.0
