"""Conformance checks for attention components: behaviour in each mode and with each test
position, multi-/grouped-query heads, and (in their own modules) incremental decoding and
cross-attention."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import Tensor, nn

from plugformer.attention import Attention
from plugformer.components import PositionEncoding
from plugformer.registry import Component
from plugformer.testing._support import (
    Outputs,
    Sizes,
    Subject,
    assert_close,
    assert_differs,
    assert_finite,
    assert_output_like_input,
    check_determinism,
    check_gradients,
    check_state_dict_round_trip,
    isolated,
    randn,
)
from plugformer.testing.cross import check_cross_attention
from plugformer.testing.decoding import DecodingChecks
from plugformer.testing.probes import QKTransformProbe, RelativeTermsProbe, ScoreBiasProbe, padding_mask

__all__ = ["QKTransformProbe", "RelativeTermsProbe", "ScoreBiasProbe", "check_attention", "padding_mask"]


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
    :class:`QKTransformProbe` if it provides "qk_transform", a :class:`RelativeTermsProbe`
    if it provides "relative_terms"; in causal mode, with
    "incremental_decoding", decoding with its state is checked against the full forward.
    An attention built on :class:`plugformer.Attention` is also built with grouped-query
    (2 key/value heads) and multi-query (1) heads and checked again; one providing
    "cross_attention" is checked as a cross-attention. See docs/testing.md.
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
    if "relative_terms" in provides:
        positions.append(("relative-terms position", lambda: RelativeTermsProbe(sizes.d_model // sizes.n_heads)))
    on_base = False
    for causal in modes:
        for position_label, make_position in positions:
            probe = make_position()
            subject = _subject(component, config, sizes, capabilities.max_length, causal, probe, position_label,
                               dtype=dtype, allow_zero_grad=allow_zero_grad)
            checks = _AttentionChecks(subject, sizes, length, provides, probe)
            checks.run()
            on_base = checks.on_base
            if causal and "incremental_decoding" in provides:
                DecodingChecks(subject, sizes, length, padding="key_padding_mask" in provides).run()
    if on_base:
        for causal in modes:
            for kv_heads in _kv_head_counts(sizes.n_heads):
                _check_grouped_query(component, config, sizes, capabilities.max_length, causal, kv_heads, length,
                                     provides, dtype=dtype, allow_zero_grad=allow_zero_grad)
    if "cross_attention" in provides:
        check_cross_attention(component, config, sizes=sizes, dtype=dtype, allow_zero_grad=allow_zero_grad)


def _kv_head_counts(n_heads: int) -> list[int]:
    """Multi-query (1) and grouped-query (2) key/value heads, where they divide n_heads."""
    return [g for g in (1, 2) if g < n_heads and n_heads % g == 0]


def _subject(
    component: Component,
    config: Any,
    sizes: Sizes,
    limit: int | None,
    causal: bool,
    probe: PositionEncoding | None,
    label: str,
    *,
    dtype: torch.dtype,
    allow_zero_grad: Collection[str],
    **context: Any,
) -> Subject:
    return Subject(
        component,
        config,
        sizes.context(causal=causal, limit=limit, position=probe, **context),
        dtype=dtype,
        setting=f"{'causal' if causal else 'bidirectional'}, {label}",
        allow_zero_grad=allow_zero_grad,
        prepare=(lambda module, dt, probe=probe: probe.to(dt)) if probe is not None else None,
    )


def _check_grouped_query(
    component: Component,
    config: Any,
    sizes: Sizes,
    limit: int | None,
    causal: bool,
    kv_heads: int,
    length: int,
    provides: frozenset[str],
    *,
    dtype: torch.dtype,
    allow_zero_grad: Collection[str],
) -> None:
    """The behavioural checks (shape, causality, padding, batch independence, decoding) with
    ``n_kv_heads`` key/value heads, and a key/value projection of n_kv_heads·head_dim·2
    outputs: grouped-query attention must really have fewer key/value heads."""
    label = f"{'multi' if kv_heads == 1 else 'grouped'}-query, n_kv_heads={kv_heads} of n_heads={sizes.n_heads}"
    subject = _subject(component, config, sizes, limit, causal, None, label,
                       dtype=dtype, allow_zero_grad=allow_zero_grad, n_kv_heads=kv_heads)
    checks = _AttentionChecks(subject, sizes, length, provides, None)
    with subject.check("key/value projection"):
        module = subject.build()
        head_dim = sizes.d_model // sizes.n_heads
        expected = 2 * kv_heads * head_dim
        got = module.key_value.out_features
        if got != expected:
            subject.fail(
                f"key_value has {got} outputs; expected 2·n_kv_heads·head_dim = {expected}: an attention on "
                "plugformer.Attention must project keys and values to ctx.kv_heads heads (the memory saving of "
                "multi-/grouped-query attention)"
            )
    checks.shape_and_dtype()
    if causal:
        checks.causality()
    if checks.padding:
        checks.key_padding()
    checks.batch_independence()
    if causal and "incremental_decoding" in provides:
        DecodingChecks(subject, sizes, length, padding=checks.padding).run(all_checks=False)


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
        self.positions = sizes.positions(length)
        self.x = randn(sizes.batch, length, sizes.d_model, seed=10, dtype=subject.dtype)
        self.mask = padding_mask(sizes.batch, length) if self.padding else None
        self.on_base = False

    def call(self, module: nn.Module, x: Tensor, mask: Tensor | None, positions: Tensor | None = None) -> Tensor:
        return module(x, mask=mask, positions=self.positions if positions is None else positions)

    def run(self) -> None:
        self.shape_and_dtype()
        self.on_base = isinstance(self.subject.build(), Attention)
        if self.causal:
            self.causality()
        if self.padding:
            self.key_padding()
        self.batch_independence()
        self.per_example_positions()
        if self.probe is not None:
            self.position_is_applied()
        check_gradients(self.subject, self.loss)
        check_determinism(self.subject, self.outputs)
        check_state_dict_round_trip(self.subject, self.outputs)

    def per_example_positions(self) -> None:
        s = self.subject
        with s.check("per-example positions"):
            module = s.build().eval()
            per_example = self.positions.expand(self.sizes.batch, -1).clone()
            with torch.no_grad():
                shared = self.call(module, self.x, self.mask)
                each = self.call(module, self.x, self.mask, per_example)
            assert_close(
                s,
                each,
                shared,
                "positions given per example (batch, length) should give the same outputs as the same "
                "positions shared by the batch (1, length)",
            )

    def shape_and_dtype(self) -> None:
        s = self.subject
        with s.check("output shape and dtype"):
            for dtype in dict.fromkeys((torch.float32, s.dtype)):
                module = s.build(dtype=dtype).eval()
                for mask in (None, self.mask) if self.padding else (None,):
                    assert_output_like_input(
                        s,
                        lambda x, module=module, mask=mask: self.call(module, x, mask),
                        self.x.to(dtype),
                        f"the output (dtype {dtype}, without a mask)"
                        if mask is None
                        else f"the output (dtype {dtype}, with a key padding mask; every position must be finite, "
                        "padded queries and queries that see no key included, since a NaN there reaches real "
                        "tokens through the next layer)",
                    )

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
        flag, what, method = {
            ScoreBiasProbe: ("score_bias", "score bias", "Attention.score_bias"),
            QKTransformProbe: ("qk_transform", "query/key transform", "Attention.transform_qk"),
            RelativeTermsProbe: ("relative_terms", "relative terms", "Attention.score_terms and Attention.value_terms"),
        }[type(probe)]
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
                f"{flag} must apply it (see {method})",
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
