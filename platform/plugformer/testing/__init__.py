"""The conformance kit: behavioural checks that any registered component can be run
through, for plugin authors and for plugformer's own test suite.

Every check function takes a :class:`plugformer.Component` and optionally an instance of its
config dataclass (default: ``component.config()``), builds the component at small sizes
(:class:`Sizes`) with fixed seeds, and raises ``AssertionError`` naming the component, the
setting, the check and what went wrong. They run on the CPU in well under a second or two,
leave the global RNG state as they found it, and need nothing but plugformer itself::

    from plugformer.testing import check_component
    from my_plugin import COMPONENT

    def test_conformance():
        check_component(COMPONENT)

Keyword options, for every check function:

- ``dtype``: the dtype of the behavioural checks (float64 by default, so that tolerances can
  be tight; shape-and-dtype checks also run in float32);
- ``sizes``: a :class:`Sizes` to change d_model, heads, length or batch;
- ``allow_zero_grad``: parameter names (fnmatch patterns) that may legitimately receive no
  or an all-zero gradient (an expert that the test batch never routes to, say).

What each check asserts is listed in docs/testing.md.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from typing import Any

import torch
from torch import nn

from plugformer.capabilities import Capabilities
from plugformer.components import ARCHITECTURES, Objective
from plugformer.registry import KINDS, Component
from plugformer.testing._support import Sizes, Subject, isolated
from plugformer.testing.attention import check_attention
from plugformer.testing.block import check_block
from plugformer.testing.cross import check_cross_attention
from plugformer.testing.data import check_data_task, small_data_config
from plugformer.testing.objective import KitModel, check_objective_training, serving_data_tasks
from plugformer.testing.probes import QKTransformProbe, RelativeTermsProbe, ScoreBiasProbe
from plugformer.testing.position import check_position
from plugformer.testing.sublayers import check_ffn, check_norm

__all__ = [
    "KitModel",
    "QKTransformProbe",
    "RelativeTermsProbe",
    "ScoreBiasProbe",
    "Sizes",
    "check_attention",
    "check_block",
    "check_component",
    "check_cross_attention",
    "check_data_task",
    "check_ffn",
    "check_norm",
    "check_objective",
    "check_objective_training",
    "check_position",
    "check_registration",
    "serving_data_tasks",
    "small_data_config",
    "task_facts",
]


def check_registration(component: Component, config: Any = None) -> None:
    """What every component of any kind must satisfy: a known kind, a one-line summary, a
    config dataclass whose every field has a default, ``config`` an instance of it, and
    capabilities (or a function of the config returning them) that are a
    :class:`plugformer.Capabilities`."""
    name = component.qualified_name
    if component.kind not in KINDS:
        raise AssertionError(f"{name}: registration: unknown kind {component.kind!r}; expected one of {', '.join(KINDS)}")
    if not component.summary or not component.summary.strip():
        raise AssertionError(f"{name}: registration: the summary is empty; give a one-line description")
    if not (isinstance(component.config, type) and dataclasses.is_dataclass(component.config)):
        raise AssertionError(f"{name}: registration: config is {component.config!r}, not a dataclass type")
    try:
        default = component.config()
    except TypeError as error:
        raise AssertionError(
            f"{name}: registration: {component.config.__name__}() fails ({error}); every option needs a default"
        ) from None
    if config is not None and not isinstance(config, component.config):
        raise AssertionError(
            f"{name}: registration: the config given is a {type(config).__name__}, not a {component.config.__name__}"
        )
    capabilities = component.capabilities_for(config if config is not None else default)
    if not isinstance(capabilities, Capabilities):
        raise AssertionError(
            f"{name}: registration: capabilities are a {type(capabilities).__name__}, not a plugformer.Capabilities"
        )


def task_facts(sizes: Sizes) -> dict[str, Any]:
    """The data task's facts an objective is built with: ``num_classes`` (classification),
    and the special tokens of a text task: ``pad_id`` 0, ``start_id`` 1, ``eos_id`` 2,
    ``mask_id`` the last id, ten ``sentinel_ids`` below it (span corruption), all in
    ``special_ids`` (masked LM)."""
    mask_id = sizes.vocab_size - 1
    sentinel_ids = list(range(mask_id - 10, mask_id))
    return {
        "num_classes": sizes.num_classes, "pad_id": 0, "start_id": 1, "eos_id": 2, "mask_id": mask_id,
        "sentinel_ids": sentinel_ids, "special_ids": [0, 1, 2, *sentinel_ids, mask_id],
    }


@isolated
def check_objective(component: Component, config: Any = None, *, sizes: Sizes | None = None) -> None:
    """The cheap checks of an objective: it names its architecture, providing exactly one
    of "decoder", "encoder" and "encoder_decoder" (or, as in version 1, none of them and
    exactly one of "causal" and "bidirectional" among what it requires from the attention),
    and its factory builds a :class:`plugformer.Objective` from a context like a model's
    (with a tied token embedding and the task facts of :func:`task_facts`). Its forward pass
    needs a batch in its own format, so training tests exercise it instead."""
    config = config if config is not None else component.config()
    sizes = sizes or Sizes()
    capabilities = component.capabilities_for(config)
    named = [a for a in ARCHITECTURES if a in capabilities.provides]
    needed = capabilities.requires.get("attention", frozenset())
    modes = needed & {"causal", "bidirectional"}
    if len(named) > 1:
        raise AssertionError(
            f"{component.qualified_name}: capabilities: an objective must provide exactly one architecture of "
            f"{', '.join(ARCHITECTURES)}; it provides {named}"
        )
    if not named and len(modes) != 1:
        raise AssertionError(
            f"{component.qualified_name}: capabilities: an objective must provide one of {', '.join(ARCHITECTURES)} "
            f"(or require exactly one of 'causal' and 'bidirectional' from the attention); it provides none and "
            f"requires {sorted(needed) or 'neither'}"
        )
    architecture = named[0] if named else ("decoder" if "causal" in modes else "encoder")
    ctx = sizes.context(
        causal=architecture != "encoder",
        limit=capabilities.max_length,
        task=task_facts(sizes),
        token_embedding=nn.Embedding(sizes.vocab_size, sizes.d_model),
    )
    subject = Subject(component, config, ctx, dtype=torch.float32)
    with subject.check("type"):
        if not isinstance(subject.build(), Objective):
            subject.fail("the factory must return a plugformer.Objective")


@isolated
def check_component(
    component: Component,
    config: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    sizes: Sizes | None = None,
    allow_zero_grad: Collection[str] = (),
) -> None:
    """Run the checks for the component's kind; raise AssertionError naming the first failure.

    attention, position, norm, ffn and block get the full behavioural checks
    (:func:`check_attention`, :func:`check_position`, :func:`check_norm`, :func:`check_ffn`,
    :func:`check_block`);
    objectives get the cheap :func:`check_objective`. Data tasks and techniques get only
    :func:`check_registration`: building them means building datasets or a whole run, which
    the training tests do.
    """
    check_registration(component, config)
    options = dict(dtype=dtype, sizes=sizes, allow_zero_grad=allow_zero_grad)
    if component.kind == "attention":
        check_attention(component, config, **options)
    elif component.kind == "position":
        check_position(component, config, **options)
    elif component.kind == "norm":
        check_norm(component, config, **options)
    elif component.kind == "ffn":
        check_ffn(component, config, **options)
    elif component.kind == "block":
        check_block(component, config, **options)
    elif component.kind == "objective":
        check_objective(component, config, sizes=sizes)
