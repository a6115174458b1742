"""The ``retro_text`` data task: the ``text`` task's packed blocks, each with the RETRO
neighbours of its chunks (Borgeaud et al. 2022) as a ``datasets`` column, retrieved at
preparation time from the training split.

For block b and chunk u (tokens u·m … u·m+m−1 of the block), ``neighbours[b, u]`` holds the
k nearest training chunks (by the frozen ``data.encoder``'s embeddings, through a faiss
index), each followed by its continuation: (k, 2m) token ids, ``pad_id`` where a neighbour is
missing or the stream ends. Chunks that share a document with the query chunk or its
continuation are excluded (:mod:`plugformer_plugins.retrieval.retro_index`). Batches carry
``extras = {"retro_neighbours": (batch, chunks, k, 2m) long, "retro_neighbours_mask":
same shape, bool}``, which the default ``Objective.model_inputs`` hands to the model, where
the ``retro`` block's chunked cross-attention reads them.

What is cached where (all under the dataset cache, ``paths.data_dir``):

- ``retro-index/<key>/``: ``index.faiss`` (the chunk index), ``embeddings.npy`` (the
  training chunks' embeddings, which are also the training queries) and ``index.json``
  (encoder, chunk size, index type, entries, dimension, bytes, encode and build time), keyed
  by the encoder's identity (checkpoint or model files' hash), the text, the tokenizer, the
  chunk size, the document rule and the index options;
- ``retro_text/<key>/``: the splits with the ``neighbours`` column, keyed by the index's key,
  the block size, k and ``random_neighbours``; ``retrieval.json`` beside the index records
  the search time per chunk of each split.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch
from filelock import FileLock
from torch import Tensor

from plugformer import Capabilities, Component, ConfigError, DataContext, bounds
from plugformer.data import parameters_key
from plugformer_plugins.data.text import TextConfig, TextTask, check_config as check_text_config, pack, text_capabilities
from plugformer_plugins.retrieval import retro_index as rx

if TYPE_CHECKING:
    from datasets import DatasetDict

#: Extras keys of a batch (read by the ``retro`` block).
NEIGHBOURS = "retro_neighbours"
NEIGHBOURS_MASK = "retro_neighbours_mask"
#: A short line after a blank line, not ending like a sentence: a title ("On Rivers").
DEFAULT_DOCUMENT_START = r"[^\s.,;:!?\"'][^.,;:!?\"]{0,58}[^\s.,;:!?\"]"
INDEX_TYPES = ("flat", "ivf", "hnsw")


@dataclass
class RetroTextConfig(TextConfig):
    # A plugformer run directory, a local Hugging Face model directory, or ngrams (required).
    encoder: str = ""
    chunk_size: int = field(default=16, metadata=bounds(ge=1))  # m (64 in the paper)
    neighbours: int = field(default=2, metadata=bounds(ge=1))  # k (2 in the paper)
    index: str = "flat"  # flat (exact L2), ivf (index_nlist cells), hnsw (index_m links)
    index_nlist: int = field(default=64, metadata=bounds(ge=1))
    index_m: int = field(default=32, metadata=bounds(ge=2))
    nprobe: int = field(default=8, metadata=bounds(ge=1))  # IVF cells searched
    # A line matching this (whole line, after a blank line) starts a new document; null: one document.
    document_start: Optional[str] = DEFAULT_DOCUMENT_START
    # The paper's ablation: k random chunks (same exclusion) instead of the nearest.
    random_neighbours: bool = False
    encode_batch_size: int = field(default=256, metadata=bounds(ge=1))


def check_config(config: RetroTextConfig) -> None:
    check_text_config(config)
    if config.block_size % config.chunk_size:
        raise ConfigError(
            f"data.block_size={config.block_size} is not a multiple of data.chunk_size={config.chunk_size}.",
            expected="blocks made of whole chunks",
            fix=f"set data.block_size to a multiple of {config.chunk_size}, or change data.chunk_size",
        )
    if config.index not in INDEX_TYPES:
        raise ConfigError(f"Unknown data.index={config.index!r}.", expected=f"one of {', '.join(INDEX_TYPES)}", fix="data.index=flat")


def encoder_identity(path: str) -> dict[str, Any]:
    """What the encoder's embeddings depend on, without loading it: the checkpoint
    ``load_run`` would read (best, else last) or the model directory's files."""
    if path == rx.NgramEncoder.NAME:
        return rx.NgramEncoder().identity()
    directory = Path(path).expanduser()
    if (directory / "checkpoints").is_dir():
        checkpoint = directory / "checkpoints" / "best.ckpt"
        if not checkpoint.is_file():
            checkpoint = directory / "checkpoints" / "last.ckpt"
        if checkpoint.is_file():
            return {"kind": "plugformer_run", "checkpoint": rx._digest([checkpoint])}
    if (directory / "config.json").is_file():
        return rx.hf_identity(directory)
    return rx.load_encoder(path).identity()  # raises the clear error (no encoder there)


class RetroTextTask(TextTask):
    """Packed text blocks plus a ``neighbours`` column (blocks × chunks × k × 2m token ids) and
    a ``neighbour_ids`` column (blocks × chunks × k: the database chunk of each, -1 for none)."""

    name = "retro_text"

    def __init__(self, config: RetroTextConfig, ctx: DataContext) -> None:
        check_config(config)
        super().__init__(config, ctx)
        self.config: RetroTextConfig = config
        self._streams: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.built = False  # True when this task retrieved (the cache did not have the splits)
        self.retrieval: dict[str, dict[str, float]] = {}

    # Keys -----------------------------------------------------------------------------------
    def index_key(self) -> dict[str, Any]:
        c = self.config
        return {
            "encoder": encoder_identity(c.encoder), "text": super().cache_key(), "chunk_size": c.chunk_size,
            "document_start": c.document_start, "index": c.index,
            "index_options": {"ivf": {"nlist": c.index_nlist}, "hnsw": {"m": c.index_m}}.get(c.index, {}), "version": 1,
        }

    def cache_key(self) -> dict[str, Any]:
        c = self.config
        return {
            "index": self.index_key(), "block_size": c.block_size, "neighbours": c.neighbours,
            "random_neighbours": c.random_neighbours, "nprobe": c.nprobe if c.index == "ivf" else None, "version": 1,
        }

    def index_folder(self) -> Path:
        return self.cache_dir / "retro-index" / parameters_key(self.index_key())

    # Token streams with document ids ----------------------------------------------------
    def token_streams(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per split: its token ids and the document id of each token. Documents are numbered
        over the training lines then the validation lines, so a document that the
        validation split continues keeps its id; validation files start a new one."""
        if not self._streams:
            assert self.tokenizer is not None
            raw = self.raw_text()
            lines = {s: list(raw[s]["text"]) for s in ("train", "validation")}
            starts = rx.document_starts(lines["train"] + lines["validation"], self.config.document_start)
            if self.config.validation_files and lines["validation"]:
                starts[len(lines["train"])] = True
            if starts:
                starts[0] = True  # the first line opens document 0
            offset, before = 0, -1
            for split in ("train", "validation"):
                split_starts = starts[offset : offset + len(lines[split])]
                pieces, piece_starts = [], []
                for line, start in zip(lines[split], split_starts):
                    if start or not pieces:
                        pieces.append([])
                        piece_starts.append(start)
                    pieces[-1].append(line)
                encoded = [np.asarray(self.tokenizer.encode("".join(piece)), dtype=np.int32) for piece in pieces]
                ids = np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.int32)
                docs = rx.document_ids([len(e) for e in encoded], piece_starts, before)
                self._streams[split] = (ids, docs)
                before = int(docs[-1]) if len(docs) else before
                offset += len(lines[split])
        return self._streams

    def encode_split(self, split: str) -> np.ndarray:
        return self.token_streams()[split][0]

    # Building -------------------------------------------------------------------------------
    def _chunk_texts(self, ids: np.ndarray, starts: np.ndarray) -> list[str]:
        assert self.tokenizer is not None
        m = self.config.chunk_size
        return [self.tokenizer.decode(ids[s : s + m].tolist(), skip_special=False) for s in starts]

    def chunk_index(self) -> tuple[rx.ChunkIndex, np.ndarray]:
        """The training chunks' index and embeddings: read from the index folder, or
        encoded, built and saved there (under a file lock)."""
        from plugformer_plugins.retrieval.knn_lm import IndexOptions

        c = self.config
        ids, _ = self.token_streams()["train"]
        n_chunks = rx.chunk_count(len(ids), c.chunk_size)
        folder = self.index_folder()
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            def embed() -> np.ndarray:
                encoder = rx.load_encoder(c.encoder, c.encode_batch_size)
                keys = encoder.encode(self._chunk_texts(ids, np.arange(n_chunks) * c.chunk_size))
                folder.mkdir(parents=True, exist_ok=True)
                np.save(folder / "embeddings.npy", keys)
                return keys

            options = IndexOptions(type=c.index, nlist=c.index_nlist, m=c.index_m)
            info = {"encoder": c.encoder, "encoder_identity": self.index_key()["encoder"], "chunk_size": c.chunk_size, "type": c.index}
            index = rx.build_or_load_index(folder, embed, options, info)
            embeddings = np.load(folder / "embeddings.npy")
        if hasattr(index.index, "nprobe"):
            index.index.nprobe = c.nprobe
        return index, embeddings

    def build_splits(self) -> DatasetDict:
        from datasets import Array2D, Array3D, Dataset, DatasetDict, Features, Sequence, Value

        self.built = True
        c = self.config
        m, k, L = c.chunk_size, c.neighbours, c.block_size
        per_block = L // m
        streams = self.token_streams()
        train_ids, train_docs = streams["train"]
        index, embeddings = self.chunk_index()
        n_database = len(embeddings)
        database_span = rx.document_spans(train_docs, np.arange(n_database) * m, 2 * m)
        encoder = None
        splits = {}
        for split, (ids, docs) in streams.items():
            blocks = pack(ids, L, split)
            starts = (np.arange(blocks.num_rows)[:, None] * L + np.arange(per_block) * m).reshape(-1)
            query_span = rx.document_spans(docs, starts, 2 * m)
            if split == "train":
                queries = embeddings[starts // m]  # a training chunk is a database chunk
            else:
                encoder = encoder or rx.load_encoder(c.encoder, c.encode_batch_size)
                queries = np.ascontiguousarray(encoder.encode(self._chunk_texts(ids, starts)), dtype=np.float32)
            started = time.perf_counter()
            if c.random_neighbours:
                found = rx.random_neighbours(n_database, query_span, database_span, k, seed=0 if split == "train" else 1)
            else:
                found = rx.retrieve(index.index, queries, query_span, database_span, k)
            seconds = time.perf_counter() - started
            self.retrieval[split] = {"chunks": len(starts), "ms_per_chunk": 1000 * seconds / max(1, len(starts)),
                                     "missing": int((found < 0).sum())}
            tokens = rx.neighbour_tokens(train_ids, np.clip(found, 0, None).reshape(-1), m, self.pad_id)
            tokens[found.reshape(-1) < 0] = self.pad_id
            neighbours = tokens.reshape(blocks.num_rows, per_block, k, 2 * m).astype(np.int32)
            features = Features({
                "input_ids": Sequence(Value("int32")), "labels": Sequence(Value("int32")),
                "neighbours": Array3D(shape=(per_block, k, 2 * m), dtype="int32"),
                "neighbour_ids": Array2D(shape=(per_block, k), dtype="int32"),
            })
            columns = blocks.with_format("numpy")[:]
            splits[split] = Dataset.from_dict(
                {"input_ids": columns["input_ids"].astype(np.int32), "labels": columns["labels"].astype(np.int32),
                 "neighbours": neighbours, "neighbour_ids": found.reshape(blocks.num_rows, per_block, k).astype(np.int32)},
                features=features,
            )
        self._record_retrieval()
        return DatasetDict(splits)

    def _record_retrieval(self) -> None:
        """Add this neighbour set's search times to ``retrieval.json`` beside the index, under
        the index's lock and through a rename (several runs may prepare at once)."""
        folder = self.index_folder()
        record = folder / "retrieval.json"
        with FileLock(str(folder) + ".lock"):
            try:
                saved = json.loads(record.read_text()) if record.is_file() else {}
            except ValueError:
                saved = {}  # a damaged record is only timing information: start it again
            saved[parameters_key(self.cache_key())] = {
                "random_neighbours": self.config.random_neighbours, "k": self.config.neighbours, **self.retrieval,
            }
            staging = folder / f".retrieval.{os.getpid()}.tmp"
            staging.write_text(json.dumps(saved, indent=2) + "\n")
            os.replace(staging, record)

    def prepare(self) -> None:
        if self.splits is None:
            super().prepare()
            assert self.splits is not None
            self.splits = self.splits.with_format("torch", columns=["input_ids", "labels", "neighbours"])

    def collate(self, rows: list[dict[str, Tensor]]) -> dict[str, Any]:
        batch: dict[str, Any] = super().collate(rows)
        neighbours = torch.stack([row["neighbours"] for row in rows]).long()
        batch["extras"] = {NEIGHBOURS: neighbours, NEIGHBOURS_MASK: neighbours != self.pad_id}
        return batch

    @property
    def facts(self) -> dict[str, Any]:
        """The text task's facts, and ``retro_chunk_size`` (m) and ``retro_neighbours`` (k)."""
        return {**super().facts, "retro_chunk_size": self.config.chunk_size, "retro_neighbours": self.config.neighbours}


def retro_capabilities(config: RetroTextConfig) -> Capabilities:
    """The text task's, plus ``retro_neighbours`` (what the ``retro`` block requires)."""
    base = text_capabilities(config)
    return Capabilities(provides=base.provides | {"retro_neighbours"}, requires=base.requires, max_length=base.max_length)


COMPONENT = Component(
    kind="data",
    name="retro_text",
    factory=RetroTextTask,
    config=RetroTextConfig,
    summary="Text blocks with RETRO neighbours per chunk (frozen encoder, faiss index, same-document exclusion), cached.",
    reference="Borgeaud et al. 2022, Improving language models by retrieving from trillions of tokens",
    capabilities=retro_capabilities,
)
