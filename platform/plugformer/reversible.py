"""Reversible residual layers (RevNet, Gomez et al. 2017; used by the Reformer, Kitaev et al.
2020): a layer maps a pair of streams (x1, x2) to

    y1 = x1 + f(x2),    y2 = x2 + g(y1),

so its inputs can be recomputed from its outputs, x2 = y2 − g(y1), x1 = y1 − f(x2). A run of
reversible layers then keeps no activations for the backward pass: :func:`run_reversible`
stores only the last pair and, going backwards, recomputes each layer's inputs and its
branch activations one layer at a time. Activation memory no longer grows with depth.

The residual stream enters a run duplicated, x1 = x2 = x, and leaves it averaged,
(y1 + y2) / 2, so a run of reversible blocks has the shape of any other block in a stack
(the Reformer concatenates the halves and widens the head instead; averaging, as
reformer-pytorch does, keeps the objective's head unchanged).

Random draws in f and g (dropout, the random rotations of LSH attention) are replayed
exactly in the recomputation: the CPU and, for CUDA tensors, the device's generator state
before each branch is saved in the forward pass and restored around its recomputation. So
is the autocast setting.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from plugformer.blocks import Block, LayerState, StepInputs


class ReversibleBlock(Block):
    """A block on a pair of streams: ``f`` (the attention branch, any function of the
    sequence) and ``g`` (a position-wise branch, the feed-forward). The stack runs
    consecutive reversible blocks as one reversible sequence (:func:`run_reversible`);
    ``forward`` runs this block alone as a sequence of one.

    ``g_chunks``: g is applied to that many consecutive pieces of the sequence, in the
    forward pass and in the backward recomputation alike, bounding its activation memory
    to one piece (the Reformer's chunked feed-forward). g must therefore be position-wise.

    Every parameter f and g use must be the block's own, or a parameter of a position
    module one of its submodules holds as ``position`` (as :class:`plugformer.Attention`
    does): gradients are computed for exactly those.
    """

    g_chunks: int = 1

    def f(self, x: Tensor, inputs: StepInputs, state: LayerState | None) -> Tensor:
        """The first branch, added to x1: (batch, length, d_model) → same."""
        raise NotImplementedError

    def g(self, x: Tensor) -> Tensor:
        """The second, position-wise branch, added to x2: (batch, length, d_model) → same."""
        raise NotImplementedError

    def forward(self, x: Tensor, inputs: StepInputs, state: LayerState | None = None) -> Tensor:
        return run_reversible([self], x, inputs, [state])


def run_reversible(
    blocks: Sequence[ReversibleBlock], x: Tensor, inputs: StepInputs, states: Sequence[LayerState | None] | None = None
) -> Tensor:
    """Run ``blocks`` as one reversible sequence on x (duplicated in, averaged out).

    With gradients enabled and no state, the activations are recomputed in the backward
    pass instead of being stored. With a state (incremental decoding, memories carried
    across batches, which recomputation would update twice) or without gradients, the
    coupling runs under ordinary autograd.
    """
    states = list(states) if states is not None else [None] * len(blocks)
    if not torch.is_grad_enabled() or any(s is not None for s in states):
        x1 = x2 = x
        for block, state in zip(blocks, states):
            x1 = x1 + block.f(x2, inputs, state)
            x2 = x2 + _apply_g(block, x1)
        return (x1 + x2) / 2
    params, index = _parameters(blocks)
    return _ReversibleSequence.apply(x, _Run(list(blocks), inputs, index), *params)


def _apply_g(block: ReversibleBlock, x: Tensor) -> Tensor:
    if block.g_chunks <= 1 or x.shape[1] <= 1:
        return block.g(x)
    return torch.cat([block.g(piece) for piece in x.chunk(block.g_chunks, dim=1)], dim=1)


def _parameters(blocks: Sequence[ReversibleBlock]) -> tuple[list[Tensor], list[list[int]]]:
    """The trainable parameters the blocks use, each once, and for each block the indices of
    its own among them."""
    params: list[Tensor] = []
    seen: dict[int, int] = {}
    index: list[list[int]] = []
    for block in blocks:
        mine: list[int] = []
        for p in _block_parameters(block):
            if not p.requires_grad:
                continue
            if id(p) not in seen:
                seen[id(p)] = len(params)
                params.append(p)
            if seen[id(p)] not in mine:
                mine.append(seen[id(p)])
        index.append(mine)
    return params, index


def _block_parameters(block: nn.Module) -> Iterator[Tensor]:
    yield from block.parameters()
    for module in block.modules():
        # Attention keeps the stack's position as an unregistered reference.
        position = module.__dict__.get("position")
        if isinstance(position, nn.Module):
            yield from position.parameters()


@dataclass
class _Run:
    """What the autograd function needs besides tensors."""

    blocks: list[ReversibleBlock]
    inputs: StepInputs
    index: list[list[int]]


@dataclass
class _RandomState:
    cpu: Tensor
    device: torch.device
    cuda: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), device, cuda)

    @contextmanager
    def replayed(self) -> Iterator[None]:
        """Run the block with the generators as captured, restoring them afterwards."""
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


class _ReversibleSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, run: _Run, *params: Tensor) -> Tensor:  # noqa: ANN001
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        x1 = x2 = x.detach()
        randomness = []
        for block in run.blocks:
            before_f = _RandomState.capture(x.device)
            x1 = x1 + block.f(x2, run.inputs, None)
            before_g = _RandomState.capture(x.device)
            x2 = x2 + _apply_g(block, x1)
            randomness.append((before_f, before_g))
        ctx.run, ctx.randomness, ctx.params = run, randomness, params
        ctx.save_for_backward(x1, x2)
        return (x1 + x2) / 2

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # noqa: ANN001
        run: _Run = ctx.run
        y1, y2 = ctx.saved_tensors
        all_params: tuple[Tensor, ...] = ctx.params
        grads: list[Tensor | None] = [None] * len(all_params)
        dy1 = dy2 = grad / 2
        device_type, autocast_enabled, autocast_dtype = ctx.autocast
        for block, index, (before_f, before_g) in reversed(list(zip(run.blocks, run.index, ctx.randomness))):
            mine = [all_params[i] for i in index]
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_enabled):
                x2, dy1 = _backward_g(block, y1, y2, dy1, dy2, mine, index, grads, before_g)
                x1, dx2 = _backward_f(block, run.inputs, y1, x2, dy1, dy2, mine, index, grads, before_f)
            y1, y2, dy2 = x1, x2, dx2
        return (dy1 + dy2, None, *grads)


def _accumulate(grads: list[Tensor | None], index: list[int], new: Sequence[Tensor | None]) -> None:
    for i, g in zip(index, new):
        if g is not None:
            grads[i] = g if grads[i] is None else grads[i] + g


def _backward_g(
    block: ReversibleBlock,
    y1: Tensor,
    y2: Tensor,
    dy1: Tensor,
    dy2: Tensor,
    params: list[Tensor],
    index: list[int],
    grads: list[Tensor | None],
    before: _RandomState,
) -> tuple[Tensor, Tensor]:
    """Recompute g(y1) piece by piece: x2 = y2 − g(y1), and dL/dy1 gains g's share."""
    chunks = block.g_chunks if block.g_chunks > 1 and y1.shape[1] > 1 else 1
    x2_pieces, dy1_pieces = [], []
    with before.replayed():
        for y1_piece, y2_piece, dy2_piece in zip(y1.chunk(chunks, 1), y2.chunk(chunks, 1), dy2.chunk(chunks, 1)):
            with torch.enable_grad():
                leaf = y1_piece.detach().requires_grad_(True)
                out = block.g(leaf)
                found = torch.autograd.grad(out, [leaf, *params], dy2_piece, allow_unused=True)
            _accumulate(grads, index, found[1:])
            x2_pieces.append(y2_piece - out.detach())
            dy1_pieces.append(found[0] if found[0] is not None else torch.zeros_like(y1_piece))
    dy1 = dy1 + (torch.cat(dy1_pieces, dim=1) if chunks > 1 else dy1_pieces[0])
    return (torch.cat(x2_pieces, dim=1) if chunks > 1 else x2_pieces[0]), dy1


def _backward_f(
    block: ReversibleBlock,
    inputs: StepInputs,
    y1: Tensor,
    x2: Tensor,
    dy1: Tensor,
    dy2: Tensor,
    params: list[Tensor],
    index: list[int],
    grads: list[Tensor | None],
    before: _RandomState,
) -> tuple[Tensor, Tensor]:
    """Recompute f(x2): x1 = y1 − f(x2), and dL/dx2 = dL/dy2 + f's share."""
    with before.replayed(), torch.enable_grad():
        leaf = x2.detach().requires_grad_(True)
        out = block.f(leaf, inputs, None)
        found = torch.autograd.grad(out, [leaf, *params], dy1, allow_unused=True)
    _accumulate(grads, index, found[1:])
    dx2 = dy2 + found[0] if found[0] is not None else dy2
    return y1 - out.detach(), dx2
