"""Shared machinery for data tasks: splits cached on disk by their parameters, and a data
module over a ``datasets.DatasetDict`` with padding collation.

A task subclasses :class:`CachedDatasetTask`, implements :meth:`cache_key` and
:meth:`build_splits`, and sets ``vocab_size``/``max_length`` in
:meth:`describe`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock
from torch import Tensor
from torch.utils.data import DataLoader

from plugformer.batching import LengthGroupedSampler

from plugformer.components import DataTask

if TYPE_CHECKING:
    from datasets import DatasetDict

IGNORE_INDEX = -100


def parameters_key(params: dict[str, Any]) -> str:
    """A short stable hash of JSON-serializable parameters."""
    text = json.dumps(params, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


PARAMS_FILE = "plugformer_params.json"


def cached_splits(cache_dir: Path, name: str, params: dict[str, Any], build: Callable[[], DatasetDict]) -> DatasetDict:
    """Load ``name``'s splits for ``params`` from ``cache_dir``, building and saving them first
    if absent. Safe when several processes ask at once (a file lock; the first one builds)
    and when a build is killed (written to a temporary folder, then renamed; the folders of
    killed builds are removed by the next build of the same key). A cache that no longer
    loads, or holds fewer rows than were saved (truncated or damaged files), is rebuilt."""
    from datasets import load_from_disk

    root = Path(cache_dir) / name
    root.mkdir(parents=True, exist_ok=True)
    target = root / parameters_key(params)
    with FileLock(str(target) + ".lock"):
        for orphan in root.glob(f".{target.name}.*.tmp"):
            shutil.rmtree(orphan, ignore_errors=True)
        if target.exists():
            problem = _cache_problem(target)
            if problem is None:
                return load_from_disk(str(target))
            warnings.warn(f"plugformer: the dataset cache {target} is damaged ({problem}); rebuilding it.", stacklevel=2)
            broken = root / f".{target.name}.{uuid.uuid4().hex}.tmp"
            os.replace(target, broken)
            shutil.rmtree(broken, ignore_errors=True)
        staging = root / f".{target.name}.{uuid.uuid4().hex}.tmp"
        splits = build()
        splits.save_to_disk(str(staging))
        record = {"params": params, "num_rows": {split: splits[split].num_rows for split in splits}}
        (staging / PARAMS_FILE).write_text(json.dumps(record, sort_keys=True, default=str))
        os.replace(staging, target)
    return load_from_disk(str(target))


def _cache_problem(target: Path) -> str | None:
    """Why the cached splits in ``target`` cannot be used, or None when they load completely."""
    from datasets import load_from_disk

    try:
        record = json.loads((target / PARAMS_FILE).read_text())
        splits = load_from_disk(str(target))
        for split, rows in (record.get("num_rows") or {}).items():
            if splits[split].num_rows != rows:
                return f"split {split!r} has {splits[split].num_rows} rows, {rows} were saved"
            for column in splits[split].column_names:
                splits[split].data.column(column)  # reads every chunk's buffers
        return None
    except Exception as error:  # noqa: BLE001 - whatever fails to load is damage
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def pad_sequences(sequences: list[Tensor], value: int) -> Tensor:
    length = max(len(s) for s in sequences)
    out = torch.full((len(sequences), length), value, dtype=torch.long)
    for row, seq in enumerate(sequences):
        out[row, : len(seq)] = seq
    return out


class CachedDatasetTask(DataTask):
    """A data task over cached ``datasets`` splits named "train" and "validation" (and
    optionally "test"), each with an ``input_ids`` column and a ``labels`` column (a label
    per example, or a label sequence aligned with ``input_ids``)."""

    def __init__(
        self, cache_dir: Path, batch_size: int, num_workers: int = 0, *, bucket_by_length: bool = False,
        persistent_workers: bool = True, pin_memory: bool | None = None,
    ) -> None:
        """``num_workers``: loader processes (0: batches are collated in the training process,
        the right choice for splits held in memory on a few CPU cores); ``persistent_workers``:
        keep them from one epoch to the next (only with workers); ``pin_memory``: page-locked
        batches for faster copies to the GPU, None for on exactly when the run trains on a CUDA
        device."""
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.bucket_by_length = bucket_by_length
        self.persistent_workers = persistent_workers
        self.pin_memory = pin_memory
        self.splits: DatasetDict | None = None

    # --- what a task implements -------------------------------------------------------
    name: str = "task"

    def cache_key(self) -> dict[str, Any]:
        """The parameters the splits depend on."""
        raise NotImplementedError

    def build_splits(self) -> DatasetDict:
        raise NotImplementedError

    def describe(self, splits: DatasetDict) -> None:
        """Set ``vocab_size`` and ``max_length`` from the built splits (task facts for the
        objective go in the ``facts`` property)."""
        raise NotImplementedError

    # --- the DataTask contract --------------------------------------------------------
    def prepare(self) -> None:
        if self.splits is None:
            self.splits = cached_splits(self.cache_dir, self.name, self.cache_key(), self.build_splits)
            self.splits = self.splits.with_format("torch", columns=["input_ids", "labels"])
            self.describe(self.splits)

    def collate(self, rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        input_ids = pad_sequences([row["input_ids"] for row in rows], self.pad_id)
        lengths = torch.tensor([len(row["input_ids"]) for row in rows])
        attention_mask = torch.arange(input_ids.shape[1])[None, :] < lengths[:, None]
        labels = [row["labels"] for row in rows]
        if labels[0].dim() == 0:
            stacked = torch.stack(labels).long()
        else:
            stacked = pad_sequences(labels, IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": stacked}

    def example_lengths(self, split: str) -> list[int]:
        """Tokens per example of ``split``: the lengths of its sequence columns
        (``input_ids``, and ``labels`` when it holds sequences), added."""
        import pyarrow.compute as pc

        assert self.splits is not None
        table = self.splits[split].data
        total = None
        for column in ("input_ids", "labels"):
            if column in table.column_names and hasattr(table.column(column).type, "value_type"):
                lengths = pc.list_value_length(table.column(column))
                total = lengths if total is None else pc.add(total, lengths)
        return total.to_pylist() if total is not None else [1] * self.splits[split].num_rows

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.prepare()
        assert self.splits is not None
        sampler = None
        if self.bucket_by_length:
            # Seeded from the run's seed (seed_everything), so a seeded run repeats its batches.
            sampler = LengthGroupedSampler(self.example_lengths(split), self.batch_size, shuffle=shuffle, seed=torch.initial_seed())
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self._pins_memory(),
            drop_last=shuffle,
        )

    def _pins_memory(self) -> bool:
        """``pin_memory`` as set, or (None) whether the trainer this task is attached to
        trains on a CUDA device; pinning for a CPU run only costs copies."""
        if self.pin_memory is not None:
            return bool(self.pin_memory) and torch.cuda.is_available()
        trainer = getattr(self, "trainer", None)
        device = getattr(getattr(trainer, "strategy", None), "root_device", None)
        return device is not None and device.type == "cuda"

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.prepare()
        assert self.splits is not None
        return self._loader("test" if "test" in self.splits else "validation", shuffle=False)
