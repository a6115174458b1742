"""plugformer: an experiment platform for Transformer variants, composed from plugins.

This module is the public API that plugins build on (built-in and third-party alike), and
the Python API beside the CLI: :func:`compose`, :func:`build`, :func:`train`,
:func:`load_run`, :func:`evaluate`.
"""

from plugformer.api import Built, LoadedRun, build, compose, load_run, train
from plugformer.attention import Attention, AttentionState, KVCache, causal_allowed, repeat_kv
from plugformer.blocks import Block, BlockParts, LayerState, StepInputs
from plugformer.bounds import Bounds, bounds, check_bounds
from plugformer.capabilities import Capabilities
from plugformer.evaluation import evaluate
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
from plugformer.errors import (
    CapabilityError,
    ConfigError,
    DataError,
    PlugformerError,
    PluginError,
    UnknownComponentError,
)
from plugformer.hookspecs import hookimpl
from plugformer.masks import allowed_keys, no_key_fallback
from plugformer.parameters import keep_initialization, set_weight_decay
from plugformer.registry import KINDS, Component, Provider, Registry, RegistryView
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
    "LoadedRun",
    "ModelInputs",
    "Objective",
    "ObjectiveOutput",
    "PlugformerError",
    "PluginError",
    "PositionEncoding",
    "Provider",
    "Registry",
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
    "repeat_kv",
    "set_weight_decay",
    "train",
]
