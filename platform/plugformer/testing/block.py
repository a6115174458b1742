"""Conformance checks for block components: the wiring of a layer's sublayers.

A block's factory receives its sublayers (``factory(config, ctx, parts)``); the kit builds
them itself (:class:`KitAttention`, :class:`KitFeedForward`, ``nn.LayerNorm`` norms), so the
checks depend on no plugin and a failure is the block's. The kit's attention carries a
:class:`ScoreBiasProbe`, so a block that loses the positions on the way is caught.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from plugformer.attention import Attention, AttentionState, causal_allowed
from plugformer.blocks import Block, BlockParts, LayerState, StepInputs
from plugformer.components import BuildContext, FeedForward, mark_residual_projection
from plugformer.registry import Component
from plugformer.testing._support import (
    Outputs,
    Sizes,
    Subject,
    assert_close,
    assert_differs,
    assert_output_like_input,
    check_determinism,
    check_gradients,
    check_state_dict_round_trip,
    isolated,
    randn,
)
from plugformer.testing.decoding import decode
from plugformer.testing.probes import ScoreBiasProbe, left_padding_mask, padding_mask, positions_of


class KitAttention(Attention):
    """Softmax attention formed explicitly (:meth:`Attention.explicit_attend`): causal,
    bidirectional or cross, with key padding, the position's score terms and a KVCache."""

    def attend(
        self,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        *,
        key_padding_mask: Tensor | None,
        q_positions: Tensor,
        k_positions: Tensor,
        state: AttentionState | None = None,
    ) -> Tensor:
        q_length, k_length = q.shape[-2], k.shape[-2]
        if self.causal:
            allowed = causal_allowed(q_length, k_length, q.device)
        else:
            allowed = torch.ones(q_length, k_length, dtype=torch.bool, device=q.device)
        allowed = allowed[None, None]
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :].bool()
        return self.explicit_attend(q, k, v, allowed, q_positions, k_positions)


class KitFeedForward(FeedForward):
    """Linear → GELU → linear, twice as wide inside."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.up = nn.Linear(ctx.d_model, 2 * ctx.d_model)
        self.down = mark_residual_projection(nn.Linear(2 * ctx.d_model, ctx.d_model))

    def forward(self, x: Tensor) -> Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


def kit_parts(ctx: BuildContext, *, cross: bool) -> BlockParts:
    """The kit's sublayers for a block built with ``ctx`` (a cross-attention when ``cross``)."""
    return BlockParts(
        attention=KitAttention(ctx),
        ffn=KitFeedForward(ctx),
        make_norm=lambda: nn.LayerNorm(ctx.d_model),
        cross_attention=KitAttention(replace(ctx, cross=True, position=None)) if cross else None,
    )


@isolated
def check_block(
    component: Component,
    config: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    sizes: Sizes | None = None,
    allow_zero_grad: Collection[str] = (),
) -> None:
    """Run every block check, for a decoder block (causal), an encoder block (bidirectional)
    and, if it provides "cross_attention", a decoder block of an encoder–decoder; raise
    AssertionError naming the first that fails. See docs/testing.md."""
    config = config if config is not None else component.config()
    sizes = sizes or Sizes()
    capabilities = component.capabilities_for(config)
    length = sizes.length_for(capabilities.max_length)
    settings = [("decoder block, causal", True, False), ("encoder block, bidirectional", False, False)]
    if "cross_attention" in capabilities.provides:
        settings.append(("decoder block of an encoder–decoder, causal, with cross-attention", True, True))
    for label, causal, cross in settings:
        probe = ScoreBiasProbe(sizes.n_heads)
        layers = dict(encoder_layers=sizes.n_layers, decoder_layers=sizes.n_layers) if cross else {}
        ctx = sizes.context(causal=causal, limit=capabilities.max_length, position=probe, **layers)

        def factory(config: Any, ctx: BuildContext, cross: bool = cross) -> nn.Module:
            return component.factory(config, ctx, kit_parts(ctx, cross=cross))

        subject = Subject(
            component,
            config,
            ctx,
            dtype=dtype,
            setting=label,
            allow_zero_grad=allow_zero_grad,
            prepare=lambda module, dt, probe=probe: probe.to(dt),
            factory=factory,
        )
        _BlockChecks(subject, sizes, length, cross=cross).run()


class _BlockChecks:
    def __init__(self, subject: Subject, sizes: Sizes, length: int, *, cross: bool) -> None:
        self.subject = subject
        self.sizes = sizes
        self.length = length
        self.cross = cross
        self.causal = subject.ctx.causal
        self.positions = sizes.positions(length)
        self.x = randn(sizes.batch, length, sizes.d_model, seed=100, dtype=subject.dtype)
        self.mask = padding_mask(sizes.batch, length)
        context_length = max(3, length - 3)
        self.context = randn(sizes.batch, context_length, sizes.d_model, seed=101, dtype=subject.dtype) if cross else None
        self.context_mask = padding_mask(sizes.batch, context_length) if cross else None

    def inputs(
        self, mask: Tensor | None, positions: Tensor | None = None, context: Tensor | None = None,
        extras: dict[str, Tensor] | None = None,
    ) -> StepInputs:
        return StepInputs(
            mask=mask,
            positions=self.positions if positions is None else positions,
            context=self.context if context is None else context,
            context_mask=self.context_mask,
            extras=extras or {},
        )

    def extras(self, block: nn.Module, rows: slice | None = None) -> dict[str, Tensor]:
        """The block's own ``kit_extras(batch, length)`` (inputs a block reads from the batch
        extras, such as retrieved neighbours), in the subject's dtype, or none."""
        make = getattr(block, "kit_extras", None)
        if make is None:
            return {}
        extras = make(self.sizes.batch, self.length)
        extras = {k: v.to(self.subject.dtype) if v.is_floating_point() else v for k, v in extras.items()}
        return {k: v[rows] for k, v in extras.items()} if rows is not None else extras

    def call(self, block: nn.Module, x: Tensor, mask: Tensor | None, context: Tensor | None = None) -> Tensor:
        return block(x, self.inputs(mask, context=context, extras=self.extras(block)))

    def run(self) -> None:
        self.shape_and_dtype()
        if self.causal:
            self.causality()
        self.key_padding()
        self.batch_independence()
        if self.cross:
            self.cross_attention()
        check_gradients(self.subject, self.loss)
        check_determinism(self.subject, self.outputs)
        check_state_dict_round_trip(self.subject, self.outputs)
        if self.causal:
            self.incremental_decoding()

    def shape_and_dtype(self) -> None:
        s = self.subject
        with s.check("output shape and dtype"):
            for dtype in dict.fromkeys((torch.float32, s.dtype)):
                block = s.build(dtype=dtype).eval()
                if not isinstance(block, Block):
                    s.fail(f"the factory returned a {type(block).__name__}, not a plugformer.Block")
                if not isinstance(block.final_norm, bool):
                    s.fail(f"final_norm is {block.final_norm!r}; expected a bool (does the stack need a final norm?)")
                context = self.context.to(dtype) if self.context is not None else None
                assert_output_like_input(
                    s,
                    lambda x, block=block, context=context: self.call(block, x, self.mask, context),
                    self.x.to(dtype),
                    f"the output (dtype {dtype}, with a key padding mask)",
                )

    def causality(self) -> None:
        s = self.subject
        with s.check("causality"):
            block = s.build().eval()
            with torch.no_grad():
                reference = self.call(block, self.x, None)
                for cut in sorted({1, self.length // 2, self.length - 1}):
                    perturbed = self.x.clone()
                    perturbed[:, cut:] = randn(self.sizes.batch, self.length - cut, self.sizes.d_model, seed=110 + cut, dtype=s.dtype)
                    assert_close(
                        s,
                        self.call(block, perturbed, None)[:, :cut],
                        reference[:, :cut],
                        f"changing the tokens from position {cut} on should leave the outputs before {cut} unchanged "
                        "in a causal block (it must pass the causal attention its inputs, not mix tokens itself)",
                    )

    def key_padding(self) -> None:
        s = self.subject
        with s.check("key padding mask"):
            block = s.build().eval()
            real = self.mask[..., None]
            noise = randn(*self.x.shape, seed=120, dtype=s.dtype) * 3.0
            with torch.no_grad():
                reference = self.call(block, self.x, self.mask)
                out = self.call(block, torch.where(real, self.x, noise), self.mask)
            assert_close(
                s,
                out * real,
                reference * real,
                "changing the padded tokens (mask False) should leave the outputs at real tokens unchanged (the block "
                "must hand the mask to its attention)",
            )

    def batch_independence(self) -> None:
        s = self.subject
        with s.check("batch independence"):
            block = s.build().eval()
            with torch.no_grad():
                together = self.call(block, self.x, self.mask)
                for i in range(self.sizes.batch):
                    rows = slice(i, i + 1)
                    inputs = StepInputs(
                        mask=self.mask[rows],
                        positions=self.positions,
                        context=self.context[rows] if self.context is not None else None,
                        context_mask=self.context_mask[rows] if self.context_mask is not None else None,
                        extras=self.extras(block, rows),
                    )
                    alone = block(self.x[rows], inputs)
                    assert_close(s, alone[0], together[i], f"example {i} alone should give the same output as in the batch")

    def cross_attention(self) -> None:
        s = self.subject
        assert self.context is not None and self.context_mask is not None
        with s.check("cross-attention"):
            block = s.build().eval()
            other = randn(*self.context.shape, seed=130, dtype=s.dtype)
            noise = randn(*self.context.shape, seed=131, dtype=s.dtype) * 3.0
            with torch.no_grad():
                reference = self.call(block, self.x, self.mask)
                changed = self.call(block, self.x, self.mask, other)
                masked = self.call(block, self.x, self.mask, torch.where(self.context_mask[..., None], self.context, noise))
            assert_differs(
                s,
                changed,
                reference,
                "changing the context did not change the output: a block that provides 'cross_attention' must call its "
                "cross-attention (parts.cross_attention) with the context when it has one",
            )
            assert_close(
                s,
                masked,
                reference,
                "changing the context tokens that context_mask marks False should leave every output unchanged (the "
                "block must hand context_mask to its cross-attention)",
            )

    def incremental_decoding(self) -> None:
        """Token by token with ``block.new_state(batch)`` (a :class:`LayerState`) equals the
        full forward; so does a prefill then tokens on left-padded rows with per-example
        positions."""
        s = self.subject

        def step(block: nn.Module, x: Tensor, mask: Tensor | None, positions: Tensor, state: object) -> Tensor:
            return block(x, self.inputs(mask, positions), state)

        with s.check("incremental decoding"):
            block = s.build().eval()
            state = block.new_state(self.sizes.batch)
            if not isinstance(state, LayerState):
                s.fail(f"new_state(batch) returned a {type(state).__name__}, not a plugformer.LayerState")
            with torch.no_grad():
                # Without kit_extras: they describe whole sequences, not one decoding step.
                expected = block(self.x, self.inputs(None))
                got = decode(step, block, self.x, chunks=[1] * self.length, mask=None, positions=self.positions, state=state)
            assert_close(
                s,
                got,
                expected,
                "decoding one token per call with the LayerState from new_state(batch) should give the outputs of one "
                "forward pass over the whole sequence (the block must hand state.attention and state.cross_attention "
                "to its attentions, with the step's positions)",
            )
            mask = left_padding_mask(self.sizes.batch, self.length)
            positions = positions_of(mask)
            prompt = max(2, self.length // 3)
            state = block.new_state(self.sizes.batch)
            with torch.no_grad():
                expected = block(self.x, self.inputs(mask, positions))
                got = decode(step, block, self.x, chunks=[prompt] + [1] * (self.length - prompt), mask=mask,
                             positions=positions, state=state)
            real = mask[..., None]
            assert_close(
                s,
                got * real,
                expected * real,
                f"left-padded rows decoded as a prefill of {prompt} tokens then one token per call (per-example "
                "positions) should give the outputs of one forward pass at the real tokens",
            )

    def loss(self, block: nn.Module) -> tuple[Tensor, list[Tensor]]:
        x = self.x.clone().requires_grad_(True)
        inputs = [x]
        context = None
        if self.context is not None:
            context = self.context.clone().requires_grad_(True)
            inputs.append(context)
        out = self.call(block, x, self.mask, context)
        weights = randn(*out.shape, seed=140, dtype=out.dtype) * self.mask[..., None]
        return (out * weights).sum(), inputs

    def outputs(self, block: nn.Module) -> Outputs:
        return {"output": self.call(block, self.x, self.mask)}
