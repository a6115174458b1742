"""Machinery shared by the conformance checks: sizes, seeded builds, comparisons with
tolerances, and the checks every module kind runs the same way (gradients, determinism,
state_dict round trips)."""

from __future__ import annotations

import functools
import io
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any, NoReturn, TypeVar

import torch
from torch import Tensor, nn

from plugformer.components import BuildContext
from plugformer.registry import Component

#: What a forward function returns for comparison: named output tensors.
Outputs = dict[str, Tensor]


@dataclass(frozen=True)
class Sizes:
    """The sizes the kit builds components with. The defaults keep every check well under a
    second on a CPU; ``length`` is lowered to a component's ``max_length`` capability."""

    d_model: int = 32
    n_heads: int = 4
    length: int = 20
    batch: int = 3
    n_layers: int = 2
    vocab_size: int = 50
    num_classes: int = 5
    max_length: int = 64

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"Sizes: d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.length < 4 or self.batch < 3:
            raise ValueError("Sizes: the checks need length ≥ 4 and batch ≥ 3")

    def length_for(self, limit: int | None) -> int:
        """The test sequence length under a component's ``max_length`` capability."""
        return self.length if limit is None else min(self.length, limit)

    def context(self, *, causal: bool, limit: int | None = None, **overrides: Any) -> BuildContext:
        """A model's context at these sizes; ``max_length`` (the longest sequence the data
        yields, here ``self.max_length``) is kept within a component's ``limit``."""
        max_length = self.max_length if limit is None else min(self.max_length, limit)
        values: dict[str, Any] = dict(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_layers=self.n_layers,
            dropout=0.0,
            causal=causal,
            max_length=max(max_length, self.length_for(limit)),
            vocab_size=self.vocab_size,
            # A decoder-only model when causal, an encoder-only one otherwise.
            stack="decoder" if causal else "encoder",
            decoder_layers=self.n_layers if causal else 0,
            encoder_layers=0 if causal else self.n_layers,
        )
        values.update(overrides)
        return BuildContext(**values)

    def positions(self, length: int) -> Tensor:
        """Positions 0..length−1 shared by every example: (1, length)."""
        return torch.arange(length)[None, :]


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with the global CPU RNG seeded, restoring its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only: torch.manual_seed also queues a seed for CUDA, recording a
        # stack trace each time while CUDA is not initialized (milliseconds per call).
        torch.random.default_generator.manual_seed(seed)
        yield


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with one intra-op CPU thread, restoring the count afterwards. The kit's
    tensors are tiny: with several threads, synchronization costs far more than the work
    (over 20× slower on a busy two-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


CheckFunction = TypeVar("CheckFunction", bound=Callable[..., Any])


def isolated(function: CheckFunction) -> CheckFunction:
    """Decorator of the public checks: one CPU thread, a seeded global RNG, and both restored
    afterwards, so a check neither depends on nor disturbs the caller's state."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with single_threaded(), seeded(0):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def tolerance(dtype: torch.dtype) -> float:
    """Relative tolerance (to the largest magnitude compared) for outputs that should agree.
    Loose enough for components that compute in float32 internally; a real leak or mix-up
    changes outputs by a sizeable fraction of their scale."""
    return 1e-5 if dtype == torch.float64 else 1e-4


#: Standard deviation of the noise added to every trainable parameter after initialization,
#: before any behavioural check. Freshly initialized weights can hide a leak: a mixing
#: matrix initialized to the identity (over heads, tokens or channels) mixes nothing until
#: training moves it, so causality and padding checks would pass on step 0 and fail later.
#: 0.02 is the scale of GPT-2 initialization: large enough that a leak through such a weight
#: changes outputs far beyond the tolerances, small enough to keep every component in its
#: working range.
PERTURBATION = 0.02


def perturb_parameters(module: nn.Module, std: float) -> None:
    """Add N(0, std²) noise to every trainable floating-point parameter of ``module`` (each
    once, shared ones included), from the global RNG (the caller seeds it). Frozen
    parameters (``requires_grad=False``) and buffers are left alone: training never moves them."""
    if std <= 0:
        return
    seen: set[int] = set()
    with torch.no_grad():
        for parameter in module.parameters():
            if parameter.requires_grad and parameter.is_floating_point() and id(parameter) not in seen:
                seen.add(id(parameter))
                parameter.add_(torch.randn_like(parameter), alpha=std)


class Subject:
    """One component under test in one setting: how to build it and how to report failures.

    ``setting`` describes the build (e.g. "causal, score-bias position") and appears in every
    message; ``prepare`` receives each freshly built module (to cast a test position along);
    ``factory(config, ctx)`` replaces the component's own (a block's factory also takes its
    sublayers, which the kit supplies).
    """

    def __init__(
        self,
        component: Component,
        config: Any,
        ctx: Any,
        *,
        dtype: torch.dtype,
        setting: str = "",
        allow_zero_grad: Collection[str] = (),
        prepare: Callable[[nn.Module, torch.dtype], None] | None = None,
        factory: Callable[[Any, Any], nn.Module] | None = None,
    ) -> None:
        self.component = component
        self.config = config
        self.ctx = ctx
        self.dtype = dtype
        self.setting = setting
        self.allow_zero_grad = tuple(allow_zero_grad)
        self._prepare = prepare
        self._factory = factory if factory is not None else component.factory
        self._check = "build"

    @property
    def label(self) -> str:
        return f"{self.component.qualified_name} ({self.setting})" if self.setting else self.component.qualified_name

    def fail(self, message: str) -> NoReturn:
        raise AssertionError(f"{self.label}: {self._check}: {message}")

    @contextmanager
    def check(self, name: str) -> Iterator[None]:
        """Name the check running in the block; an exception other than a failed assertion
        becomes one naming the check (a check fails the same way whatever went wrong)."""
        previous, self._check = self._check, name
        try:
            yield
        except AssertionError:
            raise
        except Exception as error:  # noqa: BLE001 - any error inside a check is its failure
            raise AssertionError(f"{self.label}: {name}: raised {type(error).__name__}: {error}") from error
        finally:
            self._check = previous

    def build(self, seed: int = 0, dtype: torch.dtype | None = None) -> nn.Module:
        """``factory(config, ctx)`` under ``seed``, given the last word over its parameters
        through ``init_weights()`` as in a model, then perturbed (:func:`perturb_parameters`)
        so that the checks see weights that have moved, and cast to ``dtype`` (default: the
        subject's)."""
        dtype = dtype or self.dtype
        with self.check("build"), seeded(seed):
            module = self._factory(self.config, self.ctx)
            if not isinstance(module, nn.Module):
                self.fail(f"the factory returned {type(module).__name__}, not a torch.nn.Module")
            for sub in module.modules():
                init_weights = getattr(sub, "init_weights", None)
                if callable(init_weights):
                    init_weights()
            perturb_parameters(module, PERTURBATION)
            module = module.to(dtype)
            if self._prepare is not None:
                self._prepare(module, dtype)
        return module

    def allowed_without_grad(self, name: str) -> bool:
        return any(fnmatch(name, pattern) for pattern in self.allow_zero_grad)


def randn(*shape: int, seed: int, dtype: torch.dtype) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def assert_close(subject: Subject, actual: Tensor, expected: Tensor, what: str) -> None:
    """|actual − expected| ≤ tolerance · (largest magnitude) everywhere, else a failure that
    says ``what`` should have held and where it did not."""
    if actual.shape != expected.shape:
        subject.fail(f"{what}, but the shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    actual, expected = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(actual).all() and torch.isfinite(expected).all()):
        subject.fail(f"{what}, but the outputs contain NaN or inf")
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, 1e-6)
    allowed = tolerance(subject.dtype) * scale
    difference = (actual - expected).abs()
    if difference.numel() and float(difference.max()) > allowed:
        index = tuple(int(i) for i in torch.nonzero(difference == difference.max())[0])
        subject.fail(
            f"{what}, but outputs differ by up to {float(difference.max()):.3g} at index {index} "
            f"(tolerance {allowed:.3g}, {tolerance(subject.dtype):g} of the largest magnitude {scale:.3g})"
        )


def assert_differs(subject: Subject, actual: Tensor, expected: Tensor, what: str) -> None:
    """The opposite of :func:`assert_close`: the outputs must change by more than the tolerance."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = max(float(expected.abs().max()), 1e-6)
    if float((actual - expected).abs().max()) <= tolerance(subject.dtype) * scale:
        subject.fail(what)


def assert_finite(subject: Subject, tensor: Tensor, what: str) -> None:
    if not bool(torch.isfinite(tensor).all()):
        bad = torch.nonzero(~torch.isfinite(tensor))[0]
        subject.fail(f"{what} contains NaN or inf (first at index {tuple(int(i) for i in bad)})")


def assert_output_like_input(subject: Subject, run: Callable[[Tensor], Any], x: Tensor, what: str) -> Tensor:
    """Call ``run(x)`` without gradients and fail unless it returns a finite tensor of x's
    shape and dtype and leaves x unchanged; ``what`` names the output in messages."""
    before = x.clone()
    with torch.no_grad():
        out = run(x)
    if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != x.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
        subject.fail(f"input {tuple(x.shape)} {x.dtype} gave {got}; expected the input's shape and dtype")
    assert_finite(subject, out, what)
    if not torch.equal(x, before):
        subject.fail("forward modified its input in place")
    return out


def check_gradients(subject: Subject, loss_of: Callable[[nn.Module], tuple[Tensor, list[Tensor]]]) -> None:
    """Backpropagate the loss of ``loss_of(module) -> (loss, inputs)`` through a module in
    training mode, then require a finite gradient, not all exactly zero, for every trainable
    parameter (except names matching ``allow_zero_grad`` or the module's own
    ``state_only_parameters`` patterns) and for every tensor in ``inputs``.

    The parameters are first jittered slightly, so that a component initializing a layer to
    zero (which blocks the gradient of everything before it at step 0) still passes: the
    check is about whether gradient *can* reach a parameter.
    """
    with subject.check("gradients"):
        module = subject.build(seed=0)
        with torch.no_grad(), seeded(1):
            for parameter in module.parameters():
                if parameter.is_floating_point():
                    parameter.add_(0.01 * torch.randn_like(parameter))
        module.train()
        loss, inputs = loss_of(module)
        if loss.dim() != 0:
            subject.fail(f"internal: the kit's loss is not a scalar ({tuple(loss.shape)})")
        loss.backward()
        trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        # Parameters a module trains only through the state it carries across calls (a
        # compressive memory's compressor) get no gradient from one stateless forward pass.
        state_only = tuple(getattr(module, "state_only_parameters", ()))
        for name, parameter in trainable:
            if subject.allowed_without_grad(name) or any(fnmatch(name, pattern) for pattern in state_only):
                continue
            if parameter.grad is None:
                subject.fail(
                    f"parameter {name!r} received no gradient: it is not used in the forward pass, or "
                    "is detached from it (pass allow_zero_grad=[...] if that is intended)"
                )
            assert_finite(subject, parameter.grad, f"the gradient of parameter {name!r}")
            if not bool(parameter.grad.any()):
                subject.fail(
                    f"the gradient of parameter {name!r} is exactly zero everywhere: it does not "
                    "influence the output (pass allow_zero_grad=[...] if that is intended)"
                )
        for position, tensor in enumerate(inputs):
            if tensor.grad is None or not bool(tensor.grad.any()):
                subject.fail(f"no gradient reaches input {position}: the output does not depend on it")
            assert_finite(subject, tensor.grad, f"the gradient of input {position}")


def check_determinism(subject: Subject, run: Callable[[nn.Module], Outputs]) -> None:
    """Two evaluation-mode calls with the same input give the same outputs."""
    with subject.check("determinism in eval mode"):
        module = subject.build(seed=0).eval()
        with torch.no_grad():
            first, second = run(module), run(module)
        for key in first:
            assert_close(subject, second[key], first[key], f"calling it twice in eval mode should give the same {key}")


def check_state_dict_round_trip(subject: Subject, run: Callable[[nn.Module], Outputs]) -> None:
    """A differently seeded fresh instance, loaded with the state dict after a trip through
    ``torch.save``/``torch.load(weights_only=True)`` (how checkpoints are read), gives the
    same outputs as the original."""
    with subject.check("state_dict round trip"):
        original = subject.build(seed=0).eval()
        buffer = io.BytesIO()
        torch.save(original.state_dict(), buffer)
        buffer.seek(0)
        try:
            state = torch.load(buffer, weights_only=True)
        except Exception as error:  # noqa: BLE001
            subject.fail(f"the state dict does not load with torch.load(weights_only=True): {error}")
        fresh = subject.build(seed=12345).eval()
        try:
            fresh.load_state_dict(state)
        except Exception as error:  # noqa: BLE001
            subject.fail(f"a fresh instance does not accept the state dict: {error}")
        with torch.no_grad():
            expected, actual = run(original), run(fresh)
        for key in expected:
            assert_close(
                subject,
                actual[key],
                expected[key],
                f"a fresh instance loaded with the state dict should give the same {key} (state that is "
                "not in the state dict — a random non-persistent buffer, say — is lost in checkpoints)",
            )
