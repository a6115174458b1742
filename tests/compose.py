"""Compose plugformer's config in-process, exactly as `plugformer train` does."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from plugformer.config import store_core_configs


def compose_train(*overrides: str) -> DictConfig:
    store_core_configs()
    with initialize_config_module(config_module="plugformer.conf", version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))
