"""Algorithmic sequence-to-sequence pairs: copy, reverse or sort a random sequence of
symbols, the classic probes of sequence transduction (Graves et al. 2014, Neural Turing
Machines; Grefenstette et al. 2015).

Token ids: 0 ``<pad>``, 1 ``<start>`` (the decoder's first input), 2 ``<eos>`` (ends every
target), then ``vocab_size - 3`` symbols. A source has a uniform length in
``min_length..max_length`` and uniform symbols; its target is the same symbols copied,
reversed or sorted ascending. Sources are distinct across all splits, so validation and test
never repeat a training source. Batches follow the ``seq2seq`` objective's format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np

from plugformer import Capabilities, Component, ConfigError, DataContext, DataError, bounds
from plugformer_plugins.data.seq2seq_batches import Seq2SeqTask

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset, DatasetDict


PAD_ID, START_ID, EOS_ID = 0, 1, 2
FIRST_SYMBOL = 3


class Operation(str, Enum):
    copy = "copy"
    reverse = "reverse"
    sort = "sort"


@dataclass
class AlgorithmicConfig:
    task: Operation = Operation.reverse
    # All token ids, the three special tokens included.
    vocab_size: int = field(default=16, metadata=bounds(ge=4))
    min_length: int = field(default=4, metadata=bounds(ge=1))
    max_length: int = field(default=16, metadata=bounds(ge=1))
    train_examples: int = field(default=20000, metadata=bounds(ge=1))
    val_examples: int = field(default=500, metadata=bounds(ge=1))
    test_examples: int = field(default=500, metadata=bounds(ge=0))
    batch_size: int = field(default=64, metadata=bounds(ge=1))
    # Loader processes; 0 collates in the training process (the splits are in memory; on a few
    # CPU cores workers compete with training: see BENCHMARKS.md, data wait).
    num_workers: int = field(default=0, metadata=bounds(ge=0))
    # Keep the loader processes from one epoch to the next (with num_workers > 0).
    persistent_workers: bool = True
    # Page-locked batches for faster GPU copies; null: on exactly when training on a GPU.
    pin_memory: bool | None = None
    # Batches of examples of similar length (plugformer.batching): less padding per batch.
    bucket_by_length: bool = False
    seed: int = 1234


def transform(source: np.ndarray, operation: Operation) -> np.ndarray:
    """The target symbols for ``source`` (without the end token)."""
    operation = Operation(operation)
    if operation is Operation.reverse:
        return source[::-1].copy()
    if operation is Operation.sort:
        return np.sort(source)
    return source.copy()


def distinct_sources(config: AlgorithmicConfig) -> int:
    """How many distinct sources the length range and vocabulary allow."""
    symbols = config.vocab_size - FIRST_SYMBOL
    return sum(symbols**length for length in range(config.min_length, config.max_length + 1))


def generate(config: AlgorithmicConfig, count: int, seed: int) -> list[np.ndarray]:
    """``count`` distinct sources (int16 arrays of symbol ids), deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    seen: set[bytes] = set()
    sources: list[np.ndarray] = []
    attempts, budget = 0, 100 * count + 10_000
    chunk = max(1024, count)
    while len(sources) < count:
        lengths = rng.integers(config.min_length, config.max_length + 1, size=chunk)
        symbols = rng.integers(FIRST_SYMBOL, config.vocab_size, size=(chunk, config.max_length), dtype=np.int16)
        for row, length in zip(symbols, lengths):
            attempts += 1
            source = row[:length]
            key = source.tobytes()
            if key not in seen:
                seen.add(key)
                sources.append(source)
                if len(sources) == count:
                    break
        if attempts > budget and len(sources) < count:
            raise DataError(
                f"The algorithmic task found only {len(sources)} distinct sources of {count} after {attempts} draws.",
                expected="a vocabulary and length range with many more distinct sources than examples",
                fix="raise data.vocab_size or data.max_length, or ask for fewer examples",
            )
    return sources


def to_dataset(sources: list[np.ndarray], operation: Operation) -> Dataset:
    """``input_ids`` (the sources) and ``labels`` (each target followed by the end token)."""
    import pyarrow as pa
    from datasets import Dataset  # imported when data is built: it takes a second

    eos = np.array([EOS_ID], dtype=np.int16)
    targets = [np.concatenate([transform(s, operation), eos]) for s in sources]

    def column(arrays: list[np.ndarray]) -> pa.Array:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in arrays])
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int16)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))

    return Dataset.from_dict({"input_ids": column(sources), "labels": column(targets)})


class AlgorithmicTask(Seq2SeqTask):
    name = "algorithmic"
    pad_id = PAD_ID
    start_id = START_ID
    eos_id = EOS_ID

    def __init__(self, config: AlgorithmicConfig, ctx: DataContext) -> None:
        check_config(config)
        super().__init__(
            ctx.cache_dir, config.batch_size, config.num_workers, bucket_by_length=config.bucket_by_length,
            persistent_workers=config.persistent_workers, pin_memory=config.pin_memory,
        )
        self.config = config

    def cache_key(self) -> dict[str, Any]:
        c = self.config
        return {
            "task": Operation(c.task).value, "vocab_size": c.vocab_size,
            "min_length": c.min_length, "max_length": c.max_length,
            "train": c.train_examples, "val": c.val_examples, "test": c.test_examples,
            "seed": c.seed, "version": 1,
        }

    def build_splits(self) -> DatasetDict:
        from datasets import DatasetDict

        c = self.config
        sizes = {"train": c.train_examples, "validation": c.val_examples, "test": c.test_examples}
        sources = generate(c, sum(sizes.values()), c.seed)
        splits, start = {}, 0
        for split, size in sizes.items():
            if size:
                splits[split] = to_dataset(sources[start : start + size], c.task)
            start += size
        return DatasetDict(splits)

    def describe(self, splits: DatasetDict) -> None:
        self.vocab_size = self.config.vocab_size
        self.max_length = self.config.max_length + 1  # a target and its end token, or start + target


def check_config(config: AlgorithmicConfig) -> None:
    """Reject sizes the generator cannot satisfy, before any work."""
    c = config
    if c.vocab_size <= FIRST_SYMBOL:
        raise ConfigError(
            f"data.vocab_size={c.vocab_size} leaves no symbols after the 3 special tokens.",
            expected="vocab_size >= 4 (pad, start, eos and at least one symbol)",
            fix="raise data.vocab_size",
        )
    if not 1 <= c.min_length <= c.max_length:
        raise ConfigError(
            f"The algorithmic task cannot use data.min_length={c.min_length} with data.max_length={c.max_length}.",
            expected="1 <= min_length <= max_length",
            fix="change data.min_length or data.max_length",
        )
    needed = c.train_examples + c.val_examples + c.test_examples
    available = distinct_sources(c)
    if available < 2 * needed:
        raise ConfigError(
            f"The algorithmic task needs {needed} distinct sources, but vocab_size={c.vocab_size} and lengths "
            f"{c.min_length}..{c.max_length} allow only {available}.",
            expected="at least twice as many distinct sources as examples (train + val + test)",
            fix="raise data.vocab_size or data.max_length, or lower the example counts",
        )


COMPONENT = Component(
    kind="data",
    name="algorithmic",
    factory=AlgorithmicTask,
    config=AlgorithmicConfig,
    summary="Generated seq2seq pairs: copy, reverse or sort random symbol sequences.",
    reference="Graves et al. 2014, Neural Turing Machines (copy and sort tasks)",
    # max_length: the longest sequence a batch holds (a target and its end token), for the memory preflight
    capabilities=lambda c: Capabilities(requires={"objective": {"seq2seq"}}, max_length=c.max_length + 1),
)
