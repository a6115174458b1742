"""Conformance checks for position-wise sublayers: norms and feed-forward networks."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from plugformer.components import FeedForward
from plugformer.registry import Component
from plugformer.testing._support import (
    Outputs,
    Sizes,
    Subject,
    assert_close,
    assert_finite,
    assert_output_like_input,
    check_determinism,
    check_gradients,
    check_state_dict_round_trip,
    isolated,
    randn,
)


@isolated
def check_norm(
    component: Component,
    config: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    sizes: Sizes | None = None,
    allow_zero_grad: Collection[str] = (),
) -> None:
    """Run every norm check; raise AssertionError naming the first that fails: shape and
    dtype kept, finite outputs for zero, tiny and huge inputs, position-wise (tokens and
    examples normalized on their own), gradients, determinism, state_dict round trip."""
    subject = _subject(component, config, dtype, sizes, allow_zero_grad)
    checks = _PositionWiseChecks(subject, sizes or Sizes())
    checks.shape_and_dtype()
    checks.extreme_inputs()
    checks.position_wise()
    checks.batch_independence()
    check_gradients(subject, checks.loss)
    check_determinism(subject, checks.outputs)
    check_state_dict_round_trip(subject, checks.outputs)


@isolated
def check_ffn(
    component: Component,
    config: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    sizes: Sizes | None = None,
    allow_zero_grad: Collection[str] = (),
) -> None:
    """Run every feed-forward check; raise AssertionError naming the first that fails: a
    :class:`plugformer.FeedForward`, shape and dtype kept, position-wise (permuting tokens
    permutes outputs), batch independence, gradients, determinism, state_dict round trip,
    and ``aux_losses()`` a dict of finite scalar tensors after a training forward pass.

    Position-wise and batch checks run in eval mode: routing with a capacity that drops
    tokens depending on the other tokens fails them there (in a decoder it leaks the future).
    """
    subject = _subject(component, config, dtype, sizes, allow_zero_grad)
    checks = _PositionWiseChecks(subject, sizes or Sizes())
    with subject.check("type"):
        if not isinstance(subject.build(), FeedForward):
            subject.fail("the factory must return a plugformer.FeedForward (it provides aux_losses())")
    checks.shape_and_dtype()
    checks.position_wise()
    checks.batch_independence()
    check_gradients(subject, checks.loss)
    check_determinism(subject, checks.outputs)
    check_state_dict_round_trip(subject, checks.outputs)
    checks.aux_losses()


def _subject(component: Component, config: Any, dtype: torch.dtype, sizes: Sizes | None, allow_zero_grad: Collection[str]) -> Subject:
    sizes = sizes or Sizes()
    config = config if config is not None else component.config()
    return Subject(
        component,
        config,
        sizes.context(causal=True),
        dtype=dtype,
        allow_zero_grad=allow_zero_grad,
    )


class _PositionWiseChecks:
    def __init__(self, subject: Subject, sizes: Sizes) -> None:
        self.subject = subject
        self.sizes = sizes
        # Off-centre and not unit-scaled, so that a norm has something to normalize.
        self.x = randn(sizes.batch, sizes.length, sizes.d_model, seed=80, dtype=subject.dtype) * 2.0 + 0.5

    def shape_and_dtype(self) -> None:
        s = self.subject
        with s.check("output shape and dtype"):
            for dtype in dict.fromkeys((torch.float32, s.dtype)):
                module = s.build(dtype=dtype).eval()
                assert_output_like_input(s, module, self.x.to(dtype), f"the output (dtype {dtype})")

    def extreme_inputs(self) -> None:
        s = self.subject
        with s.check("finite on extreme inputs"):
            module = s.build().eval()
            for name, x in (("all zeros", torch.zeros_like(self.x)), ("tiny (×1e-4)", self.x * 1e-4), ("huge (×1e4)", self.x * 1e4)):
                with torch.no_grad():
                    assert_finite(s, module(x), f"the output for {name} input")

    def position_wise(self) -> None:
        s = self.subject
        with s.check("position-wise"):
            module = s.build().eval()
            order = torch.randperm(self.sizes.length, generator=torch.Generator().manual_seed(90))
            with torch.no_grad():
                reference = module(self.x)
                permuted = module(self.x[:, order])
                changed = self.x.clone()
                changed[:, 1::3] = randn(*changed[:, 1::3].shape, seed=91, dtype=s.dtype)
                others = module(changed)
            untouched = torch.ones(self.sizes.length, dtype=torch.bool)
            untouched[1::3] = False
            assert_close(
                s,
                others[:, untouched],
                reference[:, untouched],
                "changing some tokens should leave the outputs at the other tokens unchanged: each token is "
                "processed on its own, without seeing the others",
            )
            assert_close(
                s,
                permuted,
                reference[:, order],
                "permuting the tokens should permute the outputs the same way: the same function is applied "
                "at every position",
            )

    def batch_independence(self) -> None:
        s = self.subject
        with s.check("batch independence"):
            module = s.build().eval()
            with torch.no_grad():
                together = module(self.x)
                for i in range(self.sizes.batch):
                    assert_close(s, module(self.x[i : i + 1])[0], together[i], f"example {i} alone should give the same output as in the batch")

    def aux_losses(self) -> None:
        s = self.subject
        with s.check("aux_losses"):
            module = s.build().train()
            module(self.x)
            losses = module.aux_losses()
            if not isinstance(losses, dict):
                s.fail(f"aux_losses() returned {type(losses).__name__}; expected a dict of name → scalar tensor")
            for name, value in losses.items():
                if not isinstance(name, str) or not isinstance(value, Tensor) or value.dim() != 0:
                    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    s.fail(f"aux_losses() entry {name!r} is {shape}; expected a str name and a 0-dim tensor")
                assert_finite(s, value, f"aux loss {name!r}")

    def outputs(self, module: nn.Module) -> Outputs:
        return {"output": module(self.x)}

    def loss(self, module: nn.Module) -> tuple[Tensor, list[Tensor]]:
        x = self.x.clone().requires_grad_(True)
        out = module(x)
        loss = (out * randn(*out.shape, seed=95, dtype=out.dtype)).sum()
        if isinstance(module, FeedForward):
            # As in training: a router may get its gradient through a balance loss.
            loss = loss + sum(module.aux_losses().values(), torch.zeros((), dtype=loss.dtype))
        return loss, [x]
