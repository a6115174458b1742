"""Text tokenizers with declared special tokens: characters, bytes, a trained byte-level BPE,
and pretrained Hugging Face tokenizers read from local files.

Contract (every kind):

- ``vocab_size``: ids are ``0 .. vocab_size - 1``.
- ``special``: a :class:`SpecialTokens` with the ids of pad, bos, eos, mask, unk (None where
  the kind has no unknown token) and the ``sentinels`` (``<extra_id_0>`` ... in T5 style).
  Objectives and generation read these ids (through the data task's ``facts``), never
  constants of their own.
- ``encode(text) -> list[int]``: the special token strings (``<pad>``, ``<unk>``, ``<s>``,
  ``</s>``, ``<mask>``, ``<extra_id_i>``, or a pretrained tokenizer's own spellings) are
  recognised inside the text and become their ids, so a prompt ``"The c<mask>t"`` holds the
  mask id. No bos/eos is added.
- ``decode(ids, skip_special=True) -> str``: special tokens are dropped (the unknown token of
  ``char`` becomes U+FFFD); with ``skip_special=False`` they are rendered as their strings.
- ``to_json()`` and :func:`tokenizer_from_json` round-trip a tokenizer exactly.

Layouts: ``char`` is pad 0, unk 1, the training characters, then bos, eos, mask and the
sentinels; ``byte`` is pad 0, byte + 1, then bos, eos, mask, sentinels; ``bpe`` (trained
here) is pad 0, bos, eos, mask, sentinels, then the byte alphabet and the merges. A
``pretrained`` tokenizer keeps its ids; the specials it lacks are added at the end.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from plugformer import ConfigError

#: Version of the serialized format and of the id layouts; part of every cache key.
TOKENIZER_VERSION = 2
FORMAT = "plugformer-tokenizer"
DEFAULT_SENTINELS = 16

PAD, UNK, BOS, EOS, MASK = "<pad>", "<unk>", "<s>", "</s>", "<mask>"
PAD_ID = 0


def sentinel_token(index: int) -> str:
    """The T5-style string of sentinel ``index``: ``<extra_id_{index}>``."""
    return f"<extra_id_{index}>"


@dataclass
class SpecialTokens:
    """The ids of a tokenizer's special tokens."""

    pad: int
    bos: int
    eos: int
    mask: int
    unk: int | None = None
    sentinels: list[int] = field(default_factory=list)

    def ids(self) -> list[int]:
        """Every special id (pad, unk, bos, eos, mask, sentinels), sorted, each once."""
        ids = {self.pad, self.bos, self.eos, self.mask, *self.sentinels}
        if self.unk is not None:
            ids.add(self.unk)
        return sorted(ids)


class _Specials:
    """Special token strings ↔ ids for the tokenizers implemented here (char, byte)."""

    def __init__(self, strings: dict[str, int]) -> None:
        self.by_string = strings
        self.by_id = {i: s for s, i in strings.items()}
        alternatives = sorted(strings, key=len, reverse=True)
        self.pattern = re.compile("(" + "|".join(re.escape(s) for s in alternatives) + ")")

    def split(self, text: str) -> Iterator[tuple[str, int | None]]:
        """``text`` as pieces: (plain text, None) and (special string, its id)."""
        if "<" not in text:
            yield text, None
            return
        for index, piece in enumerate(self.pattern.split(text)):
            if index % 2:
                yield piece, self.by_string[piece]
            elif piece:
                yield piece, None


def _layout(first: int, sentinel_tokens: int, *, pad: int = PAD_ID, unk: int | None = None) -> tuple[SpecialTokens, dict[str, int]]:
    """bos, eos, mask and the sentinels from id ``first`` on; their strings with pad's (and unk's)."""
    special = SpecialTokens(
        pad=pad, bos=first, eos=first + 1, mask=first + 2, unk=unk,
        sentinels=list(range(first + 3, first + 3 + sentinel_tokens)),
    )
    strings = {PAD: pad, BOS: special.bos, EOS: special.eos, MASK: special.mask}
    if unk is not None:
        strings[UNK] = unk
    strings.update({sentinel_token(i): s for i, s in enumerate(special.sentinels)})
    return special, strings


class CharTokenizer:
    """One id per character seen in the training text; pad 0, unk 1 for any other character."""

    kind = "char"
    UNK_ID = 1

    def __init__(self, chars: str, sentinel_tokens: int = DEFAULT_SENTINELS) -> None:
        self.chars = chars
        self.sentinel_tokens = sentinel_tokens
        self.index = {ch: i + 2 for i, ch in enumerate(chars)}
        self.special, strings = _layout(len(chars) + 2, sentinel_tokens, unk=self.UNK_ID)
        self._specials = _Specials(strings)
        self.vocab_size = len(chars) + 5 + sentinel_tokens

    @classmethod
    def train(cls, texts: Iterable[list[str]], sentinel_tokens: int = DEFAULT_SENTINELS) -> CharTokenizer:
        seen: set[str] = set()
        for batch in texts:
            for text in batch:
                seen.update(text)
        return cls("".join(sorted(seen)), sentinel_tokens)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, special in self._specials.split(text):
            if special is None:
                ids.extend(self.index.get(ch, self.UNK_ID) for ch in piece)
            else:
                ids.append(special)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out: list[str] = []
        first_special = len(self.chars) + 2
        for i in map(int, ids):
            if 2 <= i < first_special:
                out.append(self.chars[i - 2])
            elif not skip_special:
                out.append(self._specials.by_id.get(i, "\ufffd"))
            elif i == self.UNK_ID:
                out.append("\ufffd")
        return "".join(out)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": TOKENIZER_VERSION, "kind": self.kind,
                           "chars": self.chars, "sentinel_tokens": self.sentinel_tokens})


class ByteTokenizer:
    """The UTF-8 bytes: id = byte + 1, pad 0, then bos, eos, mask and the sentinels."""

    kind = "byte"

    def __init__(self, sentinel_tokens: int = DEFAULT_SENTINELS) -> None:
        self.sentinel_tokens = sentinel_tokens
        self.special, strings = _layout(257, sentinel_tokens)
        self._specials = _Specials(strings)
        self.vocab_size = 260 + sentinel_tokens

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, special in self._specials.split(text):
            if special is None:
                ids.extend((np.frombuffer(piece.encode("utf-8"), dtype=np.uint8).astype(np.int64) + 1).tolist())
            else:
                ids.append(special)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        out: list[str] = []
        pending = bytearray()
        for i in map(int, ids):
            if 1 <= i <= 256:
                pending.append(i - 1)
                continue
            if not skip_special:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
                out.append(self._specials.by_id.get(i, "\ufffd"))
        out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": TOKENIZER_VERSION, "kind": self.kind, "sentinel_tokens": self.sentinel_tokens})


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` whose special tokens are named by ``tokens``:
    role ("pad", "bos", "eos", "mask", "unk") → string, and "sentinels" → list of strings.
    Every named token exists in the tokenizer and is registered as special (so ``encode``
    recognises it in text)."""

    kind = "hf"

    def __init__(self, tokenizer: Tokenizer, tokens: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.tokens = tokens

        def id_of(token: str) -> int:
            found = tokenizer.token_to_id(token)
            if found is None:
                raise ValueError(f"the special token {token!r} is not in the tokenizer")
            return int(found)

        self.special = SpecialTokens(
            pad=id_of(tokens["pad"]), bos=id_of(tokens["bos"]), eos=id_of(tokens["eos"]), mask=id_of(tokens["mask"]),
            unk=id_of(tokens["unk"]) if tokens.get("unk") else None,
            sentinels=[id_of(s) for s in tokens.get("sentinels", [])],
        )
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(self.special.ids()) + 1)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": TOKENIZER_VERSION, "kind": self.kind,
                           "tokens": self.tokens, "tokenizer": json.loads(self.tokenizer.to_str())})


def _hf_tokens(sentinel_tokens: int) -> dict[str, Any]:
    return {"pad": PAD, "bos": BOS, "eos": EOS, "mask": MASK, "sentinels": [sentinel_token(i) for i in range(sentinel_tokens)]}


class BPETokenizer(HFTokenizer):
    """A byte-level BPE (as in GPT-2) trained with Hugging Face ``tokenizers``; lossless for
    any text; the special tokens take the first ids (pad 0)."""

    kind = "bpe"

    @classmethod
    def train(cls, texts: Iterable[list[str]], vocab_size: int, sentinel_tokens: int = DEFAULT_SENTINELS) -> BPETokenizer:
        tokens = _hf_tokens(sentinel_tokens)
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[tokens["pad"], tokens["bos"], tokens["eos"], tokens["mask"], *tokens["sentinels"]],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer, tokens)


class PretrainedTokenizer(HFTokenizer):
    """A tokenizer read from local Hugging Face files (see :func:`load_pretrained`)."""

    kind = "pretrained"


TextTokenizer = CharTokenizer | ByteTokenizer | BPETokenizer | PretrainedTokenizer


def tokenizer_from_json(text: str) -> TextTokenizer:
    """The tokenizer that ``to_json()`` serialized; ValueError for anything else."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a plugformer tokenizer (no \"format\": \"plugformer-tokenizer\")")
    if data.get("version") != TOKENIZER_VERSION:
        raise ValueError(f"plugformer tokenizer version {data.get('version')}, this version reads {TOKENIZER_VERSION}")
    kind = data["kind"]
    if kind == "char":
        return CharTokenizer(data["chars"], data["sentinel_tokens"])
    if kind == "byte":
        return ByteTokenizer(data["sentinel_tokens"])
    classes = {"bpe": BPETokenizer, "pretrained": PretrainedTokenizer}
    if kind not in classes:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    return classes[kind](Tokenizer.from_str(json.dumps(data["tokenizer"])), data["tokens"])


# --- pretrained (local Hugging Face files) ---------------------------------------------------

CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json")
#: Spellings looked for in the vocabulary when the config files do not declare a role.
KNOWN_SPELLINGS = {
    "pad": ("<pad>", "[PAD]", "<|pad|>"),
    "unk": ("<unk>", "[UNK]", "<|unk|>"),
    "bos": ("<s>", "[CLS]", "<bos>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("</s>", "[SEP]", "<eos>", "<|endoftext|>"),
    "mask": ("<mask>", "[MASK]", "<|mask|>"),
}
_EXPECTED = (
    "a Hugging Face tokenizer: a tokenizer.json file, or a directory holding tokenizer.json, "
    "vocab.json + merges.txt (byte-level BPE) or vocab.txt (WordPiece)"
)


def _tokenizer_files(path: Path, option: str) -> tuple[str, list[Path]]:
    """The format ("json", "bpe", "wordpiece") and the model files at ``path``."""
    if not path.exists():
        raise ConfigError(
            f"{option}={str(path)!r} does not exist (looked from {Path.cwd()}).",
            expected=_EXPECTED,
            fix=f"point {option} at a local tokenizer directory or file (Hub downloads are not used); "
            "save one with tokenizer.save('tokenizer.json') or AutoTokenizer.save_pretrained(dir)",
        )
    if path.is_file():
        return ("wordpiece" if path.suffix == ".txt" else "json"), [path]
    if (path / "tokenizer.json").is_file():
        return "json", [path / "tokenizer.json"]
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return "bpe", [path / "vocab.json", path / "merges.txt"]
    if (path / "vocab.txt").is_file():
        return "wordpiece", [path / "vocab.txt"]
    present = sorted(p.name for p in path.iterdir())[:10]
    raise ConfigError(
        f"{option}={str(path)!r} holds no tokenizer files (it has: {', '.join(present) or 'nothing'}).",
        expected=_EXPECTED,
        fix=f"point {option} at the directory where the tokenizer was saved",
    )


def _config_dir(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def pretrained_digest(path: Path, option: str = "data.tokenizer_path") -> str:
    """A hash of the tokenizer files at ``path`` and of its config files (for cache keys)."""
    _, files = _tokenizer_files(path, option)
    digest = hashlib.sha256()
    for file in [*files, *(_config_dir(path) / name for name in CONFIG_FILES)]:
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _read_config(directory: Path) -> dict[str, Any]:
    """tokenizer_config.json, then special_tokens_map.json over it; {} when absent."""
    merged: dict[str, Any] = {}
    for name in CONFIG_FILES:
        file = directory / name
        if file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConfigError(f"{file} is not valid JSON ({error}).", expected="a Hugging Face tokenizer config file",
                                  fix=f"repair or remove {file}") from None
            if isinstance(data, dict):
                merged.update({k: v for k, v in data.items() if v is not None})
    return merged


def _token_string(value: Any) -> str | None:
    """A config value as a token string: a string, or an AddedToken dict's ``content``."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _build_model(kind: str, files: list[Path], config: dict[str, Any], option: str) -> Tokenizer:
    try:
        if kind == "json":
            return Tokenizer.from_file(str(files[0]))
        if kind == "bpe":
            tokenizer = Tokenizer(models.BPE.from_file(str(files[0]), str(files[1])))
            tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=bool(config.get("add_prefix_space", False)))
            tokenizer.decoder = decoders.ByteLevel()
            return tokenizer
        unk = _token_string(config.get("unk_token")) or "[UNK]"
        tokenizer = Tokenizer(models.WordPiece.from_file(str(files[0]), unk_token=unk))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=bool(config.get("do_lower_case", True)))
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        return tokenizer
    except Exception as error:  # noqa: BLE001 - tokenizers raises plain Exceptions for bad files
        raise ConfigError(
            f"{option}: cannot read {', '.join(str(f) for f in files)} as a tokenizer ({str(error).splitlines()[0][:200]}).",
            expected=_EXPECTED,
            fix=f"check the files, or point {option} elsewhere",
        ) from None


def load_pretrained(path: Path, sentinel_tokens: int = DEFAULT_SENTINELS, option: str = "data.tokenizer_path") -> TextTokenizer:
    """The tokenizer saved at ``path`` (a file or a directory; see the module docstring).

    Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` next to
    it (bos falls back to ``cls_token``, eos to ``sep_token``), else from well-known
    spellings in the vocabulary; the first ``sentinel_tokens`` sentinels are
    ``<extra_id_i>``. Whatever is still missing is added with the plugformer spelling
    (``<pad>``, ``<s>``, ``</s>``, ``<mask>``, ``<extra_id_i>``), and every special token is
    registered as special so that ``encode`` recognises it. A ``tokenizer.json`` written by
    plugformer into a run directory is read back as it was saved.
    """
    kind, files = _tokenizer_files(path, option)
    if kind == "json":
        try:
            return tokenizer_from_json(files[0].read_text(encoding="utf-8"))
        except (ValueError, KeyError, UnicodeDecodeError):
            pass  # not plugformer's own format: a Hugging Face tokenizer.json
    config = _read_config(_config_dir(path))
    tokenizer = _build_model(kind, files, config, option)

    def present(token: str) -> bool:
        return tokenizer.token_to_id(token) is not None

    declared = {role: _token_string(config.get(f"{role}_token")) for role in ("pad", "unk", "bos", "eos", "mask")}
    declared["bos"] = declared["bos"] or _token_string(config.get("cls_token"))
    declared["eos"] = declared["eos"] or _token_string(config.get("sep_token"))
    defaults = {"pad": PAD, "bos": BOS, "eos": EOS, "mask": MASK}
    tokens: dict[str, Any] = {}
    for role, spellings in KNOWN_SPELLINGS.items():
        token = declared[role] or next((s for s in spellings if present(s)), None) or defaults.get(role)
        if token is not None:
            tokens[role] = token
    tokens["sentinels"] = [sentinel_token(i) for i in range(sentinel_tokens)]
    model_unk = tokens.get("unk")
    if model_unk is not None and not present(model_unk):
        tokens.pop("unk")  # declared, but the model has no such token: it has no unknown token
    # Register every special (an existing vocabulary entry keeps its id; the others are appended).
    wanted = [tokens[r] for r in ("pad", "bos", "eos", "mask") if r in tokens] + tokens["sentinels"]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(wanted)])
    return PretrainedTokenizer(tokenizer, tokens)
