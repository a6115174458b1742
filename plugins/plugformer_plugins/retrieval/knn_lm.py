"""kNN-LM (Khandelwal et al. 2020, "Generalization through Memorization: Nearest Neighbor
Language Models"): a datastore of (final hidden state, next token) pairs of a trained causal
LM, searched with faiss at evaluation time; p = λ·p_kNN + (1 − λ)·p_LM with
p_kNN(y) ∝ Σ_{neighbours i with token y} exp(−d(q, k_i)/T), d the squared L2 distance.

``plugformer index RUN_DIR [data.OPTION=...] [split=train] [index.type=flat|ivf|hnsw]``
builds the datastore; ``plugformer eval RUN_DIR knn_lm.index=train-flat knn_lm.lambda=0.25
knn_lm.k=8 knn_lm.temperature=1`` reports the perplexity with and without retrieval on the
same tokens.

Datastores live inside the run directory (``<run_dir>/knn_lm/<name>/``): the keys are hidden
states of that run's checkpoint, so a datastore is meaningless for any other model, and it
is removed with the run. The dataset cache is shared by every run, so a datastore there
would need the run's identity in its key anyway.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from plugformer import ConfigError, bounds, check_bounds

from plugformer_plugins.retrieval.faiss_support import require_faiss

IGNORE_INDEX = -100
DATASTORES = "knn_lm"
INDEX_TYPES = ("flat", "ivf", "hnsw")


@dataclass
class IndexOptions:
    """``index.*`` options of ``plugformer index``."""

    type: str = "flat"  # flat: exact L2; ivf: IndexIVFFlat (nlist cells); hnsw: IndexHNSWFlat (m links)
    nlist: int = field(default=64, metadata=bounds(ge=1))
    m: int = field(default=32, metadata=bounds(ge=2))
    name: str | None = None  # default: <split>-<type>


@dataclass
class KnnLMOptions:
    """``knn_lm.*`` options of ``plugformer eval``."""

    index: str = ""  # a datastore name in <run_dir>/knn_lm/, or a folder
    k: int = field(default=8, metadata=bounds(ge=1))
    temperature: float = field(default=1.0, metadata=bounds(gt=0.0))
    nprobe: int = field(default=8, metadata=bounds(ge=1))  # IVF cells searched
    ef_search: int = field(default=64, metadata=bounds(ge=1))  # HNSW search breadth
    lmbda: float = field(default=0.25, metadata=bounds(ge=0.0, le=1.0))  # `knn_lm.lambda` on the command line


def _options(cls: type, values: dict[str, Any], prefix: str) -> Any:
    values = {("lmbda" if key == "lambda" else key): value for key, value in values.items()}
    known = {f.name for f in cls.__dataclass_fields__.values()}
    unknown = sorted(set(values) - known)
    if unknown:
        shown = sorted("lambda" if name == "lmbda" else name for name in known)
        raise ConfigError(
            f"Unknown option(s) {', '.join(f'{prefix}.{u}' for u in unknown)}.",
            expected=f"{prefix}.<one of {', '.join(shown)}>",
            fix="check the spelling (docs/retrieval.md lists the options)",
        )
    try:
        options = cls(**values)
    except TypeError as error:
        raise ConfigError(f"Bad {prefix} options: {error}.", expected="docs/retrieval.md", fix="fix the option") from None
    check_bounds(options, prefix)
    return options


def final_states(run: Any, loader: Iterable[dict[str, Tensor]]) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Per batch: the final hidden states of the scored positions (n, d_model), their next
    tokens (n,) and the model's log-probabilities of those tokens (n,). The model runs
    without carried state, batch by batch."""
    model = run.model.eval()
    objective = model.objective
    if not hasattr(objective, "logits"):
        raise ConfigError("kNN-LM needs a language model's logits.", expected="a causal_lm run", fix="index a causal_lm run")
    with torch.no_grad():
        for batch in loader:
            batch = objective.prepare_batch(batch)
            if "labels" not in batch:
                raise ConfigError(
                    "kNN-LM needs next-token labels in the batch.", expected="a causal_lm run on text data",
                    fix="index and evaluate a causal_lm run",
                )
            hidden = model.hidden_states(objective.model_inputs(batch))
            labels = batch["labels"]
            scored = labels != IGNORE_INDEX
            hidden, labels = hidden[scored], labels[scored]
            log_probs = objective.logits(hidden).float().log_softmax(-1).gather(-1, labels[:, None]).squeeze(-1)
            yield hidden.float(), labels, log_probs


def _check_causal_lm(run: Any) -> None:
    objective = run.cfg.objective.get("name") if "objective" in run.cfg else None
    if objective != "causal_lm":
        raise ConfigError(
            f"kNN-LM works on causal language models; {run.run_dir} trained objective {objective!r}.",
            expected="a run with objective=causal_lm",
            fix="train a causal_lm run on text data and index that",
        )


def build_index(keys: Any, options: IndexOptions) -> Any:
    """A faiss index of ``keys`` (n, d) float32 numpy, by L2 distance."""
    faiss = require_faiss()
    n, dim = keys.shape
    if options.type == "flat":
        index = faiss.IndexFlatL2(dim)
    elif options.type == "ivf":
        nlist = min(options.nlist, max(1, n // 39))  # faiss warns below 39 training points per cell
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist, faiss.METRIC_L2)
        index.train(keys)
    elif options.type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, options.m, faiss.METRIC_L2)
    else:
        raise ConfigError(
            f"Unknown index.type={options.type!r}.", expected=f"one of {', '.join(INDEX_TYPES)}", fix="index.type=flat"
        )
    index.add(keys)
    return index


def index_command(arguments: list[str]) -> int:
    """``plugformer index RUN_DIR [data.OPTION=VALUE ...] [split=train] [index.OPTION=VALUE ...]``."""
    run_dirs = [a for a in arguments if "=" not in a and not a.startswith("-")]
    if len(run_dirs) != 1 or any(a.startswith("-") for a in arguments):
        raise ConfigError(
            "plugformer index takes one run directory and options.",
            expected="plugformer index RUN_DIR [data.OPTION=VALUE ...] [split=train|validation|test] [index.type=flat|ivf|hnsw]",
            fix="name one run directory",
        )
    from plugformer.evaluation import split_overrides

    data_overrides, options = split_overrides([a for a in arguments if "=" in a and not a.startswith("split=")])
    splits = [a.split("=", 1)[1] for a in arguments if a.startswith("split=")]
    unknown = sorted(set(options) - {"index"})
    if unknown:
        raise ConfigError(
            f"plugformer index does not take {', '.join(f'{u}.*' for u in unknown)}.",
            expected="data.<option>=..., split=..., index.type/nlist/m/name=...",
            fix="drop those options",
        )
    info = build_datastore(run_dirs[0], data_overrides, split=splits[-1] if splits else "train", options=options.get("index", {}))
    print(
        f"{info['path']}: {info['entries']} entries of dimension {info['dimension']} ({info['type']}), "
        f"{info['index_bytes'] / 2**20:.1f} MiB index, built in {info['build_seconds']:.2f} s "
        f"(hidden states {info['encode_seconds']:.1f} s)",
        flush=True,
    )
    return 0


def build_datastore(run_dir: str | Path, data_overrides: list[str], *, split: str = "train", options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Encode ``split`` of the run's data (with ``data_overrides``) and write the datastore
    to ``<run_dir>/knn_lm/<name>/``: ``index.faiss``, ``values.pt`` (next tokens) and
    ``datastore.json`` (what it was built from, its size and build time). Returns the json."""
    from plugformer.evaluation import SPLITS, quiet_libraries

    index_options: IndexOptions = _options(IndexOptions, options or {}, "index")
    if split not in SPLITS:
        raise ConfigError(f"Unknown split={split!r}.", expected=f"one of {', '.join(SPLITS)}", fix="split=train")
    if index_options.type not in INDEX_TYPES:
        raise ConfigError(f"Unknown index.type={index_options.type!r}.", expected=f"one of {', '.join(INDEX_TYPES)}", fix="index.type=flat")
    faiss = require_faiss()
    with quiet_libraries():
        return _write_datastore(run_dir, data_overrides, split, index_options, faiss)


def _write_datastore(run_dir: str | Path, data_overrides: list[str], split: str, index_options: IndexOptions, faiss: Any) -> dict[str, Any]:
    from plugformer.api import load_run
    from plugformer.evaluation import data_with_overrides

    run = load_run(run_dir)
    _check_causal_lm(run)
    data = data_with_overrides(run, data_overrides)
    loader = {"train": data.train_dataloader, "validation": data.val_dataloader, "test": data.test_dataloader}[split]()
    started = time.perf_counter()
    keys, values = [], []
    for hidden, labels, _ in final_states(run, loader):
        keys.append(hidden)
        values.append(labels)
    encode_seconds = time.perf_counter() - started
    if not keys:
        raise ConfigError(f"The {split} split has no scored tokens.", expected="text to index", fix="choose another split or data")
    key_array = torch.cat(keys).numpy()
    started = time.perf_counter()
    index = build_index(key_array, index_options)
    build_seconds = time.perf_counter() - started
    name = index_options.name or f"{split}-{index_options.type}"
    path = run.run_dir / DATASTORES / name
    path.mkdir(parents=True, exist_ok=True)
    faiss.write_index(index, str(path / "index.faiss"))
    torch.save(torch.cat(values), path / "values.pt")
    info = {
        "path": str(path), "name": name, "split": split, "data_overrides": list(data_overrides), "checkpoint": run.checkpoint.name,
        "type": index_options.type, "options": asdict(index_options), "entries": int(index.ntotal),
        "dimension": int(key_array.shape[1]), "index_bytes": (path / "index.faiss").stat().st_size,
        "build_seconds": round(build_seconds, 4), "encode_seconds": round(encode_seconds, 3),
    }
    (path / "datastore.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_datastore(run_dir: Path, name: str) -> tuple[Any, Tensor, dict[str, Any]]:
    """The faiss index, the next-token values and the description of a datastore (a name in
    ``<run_dir>/knn_lm/`` or a folder)."""
    path = Path(name).expanduser()
    if not (path / "index.faiss").is_file():
        path = Path(run_dir) / DATASTORES / name
    if not name or not (path / "index.faiss").is_file():
        built = sorted(p.name for p in (Path(run_dir) / DATASTORES).glob("*") if (p / "index.faiss").is_file())
        raise ConfigError(
            f"No kNN-LM datastore {name!r} for {run_dir}.",
            expected=f"knn_lm.index=<one of {', '.join(built) or 'none built yet'}> or a datastore folder",
            fix=f"build one with: plugformer index {run_dir} [split=train]",
        )
    index = require_faiss().read_index(str(path / "index.faiss"))
    return index, torch.load(path / "values.pt"), json.loads((path / "datastore.json").read_text())


def knn_log_probs(distances: Tensor, neighbour_tokens: Tensor, targets: Tensor, temperature: float) -> Tensor:
    """log p_kNN(target) per query: softmax of −distance/T over the neighbours, summed over
    those whose token is the target (−inf when none is)."""
    weights = (-distances / temperature).log_softmax(-1)
    return weights.masked_fill(neighbour_tokens != targets[:, None], float("-inf")).logsumexp(-1)


def interpolate(lm: Tensor, knn: Tensor, lmbda: float) -> Tensor:
    """log(λ·p_kNN + (1 − λ)·p_LM), exactly log p_LM when λ = 0."""
    if lmbda == 0.0:
        return lm
    if lmbda == 1.0:
        return knn
    return torch.logaddexp(knn + math.log(lmbda), lm + math.log1p(-lmbda))


def evaluate_knn_lm(run: Any, options_in: dict[str, Any], loader: Iterable[dict[str, Tensor]]) -> dict[str, float]:
    """Perplexity with (``perplexity``) and without (``lm_perplexity``) retrieval over the
    same scored tokens, the share of tokens whose target is among the neighbours, and the
    search time per token (wall clock of the faiss searches alone)."""
    options: KnnLMOptions = _options(KnnLMOptions, options_in, "knn_lm")
    _check_causal_lm(run)
    index, values, info = load_datastore(run.run_dir, options.index)
    faiss = require_faiss()
    if hasattr(index, "nprobe"):
        index.nprobe = options.nprobe
    if isinstance(index, faiss.IndexHNSWFlat):
        index.hnsw.efSearch = options.ef_search
    lm_total = mixed_total = 0.0
    tokens = hits = 0
    search_seconds = 0.0
    for hidden, targets, lm in final_states(run, loader):
        started = time.perf_counter()
        distances, ids = index.search(hidden.numpy(), options.k)
        search_seconds += time.perf_counter() - started
        ids_t = torch.from_numpy(ids)
        found = ids_t >= 0
        neighbour_tokens = torch.where(found, values[ids_t.clamp(min=0)], torch.full_like(ids_t, -1))
        distances_t = torch.from_numpy(distances).masked_fill(~found, float("inf"))
        knn = knn_log_probs(distances_t, neighbour_tokens, targets, options.temperature)
        mixed = interpolate(lm, knn, options.lmbda)
        lm_total -= float(lm.sum())
        mixed_total -= float(mixed.sum())
        hits += int((neighbour_tokens == targets[:, None]).any(-1).sum())
        tokens += targets.numel()
    if tokens == 0:
        raise ConfigError("The evaluated split has no scored tokens.", expected="text to evaluate", fix="choose another split")
    return {
        "perplexity": math.exp(min(mixed_total / tokens, 700.0)),
        "lm_perplexity": math.exp(min(lm_total / tokens, 700.0)),
        "loss": mixed_total / tokens,
        "lm_loss": lm_total / tokens,
        "target_in_neighbours": hits / tokens,
        "tokens": float(tokens),
        "datastore_entries": float(info["entries"]),
        "search_ms_per_token": 1000.0 * search_seconds / tokens,
    }
