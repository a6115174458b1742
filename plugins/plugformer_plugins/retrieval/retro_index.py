"""RETRO's retrieval database (Borgeaud et al. 2022, "Improving language models by retrieving
from trillions of tokens"): a token stream cut into chunks of m tokens, each chunk embedded
by a FROZEN encoder, a faiss index of the embeddings, and for every query chunk its k nearest
database chunks, each returned with its continuation (the next m tokens).

Neighbours whose tokens (chunk or continuation) belong to a document that the query chunk or
its own continuation belongs to are excluded, so a chunk never retrieves itself, the text
that follows it, or anything else of its own document (the paper's exclusion, which keeps the
gain from being leakage). Documents are numbered per token (:func:`document_ids`).

Encoders (:func:`load_encoder`): a plugformer run directory (the mean over a chunk's tokens
of the final hidden states of its checkpoint), a local Hugging Face model directory
(``AutoModel`` + ``AutoTokenizer``, the mean of ``last_hidden_state`` over the attention
mask), or ``ngrams`` (hashed character trigram counts, no parameters). A chunk reaches the encoder as text (decoded with the data's tokenizer), so the
encoder's tokenizer may differ from the data's.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from plugformer import ConfigError

from plugformer_plugins.retrieval.faiss_support import require_faiss

#: Files of a Hugging Face model directory that determine its embeddings.
_HF_FILES = ("config.json", "*.safetensors", "*.bin", "tokenizer.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer_config.json")


# --- documents and chunks ---------------------------------------------------------------


def document_starts(lines: Sequence[str], pattern: str | None) -> list[bool]:
    """Per line: whether it starts a new document. A line starts one when ``pattern``
    (a regular expression) matches the whole line without its line break and the line before
    it is blank (or it is the first line). ``pattern`` None or empty: no line does (one
    document)."""
    if not pattern:
        return [False] * len(lines)
    regex = re.compile(pattern)
    starts, previous_blank = [], True
    for line in lines:
        text = line.rstrip("\r\n")
        starts.append(previous_blank and bool(text.strip()) and regex.fullmatch(text) is not None)
        previous_blank = not text.strip()
    return starts


def document_ids(token_counts: Sequence[int], starts: Sequence[bool], before: int = -1) -> np.ndarray:
    """The document id of every token of consecutive pieces of text (``token_counts`` tokens
    each, ``starts`` marking those that begin a new document); ``before`` is the id of the
    document in progress before the first piece (each start adds one)."""
    piece_ids = before + np.cumsum(np.asarray(starts, dtype=np.int64))
    return np.repeat(piece_ids, np.asarray(token_counts, dtype=np.int64))


def chunk_count(n_tokens: int, chunk_size: int) -> int:
    """Full chunks of ``chunk_size`` tokens in a stream of ``n_tokens``."""
    return n_tokens // chunk_size


def neighbour_tokens(ids: np.ndarray, chunk_ids: np.ndarray, chunk_size: int, pad_id: int) -> np.ndarray:
    """(len(chunk_ids), 2m): each database chunk followed by its continuation (the next m
    tokens of the stream, padded with ``pad_id`` at the end of the stream)."""
    padded = np.concatenate([ids, np.full(2 * chunk_size, pad_id, dtype=ids.dtype)])
    return padded[chunk_ids[:, None] * chunk_size + np.arange(2 * chunk_size)]


def document_spans(docs: np.ndarray, starts: np.ndarray, span: int) -> tuple[np.ndarray, np.ndarray]:
    """The first and last document id of the tokens [start, start + span) (clipped to the
    stream) for each start. Document ids grow along the stream, so these bound the set."""
    last = np.minimum(starts + span, len(docs)) - 1
    return docs[starts], docs[last]


# --- retrieval ------------------------------------------------------------------------------


def retrieve(
    index: Any,
    queries: np.ndarray,
    query_span: tuple[np.ndarray, np.ndarray],
    database_span: tuple[np.ndarray, np.ndarray],
    k: int,
) -> np.ndarray:
    """(len(queries), k) database chunk ids, nearest first, -1 where fewer than k chunks
    qualify. A database chunk qualifies for a query when its document span (chunk and
    continuation) does not overlap the query's (:func:`document_spans`). The search asks
    faiss for more candidates than k and asks again, with four times as many, for the queries
    that still lack k after filtering."""
    n = len(queries)
    found = np.full((n, k), -1, dtype=np.int64)
    todo = np.arange(n)
    fetch = min(index.ntotal, 4 * k)
    q_lo, q_hi = query_span
    d_lo, d_hi = database_span
    while len(todo) and fetch > 0:
        _, ids = index.search(np.ascontiguousarray(queries[todo]), fetch)
        safe = np.clip(ids, 0, None)
        overlap = (d_lo[safe] <= q_hi[todo, None]) & (d_hi[safe] >= q_lo[todo, None])
        valid = (ids >= 0) & ~overlap
        order = np.argsort(~valid, axis=1, kind="stable")  # valid candidates first, nearest first
        ranked = np.take_along_axis(np.where(valid, ids, -1), order, axis=1)[:, :k]
        if ranked.shape[1] < k:
            ranked = np.pad(ranked, ((0, 0), (0, k - ranked.shape[1])), constant_values=-1)
        found[todo] = ranked
        short = (ranked < 0).any(axis=1)
        if fetch >= index.ntotal:
            break
        todo = todo[short]
        fetch = min(index.ntotal, fetch * 4)
    return found


def random_neighbours(
    n_database: int, query_span: tuple[np.ndarray, np.ndarray], database_span: tuple[np.ndarray, np.ndarray], k: int, seed: int
) -> np.ndarray:
    """The ablation of the paper: k database chunks per query drawn at random (seeded), with
    the same document exclusion as :func:`retrieve`."""
    rng = np.random.default_rng(seed)
    q_lo, q_hi = query_span
    d_lo, d_hi = database_span
    found = np.full((len(q_lo), k), -1, dtype=np.int64)
    for row in range(len(q_lo)):
        for _ in range(8):  # a few rounds of rejection sampling; a tiny database may leave gaps
            draw = rng.integers(0, n_database, size=4 * k)
            keep = draw[~((d_lo[draw] <= q_hi[row]) & (d_hi[draw] >= q_lo[row]))]
            keep = np.array([c for c in dict.fromkeys(keep.tolist()) if c not in found[row]], dtype=np.int64)
            free = np.flatnonzero(found[row] < 0)
            take = keep[: len(free)]
            found[row, free[: len(take)]] = take
            if (found[row] >= 0).all():
                break
    return found


# --- encoders -------------------------------------------------------------------------------


class ChunkEncoder(Protocol):
    """A frozen text encoder: ``identity()`` (what its embeddings depend on, for cache keys)
    and ``encode(texts) -> (n, dim) float32``."""

    def identity(self) -> dict[str, Any]: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


def _digest(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    weights = mask.to(hidden.dtype)[..., None]
    pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return pooled.float().numpy().astype(np.float32)


class RunEncoder:
    """The final hidden states (after the final norm) of a plugformer run's checkpoint,
    averaged over a chunk's tokens; its own tokenizer encodes the chunk's text."""

    def __init__(self, run_dir: Path, batch_size: int) -> None:
        from plugformer.api import load_run

        self.run = load_run(run_dir)
        self.batch_size = batch_size
        if self.run.tokenizer is None:
            raise ConfigError(
                f"The encoder run {run_dir} has no tokenizer (it did not train on text).",
                expected="a run trained on a text task (e.g. experiment=lm_small)",
                fix="set data.encoder to a text run, or to a Hugging Face model directory",
            )

    def identity(self) -> dict[str, Any]:
        return {"kind": "plugformer_run", "checkpoint": _digest([self.run.checkpoint])}

    def encode(self, texts: list[str]) -> np.ndarray:
        from plugformer import ModelInputs

        model, tokenizer = self.run.model.eval(), self.run.tokenizer
        pad = getattr(getattr(tokenizer, "special", None), "pad", 0)
        limit = int(getattr(self.run.data, "max_length", 0) or 0) or None
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                encoded = [tokenizer.encode(text)[:limit] or [pad] for text in texts[start : start + self.batch_size]]
                length = max(len(e) for e in encoded)
                ids = torch.full((len(encoded), length), pad, dtype=torch.long)
                mask = torch.zeros(len(encoded), length, dtype=torch.bool)
                for row, e in enumerate(encoded):
                    ids[row, : len(e)] = torch.tensor(e)
                    mask[row, : len(e)] = True
                hidden = model.hidden_states(ModelInputs(input_ids=ids, attention_mask=mask))
                out.append(_mean_pool(hidden, mask))
        return np.concatenate(out)


class HFEncoder:
    """A local Hugging Face model directory (``AutoModel``, ``AutoTokenizer``; the paper
    uses BERT): the mean of ``last_hidden_state`` over the attention mask."""

    def __init__(self, path: Path, batch_size: int) -> None:
        try:
            import transformers
        except ImportError as error:
            raise ConfigError(
                f"A Hugging Face encoder needs the transformers library ({error}).",
                expected="transformers importable", fix="pip install 'plugformer[hf]'",
            ) from None
        self.path, self.batch_size = path, batch_size
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True).eval()

    def identity(self) -> dict[str, Any]:
        return hf_identity(self.path)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = []
        limit = getattr(self.model.config, "max_position_embeddings", 512)
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size], padding=True, truncation=True, max_length=limit, return_tensors="pt"
                )
                hidden = self.model(**batch).last_hidden_state
                out.append(_mean_pool(hidden, batch["attention_mask"].bool()))
        return np.concatenate(out)


class NgramEncoder:
    """A parameter-free lexical encoder (``data.encoder=ngrams``): the counts of a chunk's
    character trigrams, hashed into ``dim`` buckets (crc32) and L2-normalized. Frozen by
    construction; a baseline beside learned encoders, and what the conformance kit uses."""

    NAME = "ngrams"

    def __init__(self, dim: int = 256, n: int = 3) -> None:
        self.dim, self.n = dim, n

    def identity(self) -> dict[str, Any]:
        return {"kind": "ngrams", "dim": self.dim, "n": self.n, "hash": "crc32"}

    def encode(self, texts: list[str]) -> np.ndarray:
        import zlib

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            padded = f" {text} "
            for start in range(max(1, len(padded) - self.n + 1)):
                out[row, zlib.crc32(padded[start : start + self.n].encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-6)


def hf_identity(path: Path) -> dict[str, Any]:
    """A Hugging Face model directory's identity: the hash of its weights, config and
    tokenizer files."""
    return {"kind": "huggingface", "files": _digest([p for pattern in _HF_FILES for p in Path(path).glob(pattern)])}


def load_encoder(path: str, batch_size: int = 256) -> ChunkEncoder:
    """A plugformer run directory (it has ``checkpoints/``), a Hugging Face model directory
    (it has ``config.json``) or ``"ngrams"`` (:class:`NgramEncoder`); a ConfigError otherwise."""
    if not path:
        raise ConfigError(
            "RETRO needs a frozen encoder for its chunks: data.encoder is not set.",
            expected="data.encoder=<a plugformer run directory or a local Hugging Face model directory, or ngrams>",
            fix="train one first, e.g. plugformer train experiment=lm_small run_dir=runs/retro_encoder, "
            "then data.encoder=runs/retro_encoder (docs/retrieval.md, RETRO)",
        )
    if path == NgramEncoder.NAME:
        return NgramEncoder()
    directory = Path(path).expanduser()
    if (directory / "checkpoints").is_dir():
        return RunEncoder(directory, batch_size)
    if (directory / "config.json").is_file():
        return HFEncoder(directory, batch_size)
    raise ConfigError(
        f"data.encoder={path!r} is neither a plugformer run directory nor a Hugging Face model directory.",
        expected="a folder with checkpoints/ (a plugformer run) or config.json (save_pretrained), or ngrams",
        fix="correct data.encoder",
    )


# --- the index on disk ---------------------------------------------------------------------


@dataclass
class ChunkIndex:
    """A faiss index of the database chunk embeddings and what it was built from."""

    index: Any
    info: dict[str, Any]


def build_or_load_index(folder: Path, embed: Any, options: Any, info: dict[str, Any]) -> ChunkIndex:
    """The index saved in ``folder`` (``index.faiss``, ``index.json``), or one built from
    ``embed()`` (the (n, dim) float32 database embeddings) with
    :func:`plugformer_plugins.retrieval.knn_lm.build_index` (flat, ivf or hnsw, L2) and
    saved there. The caller holds the lock of ``folder``."""
    from plugformer_plugins.retrieval.knn_lm import build_index

    faiss = require_faiss()
    if (folder / "index.faiss").is_file() and (folder / "index.json").is_file():
        return ChunkIndex(faiss.read_index(str(folder / "index.faiss")), json.loads((folder / "index.json").read_text()))
    started = time.perf_counter()
    keys = np.ascontiguousarray(embed(), dtype=np.float32)
    encode_seconds = time.perf_counter() - started
    started = time.perf_counter()
    index = build_index(keys, options)
    build_seconds = time.perf_counter() - started
    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / "index.faiss.tmp"
    faiss.write_index(index, str(staging))
    staging.replace(folder / "index.faiss")
    info = {
        **info, "entries": int(index.ntotal), "dimension": int(keys.shape[1]),
        "index_bytes": (folder / "index.faiss").stat().st_size,
        "encode_seconds": round(encode_seconds, 3), "build_seconds": round(build_seconds, 4),
    }
    (folder / "index.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return ChunkIndex(index, info)
