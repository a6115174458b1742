"""Typed schemas of the core's own config nodes (model sizes, optimizer), stored in Hydra's
ConfigStore so that overrides like ``model.d_model=abc`` fail with Hydra's type error."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class Placement(str, Enum):
    """Where a block puts its norms: ``pre`` (before each sublayer, plus a final norm),
    ``post`` (after each residual addition) or ``sandwich`` (before and after each sublayer)."""

    pre = "pre"
    post = "post"
    sandwich = "sandwich"


@dataclass
class BlockConfig:
    placement: Placement = Placement.pre


@dataclass
class ModelConfig:
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.0
    tie_embeddings: bool = True
    block: BlockConfig = field(default_factory=BlockConfig)
    # The chosen components' configs; composed from the model/<kind> groups.
    attention: Any = None
    position: Any = None
    norm: Any = None
    ffn: Any = None


class Schedule(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up, then the schedule down to ``lr * min_lr_ratio``."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    schedule: Schedule = Schedule.cosine
    min_lr_ratio: float = 0.1


def store_core_configs(store: ConfigStore | None = None) -> None:
    store = store or ConfigStore.instance()
    store.store(group="model", name="default", node=ModelConfig)
    store.store(group="optim", name="adamw", node=OptimConfig)


def optim_config(cfg: DictConfig) -> OptimConfig:
    """The run's optimizer settings as a typed object (also for configs read back from YAML)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), cfg.optim))
