"""Typed schemas of the core's own config nodes (model sizes, optimizer), stored in Hydra's
ConfigStore so that overrides like ``model.d_model=abc`` fail with Hydra's type error."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from plugformer.bounds import METADATA_KEY, bounds, check_bounds
from plugformer.errors import ConfigError


@dataclass
class PlanConfig:
    """Per-layer choices (layer plans). ``attention``, ``ffn``, ``block`` and
    ``cross_attention`` are repeating patterns of component names over a stack's layers
    (``[local, local, full]``: two local layers then a full one, repeated); empty means the
    group's choice (``model/attention=...``) in every layer. ``layers`` overrides single
    layers by index (``layers: {"0": {ffn: glu}}``; ``"encoder.0"`` for one stack only); a
    value is a component name or a node with ``name`` and options. ``options`` holds options
    of components named in a plan by kind and name (``options.attention.local.window=16``);
    a name that is also the group's choice takes the group's options."""

    attention: list[str] = field(default_factory=list)
    ffn: list[str] = field(default_factory=list)
    block: list[str] = field(default_factory=list)
    cross_attention: list[str] = field(default_factory=list)
    layers: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """Sizes of the model. ``n_layers`` is the number of layers of each stack unless
    ``encoder_layers``/``decoder_layers`` set them; ``n_kv_heads`` (None: ``n_heads``) gives
    multi-query (1) or grouped-query attention. ``head_dim`` (None: d_model / n_heads) sets
    the width of each attention head explicitly; the attention then projects to
    n_heads·head_dim and back. ``vocab_size`` (None: the data task's vocabulary) gives the
    token embedding and output head more rows than the tokenizer has ids (padding to a
    multiple of 64, or an imported model's vocabulary); it may not be smaller than the data's."""

    d_model: int = field(default=128, metadata=bounds(ge=1))
    n_layers: int = field(default=2, metadata=bounds(ge=1))
    n_heads: int = field(default=4, metadata=bounds(ge=1))
    n_kv_heads: Optional[int] = field(default=None, metadata=bounds(ge=1))
    head_dim: Optional[int] = field(default=None, metadata=bounds(ge=1))
    vocab_size: Optional[int] = field(default=None, metadata=bounds(ge=1))
    encoder_layers: Optional[int] = field(default=None, metadata=bounds(ge=1))
    decoder_layers: Optional[int] = field(default=None, metadata=bounds(ge=1))
    dropout: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))
    tie_embeddings: bool = True
    plan: PlanConfig = field(default_factory=PlanConfig)
    # The chosen components' configs; composed from the model/<kind> groups.
    attention: Any = None
    cross_attention: Any = None
    position: Any = None
    norm: Any = None
    ffn: Any = None
    block: Any = None


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then the schedule down to ``lr * min_lr_ratio``."""

    lr: float = field(default=1e-3, metadata=bounds(gt=0.0))
    weight_decay: float = field(default=0.1, metadata=bounds(ge=0.0))
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95], metadata=bounds(ge=0.0, lt=1.0))
    eps: float = field(default=1e-8, metadata=bounds(gt=0.0))
    warmup_steps: int = field(default=100, metadata=bounds(ge=0))
    schedule: Schedule = Schedule.cosine
    min_lr_ratio: float = field(default=0.1, metadata=bounds(ge=0.0, le=1.0))


class ShardingStrategy(str, Enum):
    """What FSDP shards (torch.distributed.fsdp.ShardingStrategy): parameters, gradients and
    optimizer state (FULL_SHARD); gradients and optimizer state, with parameters kept whole
    between forward and backward (SHARD_GRAD_OP); FULL_SHARD within a node and replicas
    across nodes (HYBRID_SHARD, GPUs only)."""

    FULL_SHARD = "FULL_SHARD"
    SHARD_GRAD_OP = "SHARD_GRAD_OP"
    HYBRID_SHARD = "HYBRID_SHARD"


class StateDictType(str, Enum):
    sharded = "sharded"  # a checkpoint directory: one shard file per rank, written in parallel
    full = "full"  # one checkpoint file, gathered on rank 0


@dataclass
class FSDPConfig:
    """``trainer.fsdp.*`` (``trainer=fsdp``; read by :mod:`plugformer.training.fsdp`). Every
    block class of the built model is its own FSDP unit; ``activation_checkpointing``
    recomputes each block's activations in the backward pass; ``reduce_in_fp32`` reduces
    gradients in float32 when ``trainer.precision`` is a mixed one (parameters are gathered
    and computed in its 16-bit type); ``cpu_offload`` keeps the parameter shards in CPU memory."""

    sharding_strategy: ShardingStrategy = ShardingStrategy.FULL_SHARD
    activation_checkpointing: bool = False
    state_dict_type: StateDictType = StateDictType.sharded
    reduce_in_fp32: bool = True
    cpu_offload: bool = False


def store_core_configs(store: ConfigStore | None = None) -> None:
    store = store or ConfigStore.instance()
    store.store(group="model", name="default", node=ModelConfig)
    store.store(group="optim", name="adamw", node=OptimConfig)
    # conf/trainer/fsdp.yaml takes its `fsdp:` node from here, so its options are typed.
    store.store(group="trainer/fsdp", name="options", node=FSDPConfig)


def optim_config(cfg: DictConfig) -> OptimConfig:
    """The run's optimizer settings as a typed object (also for configs read back from YAML)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), cfg.optim))


@dataclass
class TrainerBounds:
    """Ranges of the common Lightning Trainer arguments (``trainer.*`` passes through to
    Lightning untyped); checked early so a bad value is not a traceback minutes later."""

    max_steps: Optional[int] = field(default=None, metadata=bounds(ge=-1))
    max_epochs: Optional[int] = field(default=None, metadata=bounds(ge=-1))
    val_check_interval: Optional[float] = field(default=None, metadata=bounds(gt=0))
    check_val_every_n_epoch: Optional[int] = field(default=None, metadata=bounds(ge=1))
    log_every_n_steps: Optional[int] = field(default=None, metadata=bounds(ge=1))
    accumulate_grad_batches: Optional[int] = field(default=None, metadata=bounds(ge=1))
    gradient_clip_val: Optional[float] = field(default=None, metadata=bounds(ge=0))
    limit_train_batches: Optional[float] = field(default=None, metadata=bounds(ge=0))
    limit_val_batches: Optional[float] = field(default=None, metadata=bounds(ge=0))
    overfit_batches: Optional[float] = field(default=None, metadata=bounds(ge=0))
    num_sanity_val_steps: Optional[int] = field(default=None, metadata=bounds(ge=-1))


def check_core_config(cfg: DictConfig) -> None:
    """Reject model sizes, optimizer settings and common Trainer arguments outside their
    declared bounds, in one :class:`plugformer.ConfigError`, before any data or model is built."""
    errors: list[ConfigError] = []
    for schema, path in ((ModelConfig, "model"), (OptimConfig, "optim"), (TrainerBounds, "trainer")):
        node = OmegaConf.to_container(cfg[path], resolve=True) if cfg.get(path) is not None else {}
        bounded = {f.name: node[f.name] for f in fields(schema) if METADATA_KEY in f.metadata and f.name in node}
        try:
            check_bounds(schema(**bounded), path)
        except ConfigError as error:
            errors.append(error)
    if errors:
        raise ConfigError(" ".join(e.what for e in errors), fix="; ".join(e.fix or "" for e in errors))
