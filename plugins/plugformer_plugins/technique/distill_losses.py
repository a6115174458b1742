"""The loss terms of knowledge distillation: softened logits (Hinton et al. 2015), hidden
states and attention maps (Jiao et al. 2020, TinyBERT)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from plugformer import Attention, causal_allowed, repeat_kv

IGNORE_INDEX = -100


def scored_positions(logits: Tensor, batch: dict[str, Tensor]) -> Tensor | None:
    """(batch, length) bool of the token positions the objective scores (labels ≠ -100), for
    token logits (batch, length, vocab); None when every row of the logits counts
    (classification logits (batch, classes), or no token labels)."""
    labels = batch.get("labels")
    if logits.dim() == 3 and labels is not None and labels.shape == logits.shape[:2]:
        return labels != IGNORE_INDEX
    return None


def logit_distillation(student: Tensor, teacher: Tensor, temperature: float, scored: Tensor | None) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the scored rows (the T²
    keeps gradient sizes independent of T, Hinton et al. 2015). Logits (..., classes)."""
    if student.shape != teacher.shape:
        raise ValueError(f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if scored is not None:
        student, teacher = student[scored], teacher[scored]
    student = student.reshape(-1, student.shape[-1]).float() / temperature
    teacher = teacher.reshape(-1, teacher.shape[-1]).float() / temperature
    if student.shape[0] == 0:
        return student.sum() * 0.0
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """Mean squared error over the real tokens (mask (batch, length), True for real ones)."""
    error = (student.float() - teacher.float()).pow(2).mean(dim=-1)
    if mask is None:
        return error.mean()
    weights = mask.to(error.dtype)
    return (error * weights).sum() / weights.sum().clamp(min=1.0)


def softmax_attention_map(attention: Attention, x: Tensor, kwargs: dict[str, Any]) -> Tensor:
    """The attention probabilities (batch, heads, L, L) a softmax self-attention computed for
    input ``x`` with its recorded keyword arguments (mask, positions), recomputed from its own
    projections, position terms and masks. Only meaningful for attentions that attend with
    a full softmax over their visible keys (``full``); without a cache."""
    batch, length, _ = x.shape
    mask, positions = kwargs.get("mask"), kwargs.get("positions")
    if positions is None:
        positions = torch.arange(length, device=x.device)
    if positions.dim() == 1:
        positions = positions[None, :]
    q = attention.query(x).view(batch, length, attention.n_heads, attention.head_dim).transpose(1, 2)
    kv = attention.key_value(x).view(batch, length, 2, attention.n_kv_heads, attention.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attention.transform_qk(q, kv[0], positions)
    k = repeat_kv(k, attention.n_heads)
    scores = torch.matmul(q * attention.scale, k.transpose(-1, -2)).float()
    terms = attention.score_terms(q, positions, positions)
    if terms is not None:
        scores = scores + terms.float()
    allowed = causal_allowed(length, length, x.device) if attention.causal else torch.ones(length, length, dtype=torch.bool, device=x.device)
    allowed = allowed[None, None]
    if mask is not None:
        allowed = allowed & mask[:, None, None, :].bool()
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) * allowed.any(dim=-1, keepdim=True)


def attention_map_loss(student: Tensor, teacher: Tensor, mask: Tensor | None) -> Tensor:
    """MSE between attention maps (batch, heads, L, L) over the real query rows; when the
    head counts differ, between the maps averaged over heads."""
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(dim=1, keepdim=True), teacher.mean(dim=1, keepdim=True)
    error = (student - teacher).pow(2).sum(dim=-1).mean(dim=1)  # (batch, L): summed over keys
    if mask is None:
        return error.mean()
    weights = mask.to(error.dtype)
    return (error * weights).sum() / weights.sum().clamp(min=1.0)
