"""Structured pruning that removes parts for real: attention heads (smaller query, key/value
and output matrices; the attention's ``n_heads`` changes) and feed-forward neurons (smaller
feed-forward matrices), ranked by importance as in Michel et al. 2019 ("Are Sixteen Heads
Really Better than One?"): I_h = E_x |∂L/∂ξ_h| for a gate ξ_h = 1 on each head's output
(each neuron's activation), normalised per layer by its L2 norm, then ranked over all layers.

Shrinking a layer replaces its parameters with smaller ones in the module and in the
optimizer's groups, with the optimizer's per-parameter state sliced the same way, so
training continues with the same optimizer, schedule and moments for what remains."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from plugformer import Attention

# --- which layers can shrink ---------------------------------------------------------------------


def head_prunable(attention: nn.Module) -> bool:
    """An attention of the base class with one key/value head per query head (heads of
    grouped-query attention share keys and values, so they cannot go one at a time)."""
    return (
        isinstance(attention, Attention)
        and not attention.cross
        and attention.n_kv_heads == attention.n_heads
        and all(isinstance(getattr(attention, n, None), nn.Linear) for n in ("query", "key_value", "out"))
    )


def ffn_kind(ffn: nn.Module) -> str | None:
    """"mlp" (``up`` then ``down``), "glu" (``gate_and_value`` then ``down``), or None for a
    feed-forward layer whose neurons this module cannot remove (mixture of experts, ...)."""
    if not isinstance(getattr(ffn, "down", None), nn.Linear):
        return None
    if isinstance(getattr(ffn, "up", None), nn.Linear):
        return "mlp"
    if isinstance(getattr(ffn, "gate_and_value", None), nn.Linear):
        return "glu"
    return None


def ffn_width(ffn: nn.Module) -> int:
    return ffn.down.in_features


# --- shrinking -----------------------------------------------------------------------------------


def _shrink(tensor: Tensor, dim: int, keep: Tensor) -> Tensor:
    return tensor.index_select(dim, keep.to(tensor.device))


def shrink_linear(linear: nn.Linear, dim: int, keep: Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Keep rows (``dim`` 0: output features) or columns (1: input features) ``keep`` of a
    linear layer, in place: its weight (``weight_orig`` and ``weight_mask`` when it is
    pruned with ``torch.nn.utils.prune``), its bias for rows, and the optimizers' state of
    those parameters."""
    targets: list[tuple[str, int]] = [("weight", dim), ("weight_orig", dim), ("weight_mask", dim)]
    if dim == 0:
        targets += [("bias", 0), ("bias_orig", 0), ("bias_mask", 0)]
    with torch.no_grad():
        for name, axis in targets:
            if name in linear._parameters and linear._parameters[name] is not None:
                old = linear._parameters[name]
                # A new parameter, not new .data: autograd caches a parameter's shape in its
                # gradient accumulator, which a graph still alive somewhere may hold.
                new = nn.Parameter(_shrink(old.detach(), axis, keep), requires_grad=old.requires_grad)
                linear._parameters[name] = new
                for optimizer in optimizers:
                    _replace_in_optimizer(optimizer, old, new, axis, keep)
            elif name in linear._buffers and linear._buffers[name] is not None:
                linear._buffers[name] = _shrink(linear._buffers[name], axis, keep)
        if "weight_orig" in linear._parameters:  # pruned: recompute the effective weight now
            linear.weight = linear.weight_orig * linear.weight_mask
    if dim == 0:
        linear.out_features = int(keep.numel())
    else:
        linear.in_features = int(keep.numel())


def _replace_in_optimizer(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, axis: int, keep: Tensor) -> None:
    """Put ``new`` where ``old`` was in the optimizer's groups, with ``old``'s state sliced."""
    for group in optimizer.param_groups:
        group["params"] = [new if p is old else p for p in group["params"]]
    if old in optimizer.state:
        state = optimizer.state.pop(old)
        optimizer.state[new] = {
            key: _shrink(value, axis, keep) if isinstance(value, Tensor) and value.shape == old.shape else value
            for key, value in state.items()
        }


def _head_rows(heads: Tensor, head_dim: int) -> Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def keep_heads(attention: Attention, heads: Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Keep only query heads ``heads`` (sorted indices) of a multi-head attention, with their
    keys, values and output columns; ``n_heads`` and ``n_kv_heads`` become ``len(heads)``."""
    heads = heads.sort().values.cpu()
    optimizers = list(optimizers)
    rows = _head_rows(heads, attention.head_dim)
    kv_width = attention.n_kv_heads * attention.head_dim
    shrink_linear(attention.query, 0, rows, optimizers)
    shrink_linear(attention.key_value, 0, torch.cat([rows, rows + kv_width]), optimizers)
    shrink_linear(attention.out, 1, rows, optimizers)
    attention.n_heads = attention.n_kv_heads = int(heads.numel())


def keep_neurons(ffn: nn.Module, neurons: Tensor, optimizers: Iterable[torch.optim.Optimizer] = ()) -> None:
    """Keep only hidden units ``neurons`` of an MLP or GLU feed-forward layer."""
    neurons = neurons.sort().values.cpu()
    optimizers = list(optimizers)
    kind = ffn_kind(ffn)
    if kind == "mlp":
        shrink_linear(ffn.up, 0, neurons, optimizers)
    elif kind == "glu":
        width = ffn_width(ffn)
        shrink_linear(ffn.gate_and_value, 0, torch.cat([neurons, neurons + width]), optimizers)
        ffn.hidden = int(neurons.numel())
    else:
        raise ValueError(f"cannot remove neurons of {type(ffn).__name__}")
    shrink_linear(ffn.down, 1, neurons, optimizers)


# --- importance ----------------------------------------------------------------------------------


def _gate_hook(gate: Tensor, group: int) -> Callable[..., Any]:
    """A forward pre-hook multiplying the input's last dimension, in groups of ``group``
    features, by ``gate``."""

    def hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        x = args[0]
        shape = x.shape
        gated = (x.reshape(*shape[:-1], gate.numel(), group) * gate.to(x.dtype)[:, None]).reshape(shape)
        return (gated, *args[1:])

    return hook


def importance(
    model: nn.Module,
    batches: Iterable[dict[str, Tensor]],
    attentions: dict[str, Attention],
    ffns: dict[str, nn.Module],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Michel et al.'s importance of every head of ``attentions`` and every neuron of
    ``ffns``: Σ over ``batches`` of |∂L/∂ξ| for gates ξ = 1 on head outputs (the output
    projection's input) and neuron activations (the down projection's input), each layer's
    scores divided by their L2 norm. The batches are the objective's prepared batches;
    the model runs in eval mode and its parameters' gradients are left untouched."""
    gates: dict[tuple[str, str], Tensor] = {}  # (kind, layer name): attention and ffn names coincide
    handles = []
    device = next(model.parameters()).device
    for name, attention in attentions.items():
        gates["head", name] = torch.ones(attention.n_heads, device=device, requires_grad=True)
        handles.append(attention.out.register_forward_pre_hook(_gate_hook(gates["head", name], attention.head_dim)))
    for name, ffn in ffns.items():
        gates["neuron", name] = torch.ones(ffn_width(ffn), device=device, requires_grad=True)
        handles.append(ffn.down.register_forward_pre_hook(_gate_hook(gates["neuron", name], 1)))
    scores = {name: torch.zeros_like(gate) for name, gate in gates.items()}
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            loss = model(batch).loss
            grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
            for name, grad in zip(gates, grads):
                if grad is not None:
                    scores[name] += grad.detach().abs()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    normalised = {name: s / s.norm().clamp(min=1e-12) for name, s in scores.items()}
    return {n: normalised["head", n] for n in attentions}, {n: normalised["neuron", n] for n in ffns}


def least_important(scores: dict[str, Tensor], count: int, *, keep_at_least: int = 1) -> dict[str, Tensor]:
    """The units to keep in each layer after removing the ``count`` least important over all
    layers together, never leaving a layer with fewer than ``keep_at_least``."""
    ranked = sorted(((float(v), name, i) for name, s in scores.items() for i, v in enumerate(s.tolist())))
    removed: dict[str, set[int]] = {name: set() for name in scores}
    for _, name, index in ranked:
        if count <= 0:
            break
        if scores[name].numel() - len(removed[name]) > keep_at_least:
            removed[name].add(index)
            count -= 1
    return {
        name: torch.tensor([i for i in range(s.numel()) if i not in removed[name]], dtype=torch.long)
        for name, s in scores.items()
    }
