"""AdamW with linear warm-up followed by cosine, linear or constant decay."""

from __future__ import annotations

import math

import torch
from torch import nn

from plugformer.config import OptimConfig, Schedule
from plugformer.parameters import decays


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights of linear layers and embeddings), not biases, norms or scalars,
    unless a component chose otherwise with :func:`plugformer.set_weight_decay`."""
    decay, no_decay = [], []
    seen: set[int] = set()
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (decay if decays(parameter) else no_decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_multiplier(step: int, *, warmup_steps: int, total_steps: int, schedule: Schedule, min_ratio: float) -> float:
    """The factor on the base learning rate at ``step``."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if Schedule(schedule) is Schedule.constant:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if Schedule(schedule) is Schedule.linear:
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(model: nn.Module, config: OptimConfig, total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(
        parameter_groups(model, config.weight_decay), lr=config.lr, betas=tuple(config.betas), eps=config.eps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_multiplier(
            step,
            warmup_steps=config.warmup_steps,
            total_steps=total_steps,
            schedule=config.schedule,
            min_ratio=config.min_lr_ratio,
        ),
    )
    return optimizer, scheduler
