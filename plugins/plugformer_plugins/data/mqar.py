"""Multi-query associative recall (MQAR), as generated in Zoology (Arora et al. 2023;
HazyResearch/zoology, ``zoology/data/multiquery_ar.py``).

Layout of one example of ``seq_len`` tokens with P = ``num_pairs``:

- the context, positions 0 .. 2P − 1: P key-value pairs ``k_1 v_1 k_2 v_2 …``. Keys are
  drawn without replacement from the lower half of the vocabulary (ids 1 .. V/2 − 1) and
  values without replacement from the upper half (V/2 .. V − 1), so within an example no
  two keys and no two values are equal, and each key has exactly one answer;
- the queries: each key once, at position 2P + 2g for a gap g in 0 .. S − 1 with
  S = (seq_len − 2P) // 2 (even offsets after the context, as in Zoology). Gaps are drawn
  without replacement, uniformly (``placement=uniform``) or with Zoology's power law
  (``placement=power_law``: p(g) ∝ (g + 1)^(a − 1), a = ``power_a``, 0.01 in Zoology, so
  most queries come soon after the context; a = 1 is uniform). The label at a query's
  position is its key's value (the token that follows it); every other label is ignored;
- filler, every other position: with ``random_non_queries`` (Zoology's default) a token
  drawn uniformly from the vocabulary ids 1 .. V − 1 that are *none of this example's keys
  or values*, so a queried key never reappears as filler and no filler token can be read
  as one of the example's pairs (Zoology draws filler from the whole vocabulary, which
  lets queried keys and values reappear); otherwise token 0 (Zoology's zeros).

Token 0 is also the collator's padding id, but examples all have ``seq_len`` tokens and the
attention mask comes from their lengths, so 0 as filler is an ordinary token. Sizes that
cannot hold the pairs are refused before any work (:func:`check_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

import numpy as np
from plugformer import Capabilities, Component, ConfigError, DataContext, bounds
from plugformer.data import IGNORE_INDEX, CachedDatasetTask

if TYPE_CHECKING:
    from datasets import DatasetDict

#: Bumped whenever the same config would generate different examples.
CACHE_VERSION = 2


class Placement(str, Enum):
    uniform = "uniform"
    power_law = "power_law"


@dataclass
class MQARConfig:
    """``vocab_size`` V (keys: 1 .. V/2 − 1, values: V/2 .. V − 1); ``seq_len`` tokens per
    example; ``num_pairs`` key-value pairs, each queried once; ``placement`` of the queries
    and ``power_a`` of the power law; ``random_non_queries``: random filler (else zeros)."""

    vocab_size: int = field(default=256, metadata=bounds(ge=4))
    seq_len: int = field(default=64, metadata=bounds(ge=4))
    num_pairs: int = field(default=8, metadata=bounds(ge=1))
    train_examples: int = field(default=20000, metadata=bounds(ge=1))
    val_examples: int = field(default=1000, metadata=bounds(ge=1))
    placement: Placement = Placement.uniform
    power_a: float = field(default=0.01, metadata=bounds(gt=0.0, le=1.0))
    random_non_queries: bool = True
    batch_size: int = field(default=64, metadata=bounds(ge=1))
    # Loader processes; 0 collates in the training process (the splits are in memory; on a few
    # CPU cores workers compete with training: see BENCHMARKS.md, data wait).
    num_workers: int = field(default=0, metadata=bounds(ge=0))
    # Keep the loader processes from one epoch to the next (with num_workers > 0).
    persistent_workers: bool = True
    # Page-locked batches for faster GPU copies; null: on exactly when training on a GPU.
    pin_memory: bool | None = None
    seed: int = 1234


def check_config(config: MQARConfig) -> None:
    """Raise :class:`plugformer.ConfigError` when the vocabulary or the length cannot hold
    ``num_pairs`` distinct keys, distinct values and their queries."""
    c = config
    half = c.vocab_size // 2
    keys, values = half - 1, c.vocab_size - half
    if c.num_pairs > keys:
        raise ConfigError(
            f"data.num_pairs={c.num_pairs} needs {c.num_pairs} distinct keys, but data.vocab_size={c.vocab_size} "
            f"has only {keys} (ids 1..{half - 1}, the lower half without the padding id 0).",
            expected=f"num_pairs ≤ vocab_size/2 − 1 (here ≤ {keys})",
            fix=f"raise data.vocab_size to at least {2 * (c.num_pairs + 1)} or lower data.num_pairs",
        )
    if c.num_pairs > values:
        raise ConfigError(
            f"data.num_pairs={c.num_pairs} needs {c.num_pairs} distinct values, but data.vocab_size={c.vocab_size} "
            f"has only {values} (ids {half}..{c.vocab_size - 1}).",
            expected=f"num_pairs ≤ vocab_size − vocab_size/2 (here ≤ {values})",
            fix="raise data.vocab_size or lower data.num_pairs",
        )
    if c.seq_len < 4 * c.num_pairs:
        raise ConfigError(
            f"data.seq_len={c.seq_len} cannot hold {c.num_pairs} key-value pairs and their {c.num_pairs} queries "
            f"(2·{c.num_pairs} context tokens, then a query on every other position).",
            expected=f"seq_len ≥ 4·num_pairs (here ≥ {4 * c.num_pairs})",
            fix=f"raise data.seq_len to {4 * c.num_pairs} or more, or lower data.num_pairs to {c.seq_len // 4} or less",
        )


def _distinct(rng: np.random.Generator, low: int, high: int, rows: int, k: int) -> np.ndarray:
    """(rows, k) int64: per row, k distinct ids from ``low .. high − 1`` in random order."""
    population = high - low
    if k * k <= population:  # few collisions: redraw the rows that have one
        out = rng.integers(low, high, size=(rows, k))
        while True:
            ordered = np.sort(out, axis=1)
            repeated = (ordered[:, 1:] == ordered[:, :-1]).any(axis=1)
            if not repeated.any():
                return out
            out[repeated] = rng.integers(low, high, size=(int(repeated.sum()), k))
    out = np.empty((rows, k), dtype=np.int64)
    chunk = max(1, (1 << 22) // population)
    for start in range(0, rows, chunk):
        r = rng.random((min(chunk, rows - start), population))
        chosen = np.argpartition(r, k - 1, axis=1)[:, :k] if k < population else np.tile(np.arange(population), (len(r), 1))
        order = np.argsort(np.take_along_axis(r, chosen, axis=1), axis=1)  # a random order of the chosen
        out[start : start + len(r)] = np.take_along_axis(chosen, order, axis=1) + low
    return out


def gap_weights(slots: int, placement: Placement, power_a: float) -> np.ndarray:
    """Probabilities of the query gaps 0 .. slots − 1: uniform, or Zoology's power law
    p(g) ∝ a·(g + 1)^(a − 1)."""
    if Placement(placement) is Placement.uniform:
        return np.full(slots, 1.0 / slots)
    p = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
    return p / p.sum()


def _gaps(rng: np.random.Generator, weights: np.ndarray, rows: int, k: int) -> np.ndarray:
    """(rows, k): k distinct gaps per row, drawn one after another without replacement with
    probabilities ``weights`` (as ``np.random.choice(replace=False, p=weights)``), via the
    Gumbel-top-k trick: sorting log-weights plus Gumbel noise gives the same order."""
    scores = np.log(weights)[None, :] + rng.gumbel(size=(rows, len(weights)))
    return np.argsort(-scores, axis=1)[:, :k]


def _filler(rng: np.random.Generator, excluded: np.ndarray, vocab_size: int, shape: tuple[int, int]) -> np.ndarray:
    """Tokens drawn uniformly from 1 .. vocab_size − 1 without the row's ``excluded`` ids
    ((rows, m), distinct per row): the r-th allowed id is found by stepping over the
    sorted excluded ids."""
    excluded = np.sort(excluded, axis=1)
    allowed = vocab_size - 1 - excluded.shape[1]
    tokens = rng.integers(0, allowed, size=shape) + 1
    for j in range(excluded.shape[1]):
        tokens += excluded[:, j : j + 1] <= tokens
    return tokens


def generate(config: MQARConfig, num_examples: int, seed: int) -> dict[str, np.ndarray]:
    """``input_ids`` and aligned ``labels`` (num_examples, seq_len), deterministic for
    ``seed``; ``labels`` hold each query's value at the query's position, −100 elsewhere."""
    check_config(config)
    rng = np.random.default_rng(seed)
    pairs, length, vocab = config.num_pairs, config.seq_len, config.vocab_size
    half = vocab // 2
    keys = _distinct(rng, 1, half, num_examples, pairs)
    values = _distinct(rng, half, vocab, num_examples, pairs)
    rows = np.arange(num_examples)[:, None]

    context = 2 * pairs
    gaps = _gaps(rng, gap_weights((length - context) // 2, config.placement, config.power_a), num_examples, pairs)
    queries = context + 2 * gaps  # key j is queried at queries[:, j]

    if config.random_non_queries:
        inputs = _filler(rng, np.concatenate([keys, values], axis=1), vocab, (num_examples, length))
    else:
        inputs = np.zeros((num_examples, length), dtype=np.int64)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values
    inputs[rows, queries] = keys
    labels = np.full((num_examples, length), IGNORE_INDEX, dtype=np.int64)
    labels[rows, queries] = values
    return {"input_ids": inputs, "labels": labels}


class MQARTask(CachedDatasetTask):
    name = "mqar"

    def __init__(self, config: MQARConfig, ctx: DataContext) -> None:
        check_config(config)
        super().__init__(
            ctx.cache_dir, config.batch_size, config.num_workers, persistent_workers=config.persistent_workers,
            pin_memory=config.pin_memory,
        )
        self.config = config

    def cache_key(self) -> dict[str, Any]:
        c = self.config
        return {
            "vocab_size": c.vocab_size, "seq_len": c.seq_len, "num_pairs": c.num_pairs,
            "train": c.train_examples, "val": c.val_examples,
            "placement": Placement(c.placement).value, "power_a": c.power_a,
            "random_non_queries": c.random_non_queries, "seed": c.seed, "version": CACHE_VERSION,
        }

    def build_splits(self) -> DatasetDict:
        from datasets import Dataset, DatasetDict  # imported when data is built: it takes a second

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
    # max_length: the longest sequence a batch holds, for the memory preflight
    capabilities=lambda c: Capabilities(requires={"objective": {"causal_lm"}}, max_length=c.seq_len),
)
