"""Cross-layer parameter sharing (Lan et al. 2020, "ALBERT"): the layers of a stack use one
set of sublayer modules instead of one each.

Sharing is done by module identity: layer i's sublayer attribute (``attention``, ``ffn``, a
norm, ...) is set to the module object of an earlier layer, so the layers hold the same
``nn.Parameter`` s, every layer's gradient accumulates into them, and ``model.parameters()``
(which yields each Parameter once) counts them once. The blocks themselves stay distinct
objects (forward hooks on a block still see one layer), and the model's state_dict keeps a
key per layer, so a checkpoint loads into a freshly shared model and keeps the sharing
(``load_state_dict`` copies into the one shared tensor)."""

from __future__ import annotations

from typing import Any

from torch import nn

from plugformer_plugins.technique.layers import stack_blocks

#: What each mode shares: ``all`` every sublayer of a block (attentions, feed-forward,
#: norms); ``attention`` the self- and cross-attention; ``ffn`` the feed-forward sublayer.
MODES: dict[str, tuple[str, ...] | None] = {
    "none": (),
    "all": None,  # None: every child module of the block
    "attention": ("attention", "cross_attention"),
    "ffn": ("ffn",),
}


def signature(module: nn.Module) -> tuple[Any, ...]:
    """What two modules must agree on to be shared: their class and the name and shape of
    every tensor in their state_dict."""
    return (type(module), tuple((name, tuple(t.shape)) for name, t in module.state_dict().items()))


def _parts(block: nn.Module, mode: str) -> list[str]:
    names = MODES[mode]
    if names is None:
        return [name for name, child in block.named_children()]
    return [name for name in names if isinstance(getattr(block, name, None), nn.Module)]


def share_layers(model: nn.Module, mode: str) -> dict[str, list[list[int]]]:
    """Share the sublayers that ``mode`` names across the layers of each stack of ``model``
    (in place). Layer i takes, for each part, the module of the first earlier layer whose
    module has the same :func:`signature`; layers with another kind of module there (a
    hybrid plan: convolution and attention layers) form a group of their own. Returns the
    groups of layer indices that share one module, by ``<stack>.<part>``."""
    groups: dict[str, list[list[int]]] = {}
    for stack, blocks in stack_blocks(model).items():
        canonical: dict[str, list[tuple[tuple[Any, ...], nn.Module, list[int]]]] = {}
        for index, block in enumerate(blocks):
            for part in _parts(block, mode):
                module = getattr(block, part)
                key = signature(module)
                if not key[1]:
                    continue  # nothing to share (dropout, identity)
                found = canonical.setdefault(part, [])
                match = next((entry for entry in found if entry[0] == key), None)
                if match is None:
                    found.append((key, module, [index]))
                    continue
                setattr(block, part, match[1])
                match[2].append(index)
        for part, entries in canonical.items():
            groups[f"{stack}.{part}"] = [indices for _, _, indices in entries]
    return groups


def unique_parameter_count(model: nn.Module) -> int:
    """Parameters of ``model``, each shared Parameter once."""
    return sum(p.numel() for p in model.parameters())
