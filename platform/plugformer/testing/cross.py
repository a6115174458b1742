"""The checks of an attention that provides "cross_attention": built with ``ctx.cross``, its
queries come from ``x`` and its keys and values from ``context=`` (an encoder's output,
padded as ``context_mask`` says)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from plugformer.attention import Attention
from plugformer.registry import Component
from plugformer.testing._support import (
    Outputs,
    Sizes,
    Subject,
    assert_close,
    assert_differs,
    assert_finite,
    check_determinism,
    check_gradients,
    check_state_dict_round_trip,
    randn,
)
from plugformer.testing.decoding import beam_permutation
from plugformer.testing.probes import padding_mask


def check_cross_attention(
    component: Component,
    config: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    sizes: Sizes | None = None,
    allow_zero_grad: Collection[str] = (),
) -> None:
    """Build the attention as the cross-attention of a decoder (``ctx.cross``) and check it,
    then (on :class:`plugformer.Attention`) again with one key/value head; raise
    AssertionError naming the first check that fails. See docs/testing.md."""
    config = config if config is not None else component.config()
    sizes = sizes or Sizes()
    limit = component.capabilities_for(config).max_length
    ctx = sizes.context(causal=True, limit=limit, cross=True, encoder_layers=sizes.n_layers)
    subject = Subject(component, config, ctx, dtype=dtype, setting="cross-attention", allow_zero_grad=allow_zero_grad)
    CrossChecks(subject, sizes, sizes.length_for(limit)).run()
    if isinstance(subject.build(), Attention) and sizes.n_heads > 1:
        # Multi-query: one key/value head over the context, the projected context cached as such.
        subject = Subject(
            component, config, replace(ctx, n_kv_heads=1), dtype=dtype,
            setting=f"cross-attention, multi-query, n_kv_heads=1 of n_heads={sizes.n_heads}", allow_zero_grad=allow_zero_grad,
        )
        checks = CrossChecks(subject, sizes, sizes.length_for(limit))
        checks.shape_and_dtype()
        checks.context_mask_is_applied()
        checks.batch_independence()
        checks.state_is_reused()


class CrossChecks:
    """Queries of ``length`` tokens over a context of a different length, padded."""

    def __init__(self, subject: Subject, sizes: Sizes, length: int) -> None:
        self.subject = subject
        self.sizes = sizes
        self.length = length
        self.context_length = max(3, length - 3)
        self.positions = sizes.positions(length)
        self.x = randn(sizes.batch, length, sizes.d_model, seed=90, dtype=subject.dtype)
        self.context = randn(sizes.batch, self.context_length, sizes.d_model, seed=91, dtype=subject.dtype)
        self.context_mask = padding_mask(sizes.batch, self.context_length)

    def call(
        self, module: nn.Module, x: Tensor, context: Tensor, context_mask: Tensor | None, state: object = None, start: int = 0
    ) -> Tensor:
        """``x`` holds the queries from index ``start`` on."""
        positions = self.positions[:, start : start + x.shape[1]]
        return module(x, positions=positions, context=context, context_mask=context_mask, state=state)

    def run(self) -> None:
        self.shape_and_dtype()
        self.uses_the_context()
        self.context_mask_is_applied()
        self.batch_independence()
        check_gradients(self.subject, self.loss)
        self.state_is_reused()
        check_determinism(self.subject, self.outputs)
        check_state_dict_round_trip(self.subject, self.outputs)

    def shape_and_dtype(self) -> None:
        s = self.subject
        with s.check("output shape and dtype"):
            for dtype in dict.fromkeys((torch.float32, s.dtype)):
                module = s.build(dtype=dtype).eval()
                x, context = self.x.to(dtype), self.context.to(dtype)
                before = (x.clone(), context.clone())
                with torch.no_grad():
                    out = self.call(module, x, context, self.context_mask)
                if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype:
                    got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
                    s.fail(
                        f"queries {tuple(x.shape)} over a context {tuple(context.shape)} ({dtype}) gave {got}; "
                        "expected the queries' shape and dtype"
                    )
                assert_finite(s, out, f"the output (dtype {dtype}, with a context mask)")
                if not (torch.equal(x, before[0]) and torch.equal(context, before[1])):
                    s.fail("forward modified x or the context in place")

    def uses_the_context(self) -> None:
        s = self.subject
        with s.check("the context is used"):
            module = s.build().eval()
            with torch.no_grad():
                reference = self.call(module, self.x, self.context, self.context_mask)
                changed = self.call(module, self.x, randn(*self.context.shape, seed=92, dtype=s.dtype), self.context_mask)
            assert_differs(
                s,
                changed,
                reference,
                "changing the real context tokens did not change the output: a cross-attention must take its keys "
                "and values from context=",
            )

    def context_mask_is_applied(self) -> None:
        s = self.subject
        with s.check("context mask"):
            module = s.build().eval()
            noise = randn(*self.context.shape, seed=93, dtype=s.dtype) * 3.0
            with torch.no_grad():
                reference = self.call(module, self.x, self.context, self.context_mask)
                masked = torch.where(self.context_mask[..., None], self.context, noise)
                out = self.call(module, self.x, masked, self.context_mask)
            assert_close(
                s,
                out,
                reference,
                "changing the context tokens that context_mask marks False (padding) should leave every output unchanged",
            )

    def batch_independence(self) -> None:
        s = self.subject
        with s.check("batch independence"):
            module = s.build().eval()
            with torch.no_grad():
                together = self.call(module, self.x, self.context, self.context_mask)
                for i in range(self.sizes.batch):
                    rows = slice(i, i + 1)
                    alone = self.call(module, self.x[rows], self.context[rows], self.context_mask[rows])
                    assert_close(s, alone[0], together[i], f"example {i} alone should give the same output as in the batch")

    def state_is_reused(self) -> None:
        """The state from ``new_state(batch)`` (the projected context, if it keeps one), passed
        to every call while the queries arrive in chunks, gives the outputs of one call
        without a state; reordering it (beam search) halfway equals the reordered batch."""
        s = self.subject
        with s.check("cross-attention state"):
            module = s.build().eval()
            state = module.new_state(self.sizes.batch)
            half = self.length // 2
            index = beam_permutation(self.sizes.batch)
            with torch.no_grad():
                expected = self.call(module, self.x, self.context, self.context_mask)
                steps = [self.call(module, self.x[:, :half], self.context, self.context_mask, state)]
                for t in range(half, self.length):
                    steps.append(self.call(module, self.x[:, t : t + 1], self.context, self.context_mask, state, t))
                assert_close(
                    s,
                    torch.cat(steps, dim=1),
                    expected,
                    "queries given in chunks with one state from new_state(batch) should give the outputs of one call "
                    "that computes keys and values from the context",
                )
                if state is None:
                    return
                fresh = module.new_state(self.sizes.batch)
                self.call(module, self.x[:, :half], self.context, self.context_mask, fresh)
                fresh.reorder(index)
                context, context_mask = self.context[index], self.context_mask[index]
                got = self.call(module, self.x[index, half:], context, context_mask, fresh, half)
                reordered = self.call(module, self.x[index], context, context_mask)
            assert_close(
                s,
                got,
                reordered[:, half:],
                f"reordering the cross-attention state with index {index.tolist()} (beam search) should give the "
                "outputs of the reordered batch",
            )

    def loss(self, module: nn.Module) -> tuple[Tensor, list[Tensor]]:
        x = self.x.clone().requires_grad_(True)
        context = self.context.clone().requires_grad_(True)
        out = self.call(module, x, context, self.context_mask)
        weights = randn(*out.shape, seed=94, dtype=out.dtype)
        return (out * weights).sum(), [x, context]

    def outputs(self, module: nn.Module) -> Outputs:
        return {"output": self.call(module, self.x, self.context, self.context_mask)}
