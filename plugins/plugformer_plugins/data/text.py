"""Causal language modelling on text: local files or a Hugging Face Hub dataset, tokenized by
characters, bytes or a byte-level BPE trained on the training text, and packed into blocks.

The text of a split is concatenated and cut into blocks of ``block_size + 1`` tokens that
overlap by one token (so every next-token pair is scored once): ``input_ids = block[:-1]``,
``labels = block[1:]``. Without validation files, the last ``validation_fraction`` of the
training lines becomes the validation split. With no files and no hub dataset configured,
the small English corpus shipped in ``plugformer_plugins/data/corpus`` is used.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlparse

import datasets.config
import numpy as np
from datasets import Dataset, DatasetDict, load_dataset
from filelock import FileLock
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HfHubHTTPError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from plugformer import Capabilities, Component, ConfigError, DataContext, DataError, bounds
from plugformer.data import CachedDatasetTask, parameters_key

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
PAD_ID = 0


class Tokenization(str, Enum):
    char = "char"
    byte = "byte"
    bpe = "bpe"


@dataclass
class TextConfig:
    # Paths or glob patterns; empty train_files (and no hub_name): the shipped corpus.
    train_files: list[str] = field(default_factory=list)
    validation_files: list[str] = field(default_factory=list)
    # Share of the training lines, taken from the end, used for validation when there are
    # no validation files (or the hub dataset has no "validation" split).
    validation_fraction: float = field(default=0.1, metadata=bounds(gt=0.0, lt=1.0))
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    text_column: str = "text"
    # The encoding of local text files (a Python codec name: utf-8, latin-1, cp1252, ...).
    encoding: str = "utf-8"
    tokenizer: Tokenization = Tokenization.char
    bpe_vocab_size: int = field(default=1024, metadata=bounds(ge=258))
    block_size: int = field(default=128, metadata=bounds(ge=1))
    batch_size: int = field(default=32, metadata=bounds(ge=1))
    num_workers: int = field(default=0, metadata=bounds(ge=0))


# --- tokenizers ---------------------------------------------------------------------------


class CharTokenizer:
    """One id per character seen in the training text; PAD=0, UNK=1 for anything else."""

    kind = "char"
    UNK_ID = 1

    def __init__(self, chars: str) -> None:
        self.chars = chars
        self.index = {ch: i + 2 for i, ch in enumerate(chars)}
        self.vocab_size = len(chars) + 2

    @classmethod
    def train(cls, texts: Iterator[list[str]]) -> CharTokenizer:
        seen: set[str] = set()
        for batch in texts:
            for text in batch:
                seen.update(text)
        return cls("".join(sorted(seen)))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(ch, self.UNK_ID) for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i - 2] if i >= 2 else "\ufffd" for i in map(int, ids) if i != PAD_ID)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "chars": self.chars})


class ByteTokenizer:
    """The UTF-8 bytes, shifted by one: id = byte + 1, PAD=0 (257 ids)."""

    kind = "byte"
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return (np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64) + 1).tolist()

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 1 for i in map(int, ids) if i != PAD_ID).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind})


class BPETokenizer:
    """A byte-level BPE (as in GPT-2) trained with Hugging Face ``tokenizers``; lossless for
    any text; id 0 is ``<pad>``."""

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: Iterator[list[str]], vocab_size: int) -> BPETokenizer:
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids if int(i) != PAD_ID])

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": json.loads(self.tokenizer.to_str())})


TextTokenizer = CharTokenizer | ByteTokenizer | BPETokenizer


def tokenizer_from_json(text: str) -> TextTokenizer:
    data = json.loads(text)
    if data["kind"] == "char":
        return CharTokenizer(data["chars"])
    if data["kind"] == "byte":
        return ByteTokenizer()
    return BPETokenizer(Tokenizer.from_str(json.dumps(data["tokenizer"])))


# --- sources ------------------------------------------------------------------------------


def resolve_files(patterns: list[str], option: str) -> list[Path]:
    """The files that ``patterns`` (paths or globs) name, in order, each pattern's matches
    sorted; a file named twice (by two patterns, or through a symlink) is counted once."""
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(
                f"{option} names {pattern!r}, which matches no file (looked from {os.getcwd()}).",
                expected="paths or glob patterns of existing text files",
                fix=f"correct {option}, e.g. {option}='[data/*.txt]'",
            )
        files.extend(Path(m).resolve() for m in matches)
    return list(dict.fromkeys(files))  # resolve() followed the symlinks: same file, same path


#: Bytes read at a time when checking a text file.
_CHUNK = 1 << 20


def check_text_file(path: Path, encoding: str, option: str) -> None:
    """Raise :class:`DataError` naming ``path`` when it is empty, looks binary (NUL bytes)
    or is not valid text in ``encoding``; reads the file once, in chunks."""
    import codecs

    try:
        decoder = codecs.getincrementaldecoder(encoding)()
    except LookupError:
        raise ConfigError(
            f"data.encoding={encoding!r} is not a known text encoding.",
            expected="a Python codec name such as utf-8, latin-1 or cp1252",
            fix="set data.encoding",
        ) from None
    wide = codecs.lookup(encoding).name.startswith(("utf-16", "utf-32"))  # NUL bytes are normal there
    offset, has_text = 0, False
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            nul = chunk.find(b"\0")
            if nul >= 0 and not wide:
                raise DataError(
                    f"{option}: {path} looks binary, not text (a NUL byte at offset {offset + nul}).",
                    expected="text files only",
                    fix=f"remove it from {option} (or narrow the glob, e.g. '[data/*.txt]')",
                )
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{option}: {path} is not valid {encoding} text (byte {chunk[error.start:error.start + 1]!r} at "
                    f"offset {offset + error.start}: {error.reason}).",
                    expected=f"text in data.encoding={encoding}",
                    fix=f"set data.encoding to the file's encoding (e.g. data.encoding=latin-1), or convert it: "
                    f"iconv -f <its encoding> -t {encoding} {path}",
                ) from None
            has_text = has_text or bool(text.strip())
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise DataError(
                f"{option}: {path} is not valid {encoding} text (it ends inside a multi-byte character).",
                expected=f"text in data.encoding={encoding}",
                fix=f"set data.encoding to the file's encoding, or repair the truncated file {path}",
            ) from None
    if not has_text:
        raise DataError(
            f"{option}: {path} is empty" + (" (only whitespace)." if offset else "."),
            expected="text in every file",
            fix=f"add text to it, or remove it from {option}",
        )


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_is_offline() -> bool:
    """Offline when HF_DATASETS_OFFLINE / HF_HUB_OFFLINE say so (now or at import time), or
    when the Hub's host does not answer within a few seconds."""
    if _env_true("HF_DATASETS_OFFLINE") or _env_true("HF_HUB_OFFLINE") or datasets.config.HF_HUB_OFFLINE:
        return True
    endpoint = urlparse(hub_constants.ENDPOINT)
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=3).close()
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _offline_mode() -> Iterator[None]:
    """datasets and huggingface_hub read the offline variables once, at import; switch them
    for one call so a later setting (or an unreachable Hub) means "use the local cache"
    instead of minutes of retries."""
    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_hub(config: TextConfig) -> DatasetDict:
    """The hub dataset's splits with a ``text`` column; a clear DataError when it cannot be had."""
    name = config.hub_name if config.hub_config is None else f"{config.hub_name} ({config.hub_config})"
    offline = hub_is_offline()
    try:
        with _offline_mode() if offline else contextlib.nullcontext():
            splits = load_dataset(config.hub_name, config.hub_config)
    except (ConnectionError, FileNotFoundError, HfHubHTTPError, ValueError) as error:
        reason = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        if offline:
            raise DataError(
                f"Cannot load the Hugging Face dataset {name}: the Hub cannot be reached (no network, "
                f"or HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set) and the dataset is not in the local cache ({reason}).",
                expected="network access to the Hugging Face Hub, or the dataset already in the Hugging Face cache",
                fix="download it once where there is network and point HF_HOME (or HF_DATASETS_CACHE) at that "
                "cache with HF_DATASETS_OFFLINE=1, or use local files: data.hub_name=null data.train_files='[path/*.txt]'",
            ) from None
        raise DataError(
            f"Cannot load the Hugging Face dataset {name}: {reason}",
            expected="an existing, accessible dataset name and config on the Hub",
            fix="check data.hub_name and data.hub_config (and HF_TOKEN for gated datasets)",
        ) from None
    if config.text_column not in splits["train"].column_names:
        raise DataError(
            f"The Hugging Face dataset {name} has no column {config.text_column!r}.",
            expected=f"one of its columns: {splits['train'].column_names}",
            fix="set data.text_column",
        )
    column = config.text_column

    def text_only(split: Dataset) -> Dataset:
        split = split.select_columns([column])
        return split if column == "text" else split.rename_column(column, "text")

    return DatasetDict({s: text_only(splits[s]) for s in ("train", "validation") if s in splits})


def split_off_validation(train: Dataset, fraction: float) -> DatasetDict:
    """The last ``fraction`` of the lines (at least one) as validation; the rest as train."""
    count = len(train)
    held = max(1, int(round(count * fraction)))
    if held >= count:
        raise DataError(
            f"The training text has {count} lines, too few to hold out {fraction:.0%} for validation.",
            expected="more text, or validation files",
            fix="add text to data.train_files or set data.validation_files",
        )
    return DatasetDict(train=train.select(range(count - held)), validation=train.select(range(count - held, count)))


def pack(ids: np.ndarray, block_size: int, split: str) -> Dataset:
    """Blocks of ``block_size + 1`` tokens overlapping by one: inputs and labels shifted by one."""
    count = (len(ids) - 1) // block_size
    if count < 1:
        raise DataError(
            f"The {split} text has {len(ids)} tokens, fewer than one block of data.block_size={block_size} + 1.",
            expected="at least block_size + 1 tokens in every split",
            fix="lower data.block_size or add text",
        )
    starts = np.arange(count) * block_size
    blocks = ids[starts[:, None] + np.arange(block_size + 1)]
    return Dataset.from_dict({"input_ids": blocks[:, :-1], "labels": blocks[:, 1:]})


# --- the task -----------------------------------------------------------------------------


class TextTask(CachedDatasetTask):
    """Causal LM batches from text. After :meth:`prepare`, ``tokenizer`` encodes and decodes."""

    name = "text"
    pad_id = PAD_ID

    def __init__(self, config: TextConfig, ctx: DataContext) -> None:
        check_config(config)
        super().__init__(ctx.cache_dir, config.batch_size, config.num_workers)
        self.config = config
        self.tokenizer: TextTokenizer | None = None
        self._source: dict[str, Any] | None = None
        self._raw: DatasetDict | None = None
        self._checked_files: set[Path] = set()

    # What the splits depend on ------------------------------------------------------------
    def source_key(self) -> dict[str, Any]:
        """The text's identity: the hub name and config, or the files' content hashes."""
        if self._source is None:
            c = self.config
            if c.hub_name:
                self._source = {"hub": c.hub_name, "config": c.hub_config, "column": c.text_column}
            else:
                self._source = {
                    "train": [file_digest(p) for p in self.train_paths()],
                    "validation": [file_digest(p) for p in self.validation_paths()],
                }
                if c.encoding.lower().replace("_", "-") not in ("utf-8", "utf8"):
                    self._source["encoding"] = c.encoding
            if not self._source.get("validation"):
                self._source["validation_fraction"] = c.validation_fraction
        return self._source

    def tokenizer_key(self) -> dict[str, Any]:
        c = self.config
        key: dict[str, Any] = {"kind": Tokenization(c.tokenizer).value, "version": 1}
        if key["kind"] != "byte":
            key["source"] = self.source_key()
        if key["kind"] == "bpe":
            key["vocab_size"] = c.bpe_vocab_size
        return key

    def cache_key(self) -> dict[str, Any]:
        assert self.tokenizer is not None
        # The tokenizer's own content, so a retrained tokenizer never meets stale token ids.
        fingerprint = hashlib.sha256(self.tokenizer.to_json().encode()).hexdigest()[:16]
        return {"source": self.source_key(), "tokenizer": fingerprint, "block_size": self.config.block_size, "version": 1}

    def train_paths(self) -> list[Path]:
        if self.config.train_files:
            return self._checked(resolve_files(list(self.config.train_files), "data.train_files"), "data.train_files")
        return sorted(CORPUS_DIR.glob("*.txt"))

    def validation_paths(self) -> list[Path]:
        return self._checked(resolve_files(list(self.config.validation_files), "data.validation_files"), "data.validation_files")

    def _checked(self, paths: list[Path], option: str) -> list[Path]:
        """``paths``, each checked once per task to be non-empty text in the declared encoding."""
        for path in paths:
            if path not in self._checked_files:
                check_text_file(path, self.config.encoding, option)
                self._checked_files.add(path)
        return paths

    # Building -------------------------------------------------------------------------------
    def raw_text(self) -> DatasetDict:
        """"train" and "validation" splits with a ``text`` column (lines, line breaks kept)."""
        if self._raw is None:
            c = self.config
            if c.hub_name:
                raw = load_hub(c)
            else:
                files = {"train": [str(p) for p in self.train_paths()]}
                if c.validation_files:
                    files["validation"] = [str(p) for p in self.validation_paths()]
                raw = load_dataset(
                    "text", data_files=files, keep_linebreaks=True, encoding=c.encoding,
                    cache_dir=str(self.cache_dir / "huggingface"),
                )
            if "validation" not in raw:
                raw = split_off_validation(raw["train"], c.validation_fraction)
            self._raw = raw
        return self._raw

    def _texts(self, split: str) -> Iterator[list[str]]:
        for batch in self.raw_text()[split].iter(batch_size=1000):
            yield batch["text"]

    def train_tokenizer(self) -> TextTokenizer:
        kind = Tokenization(self.config.tokenizer)
        if kind is Tokenization.byte:
            return ByteTokenizer()
        if kind is Tokenization.char:
            return CharTokenizer.train(self._texts("train"))
        return BPETokenizer.train(self._texts("train"), self.config.bpe_vocab_size)

    def load_tokenizer(self) -> TextTokenizer:
        """The tokenizer for these parameters, trained once and then read from the cache."""
        root = self.cache_dir / f"{self.name}-tokenizers"
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{parameters_key(self.tokenizer_key())}.json"
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                staging = path.with_suffix(f".{os.getpid()}.tmp")
                staging.write_text(self.train_tokenizer().to_json())
                os.replace(staging, path)
        return tokenizer_from_json(path.read_text())

    def encode_split(self, split: str) -> np.ndarray:
        """All of a split's text as one array of token ids."""
        assert self.tokenizer is not None
        parts = [np.asarray(self.tokenizer.encode("".join(batch)), dtype=np.int32) for batch in self._texts(split)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def build_splits(self) -> DatasetDict:
        return DatasetDict({s: pack(self.encode_split(s), self.config.block_size, s) for s in ("train", "validation")})

    def prepare(self) -> None:
        if self.splits is None:
            self.tokenizer = self.load_tokenizer()
            super().prepare()

    def describe(self, splits: DatasetDict) -> None:
        assert self.tokenizer is not None
        self.vocab_size = self.tokenizer.vocab_size
        self.max_length = self.config.block_size


def check_config(config: TextConfig) -> None:
    """Reject settings that cannot work, before reading any text."""
    if config.block_size < 1:
        raise ConfigError(f"data.block_size={config.block_size} is not positive.", expected="block_size >= 1", fix="set data.block_size")
    if not 0.0 < config.validation_fraction < 1.0:
        raise ConfigError(
            f"data.validation_fraction={config.validation_fraction} is outside (0, 1).",
            expected="a fraction such as 0.1",
            fix="set data.validation_fraction, or give data.validation_files",
        )
    if Tokenization(config.tokenizer) is Tokenization.bpe and config.bpe_vocab_size <= 257:
        raise ConfigError(
            f"data.bpe_vocab_size={config.bpe_vocab_size} leaves no room for merges.",
            expected="more than 257 (256 byte symbols and <pad>)",
            fix="raise data.bpe_vocab_size, e.g. 1024",
        )


COMPONENT = Component(
    kind="data",
    name="text",
    factory=TextTask,
    config=TextConfig,
    summary="Language modelling on text files or a Hub dataset: char, byte or trained BPE tokens, packed blocks.",
    reference="Sennrich et al. 2016, Neural Machine Translation of Rare Words with Subword Units (BPE)",
    capabilities=Capabilities(requires={"objective": {"token_blocks"}}),
)
