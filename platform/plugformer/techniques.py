"""What a technique's factory receives: the run's config, the registry, the run directory,
a way to load an earlier run (a teacher), and a place for frozen auxiliary modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from plugformer.api import LoadedRun
    from plugformer.plugins import Plugins
    from plugformer.registry import Registry


@dataclass
class TechniqueContext:
    """A technique factory is called as ``factory(config, ctx)`` with this context.

    ``cfg`` is the run's composed config (read-only), ``registry`` every installed component,
    ``run_dir`` the run's folder. :meth:`load_run` loads an earlier run's model, config and
    tokenizer. :meth:`add_frozen` registers an auxiliary module (a teacher): it is put in
    eval mode with gradients off, follows the model to its device, and is kept out of the
    optimizer and of checkpoints.
    """

    cfg: DictConfig
    registry: Registry
    run_dir: Path
    frozen: dict[str, nn.Module] = field(default_factory=dict)
    trainable: dict[str, nn.Module] = field(default_factory=dict)
    plugins: Plugins | None = field(default=None, repr=False)

    def load_run(self, run_dir: str | Path, *, checkpoint: str = "best") -> LoadedRun:
        """An earlier run's model (eval mode), config and data task with its tokenizer."""
        from plugformer.api import load_run

        return load_run(run_dir, checkpoint=checkpoint, plugins=self.plugins)

    def add_frozen(self, name: str, module: nn.Module) -> nn.Module:
        """Keep ``module`` frozen beside the model under ``name``; returns it."""
        if name in self.frozen:
            raise ValueError(f"a frozen module named {name!r} is already registered")
        module.eval().requires_grad_(False)
        self.frozen[name] = module
        return module

    def add_trainable(self, name: str, module: nn.Module) -> nn.Module:
        """Train ``module`` beside the model under ``name`` (optimized, checkpointed, not part of
        the model); returns it. Register it when the technique is created or in ``model_built``."""
        if name in self.trainable:
            raise ValueError(f"a trainable auxiliary module named {name!r} is already registered")
        self.trainable[name] = module
        return module
