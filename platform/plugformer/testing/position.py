"""Conformance checks for position components."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

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
    (length, d_model) with "input_embedding" and None without; ``transform_qk`` returns q and
    k of their shapes and dtypes with "qk_transform" and leaves them unchanged without;
    ``score_bias`` returns (heads, ..., Lq, Lk) for any (..., Lq) and (..., Lk) position
    tensors with "score_bias" (a bias computed block by block equals the full bias at those
    positions) and None without. See docs/testing.md.
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
        self.positions = torch.arange(length)
        head_shape = (sizes.batch, sizes.n_heads, length, sizes.d_model // sizes.n_heads)
        self.q = randn(*head_shape, seed=50, dtype=subject.dtype)
        self.k = randn(*head_shape, seed=51, dtype=subject.dtype)

    def run(self) -> None:
        self.embed()
        self.transform_qk()
        self.score_bias()
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
            expected = (self.length, self.sizes.d_model)
            if not isinstance(table, Tensor) or tuple(table.shape) != expected or not table.is_floating_point():
                got = f"{tuple(table.shape)} {table.dtype}" if isinstance(table, Tensor) else repr(table)
                s.fail(f"embed(positions of shape ({self.length},)) gave {got}; expected a float tensor {expected}")
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
            self._expect_bias(full, (heads, length, length), f"score_bias(positions ({length},), positions ({length},))")
            # Queries and keys of different lengths, then blocks as a blockwise attention forms them.
            generator = torch.Generator().manual_seed(60)
            cases = [
                (torch.arange(length // 3), torch.arange(length)),
                (torch.randint(0, length, (2, 3, 4), generator=generator), torch.randint(0, length, (2, 3, 7), generator=generator)),
            ]
            for q_positions, k_positions in cases:
                with torch.no_grad():
                    bias = module.score_bias(q_positions, k_positions)
                call = f"score_bias(positions {tuple(q_positions.shape)}, positions {tuple(k_positions.shape)})"
                expected_shape = (heads, *q_positions.shape, k_positions.shape[-1])
                self._expect_bias(bias, expected_shape, call)
                gathered = full[:, q_positions[..., :, None], k_positions[..., None, :]]
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
            s.fail(f"{call} gave {got}; expected a float tensor {shape} (heads, ..., Lq, Lk)")
        assert_finite(s, bias, call)

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
        return result

    def loss(self, module: nn.Module) -> tuple[Tensor, list[Tensor]]:
        total = torch.zeros((), dtype=self.subject.dtype)
        for seed, output in enumerate(self.outputs(module).values()):
            total = total + (output * randn(*output.shape, seed=70 + seed, dtype=output.dtype)).sum()
        return total, []
