"""How the core treats a component's parameters, and how a component opts out.

**Initialization** (:func:`plugformer.model.transformer.initialize`, once per model, after
every factory ran): every ``nn.Linear`` weight ~ N(0, 0.02) (N(0, 0.02/√(2·layers)) for a
projection marked with :func:`plugformer.mark_residual_projection`) with a zero bias, every
``nn.Embedding`` weight ~ N(0, 0.02) (GPT-2). Raw ``nn.Parameter`` s a component creates are
not touched. Then every module's ``init_weights()`` runs (children after their parents), so
a component always has the last word. A module marked with :func:`keep_initialization` is
skipped by the GPT-2 pass (it and all its submodules keep what the factory gave them, e.g.
an ``nn.Linear`` initialized to the identity); its ``init_weights()`` still runs.

**Weight decay** (:func:`plugformer.training.optim.parameter_groups`): trainable parameters
with two or more dimensions (matrices of linear layers, embeddings, tables) are decayed
with ``optim.weight_decay``; vectors and scalars (biases, norm gains, temperatures) are not.
:func:`set_weight_decay` overrides that per parameter: ``set_weight_decay(p, False)`` keeps a
matrix (a mixing matrix initialized to the identity, which decay would pull to zero) out of
decay; ``True`` decays a vector.
"""

from __future__ import annotations

from torch import nn

__all__ = ["decays", "keep_initialization", "keeps_initialization", "set_weight_decay"]

_DECAY_ATTRIBUTE = "plugformer_weight_decay"
_KEEP_INIT_ATTRIBUTE = "plugformer_keep_initialization"


def set_weight_decay(parameter: nn.Parameter, decay: bool) -> nn.Parameter:
    """Decide whether ``parameter`` is weight-decayed, whatever its shape; returns it."""
    setattr(parameter, _DECAY_ATTRIBUTE, bool(decay))
    return parameter


def decays(parameter: nn.Parameter) -> bool:
    """Whether the optimizer decays ``parameter``: its :func:`set_weight_decay` choice, else
    True for two or more dimensions."""
    choice = getattr(parameter, _DECAY_ATTRIBUTE, None)
    return parameter.dim() >= 2 if choice is None else choice


def keep_initialization(module: nn.Module) -> nn.Module:
    """Leave ``module`` and its submodules out of the model's GPT-2 initialization pass
    (their ``init_weights()`` still runs); returns the module."""
    setattr(module, _KEEP_INIT_ATTRIBUTE, True)
    return module


def keeps_initialization(module: nn.Module) -> bool:
    return bool(getattr(module, _KEEP_INIT_ATTRIBUTE, False))
