"""ListOps: classify the value of a nested list expression (Nangia & Bowman 2018), as generated
for the Long Range Arena (Tay et al. 2021).

An expression is a digit 0-9 or an operator applied to 2..max_args sub-expressions, written
with one token per operator and one per closing bracket: ``[MAX 2 9 [MIN 4 7 ] 0 ]`` is 9.
Operators: MIN, MAX, MED (median, truncated to an integer) and SM (sum modulo 10). The label
is the expression's value (10 classes).

The generator: a node at depth d (the root is at depth 1) is a digit with probability 0.75
when d < max_depth and always at max_depth; otherwise it is a uniformly chosen operator with
a uniform number of children in 2..max_args. An example is accepted when its token count is
strictly between ``min_length`` and ``max_length``; duplicates are dropped across all splits,
so validation and test never repeat a training expression. The task prepends a CLS token.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from plugformer import Capabilities, Component, ConfigError, DataContext, DataError, bounds
from plugformer.data import CachedDatasetTask

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict


def median_truncated(values: Sequence[int]) -> int:
    """The median, truncated to an integer (the mean of the middle two for an even count)."""
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) // 2


def sum_mod_10(values: Sequence[int]) -> int:
    return sum(values) % 10


OPERATORS: dict[str, Callable[[Sequence[int]], int]] = {
    "[MIN": min,
    "[MAX": max,
    "[MED": median_truncated,
    "[SM": sum_mod_10,
}
END = "]"
DIGITS = tuple(str(d) for d in range(10))
VOCAB = ("<pad>", "<cls>", *DIGITS, *OPERATORS, END)
TOKEN_ID = {token: index for index, token in enumerate(VOCAB)}
PAD_ID, CLS_ID = TOKEN_ID["<pad>"], TOKEN_ID["<cls>"]
NUM_CLASSES = 10
OPERATOR_PROBABILITY = 0.25  # below max depth; a digit otherwise

_DIGIT_IDS = tuple(TOKEN_ID[d] for d in DIGITS)
_OPERATOR_IDS = tuple(TOKEN_ID[op] for op in OPERATORS)
_OPERATOR_FUNCTIONS = tuple(OPERATORS.values())
_END_ID = TOKEN_ID[END]


@dataclass
class ListOpsConfig:
    """Defaults: a small variant that trains on a laptop CPU. LRA's sizes are in
    ``experiment=listops_lra`` (depth 10, 10 args, lengths 500-2000, 96k/2k/2k)."""

    max_depth: int = field(default=5, metadata=bounds(ge=2))
    max_args: int = field(default=10, metadata=bounds(ge=2))
    # Accepted expressions have min_length < tokens < max_length (CLS not counted).
    min_length: int = field(default=30, metadata=bounds(ge=1))
    max_length: int = field(default=120, metadata=bounds(ge=3))
    train_examples: int = field(default=20000, metadata=bounds(ge=1))
    val_examples: int = field(default=1000, metadata=bounds(ge=0))
    test_examples: int = field(default=1000, metadata=bounds(ge=0))
    batch_size: int = field(default=64, metadata=bounds(ge=1))
    # Loader processes; 0 collates in the training process (the splits are in memory; on a few
    # CPU cores workers compete with training: see BENCHMARKS.md, data wait).
    num_workers: int = field(default=0, metadata=bounds(ge=0))
    # Keep the loader processes from one epoch to the next (with num_workers > 0).
    persistent_workers: bool = True
    # Page-locked batches for faster GPU copies; null: on exactly when training on a GPU.
    pin_memory: bool | None = None
    # Batches of examples of similar length (plugformer.batching): less padding per batch.
    bucket_by_length: bool = True
    seed: int = 1234


def evaluate(expression: str | Sequence[str]) -> int:
    """The value of an expression given as a string of space-separated tokens or as a token
    list (a leading CLS is skipped). Raises ValueError for a malformed expression."""
    tokens = expression.split() if isinstance(expression, str) else list(expression)
    if tokens and tokens[0] == "<cls>":
        tokens = tokens[1:]
    stack: list[tuple[str, list[int]]] = []
    value: int | None = None
    for position, token in enumerate(tokens):
        if value is not None and not stack:
            raise ValueError(f"tokens after the end of the expression at position {position}")
        if token in OPERATORS:
            stack.append((token, []))
            continue
        if token == END:
            if not stack or len(stack[-1][1]) < 1:
                raise ValueError(f"unexpected {END!r} at position {position}")
            operator, arguments = stack.pop()
            value = OPERATORS[operator](arguments)
        elif token in DIGITS:
            value = int(token)
        else:
            raise ValueError(f"unknown token {token!r} at position {position}")
        if stack:
            stack[-1][1].append(value)
    if stack or value is None:
        raise ValueError("incomplete expression")
    return value


def decode(ids: Sequence[int]) -> str:
    """Token ids back to the space-separated expression (padding dropped)."""
    return " ".join(VOCAB[int(i)] for i in ids if int(i) != PAD_ID)


class _TooLong(Exception):
    """Abandons a tree once it reaches max_length tokens: it would be rejected anyway."""


def _grow(rng: random.Random, depth: int, config: ListOpsConfig, out: list[int], operator: bool = False) -> int:
    """Append a random subtree's token ids to ``out`` and return its value."""
    if not operator and (depth >= config.max_depth or rng.random() >= OPERATOR_PROBABILITY):
        value = rng.randrange(10)
        out.append(_DIGIT_IDS[value])
    else:
        which = rng.randrange(len(_OPERATOR_IDS))
        out.append(_OPERATOR_IDS[which])
        children = rng.randint(2, config.max_args)
        values = [_grow(rng, depth + 1, config, out) for _ in range(children)]
        out.append(_END_ID)
        value = _OPERATOR_FUNCTIONS[which](values)
    if len(out) >= config.max_length:
        raise _TooLong
    return value


def sample_expression(rng: random.Random, config: ListOpsConfig) -> tuple[list[int], int] | None:
    """One draw of the rejection sampler: (token ids, value), or None when rejected.

    Two shortcuts make it fast without changing the distribution of accepted expressions:
    the root is drawn as an operator (a lone digit has one token and is always rejected,
    since min_length >= 1), and a tree is abandoned as soon as it reaches max_length tokens.
    """
    out: list[int] = []
    try:
        value = _grow(rng, 1, config, out, operator=True)
    except _TooLong:
        return None
    return (out, value) if len(out) > config.min_length else None


def generate(config: ListOpsConfig, count: int, seed: int) -> tuple[list[bytes], list[int]]:
    """``count`` distinct accepted expressions (token ids as bytes) and their values, in the
    order drawn; deterministic for ``seed``."""
    rng = random.Random(seed)
    seen: set[bytes] = set()
    expressions: list[bytes] = []
    labels: list[int] = []
    attempts, budget = 0, 1000 * count + 100_000
    while len(expressions) < count:
        attempts += 1
        if attempts > budget:
            raise DataError(
                f"ListOps found only {len(expressions)} distinct expressions of {count} after {attempts} draws "
                f"(lengths {config.min_length}..{config.max_length}, depth {config.max_depth}, args {config.max_args}).",
                expected="a length window and depth that allow enough distinct expressions",
                fix="widen data.min_length..data.max_length, raise data.max_depth, or ask for fewer examples",
            )
        drawn = sample_expression(rng, config)
        if drawn is None:
            continue
        key = bytes(drawn[0])
        if key not in seen:
            seen.add(key)
            expressions.append(key)
            labels.append(drawn[1])
    return expressions, labels


def to_dataset(expressions: list[bytes], labels: list[int]) -> Dataset:
    """A dataset of ``input_ids`` (CLS + expression, int16) and ``labels`` (int64)."""
    import pyarrow as pa
    from datasets import Dataset  # imported when data is built: it takes a second

    tokens = np.frombuffer(b"".join(bytes([CLS_ID]) + e for e in expressions), dtype=np.uint8).astype(np.int16)
    offsets = np.zeros(len(expressions) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(e) + 1 for e in expressions])
    input_ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(tokens))
    return Dataset.from_dict({"input_ids": input_ids, "labels": pa.array(labels, type=pa.int64())})


class ListOpsTask(CachedDatasetTask):
    name = "listops"
    pad_id = PAD_ID

    def __init__(self, config: ListOpsConfig, ctx: DataContext) -> None:
        check_config(config)
        super().__init__(
            ctx.cache_dir, config.batch_size, config.num_workers, bucket_by_length=config.bucket_by_length,
            persistent_workers=config.persistent_workers, pin_memory=config.pin_memory,
        )
        self.config = config

    def cache_key(self) -> dict[str, Any]:
        c = self.config
        return {
            "max_depth": c.max_depth, "max_args": c.max_args,
            "min_length": c.min_length, "max_length": c.max_length,
            "train": c.train_examples, "val": c.val_examples, "test": c.test_examples,
            "seed": c.seed, "version": 1,
        }

    def build_splits(self) -> DatasetDict:
        from datasets import DatasetDict

        c = self.config
        expressions, labels = generate(c, c.train_examples + c.val_examples + c.test_examples, c.seed)
        bounds = np.cumsum([0, c.train_examples, c.val_examples, c.test_examples])
        return DatasetDict(
            {
                split: to_dataset(expressions[start:end], labels[start:end])
                for split, start, end in zip(("train", "validation", "test"), bounds[:-1], bounds[1:])
                if end > start  # datasets cannot load an empty split back; without test, test runs on validation
            }
        )

    def describe(self, splits: DatasetDict) -> None:
        self.vocab_size = len(VOCAB)
        self.max_length = self.config.max_length  # at most max_length - 1 tokens, plus CLS

    @property
    def facts(self) -> dict[str, Any]:
        return {"num_classes": NUM_CLASSES}


def check_config(config: ListOpsConfig) -> None:
    """Reject sizes the generator cannot satisfy, before any work."""
    c = config
    checks = [
        (c.max_depth >= 2, f"data.max_depth={c.max_depth}", "max_depth >= 2 (at depth 1 an expression is a lone digit)"),
        (c.max_args >= 2, f"data.max_args={c.max_args}", "max_args >= 2"),
        (
            1 <= c.min_length < c.max_length - 1,
            f"data.min_length={c.min_length} with data.max_length={c.max_length}",
            "1 <= min_length < max_length - 1 (accepted lengths lie strictly between them)",
        ),
        (
            c.train_examples >= 1 and c.val_examples >= 0 and c.test_examples >= 0,
            f"data.train_examples={c.train_examples}, val_examples={c.val_examples}, test_examples={c.test_examples}",
            "at least one training example and no negative sizes",
        ),
    ]
    for ok, setting, expected in checks:
        if not ok:
            raise ConfigError(f"ListOps cannot use {setting}.", expected=expected, fix=f"change {setting.split('=')[0]}")


COMPONENT = Component(
    kind="data",
    name="listops",
    factory=ListOpsTask,
    config=ListOpsConfig,
    summary="LRA ListOps: the value (10 classes) of nested MIN/MAX/MED/SM expressions.",
    reference="Tay et al. 2021, Long Range Arena: A Benchmark for Efficient Transformers; "
    "Nangia & Bowman 2018, ListOps",
    # max_length: the longest sequence a batch holds, for the memory preflight
    capabilities=lambda c: Capabilities(requires={"objective": {"classification"}}, max_length=c.max_length),
)
