"""Source/target pairs from local files, for the ``seq2seq`` objective.

Formats: TSV (one pair per line, ``source<TAB>target``; no header, no quoting) or JSON
lines (one object per line with the keys ``source_key`` and ``target_key``, both strings).
``format: auto`` picks JSON lines for ``.jsonl``/``.json`` files and TSV otherwise. Blank
lines are skipped. Text is tokenized by characters (the characters of the training pairs;
unseen ones become ``<unk>``) or by UTF-8 bytes, with ``<start>`` and ``<eos>`` appended to
the vocabulary; sources and targets longer than ``max_length`` tokens are cut (the end
token always stays). After :meth:`PairsTask.prepare`, ``tokenizer`` encodes and decodes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from plugformer import Capabilities, Component, DataContext, DataError, bounds
from plugformer_plugins.data.seq2seq_batches import Seq2SeqTask
from plugformer_plugins.data.text import PAD_ID, ByteTokenizer, CharTokenizer, file_digest

if TYPE_CHECKING:
    import pyarrow as pa
    from datasets import Dataset, DatasetDict


class PairsFormat(str, Enum):
    auto = "auto"
    tsv = "tsv"
    jsonl = "jsonl"


class PairsTokenization(str, Enum):
    char = "char"
    byte = "byte"


@dataclass
class PairsConfig:
    train_file: str = ""
    validation_file: str = ""
    # Optional: without it, test runs use the validation split.
    test_file: Optional[str] = None
    format: PairsFormat = PairsFormat.auto
    source_key: str = "source"
    target_key: str = "target"
    tokenizer: PairsTokenization = PairsTokenization.char
    # Longest source or target in tokens (longer ones are cut).
    max_length: int = field(default=256, metadata=bounds(ge=1))
    batch_size: int = field(default=32, metadata=bounds(ge=1))
    # Loader processes; 0 collates in the training process (the splits are in memory; on a few
    # CPU cores workers compete with training: see BENCHMARKS.md, data wait).
    num_workers: int = field(default=0, metadata=bounds(ge=0))
    # Keep the loader processes from one epoch to the next (with num_workers > 0).
    persistent_workers: bool = True
    # Page-locked batches for faster GPU copies; null: on exactly when training on a GPU.
    pin_memory: bool | None = None
    # Batches of examples of similar length (plugformer.batching): less padding per batch.
    bucket_by_length: bool = False


class PairTokenizer:
    """A text tokenizer (:class:`CharTokenizer` or :class:`ByteTokenizer`, pad id 0) with a
    start and an end token appended after its ids."""

    def __init__(self, base: CharTokenizer | ByteTokenizer) -> None:
        self.base = base
        self.start_id = base.vocab_size
        self.eos_id = base.vocab_size + 1
        self.vocab_size = base.vocab_size + 2

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` up to the first end token; start and padding tokens dropped."""
        kept: list[int] = []
        for i in map(int, ids):
            if i == self.eos_id:
                break
            if i not in (self.start_id, PAD_ID):
                kept.append(i)
        return self.base.decode(kept)

    def to_json(self) -> str:
        return self.base.to_json()


def read_pairs(path: Path, file_format: PairsFormat, source_key: str, target_key: str, option: str) -> list[tuple[str, str]]:
    """The (source, target) pairs of a file; DataError naming the file and line for anything
    unreadable, and for a file without pairs."""
    if not path.is_file():
        raise DataError(
            f"{option}={str(path)!r} is not a file (looked from {Path.cwd()}).",
            expected="the path of an existing TSV or JSON-lines file of source/target pairs",
            fix=f"correct {option}",
        )
    kind = PairsFormat(file_format)
    if kind is PairsFormat.auto:
        kind = PairsFormat.jsonl if path.suffix.lower() in (".jsonl", ".json") else PairsFormat.tsv
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise DataError(
            f"{path} is not UTF-8 text (byte {error.start}: {error.reason}).",
            expected="a UTF-8 encoded TSV or JSON-lines file",
            fix=f"convert the file to UTF-8, or point {option} at another one",
        ) from None
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        problem = None
        if kind is PairsFormat.tsv:
            columns = line.split("\t")
            if len(columns) == 2:
                pairs.append((columns[0], columns[1]))
            else:
                problem = f"{len(columns)} tab-separated column(s)", "exactly two columns: source<TAB>target"
        else:
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                record, problem = None, (f"invalid JSON ({error.msg})", "one JSON object per line")
            if problem is None:
                if isinstance(record, dict) and isinstance(record.get(source_key), str) and isinstance(record.get(target_key), str):
                    pairs.append((record[source_key], record[target_key]))
                else:
                    problem = (
                        f"no string values for the keys {source_key!r} and {target_key!r}",
                        f'an object such as {{"{source_key}": "...", "{target_key}": "..."}}',
                    )
        if problem is None and not pairs[-1][0]:
            problem = "an empty source", "a non-empty source text (the target may be empty)"
        if problem is not None:
            raise DataError(
                f"{path}, line {number}: {problem[0]}.",
                expected=f"{problem[1]} ({kind.value} format)",
                fix="correct that line, or set data.format / data.source_key / data.target_key to match the file",
            )
    if not pairs:
        raise DataError(
            f"{path} holds no source/target pairs.",
            expected="at least one non-blank line",
            fix=f"fill the file, or point {option} at another one",
        )
    return pairs


def encode_pairs(pairs: list[tuple[str, str]], tokenizer: PairTokenizer, max_length: int) -> Dataset:
    """``input_ids`` (sources) and ``labels`` (targets followed by the end token)."""
    import pyarrow as pa
    from datasets import Dataset  # imported when data is built: it takes a second

    sources = [np.asarray(tokenizer.encode(s)[:max_length], dtype=np.int32) for s, _ in pairs]
    targets = [np.asarray(tokenizer.encode(t)[:max_length] + [tokenizer.eos_id], dtype=np.int32) for _, t in pairs]

    def column(arrays: list[np.ndarray]) -> pa.Array:
        offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(a) for a in arrays])
        values = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int32)
        return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values))

    return Dataset.from_dict({"input_ids": column(sources), "labels": column(targets)})


class PairsTask(Seq2SeqTask):
    """Seq2seq batches from local pair files; the tokenizer is built from the training pairs."""

    name = "pairs"
    pad_id = PAD_ID

    def __init__(self, config: PairsConfig, ctx: DataContext) -> None:
        for option in ("train_file", "validation_file"):
            if not getattr(config, option):
                raise DataError(
                    f"data.{option} is not set.",
                    expected="paths of TSV or JSON-lines files of source/target pairs for training and validation",
                    fix="set data.train_file=<path> data.validation_file=<path>",
                )
        super().__init__(
            ctx.cache_dir, config.batch_size, config.num_workers, bucket_by_length=config.bucket_by_length,
            persistent_workers=config.persistent_workers, pin_memory=config.pin_memory,
        )
        self.config = config
        self.tokenizer: PairTokenizer | None = None
        self._pairs: dict[str, list[tuple[str, str]]] = {}

    def files(self) -> dict[str, Path]:
        c = self.config
        named = {"train": c.train_file, "validation": c.validation_file, "test": c.test_file}
        return {split: Path(path).expanduser().resolve() for split, path in named.items() if path}

    def _read(self) -> dict[str, list[tuple[str, str]]]:
        if not self._pairs:
            c = self.config
            option = {"train": "data.train_file", "validation": "data.validation_file", "test": "data.test_file"}
            self._pairs = {
                split: read_pairs(path, c.format, c.source_key, c.target_key, option[split]) for split, path in self.files().items()
            }
        return self._pairs

    def build_tokenizer(self) -> PairTokenizer:
        if PairsTokenization(self.config.tokenizer) is PairsTokenization.byte:
            return PairTokenizer(ByteTokenizer())
        return PairTokenizer(CharTokenizer.train([[s + t for s, t in self._read()["train"]]]))

    def cache_key(self) -> dict[str, Any]:
        assert self.tokenizer is not None
        c = self.config
        return {
            "files": {split: file_digest(path) for split, path in self.files().items()},
            "tokenizer": hashlib.sha256(self.tokenizer.to_json().encode()).hexdigest()[:16],
            "format": PairsFormat(c.format).value, "keys": [c.source_key, c.target_key],
            "max_length": c.max_length, "version": 1,
        }

    def build_splits(self) -> DatasetDict:
        from datasets import DatasetDict

        assert self.tokenizer is not None
        tokenizer = self.tokenizer
        return DatasetDict({split: encode_pairs(pairs, tokenizer, self.config.max_length) for split, pairs in self._read().items()})

    def prepare(self) -> None:
        if self.splits is None:
            self._read()  # every file checked before anything is built or looked up
            self.tokenizer = self.build_tokenizer()
            self.start_id, self.eos_id = self.tokenizer.start_id, self.tokenizer.eos_id
            super().prepare()
            self._pairs = {}

    def describe(self, splits: DatasetDict) -> None:
        import pyarrow.compute as pc

        assert self.tokenizer is not None
        self.vocab_size = self.tokenizer.vocab_size
        lengths = [
            pc.max(pc.list_value_length(splits[split].data.column(column))).as_py() or 1
            for split in splits
            for column in ("input_ids", "labels")
        ]
        self.max_length = max(lengths)


COMPONENT = Component(
    kind="data",
    name="pairs",
    factory=PairsTask,
    config=PairsConfig,
    summary="Seq2seq pairs from local TSV or JSON-lines files, tokenized by characters or bytes.",
    reference="Sutskever et al. 2014, Sequence to Sequence Learning with Neural Networks",
    # max_length: the longest sequence a batch holds (a target and its end token), for the memory preflight
    capabilities=lambda c: Capabilities(requires={"objective": {"seq2seq"}}, max_length=c.max_length + 1),
)
