"""Memory preflight: estimate a training run's peak memory from its config, before data or
model are built, and refuse (or warn) when it cannot fit the device.

The estimate, in bytes, per training process:

- **framework**: the process itself with torch, Lightning, W&B and ``datasets`` imported
  (measured: about 0.55 GiB resident on CPU; not counted against GPU memory);
- **weights**: parameters, their gradients and AdamW's two moments, 4 × 4 bytes per
  parameter, parameters counted from the sizes (embeddings, a learned position table,
  attention 4·d², feed-forward 2·d·hidden per expert, cross-attention 4·d²); under
  ``trainer=fsdp`` the sharded part divided by the ranks sharing it (all 16 bytes with
  FULL_SHARD, the 12 of gradients and AdamW with SHARD_GRAD_OP; HYBRID_SHARD shards over
  one node's ranks);
- **activations**: what each layer keeps for the backward pass, about 20 values per token
  and model dimension (norms, q/k/v, attention output, the feed-forward's hidden layer and
  the residuals; 24 with dropout), plus the embedding output and, for token-level
  objectives, the logits (batch × length × vocabulary, kept with their log-softmax and
  gradient);
- **attention**: each layer's own cost at the data's longest sequence and batch size, from
  the attention's declared cost class (``Capabilities.cost``). ``quadratic`` materialises
  the batch × heads × n × n scores when SDPA takes its explicit path: with dropout on CPU
  (torch's fused CPU kernel has no dropout), 9 bytes a score kept (softmax, dropout mask,
  dropped copy) plus two score matrices in flight during one layer's backward; otherwise
  SDPA's fused kernels (flash on CPU, memory-efficient on GPU) take the key padding mask
  without the scores (measured with torch 2.13 on CPU: 64 MiB of scores, 4 MiB kept), and
  only the batch × n × n boolean mask of a padded batch stays per layer. ``n·w`` (and
  ``n·√n``, w = √n unless the config has a ``window`` or ``block_size``) keeps
  batch × heads × n × 2w (``window`` from its config), ``linear`` and ``n·log n`` a few
  values per token. An attention that declares no cost class is counted as quadratic. A
  cross-attention is counted like a self-attention over the source.

The data's longest sequence comes from the data component's ``max_length`` capability and
the batch from its ``batch_size`` option; the vocabulary from a ``vocab_size`` (or
``bpe_vocab_size``) option, else 256. On CPU every training process of the node shares the
RAM (available: ``MemAvailable`` of /proc/meminfo, and the cgroup's limit when it has one);
on a GPU each process has its device (``torch.cuda.mem_get_info``). ``memory_check=refuse``
(default) stops a run whose estimate exceeds what is available, with the estimate, its
largest parts and what to change; ``warn`` prints the same and trains; ``off`` skips it.
``tests/test_memory.py`` keeps the estimate within a factor of 2 of measured peaks.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from plugformer.errors import ConfigError, PlugformerError

GIB = 1024**3
FRAMEWORK_BYTES = int(0.55 * GIB)
DEFAULT_VOCAB = 256
MODES = ("refuse", "warn", "off")


class InsufficientMemoryError(PlugformerError):
    """A run whose estimated peak memory does not fit the device (the memory preflight);
    ``estimate`` and ``available`` (bytes) say by how much."""

    def __init__(self, what: str, *, estimate: Estimate, available: int, expected: str | None = None, fix: str | None = None) -> None:
        super().__init__(what, expected=expected, fix=fix)
        self.estimate = estimate
        self.available = available


@dataclass
class Estimate:
    """Bytes by part for one training process; ``processes`` share the memory (CPU ranks)."""

    parts: dict[str, int]
    notes: dict[str, str]
    per_example: int  # the bytes that grow with the batch size (activations, attention)
    batch_size: int
    length: int
    processes: int = 1
    device: str = "cpu"
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def per_process(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        return self.per_process * self.processes

    def largest_parts(self, count: int = 4) -> str:
        ranked = sorted(self.parts.items(), key=lambda item: -item[1])[:count]
        return ", ".join(f"{name} {gib(value)}" + (f" ({self.notes[name]})" if self.notes.get(name) else "") for name, value in ranked)

    def as_dict(self) -> dict[str, Any]:
        return {
            "estimate_bytes": self.total, "per_process_bytes": self.per_process, "processes": self.processes,
            "device": self.device, "parts_bytes": dict(self.parts), "batch_size": self.batch_size, "length": self.length,
        }


def gib(value: float) -> str:
    return f"{value / GIB:.1f} GiB" if value >= 0.1 * GIB else f"{value / 1024**2:.0f} MiB"


def _option(config: Any, *names: str) -> Any:
    for name in names:
        if config is not None and any(f.name == name for f in fields(config)) and getattr(config, name) is not None:
            return getattr(config, name)
    return None


def _ffn_parameters(ffn: Any, d: int) -> int:
    expansion = _option(ffn.config, "expansion")
    hidden = _option(ffn.config, "hidden") or (int(expansion * d) if expansion else 4 * d)
    matrices = 3 if ffn.name == "glu" or "glu" in ffn.name else 2
    experts = _option(ffn.config, "num_experts") or 1
    return experts * matrices * d * hidden


def _activation_bytes(device: str, cfg: Any) -> int:
    precision = str((cfg.get("trainer") or {}).get("precision") or "32")
    return 2 if "16" in precision else 4


def _attention_bytes(attention: Any, b: int, n: int, d: int, heads: int, padded: bool, dropout: bool, device: str) -> tuple[int, int, str]:
    """(kept for backward, in flight during one layer's backward, note) for one layer."""
    cost = attention.component.capabilities_for(attention.config).cost or "quadratic"
    # The (batch, 1, n, n) boolean mask SDPA keeps per layer; sub-quadratic attentions build none.
    mask = b * n * n if padded and cost == "quadratic" else 0
    if cost == "quadratic" and dropout and device == "cpu":
        # SDPA's explicit path (CPU's fused kernel takes no dropout): the scores, their
        # softmax, the dropout mask and the dropped copy; 13 bytes a score at the forward's
        # peak (measured), of which softmax, mask and dropped copy stay for the backward.
        scores = b * heads * n * n
        note = f"{attention.name}: batch {b} × {heads} heads × {n}² scores per layer (dropout on CPU)"
        return scores * 9 + mask, scores * 8, note
    if cost in ("n·w", "n·√n"):  # a window of w keys, or about √n keys (sparse block patterns)
        default = math.isqrt(n) if cost == "n·√n" else 128
        window = min(n, int(_option(attention.config, "window", "block_size", "stride", "block") or default))
        scores = b * heads * n * 2 * window
        kept = scores * (9 if dropout else 4)
        return kept + mask, 2 * scores * 4, f"{attention.name}: batch {b} × {heads} heads × {n} × 2·{window} per layer"
    note = f"{attention.name}: a batch {b} × {n}² padding mask per layer" if mask > 32 * 2**20 else ""
    return 4 * b * n * d * 4 + mask, 0, note


def estimate(cfg: Any, chosen: dict[str, Any], plan: Any, processes: int = 1, device: str = "cpu") -> Estimate | None:
    """The peak memory of training this config, or None when the data component declares
    no ``max_length`` or has no ``batch_size`` option (nothing to estimate from)."""
    data = chosen["data"]
    n = data.component.capabilities_for(data.config).max_length
    b = _option(data.config, "batch_size")
    if not n or not b:
        return None
    model = cfg.model
    d, heads, dropout = int(model.d_model), int(model.n_heads), float(model.get("dropout") or 0.0) > 0
    kv_heads = int(model.get("n_kv_heads") or heads)
    vocab = int(_option(data.config, "vocab_size", "bpe_vocab_size") or DEFAULT_VOCAB)
    objective = chosen["objective"].component.capabilities_for(chosen["objective"].config).provides
    token_level = "classification" not in objective
    padded = bool(objective & {"classification", "seq2seq"})  # variable-length examples; LM blocks are full
    act = _activation_bytes(device, cfg)

    params = vocab * d * (1 if model.get("tie_embeddings", True) or not token_level else 2)
    rows = _option(chosen["position"].config, "max_length")
    params += (rows or n) * d if any(f.name == "max_length" for f in fields(chosen["position"].config)) else 0
    kept = attention_kept = in_flight = 0
    notes: list[str] = []
    for layer in plan.layers():
        params += d * (d + 2 * d * kv_heads // heads) + d * d + _ffn_parameters(layer.ffn, d) + 4 * d
        kept += (24 if dropout else 20) * b * n * d * act
        mine, flight, note = _attention_bytes(layer.attention, b, n, d, heads, padded, dropout, device)
        if layer.cross_attention is not None:
            params += 4 * d * d
            cross, cross_flight, _ = _attention_bytes(layer.cross_attention, b, n, d, heads, True, dropout, device)
            mine, flight = mine + cross, max(flight, cross_flight)
        attention_kept += mine
        in_flight = max(in_flight, flight)
        if note and note not in notes:
            notes.append(note)
    embeddings = 2 * b * n * d * act * len(plan.stacks)
    logits = 12 * b * n * vocab if token_level else 0
    parts = {
        "framework": FRAMEWORK_BYTES if device == "cpu" else 0,
        "weights, gradients, AdamW": _weight_bytes(cfg, params, processes if device == "cpu" else None),
        "activations": kept + embeddings + logits,
        "attention": attention_kept + in_flight,
    }
    layers = len(plan.layers())
    return Estimate(
        parts=parts,
        notes={"attention": "; ".join(notes) + (f"; {layers} layers" if notes else ""), "weights, gradients, AdamW": f"{params:,} parameters"},
        per_example=(parts["activations"] + parts["attention"]) // b,
        batch_size=int(b), length=int(n), processes=processes, device=device,
        details={"parameters": params},
    )


def _weight_bytes(cfg: Any, params: int, node_processes: int | None) -> int:
    """Parameters, gradients and AdamW state held by one process: 16 bytes a parameter,
    less what ``trainer=fsdp`` shards over its ranks (``node_processes``: the processes of
    this node, or None to count the node's devices)."""
    trainer = cfg.get("trainer") or {}
    if str(trainer.get("strategy") or "").lower() != "fsdp":
        return 16 * params
    per_node = node_processes or _devices(trainer.get("devices"))
    options = trainer.get("fsdp") or {}
    choice = options.get("sharding_strategy") or "FULL_SHARD"
    sharding = str(getattr(choice, "value", choice))  # an Enum in a composed config, a string read back
    ranks = per_node * (1 if sharding == "HYBRID_SHARD" else int(trainer.get("num_nodes") or 1))
    if ranks <= 1:
        return 16 * params
    sharded = 12 if sharding == "SHARD_GRAD_OP" else 16
    return (16 - sharded) * params + sharded * params // ranks


def _devices(devices: Any) -> int:
    if isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        return int(devices)
    if isinstance(devices, (list, tuple)) or hasattr(devices, "__len__") and not isinstance(devices, str):
        return len(devices)
    import torch

    return max(1, torch.cuda.device_count())  # "auto" or -1: every GPU of the node


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_available() -> int | None:
    """What the cgroup (v2) still allows this process tree, when it sets a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - used)


def available(device: str) -> tuple[int | None, str]:
    """(bytes available, where the figure comes from) for ``device`` ("cpu" or "cuda")."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free), f"free memory of {torch.cuda.get_device_name()}"
    figures = {name: value for name, value in (("MemAvailable", _meminfo_available()), ("the cgroup's limit", _cgroup_available())) if value is not None}
    if not figures:
        return None, "unknown"
    where = min(figures, key=figures.__getitem__)
    return figures[where], f"CPU RAM ({where})"


def device_of(cfg: Any) -> str:
    accelerator = str((cfg.get("trainer") or {}).get("accelerator") or "auto")
    if accelerator in ("gpu", "cuda"):
        return "cuda"
    if accelerator == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def check_memory(cfg: Any, chosen: dict[str, Any], plan: Any, processes: int = 1) -> tuple[Estimate | None, str]:
    """Estimate the run's peak memory and compare it with what the device has; returns the
    estimate and a line for the console. Raises :class:`InsufficientMemoryError` when it does not fit
    and ``memory_check`` is ``refuse``; prints the refusal as a warning with ``warn``."""
    mode = str(cfg.get("memory_check") or "refuse")
    if mode not in MODES:
        raise ConfigError(f"memory_check={mode!r} is not a mode.", expected=" or ".join(MODES), fix="memory_check=refuse")
    if mode == "off":
        return None, "memory check off"
    device = device_of(cfg)
    found = estimate(cfg, chosen, plan, processes=processes if device == "cpu" else 1, device=device)
    if found is None:
        return None, "memory not estimated (the data declares no max_length or batch_size)"
    free, where = available(device)
    if free is None:
        return found, f"memory estimate {gib(found.total)} (available memory unknown)"
    line = f"memory estimate {gib(found.total)} of {gib(free)} available ({where})"
    if found.total <= free:
        return found, line
    error = refusal(found, free, where, cfg)
    if mode == "warn":
        import warnings

        warnings.warn(f"plugformer: {error.message()} (memory_check=warn: training anyway)", stacklevel=2)
        return found, line + " — over, memory_check=warn"
    raise error


def refusal(found: Estimate, free: int, where: str, cfg: Any) -> InsufficientMemoryError:
    shared = f" for {found.processes} processes" if found.processes > 1 else ""
    what = (
        f"This run needs about {gib(found.total)} of memory at its peak{shared}, but {gib(free)} are available ({where}). "
        f"Largest parts: {found.largest_parts()}."
    )
    fixed = found.per_process - found.per_example * found.batch_size
    budget = free // found.processes - fixed
    fits = int(budget // found.per_example) if found.per_example and budget > 0 else 0
    fixes = []
    if 1 <= fits < found.batch_size:
        steps = math.ceil(found.batch_size / fits)
        fixes.append(f"data.batch_size={fits} with trainer.accumulate_grad_batches={steps} (the same batch per update)")
    if "dropout on CPU" in found.notes.get("attention", ""):
        fixes.append("model.dropout=0.0 (full attention then runs the fused kernel, without the n×n scores)")
    fixes.append(f"shorter sequences than {found.length}")
    if "²" in found.notes.get("attention", ""):
        fixes.append("an attention with a lower cost (model/attention=local or linear)")
    fixes.append("fewer or narrower layers")
    if found.device == "cpu":
        fixes.append("a GPU (trainer=gpu)")
    fixes.append("memory_check=warn to try anyway")
    return InsufficientMemoryError(
        what,
        estimate=found,
        available=free,
        expected="an estimated peak within the available memory (the estimate is within about 2× of measured peaks)",
        fix="; or ".join(fixes),
    )
