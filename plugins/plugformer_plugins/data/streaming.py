"""Ordered-segment streaming for data tasks whose split is one long text cut into
consecutive blocks (block k continues block k − 1): the batching of Transformer-XL and the
recurrent language models before it, so a model may carry a memory from batch to batch."""

from __future__ import annotations

from collections.abc import Iterator

from torch.utils.data import Sampler

from plugformer import DataError


def world_size() -> int:
    """Processes of the running torch.distributed job (1 outside one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class StreamOrderSampler(Sampler[int]):
    """Indices of ``num_blocks`` consecutive blocks in stream order.

    The split is divided into ``batch_size × ranks`` streams of S = ⌊num_blocks / streams⌋
    consecutive blocks (the rest is left out). Batch t holds block t of every stream, so row i
    of a batch continues row i of the previous one. With several ranks the indices are
    interleaved so that a distributed sampler that gives rank r every ``ranks``-th index
    (Lightning's, without shuffling) hands rank r its own ``batch_size`` streams, in order:
    the memory each rank carries belongs to its own rows.
    """

    def __init__(self, num_blocks: int, batch_size: int, ranks: int = 1, *, split: str = "train") -> None:
        streams = batch_size * ranks
        self.steps = num_blocks // streams
        if self.steps < 1:
            raise DataError(
                f"The {split} split has {num_blocks} blocks, fewer than one per stream "
                f"(data.batch_size={batch_size} × {ranks} process(es)).",
                expected="at least batch_size × processes blocks of data.block_size tokens",
                fix="lower data.batch_size or data.block_size, or add text",
            )
        self.batch_size, self.ranks = batch_size, ranks

    def __iter__(self) -> Iterator[int]:
        for step in range(self.steps):
            for row in range(self.batch_size):
                for rank in range(self.ranks):
                    yield (rank * self.batch_size + row) * self.steps + step

    def __len__(self) -> int:
        return self.steps * self.batch_size * self.ranks
