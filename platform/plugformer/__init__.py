"""plugformer: an experiment platform for Transformer variants, composed from plugins.

This module is the public API that plugins build on (built-in and third-party alike).
"""

from plugformer.bounds import Bounds, bounds, check_bounds
from plugformer.capabilities import Capabilities
from plugformer.compatibility import Chosen
from plugformer.components import (
    Attention,
    BuildContext,
    DataContext,
    DataTask,
    FeedForward,
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
from plugformer.registry import KINDS, Component, Provider, Registry

__version__ = "0.1.0"

__all__ = [
    "KINDS",
    "Attention",
    "Bounds",
    "BuildContext",
    "Capabilities",
    "CapabilityError",
    "Chosen",
    "Component",
    "ConfigError",
    "DataContext",
    "DataError",
    "DataTask",
    "FeedForward",
    "Objective",
    "ObjectiveOutput",
    "PlugformerError",
    "PluginError",
    "PositionEncoding",
    "Provider",
    "Registry",
    "UnknownComponentError",
    "bounds",
    "check_bounds",
    "hookimpl",
    "mark_residual_projection",
]
