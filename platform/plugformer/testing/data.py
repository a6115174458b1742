"""The behavioural kit of data tasks: the task builds at small sizes, and its batches keep
the contract the model and the objective rely on.

What a batch must satisfy (plugformer's batch conventions, docs/plugins.md):

- a dict of tensors, all with the same first (batch) dimension; under the key ``extras`` a
  dict of such tensors may hold inputs for the layers that read them (RETRO's neighbours);
- ``input_ids`` (and ``decoder_input_ids`` when present): 2-D integer ids in
  ``[0, vocab_size)``, no longer than ``max_length``;
- ``attention_mask`` (``decoder_attention_mask``): the ids' shape, boolean (or 0/1), True on
  real tokens; every row has a real token; ids are the pad id where it is False;
- ``labels``: integers; aligned with the ids of a stack when they have its shape, and then
  -100 (not scored) wherever that stack's mask is False, so padding never enters a loss;
  otherwise one label per example, in ``[0, num_classes)`` when the task declares
  ``num_classes``. Token labels are token ids (< ``vocab_size``) or -100.

A task must also declare the batch format it yields (``requires={"objective": {...}}``),
and give the same validation batches each time they are read.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable, Mapping
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from plugformer.components import DataContext, DataTask
from plugformer.registry import Component

IGNORE_INDEX = -100

#: Config fields made small by :func:`small_data_config` when a task's config has them.
SMALL_SIZES: dict[str, int] = {"train_examples": 64, "val_examples": 32, "test_examples": 16, "batch_size": 8, "num_workers": 0}

#: Prefixes of the id/mask pairs of each stack: the only one (or the encoder's), the decoder's.
STACKS = ("", "decoder_")


def small_data_config(component: Component, **overrides: Any) -> Any:
    """The component's default config with the usual size fields (:data:`SMALL_SIZES`:
    ``train_examples``, ``val_examples``, ``test_examples``, ``batch_size``,
    ``num_workers``) made small where the config has them, then ``overrides`` applied."""
    config = component.config()
    fields = {f.name for f in dataclasses.fields(config)}
    small = {name: value for name, value in SMALL_SIZES.items() if name in fields}
    return dataclasses.replace(config, **{**small, **overrides})


class DataCheckFailure(AssertionError):
    """A data task broke its contract; the message names the task, the check and the batch."""


def _fail(component: Component, check: str, message: str) -> DataCheckFailure:
    return DataCheckFailure(f"{component.qualified_name}: {check}: {message}")


def build_data_task(component: Component, config: Any, cache_dir: Path, *, seed: int = 0) -> DataTask:
    """``factory(config, DataContext)`` then ``prepare()``: the task the kit checks."""
    task = component.factory(config, DataContext(cache_dir=Path(cache_dir), seed=seed))
    if not isinstance(task, DataTask):
        raise _fail(component, "type", f"the factory returned a {type(task).__name__}, not a plugformer.DataTask")
    task.prepare()
    return task


def check_batch(component: Component, task: DataTask, batch: Mapping[str, Any], where: str) -> None:
    """Assert that one batch keeps the contract in the module docstring; ``where`` (e.g.
    "train batch 0") appears in the message."""
    check = f"batch contract ({where})"
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise _fail(component, check, f"a batch must be a dict holding input_ids; got {type(batch).__name__} "
                    f"{sorted(batch) if isinstance(batch, Mapping) else ''}")
    extras = batch.get("extras", {})
    if not isinstance(extras, Mapping):
        raise _fail(component, check, f"'extras' is a {type(extras).__name__}; it must be a dict of tensors")
    for key, value in batch.items():
        if key != "extras" and not isinstance(value, Tensor):
            raise _fail(component, check, f"{key!r} is a {type(value).__name__}; every batch value must be a tensor (or, "
                        "under 'extras', a dict of tensors)")
    for key, value in extras.items():
        if not isinstance(value, Tensor):
            raise _fail(component, check, f"extras[{key!r}] is a {type(value).__name__}; extras must be tensors")
    size = batch["input_ids"].shape[0] if batch["input_ids"].dim() else 0
    if size == 0:
        raise _fail(component, check, "input_ids has no rows")
    tensors = {**{k: v for k, v in batch.items() if k != "extras"}, **{f"extras[{k!r}]": v for k, v in extras.items()}}
    for key, value in tensors.items():
        if value.dim() == 0 or value.shape[0] != size:
            raise _fail(component, check, f"{key!r} has shape {tuple(value.shape)}; every tensor's first dimension is the batch ({size})")
    facts = task.facts
    pad_id = int(facts.get("pad_id", getattr(task, "pad_id", 0)))
    for prefix in STACKS:
        ids = batch.get(f"{prefix}input_ids")
        if ids is None:
            continue
        _check_ids(component, check, task, f"{prefix}input_ids", ids)
        mask = batch.get(f"{prefix}attention_mask")
        if mask is not None:
            _check_mask(component, check, f"{prefix}attention_mask", mask, ids, pad_id)
    labels = batch.get("labels")
    if labels is not None:
        _check_labels(component, check, task, batch, labels)


def _check_ids(component: Component, check: str, task: DataTask, key: str, ids: Tensor) -> None:
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise _fail(component, check, f"{key} must be (batch, length) integer ids; got {ids.dtype} {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= task.vocab_size):
        raise _fail(component, check, f"{key} holds ids in [{int(ids.min())}, {int(ids.max())}], outside [0, vocab_size={task.vocab_size})")
    if ids.shape[1] > task.max_length:
        raise _fail(component, check, f"{key} has {ids.shape[1]} tokens, more than the declared max_length={task.max_length}")


def _check_mask(component: Component, check: str, key: str, mask: Tensor, ids: Tensor, pad_id: int) -> None:
    if mask.shape != ids.shape:
        raise _fail(component, check, f"{key} has shape {tuple(mask.shape)}, the ids {tuple(ids.shape)}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise _fail(component, check, f"{key} must be boolean (True on real tokens); got {mask.dtype} values other than 0/1")
    real = mask.bool()
    empty = (~real.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise _fail(component, check, f"{key} marks no real token in rows {empty}")
    wrong = (ids != pad_id) & ~real
    if bool(wrong.any()):
        row, column = wrong.nonzero()[0].tolist()
        raise _fail(component, check, f"{key} is False at row {row}, position {column}, but the id there is "
                    f"{int(ids[row, column])}, not the pad id {pad_id} (mask and padding disagree)")


def _check_labels(component: Component, check: str, task: DataTask, batch: Mapping[str, Tensor], labels: Tensor) -> None:
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise _fail(component, check, f"labels must be integers; got {labels.dtype}")
    if labels.dim() == 1:
        classes = task.facts.get("num_classes")
        if classes is not None and (int(labels.min()) < 0 or int(labels.max()) >= int(classes)):
            raise _fail(component, check, f"labels hold [{int(labels.min())}, {int(labels.max())}], outside [0, num_classes={classes})")
        return
    scored = labels[labels != IGNORE_INDEX]
    if scored.numel() and (int(scored.min()) < 0 or int(scored.max()) >= task.vocab_size):
        raise _fail(component, check, f"token labels hold [{int(scored.min())}, {int(scored.max())}]; expected ids below "
                    f"vocab_size={task.vocab_size} or {IGNORE_INDEX} (not scored)")
    for prefix in STACKS:
        ids, mask = batch.get(f"{prefix}input_ids"), batch.get(f"{prefix}attention_mask")
        if ids is None or mask is None or ids.shape != labels.shape:
            continue
        leaked = (labels != IGNORE_INDEX) & ~mask.bool()
        if bool(leaked.any()):
            row, column = leaked.nonzero()[0].tolist()
            raise _fail(component, check, f"labels score a padded position (row {row}, position {column}: "
                        f"{prefix}attention_mask is False there); padded labels must be {IGNORE_INDEX}")


def _same_batches(first: Iterable[Mapping[str, Any]], second: Iterable[Mapping[str, Any]]) -> bool:
    for a, b in zip(first, second):
        if a.keys() != b.keys():
            return False
        for k in a:
            if isinstance(a[k], Mapping):
                if not isinstance(b[k], Mapping) or not _same_batches([a[k]], [b[k]]):
                    return False
            elif a[k].shape != b[k].shape or not torch.equal(a[k], b[k]):
                return False
    return True


def check_data_task(
    component: Component, config: Any = None, *, cache_dir: str | Path | None = None, max_batches: int = 2
) -> None:
    """Build the task (``config``, by default :func:`small_data_config`) in ``cache_dir`` (a
    temporary folder by default) and check it: it declares the batch format it yields, sets
    positive ``vocab_size`` and ``max_length`` and a dict of ``facts``; the first
    ``max_batches`` training and validation batches keep the contract (module docstring);
    validation batches read twice are equal, and so are training batches of a streaming task
    (ordered segments are never shuffled). Raises AssertionError naming the first failure."""
    from plugformer.testing import check_registration

    check_registration(component, config)
    if component.kind != "data":
        raise _fail(component, "kind", f"check_data_task checks data tasks; this is a {component.kind}")
    config = config if config is not None else small_data_config(component)
    capabilities = component.capabilities_for(config)
    if not capabilities.requires.get("objective"):
        raise _fail(component, "capabilities", "a data task must require the batch format it yields, e.g. "
                    "Capabilities(requires={'objective': {'causal_lm'}}), so the builder can pair it with an objective")
    with tempfile.TemporaryDirectory(prefix="plugformer-kit-") as scratch:
        task = build_data_task(component, config, Path(cache_dir or scratch))
        for attribute in ("vocab_size", "max_length"):
            value = getattr(task, attribute, None)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _fail(component, "sizes", f"after prepare(), {attribute} is {value!r}; expected a positive int")
        if not isinstance(task.facts, Mapping):
            raise _fail(component, "facts", f"facts is a {type(task.facts).__name__}; expected a dict")
        loaders = {"train": task.train_dataloader, "validation": task.val_dataloader}
        for split, loader in loaders.items():
            batches = list(islice(loader(), max_batches))
            if not batches:
                raise _fail(component, "batches", f"the {split} loader yields no batch")
            for index, batch in enumerate(batches):
                check_batch(component, task, batch, f"{split} batch {index}")
        if not _same_batches(islice(task.val_dataloader(), max_batches), islice(task.val_dataloader(), max_batches)):
            raise _fail(component, "repeatable validation", "reading the validation loader twice gives different batches")
        if task.streams and not _same_batches(islice(task.train_dataloader(), 2), islice(task.train_dataloader(), 2)):
            raise _fail(component, "streams", "a streaming task (streams=True) must yield its training segments in one fixed order")
