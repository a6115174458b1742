"""What both architectures share: the unsupported-option error and option checks."""

from __future__ import annotations

from typing import Any

from plugformer.errors import ConfigError


class UnsupportedModelError(ConfigError):
    """A Hugging Face model (or a plugformer run) uses something the converter cannot express exactly."""


def unsupported(what: str, *, expected: str, fix: str) -> UnsupportedModelError:
    return UnsupportedModelError(what, expected=expected, fix=fix)


def require(config: dict[str, Any], key: str, allowed: Any, architecture: str, default: Any = None) -> None:
    """Refuse ``config[key]`` unless it is in ``allowed`` (a value or a tuple of values)."""
    value = config.get(key, default)
    choices = allowed if isinstance(allowed, tuple) else (allowed,)
    if value not in choices:
        raise unsupported(
            f"{architecture} config.json has {key}={value!r}, which plugformer cannot express exactly.",
            expected=f"{key} in {list(choices)}",
            fix=f"convert a model with {key}={choices[0]!r}, or add the option to the matching plugformer component",
        )


def plugformer_node(cfg: Any, path: str) -> Any:
    """``cfg.model.<path>`` as a plain value (a DictConfig node or a value)."""
    from omegaconf import OmegaConf

    node = OmegaConf.select(cfg, path)
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if OmegaConf.is_config(node) else node


def check_run_option(cfg: Any, path: str, allowed: Any, architecture: str) -> None:
    """Refuse a run whose ``path`` option is not in ``allowed`` for export as ``architecture``."""
    value = plugformer_node(cfg, path)
    choices = allowed if isinstance(allowed, tuple) else (allowed,)
    if value not in choices:
        raise unsupported(
            f"The run has {path}={value!r}; Hugging Face {architecture} has no equivalent.",
            expected=f"{path} in {list(choices)}",
            fix=f"export runs trained with {path}={choices[0]!r}",
        )
