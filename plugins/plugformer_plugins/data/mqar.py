"""Multi-query associative recall (MQAR), as defined in Zoology (Arora et al. 2023).

Keys come from the lower half of the vocabulary and values from the upper half. Each
example starts with ``num_pairs`` key-value pairs; each key is then queried once at a random
later position, and the model must produce the key's value right after it. The loss counts
only those answers. Token 0 is reserved for padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from datasets import Dataset, DatasetDict

from plugformer import Capabilities, Component, ConfigError, DataContext, bounds
from plugformer.data import IGNORE_INDEX, CachedDatasetTask


@dataclass
class MQARConfig:
    vocab_size: int = field(default=256, metadata=bounds(ge=4))
    seq_len: int = field(default=64, metadata=bounds(ge=3))
    num_pairs: int = field(default=8, metadata=bounds(ge=1))
    train_examples: int = field(default=20000, metadata=bounds(ge=1))
    val_examples: int = field(default=1000, metadata=bounds(ge=1))
    random_non_queries: bool = True
    batch_size: int = field(default=64, metadata=bounds(ge=1))
    num_workers: int = field(default=0, metadata=bounds(ge=0))
    seed: int = 1234


def generate(config: MQARConfig, num_examples: int, seed: int) -> dict[str, np.ndarray]:
    """``input_ids`` (num_examples, seq_len) and aligned ``labels``."""
    rng = np.random.default_rng(seed)
    half = config.vocab_size // 2
    pairs, length = config.num_pairs, config.seq_len
    # Draw one extra position so inputs and labels are the shifted halves of one sequence.
    keys = np.stack([rng.choice(np.arange(1, half), pairs, replace=False) for _ in range(num_examples)])
    values = rng.integers(half, config.vocab_size, size=(num_examples, pairs))
    sequence = np.zeros((num_examples, length + 1), dtype=np.int64)
    targets = np.full((num_examples, length + 1), IGNORE_INDEX, dtype=np.int64)
    sequence[:, 0 : 2 * pairs : 2] = keys
    sequence[:, 1 : 2 * pairs : 2] = values
    free = length - 2 * pairs  # query slots: positions 2·pairs .. length-1, answers one later
    rows = np.arange(num_examples)[:, None]
    slots = np.argsort(rng.random((num_examples, free)), axis=1)[:, :pairs] + 2 * pairs
    sequence[rows, slots] = keys
    targets[rows, slots + 1] = values
    if config.random_non_queries:
        noise = rng.integers(1, config.vocab_size, size=sequence.shape)
        sequence = np.where(sequence == 0, noise, sequence)
    return {"input_ids": sequence[:, :-1], "labels": targets[:, 1:]}


class MQARTask(CachedDatasetTask):
    name = "mqar"

    def __init__(self, config: MQARConfig, ctx: DataContext) -> None:
        if config.vocab_size < 4 or config.num_pairs >= config.vocab_size // 2:
            raise ConfigError(
                f"data.num_pairs={config.num_pairs} needs more than {config.num_pairs} distinct keys, "
                f"but data.vocab_size={config.vocab_size} gives {config.vocab_size // 2 - 1}.",
                expected="num_pairs < vocab_size/2 - 1",
                fix="raise data.vocab_size or lower data.num_pairs",
            )
        if 3 * config.num_pairs > config.seq_len:
            raise ConfigError(
                f"data.seq_len={config.seq_len} cannot hold {config.num_pairs} pairs and their queries.",
                expected="seq_len >= 3 * num_pairs",
                fix="raise data.seq_len or lower data.num_pairs",
            )
        super().__init__(ctx.cache_dir, config.batch_size, config.num_workers)
        self.config = config

    def cache_key(self) -> dict[str, Any]:
        c = self.config
        return {
            "vocab_size": c.vocab_size, "seq_len": c.seq_len, "num_pairs": c.num_pairs,
            "train": c.train_examples, "val": c.val_examples,
            "random_non_queries": c.random_non_queries, "seed": c.seed, "version": 1,
        }

    def build_splits(self) -> DatasetDict:
        c = self.config
        return DatasetDict(
            train=Dataset.from_dict(generate(c, c.train_examples, c.seed)),
            validation=Dataset.from_dict(generate(c, c.val_examples, c.seed + 1)),
        )

    def describe(self, splits: DatasetDict) -> None:
        self.vocab_size = self.config.vocab_size
        self.max_length = self.config.seq_len


COMPONENT = Component(
    kind="data",
    name="mqar",
    factory=MQARTask,
    config=MQARConfig,
    summary="Zoology multi-query associative recall: recall each queried key's value.",
    reference="Arora et al. 2023, Zoology: Measuring and Improving Recall in Efficient Language Models",
    capabilities=Capabilities(requires={"objective": {"causal_lm"}}),
)
