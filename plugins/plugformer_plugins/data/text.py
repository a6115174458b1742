"""Language modelling on text: local files or a Hugging Face Hub dataset, tokenized by
characters, bytes, a byte-level BPE trained on the training text or a pretrained Hugging Face
tokenizer (see :mod:`plugformer_plugins.data.tokenization`), and packed into blocks.

The text of a split is concatenated and cut into blocks of ``block_size + 1`` tokens that
overlap by one token (so every next-token pair is scored once): ``input_ids = block[:-1]``,
``labels = block[1:]``. With ``stream=true`` the blocks are batched as ordered segments of
``batch_size`` streams (row i of a batch continues row i of the previous batch), for models
that carry a memory across batches. Without validation files, the last ``validation_fraction`` of the
training lines becomes the validation split. With no files and no hub dataset configured,
the small English corpus shipped in ``plugformer_plugins/data/corpus`` is used.

The tokenizer is saved as ``tokenizer.json`` in the run directory; when the run directory
already holds one (a resumed run, ``plugformer eval``/``generate``), that one is used as is.
``facts`` declare its special ids (pad, bos, eos, mask, sentinels), which objectives
(masked LM, span corruption) and generation read.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import socket
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional
from urllib.parse import urlparse

import numpy as np
from filelock import FileLock

from plugformer import Capabilities, Component, ConfigError, DataContext, DataError, bounds
from plugformer.data import CachedDatasetTask, parameters_key
from plugformer_plugins.data.streaming import StreamOrderSampler, world_size
from plugformer_plugins.data.tokenization import (  # noqa: F401 - tokenizers re-exported from here too
    PAD_ID,
    TOKENIZER_VERSION,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    PretrainedTokenizer,
    SpecialTokens,
    TextTokenizer,
    load_pretrained,
    pretrained_digest,
    tokenizer_from_json,
)

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from torch.utils.data import DataLoader

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
#: The tokenizer's file in a run directory.
RUN_TOKENIZER_FILE = "tokenizer.json"


class Tokenization(str, Enum):
    char = "char"
    byte = "byte"
    bpe = "bpe"
    pretrained = "pretrained"


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
    # tokenizer=pretrained: a local tokenizer.json, or a directory with tokenizer.json,
    # vocab.json + merges.txt or vocab.txt (and tokenizer_config.json / special_tokens_map.json).
    tokenizer_path: Optional[str] = None
    # T5-style sentinel tokens <extra_id_0> .. <extra_id_{N-1}> every tokenizer reserves.
    sentinel_tokens: int = field(default=16, metadata=bounds(ge=0))
    block_size: int = field(default=128, metadata=bounds(ge=1))
    batch_size: int = field(default=32, metadata=bounds(ge=1))
    num_workers: int = field(default=0, metadata=bounds(ge=0))
    # Ordered segments (no shuffling): row i of each batch continues row i of the previous
    # batch, so a memory (model/attention=transformer_xl, compressive) carries across batches.
    stream: bool = False


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
    import datasets.config  # datasets and huggingface_hub are imported when data is built
    from huggingface_hub import constants as hub_constants

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
    import datasets.config
    from huggingface_hub import constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def load_hub(config: TextConfig) -> DatasetDict:
    """The hub dataset's splits with a ``text`` column; a clear DataError when it cannot be had."""
    from datasets import DatasetDict, load_dataset
    from huggingface_hub.errors import HfHubHTTPError

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
    from datasets import DatasetDict

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
    from datasets import Dataset

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
    """Packed token blocks from text. After :meth:`prepare`, ``tokenizer`` encodes and decodes,
    ``pad_id`` is the tokenizer's pad id and ``facts`` hold the special ids."""

    name = "text"
    pad_id = PAD_ID

    def __init__(self, config: TextConfig, ctx: DataContext) -> None:
        check_config(config)
        super().__init__(ctx.cache_dir, config.batch_size, config.num_workers)
        self.config = config
        self.run_dir = Path(ctx.run_dir) if ctx.run_dir is not None else None
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
        """What the tokenizer depends on: its kind, the sentinel count, and the training text
        (char, bpe) or the pretrained files' content hash."""
        c = self.config
        key: dict[str, Any] = {"kind": Tokenization(c.tokenizer).value, "version": TOKENIZER_VERSION,
                               "sentinel_tokens": c.sentinel_tokens}
        if key["kind"] == "pretrained":
            key["files"] = pretrained_digest(self.pretrained_path())
        elif key["kind"] != "byte":
            key["source"] = self.source_key()
        if key["kind"] == "bpe":
            key["vocab_size"] = c.bpe_vocab_size
        return key

    def cache_key(self) -> dict[str, Any]:
        assert self.tokenizer is not None
        # The tokenizer's own content, so a retrained tokenizer never meets stale token ids.
        fingerprint = hashlib.sha256(self.tokenizer.to_json().encode()).hexdigest()[:16]
        return {"source": self.source_key(), "tokenizer": fingerprint, "block_size": self.config.block_size, "version": 2}

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
        from datasets import load_dataset

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

    def pretrained_path(self) -> Path:
        """data.tokenizer_path, for tokenizer=pretrained; ConfigError when it is not set."""
        if not self.config.tokenizer_path:
            raise ConfigError(
                "data.tokenizer=pretrained needs data.tokenizer_path.",
                expected="a local tokenizer.json, or a directory with tokenizer.json, vocab.json + merges.txt or vocab.txt",
                fix="set data.tokenizer_path=<directory or file> (e.g. a directory saved by save_pretrained)",
            )
        return Path(self.config.tokenizer_path).expanduser()

    def train_tokenizer(self) -> TextTokenizer:
        """A new tokenizer for the config: trained on the training split, or read from files."""
        kind, sentinels = Tokenization(self.config.tokenizer), self.config.sentinel_tokens
        if kind is Tokenization.byte:
            return ByteTokenizer(sentinels)
        if kind is Tokenization.char:
            return CharTokenizer.train(self._texts("train"), sentinels)
        if kind is Tokenization.pretrained:
            return load_pretrained(self.pretrained_path(), sentinels)
        return BPETokenizer.train(self._texts("train"), self.config.bpe_vocab_size, sentinels)

    def load_tokenizer(self) -> TextTokenizer:
        """The run directory's tokenizer when it has one; otherwise the tokenizer for these
        parameters (trained once, then read from the cache), saved into the run directory."""
        run_dir = self.run_dir
        saved = run_dir / RUN_TOKENIZER_FILE if run_dir is not None else None
        if saved is not None and saved.is_file():
            tokenizer = read_tokenizer(saved)
            if tokenizer.kind != Tokenization(self.config.tokenizer).value:
                warnings.warn(
                    f"plugformer: data.tokenizer={Tokenization(self.config.tokenizer).value}, but the run directory's "
                    f"{saved} is a {tokenizer.kind} tokenizer; using the run's tokenizer.",
                    stacklevel=2,
                )
            return tokenizer
        root = self.cache_dir / f"{self.name}-tokenizers"
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{parameters_key(self.tokenizer_key())}.json"
        with FileLock(str(path) + ".lock"):
            if not path.exists():
                write_atomically(path, self.train_tokenizer().to_json())
        text = path.read_text()
        if saved is not None:
            write_atomically(saved, text)
        return tokenizer_from_json(text)

    def encode_split(self, split: str) -> np.ndarray:
        """All of a split's text as one array of token ids."""
        assert self.tokenizer is not None
        parts = [np.asarray(self.tokenizer.encode("".join(batch)), dtype=np.int32) for batch in self._texts(split)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def build_splits(self) -> DatasetDict:
        from datasets import DatasetDict

        return DatasetDict({s: pack(self.encode_split(s), self.config.block_size, s) for s in ("train", "validation")})

    def prepare(self) -> None:
        if self.splits is None:
            self.tokenizer = self.load_tokenizer()
            self.pad_id = self.tokenizer.special.pad
            super().prepare()

    @property
    def streams(self) -> bool:  # type: ignore[override]
        """data.stream: batches are ordered segments (see :class:`StreamOrderSampler`)."""
        return bool(self.config.stream)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if not self.config.stream:
            return super()._loader(split, shuffle)
        from torch.utils.data import DataLoader

        self.prepare()
        assert self.splits is not None
        sampler = StreamOrderSampler(self.splits[split].num_rows, self.batch_size, world_size(), split=split)
        return DataLoader(
            self.splits[split], batch_size=self.batch_size, sampler=sampler, collate_fn=self.collate,
            num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
        )

    @property
    def facts(self) -> dict[str, Any]:
        """The special token ids (after :meth:`prepare`): ``pad_id``, ``bos_id``, ``eos_id``,
        ``mask_id``, ``sentinel_ids``, ``special_ids`` (every special id, sorted, unk
        included) and ``start_id`` (= ``bos_id``, where decoders of encoder–decoders start)."""
        if self.tokenizer is None:
            return {}
        special = self.tokenizer.special
        return {
            "pad_id": special.pad,
            "bos_id": special.bos,
            "eos_id": special.eos,
            "mask_id": special.mask,
            "sentinel_ids": list(special.sentinels),
            "special_ids": special.ids(),
            "start_id": special.bos,
        }

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
    if config.sentinel_tokens < 0:
        raise ConfigError(
            f"data.sentinel_tokens={config.sentinel_tokens} is negative.", expected="0 or more", fix="set data.sentinel_tokens"
        )
    reserved = 256 + 4 + config.sentinel_tokens  # byte symbols, pad, bos, eos, mask, sentinels
    if Tokenization(config.tokenizer) is Tokenization.bpe and config.bpe_vocab_size <= reserved:
        raise ConfigError(
            f"data.bpe_vocab_size={config.bpe_vocab_size} leaves no room for merges.",
            expected=f"more than {reserved} (256 byte symbols, pad, bos, eos, mask and "
            f"data.sentinel_tokens={config.sentinel_tokens})",
            fix="raise data.bpe_vocab_size, e.g. 1024 (or lower data.sentinel_tokens)",
        )


def text_capabilities(config: TextConfig) -> Capabilities:
    """Packed token blocks for the objective; the special tokens the tokenizers declare
    (``sentinel_tokens`` only when data.sentinel_tokens > 0); ``max_length``: the block size
    (for the memory preflight)."""
    provides = {"mask_token", "eos_token"} | ({"sentinel_tokens"} if config.sentinel_tokens > 0 else set())
    return Capabilities(provides=provides, requires={"objective": {"token_blocks"}}, max_length=config.block_size)


def read_tokenizer(path: Path) -> TextTokenizer:
    """The tokenizer saved at ``path`` by :func:`write_atomically`; DataError if unreadable."""
    try:
        return tokenizer_from_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError) as error:
        raise DataError(
            f"The run's tokenizer {path} cannot be read ({error}).",
            expected="the tokenizer.json plugformer saved in the run directory",
            fix=f"restore it, or delete {path} to rebuild it from the data config (token ids may then differ "
            "from the ones the model was trained on)",
        ) from None


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename, so readers (and other
    processes writing the same content at once, e.g. DDP ranks) never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    staging.write_text(text, encoding="utf-8")
    os.replace(staging, path)


COMPONENT = Component(
    kind="data",
    name="text",
    factory=TextTask,
    config=TextConfig,
    summary="Language modelling on text files or a Hub dataset: char, byte or trained BPE tokens, packed blocks.",
    reference="Sennrich et al. 2016, Neural Machine Translation of Rare Words with Subword Units (BPE)",
    capabilities=text_capabilities,
)
