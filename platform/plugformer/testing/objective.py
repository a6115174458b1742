"""The behavioural kit of objectives: on a real batch of a data task it serves, the loss is
a finite scalar that training drives down, and it ignores what must be ignored.

The objective is run on the hidden states of :class:`KitModel`, a tiny stand-in for a
Transformer that respects masks and causality (token and position embeddings, a masked mean
of the visible tokens, an MLP), so the result depends on no attention plugin. Checks:

| check | asserts |
|---|---|
| output | ``forward(hidden, batch)`` returns an ``ObjectiveOutput`` whose ``loss`` is a finite 0-dim tensor with a gradient and whose ``metrics`` are finite scalars by name |
| loss falls on a memorizable batch | Adam on one fixed prepared batch (8 examples) lowers the loss below half its first value |
| padded positions are ignored | changing the hidden states where the last stack's mask is False leaves the loss unchanged |
| ignored labels are ignored | changing the hidden states where token labels are -100 leaves the loss unchanged, while changing them everywhere changes it |

The batch comes from a data task (``data=``: a component or a registered name, by default
the first registered task it serves), read at small sizes, through ``prepare_batch`` in
eval mode (so masking noise is fixed), or is given (``batch=`` with ``facts`` and
``vocab_size``). Token labels are aligned with the hidden states of the last stack
(plugformer's convention: the data shifts, -100 marks positions that are not scored).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from plugformer.components import ARCHITECTURES, ModelInputs, Objective, ObjectiveOutput
from plugformer.registry import Component, Registry
from plugformer.testing._support import Sizes, isolated
from plugformer.testing.data import IGNORE_INDEX, build_data_task, small_data_config


class ObjectiveCheckFailure(AssertionError):
    """An objective broke its contract; the message names it, the data and the check."""


class KitModel(nn.Module):
    """Hidden states for an objective from :class:`plugformer.ModelInputs`, with no
    attention plugin: ``h = tok(ids) + pos(t) + mean of the visible tokens' embeddings``, then
    a residual MLP. Visible: the real tokens (mask True) up to t in a decoder, all real tokens
    in an encoder; a decoder of an encoder–decoder adds the mean of the real source tokens.
    Padded tokens never change a real position's hidden state."""

    def __init__(self, vocab_size: int, max_length: int, d_model: int, *, architecture: str) -> None:
        super().__init__()
        self.architecture = architecture
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_length, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def _mix(self, ids: Tensor, mask: Tensor | None, *, causal: bool) -> Tensor:
        embedded = self.token_embedding(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))[None]
        weights = (torch.ones_like(ids, dtype=embedded.dtype) if mask is None else mask.to(embedded.dtype))[..., None]
        if causal:
            mean = (embedded * weights).cumsum(1) / weights.cumsum(1).clamp(min=1.0)
        else:
            mean = (embedded * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1.0)
        return embedded + mean

    def forward(self, inputs: ModelInputs) -> Tensor:
        if self.architecture == "encoder_decoder":
            source = self._mix(inputs.input_ids, inputs.attention_mask, causal=False)
            weights = (torch.ones_like(inputs.input_ids, dtype=source.dtype) if inputs.attention_mask is None
                       else inputs.attention_mask.to(source.dtype))[..., None]
            context = (source * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1.0)
            h = self._mix(inputs.decoder_input_ids, inputs.decoder_attention_mask, causal=True) + context
        else:
            h = self._mix(inputs.input_ids, inputs.attention_mask, causal=self.architecture == "decoder")
        return h + self.mlp(h)


def architecture_of(component: Component, config: Any) -> str:
    """The architecture an objective names ("decoder", "encoder" or "encoder_decoder"; a
    version-1 objective's from the attention mode it requires)."""
    capabilities = component.capabilities_for(config)
    named = [a for a in ARCHITECTURES if a in capabilities.provides]
    if named:
        return named[0]
    return "decoder" if "causal" in capabilities.requires.get("attention", ()) else "encoder"


def serving_data_tasks(registry: Registry, objective: Component, config: Any = None) -> list[Component]:
    """Registered data tasks whose batch format this objective provides and that provide
    what it requires of the data (with their default configs), by name."""
    config = config if config is not None else objective.config()
    provides = objective.capabilities_for(config).provides
    needs = objective.capabilities_for(config).requires.get("data", frozenset())
    found = []
    for data in registry.components("data"):
        capabilities = data.capabilities_for(data.config())
        if capabilities.requires.get("objective", frozenset()) <= provides and needs <= capabilities.provides:
            found.append(data)
    return sorted(found, key=lambda c: c.name)


def _fail(component: Component, data: str, check: str, message: str) -> ObjectiveCheckFailure:
    return ObjectiveCheckFailure(f"{component.qualified_name} (on {data}): {check}: {message}")


def _data_batch(objective: Component, config: Any, data: Component | str | None, data_config: Any,
                cache_dir: Path, rows: int) -> tuple[str, dict[str, Tensor], dict[str, Any], int, int]:
    from plugformer.plugins import load_plugins

    if not isinstance(data, Component):
        registry = load_plugins().registry
        if data is None:
            serving = serving_data_tasks(registry, objective, config)
            if not serving:
                raise _fail(objective, "no data", "setup", "no registered data task serves this objective; pass batch= or data=")
            data = serving[0]
        else:
            data = registry.get("data", data)
    data_config = data_config if data_config is not None else small_data_config(data)
    task = build_data_task(data, data_config, cache_dir)
    batch = next(iter(task.val_dataloader()))
    return data.qualified_name, _first_rows(batch, rows), dict(task.facts), task.vocab_size, task.max_length


def _first_rows(batch: dict[str, Any], rows: int) -> dict[str, Any]:
    """The batch cut to its first ``rows`` examples, nested dicts (a task's ``extras``) included."""
    return {key: _first_rows(value, rows) if isinstance(value, dict) else value[:rows] for key, value in batch.items()}


def _loss(objective: Objective, model: KitModel, batch: dict[str, Tensor], hidden: Tensor | None = None) -> Tensor:
    if hidden is None:
        hidden = model(objective.model_inputs(batch))
    return objective(hidden, batch).loss


@isolated
def check_objective_training(
    component: Component,
    config: Any = None,
    *,
    data: Component | str | None = None,
    data_config: Any = None,
    batch: dict[str, Tensor] | None = None,
    facts: dict[str, Any] | None = None,
    vocab_size: int | None = None,
    steps: int = 150,
    rows: int = 8,
    sizes: Sizes | None = None,
) -> None:
    """Run the checks in the module docstring; raise AssertionError naming the first failure.

    ``batch`` (a batch as the data task yields it, with the task's ``facts`` and
    ``vocab_size``) or ``data`` (a data component or registered name, with ``data_config``,
    by default :func:`plugformer.testing.small_data_config`) gives the batch; neither: the
    first registered data task that serves the objective. ``rows`` examples are used, and
    ``steps`` Adam steps (lr 1e-2) must halve the loss."""
    from plugformer.testing import check_registration

    check_registration(component, config)
    config = config if config is not None else component.config()
    sizes = sizes or Sizes()
    with tempfile.TemporaryDirectory(prefix="plugformer-kit-") as scratch:
        if batch is None:
            data_name, batch, facts, vocab_size, max_length = _data_batch(component, config, data, data_config, Path(scratch), rows)
        else:
            data_name, facts = "the given batch", dict(facts or {})
            if vocab_size is None:
                raise ValueError("check_objective_training: pass vocab_size with batch=")
            max_length = max(v.shape[1] for v in batch.values() if isinstance(v, Tensor) and v.dim() == 2)
    architecture = architecture_of(component, config)
    longest = max([max_length, *(v.shape[1] for v in batch.values() if isinstance(v, Tensor) and v.dim() == 2)])
    model = KitModel(vocab_size, longest + 1, sizes.d_model, architecture=architecture)
    ctx = sizes.context(causal=architecture != "encoder", task=facts, vocab_size=vocab_size, max_length=longest + 1,
                        token_embedding=model.token_embedding)
    objective = component.factory(config, ctx)
    if not isinstance(objective, Objective):
        raise _fail(component, data_name, "type", f"the factory returned a {type(objective).__name__}, not a plugformer.Objective")
    objective.eval()
    with torch.no_grad():
        prepared = objective.prepare_batch(dict(batch))
    _check_output(component, data_name, objective, model, prepared)
    _check_ignored_positions(component, data_name, objective, model, prepared, architecture)
    _check_loss_falls(component, data_name, objective, model, prepared, steps)


def _check_output(component: Component, data: str, objective: Objective, model: KitModel, batch: dict[str, Tensor]) -> None:
    objective.train()
    out = objective(model(objective.model_inputs(batch)), batch)
    objective.eval()
    if not isinstance(out, ObjectiveOutput):
        raise _fail(component, data, "output", f"forward returned a {type(out).__name__}, not a plugformer.ObjectiveOutput")
    loss = out.loss
    if not isinstance(loss, Tensor) or loss.dim() != 0 or not loss.is_floating_point():
        raise _fail(component, data, "output", f"loss must be a 0-dim float tensor; got {getattr(loss, 'shape', loss)!r}")
    if not torch.isfinite(loss) or not loss.requires_grad:
        raise _fail(component, data, "output", f"loss {float(loss)} must be finite and carry a gradient")
    for name, value in out.metrics.items():
        if not isinstance(name, str) or not isinstance(value, Tensor) or value.numel() != 1 or not torch.isfinite(value).all():
            raise _fail(component, data, "output", f"metric {name!r} = {value!r} is not a finite scalar tensor")


def _check_ignored_positions(
    component: Component, data: str, objective: Objective, model: KitModel, batch: dict[str, Tensor], architecture: str
) -> None:
    with torch.no_grad():
        inputs = objective.model_inputs(batch)
        hidden = model(inputs)
        loss = _loss(objective, model, batch, hidden)
        mask = inputs.decoder_attention_mask if architecture == "encoder_decoder" else inputs.attention_mask
        noise = torch.randn_like(hidden) * 3.0
        tolerance = 1e-4 * max(1.0, abs(float(loss)))
        if mask is not None and mask.shape == hidden.shape[:2] and not bool(mask.all()):
            padded = ~mask.bool()
            moved = _loss(objective, model, batch, torch.where(padded[..., None], hidden + noise, hidden))
            if abs(float(moved) - float(loss)) > tolerance:
                raise _fail(component, data, "padded positions are ignored",
                            f"changing the hidden states at padded positions changed the loss from {float(loss):.6f} to {float(moved):.6f}")
        labels = batch.get("labels")
        if labels is not None and labels.shape == hidden.shape[:2] and bool((labels == IGNORE_INDEX).any()):
            ignored = labels == IGNORE_INDEX
            moved = _loss(objective, model, batch, torch.where(ignored[..., None], hidden + noise, hidden))
            if abs(float(moved) - float(loss)) > tolerance:
                raise _fail(component, data, "ignored labels are ignored",
                            f"changing the hidden states where labels are {IGNORE_INDEX} changed the loss from "
                            f"{float(loss):.6f} to {float(moved):.6f}")
        everywhere = _loss(objective, model, batch, hidden + noise)
        if abs(float(everywhere) - float(loss)) <= tolerance:
            raise _fail(component, data, "the loss depends on the hidden states",
                        "changing every hidden state left the loss unchanged")


def _check_loss_falls(
    component: Component, data: str, objective: Objective, model: KitModel, batch: dict[str, Tensor], steps: int
) -> None:
    parameters = list({id(p): p for p in [*model.parameters(), *objective.parameters()] if p.requires_grad}.values())
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    with torch.no_grad():
        first = float(_loss(objective, model, batch))
    objective.train()
    for _ in range(steps):
        optimizer.zero_grad()
        _loss(objective, model, batch).backward()
        optimizer.step()
    objective.eval()
    with torch.no_grad():
        last = float(_loss(objective, model, batch))
    if not last < 0.5 * first:
        raise _fail(component, data, "loss falls on a memorizable batch",
                    f"after {steps} Adam steps on one fixed batch the loss went from {first:.4f} to {last:.4f}; "
                    "expected below half (is the loss computed from the head's output and the batch's labels?)")


__all__ = ["KitModel", "architecture_of", "check_objective_training", "serving_data_tasks"]
