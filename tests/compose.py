"""Compose plugformer's config in-process, exactly as `plugformer train` does."""

from __future__ import annotations

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from plugformer.config import store_core_configs

#: Tests compare components, so they start from plain attention in every layer.
PLAIN = "experiment=plain"


def compose_train(*overrides: str) -> DictConfig:
    """The train config for ``overrides``, starting from ``experiment=plain`` (the chosen
    attention in every layer) rather than the default run's hybrid recipe; an
    ``experiment=`` among the overrides replaces it."""
    store_core_configs()
    with initialize_config_module(config_module="plugformer.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[PLAIN, *overrides])
