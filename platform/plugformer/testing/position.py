"""Conformance checks for position components."""

from __future__ import annotations

from collections.abc import Collection
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
    assert_finite,
    check_determinism,
    check_gradients,
    check_state_dict_round_trip,
    isolated,
    randn,
)


@isolated
def check_position(
    component: Component,
    config: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    sizes: Sizes | None = None,
    allow_zero_grad: Collection[str] = (),
) -> None:
    """Run every position check, for a causal and a bidirectional build; raise AssertionError
    naming the first that fails.

    What a position contributes must match the flags it provides: ``embed`` returns
    (1, length, d_model) for positions (1, length) with "input_embedding" and None without;
    ``transform_qk`` returns q and k of their shapes and dtypes with "qk_transform" and leaves
    them unchanged without; ``score_bias`` returns (batch or 1, heads, ..., Lq, Lk) for any
    (batch or 1, ..., Lq) and (batch or 1, ..., Lk) position tensors with "score_bias" (a bias
    computed block by block equals the full bias at those positions) and None without;
    ``relative_scores``/``relative_values`` return (batch, heads, ..., Lq, Lk) and (batch,
    heads, ..., Lq, head_dim) with "relative_terms" (computed on gathered blocks, or for the
    last queries only, they equal the full-sequence terms at those positions) and None
    without. ``for_layer(i)`` must return the module or one of its submodules, and the
    relative terms are checked (gradients included) through every layer's view. See
    docs/testing.md.
    """
    config = config if config is not None else component.config()
    sizes = sizes or Sizes()
    capabilities = component.capabilities_for(config)
    length = sizes.length_for(capabilities.max_length)
    for causal in (True, False):
        subject = Subject(
            component,
            config,
            sizes.context(causal=causal, limit=capabilities.max_length),
            dtype=dtype,
            setting="causal" if causal else "bidirectional",
            allow_zero_grad=allow_zero_grad,
        )
        _PositionChecks(subject, sizes, length, capabilities.provides).run()


class _PositionChecks:
    def __init__(self, subject: Subject, sizes: Sizes, length: int, provides: frozenset[str]) -> None:
        self.subject = subject
        self.sizes = sizes
        self.length = length
        self.provides = provides
        self.positions = torch.arange(length)[None, :]
        head_shape = (sizes.batch, sizes.n_heads, length, sizes.d_model // sizes.n_heads)
        self.q = randn(*head_shape, seed=50, dtype=subject.dtype)
        self.k = randn(*head_shape, seed=51, dtype=subject.dtype)
        self.weights = randn(sizes.batch, sizes.n_heads, length, length, seed=52, dtype=subject.dtype).softmax(dim=-1)

    def run(self) -> None:
        self.embed()
        self.transform_qk()
        self.score_bias()
        self.layer_views()
        self.relative_terms()
        if any(p.requires_grad for p in self.subject.build().parameters()):
            check_gradients(self.subject, self.loss)
        check_determinism(self.subject, self.outputs)
        check_state_dict_round_trip(self.subject, self.outputs)

    def embed(self) -> None:
        s = self.subject
        with s.check("embed"):
            module = s.build().eval()
            with torch.no_grad():
                table = module.embed(self.positions)
            if "input_embedding" not in self.provides:
                if table is not None:
                    s.fail("embed() returned embeddings, but the component does not provide 'input_embedding'; "
                           "declare it in the capabilities or return None")
                return
            expected = (1, self.length, self.sizes.d_model)
            if not isinstance(table, Tensor) or tuple(table.shape) != expected or not table.is_floating_point():
                got = f"{tuple(table.shape)} {table.dtype}" if isinstance(table, Tensor) else repr(table)
                s.fail(f"embed(positions of shape (1, {self.length})) gave {got}; expected a float tensor {expected}")
            assert_finite(s, table, "embed()")

    def transform_qk(self) -> None:
        s = self.subject
        provided = "qk_transform" in self.provides
        with s.check("transform_qk"):
            for dtype in dict.fromkeys((torch.float32, s.dtype)):
                module = s.build(dtype=dtype).eval()
                q, k = self.q.to(dtype), self.k.to(dtype)
                with torch.no_grad():
                    result = module.transform_qk(q, k, self.positions)
                if not (isinstance(result, tuple) and len(result) == 2 and all(isinstance(t, Tensor) for t in result)):
                    s.fail(f"transform_qk returned {type(result).__name__}; expected a tuple (q, k) of tensors")
                for name, before, after in (("q", q, result[0]), ("k", k, result[1])):
                    if after.shape != before.shape or after.dtype != before.dtype:
                        s.fail(
                            f"transform_qk turned {name} {tuple(before.shape)} {before.dtype} into "
                            f"{tuple(after.shape)} {after.dtype}; expected the same shape and dtype"
                        )
                    assert_finite(s, after, f"transform_qk's {name}")
                    if not provided and not torch.equal(after, before):
                        s.fail(f"transform_qk changed {name}, but the component does not provide 'qk_transform'; "
                               "declare it in the capabilities or return q and k unchanged")

    def score_bias(self) -> None:
        s = self.subject
        with s.check("score_bias"):
            module = s.build().eval()
            with torch.no_grad():
                full = module.score_bias(self.positions, self.positions)
            if "score_bias" not in self.provides:
                if full is not None:
                    s.fail("score_bias() returned a bias, but the component does not provide 'score_bias'; "
                           "declare it in the capabilities or return None")
                return
            heads, length = self.sizes.n_heads, self.length
            self._expect_bias(full, (1, heads, length, length), f"score_bias(positions (1, {length}), positions (1, {length}))")
            # Queries and keys of different lengths, then blocks (batch, R, n_blocks, block) as a
            # blockwise attention forms them.
            generator = torch.Generator().manual_seed(60)
            cases = [
                (torch.arange(length // 3)[None, :], torch.arange(length)[None, :]),
                (torch.randint(0, length, (2, 3, 4), generator=generator), torch.randint(0, length, (2, 3, 7), generator=generator)),
            ]
            for q_positions, k_positions in cases:
                with torch.no_grad():
                    bias = module.score_bias(q_positions, k_positions)
                call = f"score_bias(positions {tuple(q_positions.shape)}, positions {tuple(k_positions.shape)})"
                expected_shape = (q_positions.shape[0], heads, *q_positions.shape[1:], k_positions.shape[-1])
                self._expect_bias(bias, expected_shape, call)
                gathered = full[0][:, q_positions[..., :, None], k_positions[..., None, :]].movedim(0, 1)
                assert_close(
                    s,
                    bias,
                    gathered,
                    f"{call} should equal the full bias at those positions: the bias is a function of the "
                    "position values, whatever the shape they come in (blockwise attentions rely on it)",
                )

    def _expect_bias(self, bias: Any, shape: tuple[int, ...], call: str) -> None:
        s = self.subject
        if not isinstance(bias, Tensor) or tuple(bias.shape) != shape or not bias.is_floating_point():
            got = f"{tuple(bias.shape)} {bias.dtype}" if isinstance(bias, Tensor) else repr(bias)
            s.fail(f"{call} gave {got}; expected a float tensor {shape} (batch or 1, heads, ..., Lq, Lk)")
        assert_finite(s, bias, call)

    def _views(self, module: nn.Module) -> list[tuple[int, PositionEncoding]]:
        """(first layer index, view) for each distinct ``for_layer`` view of the stack's layers."""
        views: dict[int, tuple[int, PositionEncoding]] = {}
        for index in range(self.subject.ctx.n_layers):
            view = module.for_layer(index)
            views.setdefault(id(view), (index, view))
        return list(views.values())

    def layer_views(self) -> None:
        s = self.subject
        with s.check("for_layer"):
            module = s.build()
            inside = {id(m) for m in module.modules()}
            for index in range(s.ctx.n_layers):
                view = module.for_layer(index)
                if not isinstance(view, PositionEncoding) or id(view) not in inside:
                    s.fail(
                        f"for_layer({index}) returned {type(view).__name__}, not the position itself or one of its "
                        "submodules: a per-layer view must be a PositionEncoding registered inside the position "
                        "(so that its parameters are registered, saved and optimized once)"
                    )

    def relative_terms(self) -> None:
        s = self.subject
        provided = "relative_terms" in self.provides
        with s.check("relative_terms"):
            module = s.build().eval()
            batch, heads, length, head_dim = self.q.shape
            for index, view in self._views(module):
                who = "relative_{}" if view is module else f"for_layer({index}).relative_{{}}"
                with torch.no_grad():
                    scores = view.relative_scores(self.q, self.positions, self.positions)
                    values = view.relative_values(self.weights, self.positions, self.positions)
                if not provided:
                    if scores is not None or values is not None:
                        s.fail(f"{who.format('scores/values')}() returned a term, but the component does not provide "
                               "'relative_terms'; declare it in the capabilities or return None")
                    continue
                full = f"(q {tuple(self.q.shape)}, positions (1, {length}), positions (1, {length}))"
                self._expect_term(scores, (batch, heads, length, length), who.format("scores") + full)
                # A position may contribute relative scores only (Transformer-XL): then it keeps
                # PositionEncoding's relative_values, which returns None.
                scores_only = type(view).relative_values is PositionEncoding.relative_values
                if not scores_only:
                    self._expect_term(values, (batch, heads, length, head_dim), who.format("values") + full.replace("q ", "weights "))
                self._relative_blocks(view, who, scores, None if scores_only else values)

    def _relative_blocks(self, view: PositionEncoding, who: str, scores: Tensor, values: Tensor | None) -> None:
        """Terms computed for the last queries only, and on gathered blocks (batch, R,
        n_blocks, block), equal the full-sequence terms at those positions."""
        s = self.subject
        batch, heads, length, head_dim = self.q.shape
        tail = length // 3
        with torch.no_grad():
            last = view.relative_scores(self.q[..., -tail:, :], self.positions[:, -tail:], self.positions)
        call = who.format("scores") + f"(the last {tail} queries, positions (1, {tail}), positions (1, {length}))"
        self._expect_term(last, (batch, heads, tail, length), call)
        assert_close(s, last, scores[..., -tail:, :], f"{call} should equal the last rows of the full-sequence scores")

        generator = torch.Generator().manual_seed(61)
        q_positions = torch.randint(0, length, (batch, 2, 3, 4), generator=generator)
        k_positions = torch.randint(0, length, (batch, 2, 3, 7), generator=generator)
        # For the values, each block row sees every key (in a shuffled order), so that it
        # holds the whole row of the full-sequence weights.
        shuffled = torch.rand(batch, 2, 3, length, generator=generator).argsort(dim=-1)
        rows = [(b, q_positions[b][..., :, None]) for b in range(batch)]
        q_blocks = torch.stack([self.q[b][:, q_positions[b]] for b in range(batch)])
        weight_blocks = torch.stack([self.weights[b][:, r, shuffled[b][..., None, :]] for b, r in rows])
        with torch.no_grad():
            block_scores = view.relative_scores(q_blocks, q_positions, k_positions)
            block_values = view.relative_values(weight_blocks, q_positions, shuffled)
        call = who.format("scores") + f"(q {tuple(q_blocks.shape)}, positions {tuple(q_positions.shape)}, positions {tuple(k_positions.shape)})"
        self._expect_term(block_scores, (batch, heads, 2, 3, 4, 7), call)
        expected = torch.stack([scores[b][:, r, k_positions[b][..., None, :]] for b, r in rows])
        assert_close(s, block_scores, expected, f"{call} should equal the full-sequence scores at those positions: "
                     "the terms are a function of the position values, whatever the shape they come in "
                     "(blockwise attentions rely on it)")
        if values is None:
            return
        call = who.format("values") + f"(weights {tuple(weight_blocks.shape)}, positions {tuple(q_positions.shape)}, positions {tuple(shuffled.shape)})"
        self._expect_term(block_values, (batch, heads, 2, 3, 4, head_dim), call)
        expected = torch.stack([values[b][:, q_positions[b]] for b in range(batch)])
        assert_close(s, block_values, expected, f"{call}, with every key of the row in a shuffled order, should equal "
                     "the full-sequence values at those query positions (blockwise attentions rely on it)")

    def _expect_term(self, term: Any, shape: tuple[int, ...], call: str) -> None:
        s = self.subject
        if not isinstance(term, Tensor) or tuple(term.shape) != shape or not term.is_floating_point():
            got = f"{tuple(term.shape)} {term.dtype}" if isinstance(term, Tensor) else repr(term)
            s.fail(f"{call} gave {got}; expected a float tensor {shape}")
        assert_finite(s, term, call)

    def outputs(self, module: nn.Module) -> Outputs:
        """Everything the component contributes, by name."""
        result: Outputs = {}
        table = module.embed(self.positions)
        if table is not None:
            result["embedding"] = table
        result["q"], result["k"] = module.transform_qk(self.q, self.k, self.positions)
        bias = module.score_bias(self.positions, self.positions)
        if bias is not None:
            result["score bias"] = bias
        for index, view in self._views(module):
            scores = view.relative_scores(self.q, self.positions, self.positions)
            if scores is not None:
                result[f"relative scores of layer {index}"] = scores
            values = view.relative_values(self.weights, self.positions, self.positions)
            if values is not None:
                result[f"relative values of layer {index}"] = values
        return result

    def loss(self, module: nn.Module) -> tuple[Tensor, list[Tensor]]:
        total = torch.zeros((), dtype=self.subject.dtype)
        for seed, output in enumerate(self.outputs(module).values()):
            total = total + (output * randn(*output.shape, seed=70 + seed, dtype=output.dtype)).sum()
        return total, []
