"""plugformer: an experiment platform for Transformer variants, composed from plugins.

This module is the public API that plugins build on (built-in and third-party alike), and
the Python API beside the CLI: :func:`compose`, :func:`build`, :func:`train`,
:func:`load_run`, :func:`evaluate`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Light modules, imported at once: the CLI's errors, and ``bounds`` (also the name of its
# module, which an import of ``plugformer.bounds`` would otherwise put in place of the function).
from plugformer.bounds import Bounds, bounds, check_bounds
from plugformer.errors import (
    CapabilityError,
    ConfigError,
    DataError,
    PlugformerError,
    PluginError,
    UnknownComponentError,
)

#: Every other export → the module that defines it, imported on first use (PEP 562), so
#: ``plugformer --help`` and ``plugformer plugins`` start without torch's optional parts,
#: Lightning, W&B or ``datasets``; tests/test_startup.py keeps it so.
_LAZY = {
    **dict.fromkeys(("Built", "LoadedRun", "build", "compose", "load_run", "train"), "plugformer.api"),
    **dict.fromkeys(("Attention", "AttentionState", "KVCache", "causal_allowed", "repeat_kv"), "plugformer.attention"),
    **dict.fromkeys(("Block", "BlockParts", "LayerState", "StepInputs"), "plugformer.blocks"),
    "Capabilities": "plugformer.capabilities",
    **dict.fromkeys(("allowed_keys", "no_key_fallback"), "plugformer.masks"),
    **dict.fromkeys(("keep_initialization", "set_weight_decay"), "plugformer.parameters"),
    "evaluate": "plugformer.evaluation",
    "Chosen": "plugformer.compatibility",
    **dict.fromkeys(
        (
            "BuildContext", "DataContext", "DataTask", "FeedForward", "ModelInputs", "Objective", "ObjectiveOutput",
            "PositionEncoding", "mark_residual_projection",
        ),
        "plugformer.components",
    ),
    "hookimpl": "plugformer.hookspecs",
    **dict.fromkeys(("KINDS", "Component", "LazyComponent", "Provider", "Registry", "RegistryView"), "plugformer.registry"),
    **dict.fromkeys(("ReversibleBlock", "run_reversible"), "plugformer.reversible"),
    "TechniqueContext": "plugformer.techniques",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'plugformer' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from plugformer.api import Built, LoadedRun, build, compose, load_run, train
    from plugformer.attention import Attention, AttentionState, KVCache, causal_allowed, repeat_kv
    from plugformer.blocks import Block, BlockParts, LayerState, StepInputs
    from plugformer.capabilities import Capabilities
    from plugformer.compatibility import Chosen
    from plugformer.components import (
        BuildContext,
        DataContext,
        DataTask,
        FeedForward,
        ModelInputs,
        Objective,
        ObjectiveOutput,
        PositionEncoding,
        mark_residual_projection,
    )
    from plugformer.evaluation import evaluate
    from plugformer.hookspecs import hookimpl
    from plugformer.masks import allowed_keys, no_key_fallback
    from plugformer.parameters import keep_initialization, set_weight_decay
    from plugformer.registry import KINDS, Component, LazyComponent, Provider, Registry, RegistryView
    from plugformer.reversible import ReversibleBlock, run_reversible
    from plugformer.techniques import TechniqueContext

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "Attention",
    "Bounds",
    "AttentionState",
    "Block",
    "BlockParts",
    "BuildContext",
    "Built",
    "Capabilities",
    "CapabilityError",
    "Chosen",
    "Component",
    "ConfigError",
    "DataContext",
    "DataError",
    "DataTask",
    "FeedForward",
    "KVCache",
    "LayerState",
    "LazyComponent",
    "LoadedRun",
    "ModelInputs",
    "Objective",
    "ObjectiveOutput",
    "PlugformerError",
    "PluginError",
    "PositionEncoding",
    "Provider",
    "Registry",
    "ReversibleBlock",
    "RegistryView",
    "StepInputs",
    "TechniqueContext",
    "UnknownComponentError",
    "allowed_keys",
    "bounds",
    "check_bounds",
    "build",
    "causal_allowed",
    "compose",
    "evaluate",
    "hookimpl",
    "keep_initialization",
    "load_run",
    "mark_residual_projection",
    "no_key_fallback",
    "run_reversible",
    "repeat_kv",
    "set_weight_decay",
    "train",
]
