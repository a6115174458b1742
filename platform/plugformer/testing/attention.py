"""Conformance checks for attention components, and the test positions they run with."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor, nn

from plugformer.components import PositionEncoding
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
    isolated,
    randn,
)


class ScoreBiasProbe(PositionEncoding):
    """A test position that contributes only a score bias: −strength·m_h·|i − j| with fixed
    slopes m_h from 0.3 to 1.2, for position tensors of any shapes (..., Lq) and (..., Lk).
    Set ``strength`` to 0 to switch it off."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", torch.linspace(0.3, 1.2, n_heads), persistent=False)
        self.strength = 1.0

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        distance = (q_positions[..., :, None] - k_positions[..., None, :]).abs().to(self.slopes.dtype)
        return -self.strength * self.slopes.view(-1, *([1] * distance.dim())) * distance


class QKTransformProbe(PositionEncoding):
    """A test position that contributes only a query/key transform: each pair of head
    dimensions is rotated by strength·position·ω_k, ω_k from 1 down to 0.1. Set
    ``strength`` to 0 to make it the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.strength = 1.0

    def transform_qk(self, q: Tensor, k: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        pairs = q.shape[-1] // 2
        frequencies = torch.linspace(1.0, 0.1, pairs, dtype=q.dtype, device=q.device)
        angles = self.strength * positions.to(q.dtype)[:, None] * frequencies
        cos, sin = angles.cos(), angles.sin()

        def rotate(x: Tensor) -> Tensor:
            even, odd = x[..., 0 : 2 * pairs : 2], x[..., 1 : 2 * pairs : 2]
            turned = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
            return torch.cat((turned, x[..., 2 * pairs :]), dim=-1)

        return rotate(q), rotate(k)


def padding_mask(batch: int, length: int) -> Tensor:
    """Key padding mask (batch, length), True for real tokens: example 0 unpadded, example 1
    padded at the end, example 2 at the start and in the middle (the contract allows any
    pattern; left padding is what tests a causal attention's mask), the rest unpadded."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, length - max(2, length // 4) :] = False
    mask[2, : max(1, length // 5)] = False
    mask[2, length // 2] = False
    return mask


@isolated
def check_attention(
    component: Component,
    config: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    sizes: Sizes | None = None,
    allow_zero_grad: Collection[str] = (),
) -> None:
    """Run every attention check; raise AssertionError naming the first that fails.

    The checks run once per mode the component provides ("causal", "bidirectional") and per
    position it can take: none, a :class:`ScoreBiasProbe` if it provides "score_bias", a
    :class:`QKTransformProbe` if it provides "qk_transform". See docs/testing.md.
    """
    config = config if config is not None else component.config()
    sizes = sizes or Sizes()
    capabilities = component.capabilities_for(config)
    provides = capabilities.provides
    length = sizes.length_for(capabilities.max_length)
    modes = [causal for causal, flag in ((True, "causal"), (False, "bidirectional")) if flag in provides]
    if not modes:
        raise AssertionError(
            f"{component.qualified_name}: capabilities: it provides neither 'causal' nor 'bidirectional', "
            "so no objective can use it; declare the modes it supports"
        )
    positions: list[tuple[str, Callable[[], PositionEncoding | None]]] = [("no position", lambda: None)]
    if "score_bias" in provides:
        positions.append(("score-bias position", lambda: ScoreBiasProbe(sizes.n_heads)))
    if "qk_transform" in provides:
        positions.append(("qk-transform position", QKTransformProbe))
    for causal in modes:
        for position_label, make_position in positions:
            probe = make_position()
            subject = Subject(
                component,
                config,
                sizes.context(causal=causal, limit=capabilities.max_length, position=probe),
                dtype=dtype,
                setting=f"{'causal' if causal else 'bidirectional'}, {position_label}",
                allow_zero_grad=allow_zero_grad,
                prepare=(lambda module, dt, probe=probe: probe.to(dt)) if probe is not None else None,
            )
            _AttentionChecks(subject, sizes, length, provides, probe).run()


class _AttentionChecks:
    def __init__(
        self, subject: Subject, sizes: Sizes, length: int, provides: frozenset[str], probe: PositionEncoding | None
    ) -> None:
        self.subject = subject
        self.sizes = sizes
        self.length = length
        self.provides = provides
        self.probe = probe
        self.causal = subject.ctx.causal
        self.padding = "key_padding_mask" in provides
        self.positions = torch.arange(length)
        self.x = randn(sizes.batch, length, sizes.d_model, seed=10, dtype=subject.dtype)
        self.mask = padding_mask(sizes.batch, length) if self.padding else None

    def call(self, module: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
        return module(x, mask=mask, positions=self.positions)

    def run(self) -> None:
        self.shape_and_dtype()
        if self.causal:
            self.causality()
        if self.padding:
            self.key_padding()
        self.batch_independence()
        if self.probe is not None:
            self.position_is_applied()
        check_gradients(self.subject, self.loss)
        check_determinism(self.subject, self.outputs)
        check_state_dict_round_trip(self.subject, self.outputs)

    def shape_and_dtype(self) -> None:
        s = self.subject
        with s.check("output shape and dtype"):
            for dtype in dict.fromkeys((torch.float32, s.dtype)):
                module = s.build(dtype=dtype).eval()
                for mask in (None, self.mask) if self.padding else (None,):
                    x = self.x.to(dtype)
                    before = x.clone()
                    with torch.no_grad():
                        out = self.call(module, x, mask)
                    if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype:
                        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
                        s.fail(f"input {tuple(x.shape)} {dtype} gave {got}; expected the input's shape and dtype")
                    assert_finite(
                        s,
                        out,
                        f"the output (dtype {dtype}, without a mask)"
                        if mask is None
                        else f"the output (dtype {dtype}, with a key padding mask; every position must be finite, "
                        "padded queries and queries that see no key included, since a NaN there reaches real "
                        "tokens through the next layer)",
                    )
                    if not torch.equal(x, before):
                        s.fail("forward modified its input in place")

    def causality(self) -> None:
        s = self.subject
        with s.check("causality"):
            module = s.build().eval()
            for mask in (None, self.mask) if self.padding else (None,):
                with torch.no_grad():
                    reference = self.call(module, self.x, mask)
                    for cut in sorted({1, self.length // 2, self.length - 1}):
                        perturbed = self.x.clone()
                        perturbed[:, cut:] = randn(self.sizes.batch, self.length - cut, self.sizes.d_model, seed=20 + cut, dtype=s.dtype)
                        out = self.call(module, perturbed, mask)
                        # Padded queries are exempt: their outputs are never used.
                        real = (mask[:, :cut, None] if mask is not None else torch.ones(1, cut, 1, dtype=torch.bool))
                        assert_close(
                            s,
                            out[:, :cut] * real,
                            reference[:, :cut] * real,
                            f"changing the tokens from position {cut} on ({'with' if mask is not None else 'without'} "
                            f"a key padding mask) should leave the outputs at real tokens before {cut} unchanged in a "
                            "causal model, since a query must not see later keys",
                        )

    def key_padding(self) -> None:
        s = self.subject
        assert self.mask is not None
        with s.check("key padding mask"):
            module = s.build().eval()
            real = self.mask[..., None]
            with torch.no_grad():
                reference = self.call(module, self.x, self.mask)
                assert_finite(s, reference, "the output at every position, padded ones included (NaN there reaches real tokens through the next layer)")
                noise = randn(*self.x.shape, seed=30, dtype=s.dtype) * 3.0
                out = self.call(module, torch.where(real, self.x, noise), self.mask)
                assert_close(
                    s,
                    out * real,
                    reference * real,
                    "changing the padded tokens (mask False) should leave the outputs at real tokens unchanged",
                )
                everything = torch.ones_like(self.mask)
                assert_close(
                    s,
                    self.call(module, self.x, everything),
                    self.call(module, self.x, None),
                    "a mask that is True everywhere should give the same outputs as no mask",
                )

    def batch_independence(self) -> None:
        s = self.subject
        with s.check("batch independence"):
            module = s.build().eval()
            with torch.no_grad():
                together = self.call(module, self.x, self.mask)
                for i in range(self.sizes.batch):
                    mask = self.mask[i : i + 1] if self.mask is not None else None
                    alone = self.call(module, self.x[i : i + 1], mask)
                    assert_close(s, alone[0], together[i], f"example {i} alone should give the same output as in the batch")

    def position_is_applied(self) -> None:
        s = self.subject
        probe = self.probe
        assert probe is not None
        what = "score bias" if isinstance(probe, ScoreBiasProbe) else "query/key transform"
        with s.check(f"the position's {what} is applied"):
            module = s.build().eval()
            with torch.no_grad():
                on = self.call(module, self.x, self.mask)
                probe.strength = 0.0
                try:
                    off = self.call(module, self.x, self.mask)
                finally:
                    probe.strength = 1.0
            assert_differs(
                s,
                on,
                off,
                f"switching the position's {what} off did not change the output; an attention that provides "
                f"{'score_bias' if what == 'score bias' else 'qk_transform'} must apply it (see Attention.{'score_bias' if what == 'score bias' else 'transform_qk'})",
            )

    def loss(self, module: nn.Module) -> tuple[Tensor, list[Tensor]]:
        x = self.x.clone().requires_grad_(True)
        out = self.call(module, x, self.mask)
        weights = randn(*out.shape, seed=40, dtype=out.dtype)
        if self.mask is not None:
            # As in a model, padded positions contribute nothing to the loss, and a NaN
            # computed there must not come back through a zero gradient.
            weights = weights * self.mask[..., None]
        return (out * weights).sum(), [x]

    def outputs(self, module: nn.Module) -> Outputs:
        return {"output": self.call(module, self.x, self.mask)}
