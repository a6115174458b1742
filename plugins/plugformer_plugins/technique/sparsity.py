"""Unstructured magnitude pruning with ``torch.nn.utils.prune`` masks, on the schedule of
Zhu & Gupta 2017 ("To prune, or not to prune"): s_t = s_f + (s_i − s_f)·(1 − (t − t₀)/(t₁ − t₀))³.

Every target linear layer is reparametrised once with ``prune.identity`` (``weight_orig`` a
parameter, ``weight_mask`` a buffer, ``weight = weight_orig · weight_mask`` before each
forward), so the masks are in the model's state_dict: they are saved in every checkpoint
and restored on resume. Each pruning step then zeroes further entries of the masks in place
(never a new hook or a growing chain of masks)."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.nn.utils import prune


def zhu_gupta_sparsity(step: int, *, initial: float, final: float, start: int, end: int) -> float:
    """The target sparsity at ``step``: 0 before ``start``, ``final`` from ``end`` on, the
    cubic ramp from ``initial`` to ``final`` in between."""
    if step < start:
        return 0.0
    if step >= end or end <= start:
        return final
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def prunable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every linear layer inside the model's stacks (attention and feed-forward projections),
    by qualified name; embeddings, norms and the objective's head are left dense."""
    return {f"stacks.{name}": module for name, module in model.stacks.named_modules() if isinstance(module, nn.Linear)}


def add_masks(linears: dict[str, nn.Linear]) -> None:
    """Reparametrise each layer's weight with an all-ones mask (``prune.identity``)."""
    for module in linears.values():
        if not prune.is_pruned(module):
            prune.identity(module, "weight")


def _scores(module: nn.Linear) -> Tensor:
    return (module.weight_orig.detach() * module.weight_mask).abs().float()


def prune_to(linears: dict[str, nn.Linear], target: float, *, global_scope: bool) -> None:
    """Zero the smallest-magnitude remaining weights until the fraction of zeros in the masks
    is ``target``: over all layers together (``global_scope``) or in each layer. Masks only
    grow; a target below the current sparsity changes nothing."""
    groups = [list(linears.values())] if global_scope else [[m] for m in linears.values()]
    with torch.no_grad():
        for group in groups:
            masks = [m.weight_mask for m in group]
            total = sum(mask.numel() for mask in masks)
            remaining = torch.cat([mask.flatten() for mask in masks]) != 0
            extra = round(target * total) - int((~remaining).sum())
            if extra <= 0:
                continue
            scores = torch.cat([_scores(m).flatten() for m in group])[remaining]
            keep = prune.L1Unstructured(amount=extra).compute_mask(scores, default_mask=torch.ones_like(scores))
            new = torch.zeros(total, dtype=masks[0].dtype, device=masks[0].device)
            new[remaining] = keep.to(new.dtype)
            offset = 0
            for mask in masks:
                mask.copy_(new[offset : offset + mask.numel()].view_as(mask))
                offset += mask.numel()


def sparsity_by_layer(linears: dict[str, nn.Linear]) -> dict[str, float]:
    """The fraction of zeros in each layer's effective weight (its mask when pruned)."""
    result = {}
    for name, module in linears.items():
        weight = module.weight_mask if prune.is_pruned(module) else module.weight
        result[name] = float((weight == 0).sum()) / weight.numel()
    return result


def overall_sparsity(linears: dict[str, nn.Linear]) -> float:
    """The fraction of zeros over all the layers' weights together."""
    zeros = total = 0
    for module in linears.values():
        weight = module.weight_mask if prune.is_pruned(module) else module.weight
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / max(total, 1)


def with_masks_applied(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose pruned weights are plain parameters with the zeros in them
    (``prune.remove``): no ``weight_orig``/``weight_mask``, loadable without the technique."""
    for module in model.modules():  # the effective weights are non-leaf tensors deepcopy refuses
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                name = hook._tensor_name
                setattr(module, name, (getattr(module, f"{name}_orig") * getattr(module, f"{name}_mask")).detach())
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, nn.Module) and prune.is_pruned(module):
            for hook in list(module._forward_pre_hooks.values()):
                if isinstance(hook, prune.BasePruningMethod):
                    prune.remove(module, hook._tensor_name)
    return copied
