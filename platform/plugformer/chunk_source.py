"""Reading a tensor in pieces inside recomputed chunks with one gradient buffer.

:class:`ChunkSource` is what chunked attention kernels (:func:`plugformer.attention.recomputed_chunks`)
read q, k and v through: every piece's gradient is added in place into one buffer of the
tensor's size, instead of autograd's full-size zero tensor per sliced piece. Imported by
plugins as ``plugformer.attention.ChunkSource``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import torch
from torch import Tensor


class ChunkSource:
    """A tensor that chunked code reads piece by piece (:meth:`narrow`, :meth:`take`), whose
    gradient the pieces accumulate in place into one buffer of the tensor's size.

    Slicing a tensor that requires grad (``x[..., a:b, :]``, ``x.narrow``, ``x[:, :, index]``)
    makes autograd build a zero tensor of ``x``'s full size in the backward pass of every
    slice and add it to ``x``'s gradient: with many chunks, each chunk's backward briefly
    holds one more full-size tensor per sliced input and spends O(n) time on it. Pieces taken
    through a ChunkSource instead add their gradient straight into the right rows of a single
    buffer, which becomes ``x``'s gradient once every piece's backward has run (autograd's
    dependency count sees to that order). Values and gradients are exactly those of plain
    slicing. Without autograd (no grad mode, or ``x`` not requiring grad) the pieces are plain
    views. ``tensor`` is ``x`` (through an identity node when tracked) for whole-tensor use;
    gradients through it are added to the pieces'. Not twice differentiable.

    Lifetime: a tracked source lets go of ``x`` (its :meth:`view` s read through it) as soon as
    its identity node's backward has run, i.e. once every piece's backward has: the autograd
    nodes of the pieces and the checkpoint frames of :func:`~plugformer.attention.recomputed_chunks`
    hold the source, so without this ``x`` (q, k, v: views of the projections' outputs) would
    live until the whole graph is released, through the projections' backward. After that
    backward the source is spent: reading it raises. A backward with ``retain_graph=True``
    keeps it (a second backward recomputes the chunks, which read it again).
    """

    def __init__(self, x: Tensor) -> None:
        self._buffer: Tensor | None = None
        self._like = (x.shape, x.dtype, x.device)
        self._parent: tuple[ChunkSource, Callable[[Tensor], Tensor]] | None = None
        self.tracked = torch.is_grad_enabled() and x.requires_grad
        self._tensor: Tensor | None = _SourceNode.apply(x, self) if self.tracked else x

    @property
    def tensor(self) -> Tensor:
        """The whole tensor (of a :meth:`view`: recomputed at each use, so a reshape that must
        copy copies only inside the chunk that reads it). Raises once the source is spent."""
        if self._parent is not None:
            parent, fn = self._parent
            return fn(parent.tensor)
        if self._tensor is None:
            raise RuntimeError(
                "ChunkSource read after its backward pass released it: a source lets go of its "
                "tensor once its gradient has been handed on (expected: one backward per forward, "
                "or retain_graph=True for another); build a new ChunkSource for a new forward pass"
            )
        return self._tensor

    def view(self, fn: Callable[[Tensor], Tensor]) -> ChunkSource:
        """A source of ``fn(x)``, where ``fn`` only reshapes or reorders: its pieces add their
        gradient into ``fn`` of this source's buffer (contiguous, so there ``fn`` is a view),
        so two layouts of one tensor (blocks, residues) share one gradient buffer."""
        derived = ChunkSource.__new__(ChunkSource)
        derived.tracked, derived._buffer = self.tracked, None
        derived._like = (fn(self.tensor).shape, self._like[1], self._like[2])
        derived._parent = (self, fn)
        return derived

    @property
    def dtype(self) -> torch.dtype:
        return self._like[1]

    @property
    def shape(self) -> torch.Size:
        return self._like[0]

    @property
    def device(self) -> torch.device:
        return self._like[2]

    def narrow(self, dim: int, start: int, length: int) -> Tensor:
        """``x.narrow(dim, start, length)`` (a view)."""
        if not self.tracked:
            return self.tensor.narrow(dim, start, length)
        return _NarrowNode.apply(self.tensor, self, dim, start, length)

    def take(self, dim: int, index: Tensor) -> Tensor:
        """``x`` indexed along ``dim`` by the long tensor ``index`` of any shape, whose
        dimensions replace ``dim`` (``x[:, :, index]`` for dim=2); repeated indices add up."""
        if not self.tracked:
            return _take(self.tensor, dim, index)
        return _TakeNode.apply(self.tensor, self, dim, index)

    def rows(self, index: Tensor) -> Tensor:
        """``x`` (batch, heads, n, e) at rows ``index`` (batch, g) of each example: (batch,
        heads, g, e)."""
        if not self.tracked:
            return _rows(self.tensor, index)
        return _RowsNode.apply(self.tensor, self, index)

    def matmul(self, a: Tensor, *, transpose: bool = False) -> Tensor:
        """``a @ x`` (``a`` (..., r, n) for ``x`` (..., n, e)), or ``a @ xᵀ`` with ``transpose``
        (``a`` (..., r, e)), ``a``'s leading dimensions those of ``x``. ``x`` is never copied,
        even when it is a permuted view (a :meth:`view` into another layout, such as the
        residues of a blocked sequence): the product runs as batched matrix products over
        ``x``'s own strides. The gradient for ``x`` (a full-size product) is added into the
        buffer in place, so a chunk that reads the whole tensor (a global query against every
        key) adds no full-size temporary to the backward pass."""
        x = self.tensor
        # strided_matmul writes through bmm(out=), which autograd cannot record: an untracked
        # source whose ``a`` needs a gradient (a soft permutation of constant keys) uses matmul.
        needs_graph = torch.is_grad_enabled() and a.requires_grad
        if a.shape[:-2] != x.shape[:-2] or x.dim() < 3 or (needs_graph and not self.tracked):
            return torch.matmul(a, x.transpose(-1, -2) if transpose else x)
        if not self.tracked:
            return strided_matmul(a, x.transpose(-1, -2) if transpose else x)
        return _MatmulNode.apply(a, x, self, transpose)

    def _gradient(self) -> Tensor:
        """The buffer pieces add into, zero until the first piece's backward."""
        if self._parent is not None:
            parent, fn = self._parent
            return fn(parent._gradient())
        if self._buffer is None:
            shape, dtype, device = self._like
            self._buffer = torch.zeros(shape, dtype=dtype, device=device)
        return self._buffer

    def _release(self, *, spend: bool) -> Tensor | None:
        """The accumulated gradient (None if no piece had one); ``spend`` also drops the tensor
        (see the lifetime contract)."""
        buffer, self._buffer = self._buffer, None
        if spend:
            self._tensor = None
        return buffer


def _keep_graph() -> bool:
    """Whether the running backward pass keeps the graph (``retain_graph=True``)."""
    return torch._C._autograd._get_current_graph_task_keep_graph()


def _done(ctx) -> bool:  # noqa: ANN001 (an autograd Function's ctx)
    """Drop ``ctx.source`` after a node's backward unless the graph is kept, so that nodes the
    engine keeps until the whole graph is released do not keep the source's tensor alive."""
    if not _keep_graph():
        ctx.source = None
        return True
    return False


def _take(x: Tensor, dim: int, index: Tensor) -> Tensor:
    dim = dim % x.dim()
    return x.index_select(dim, index.reshape(-1)).unflatten(dim, index.shape)


def _rows(x: Tensor, index: Tensor) -> Tensor:
    return x.gather(-2, index[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


class _RowsNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, source: ChunkSource, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.source, ctx.index = source, index
        return _rows(x, index)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[None, None, None]:  # type: ignore[override]
        if grad is not None:
            index = ctx.index[:, None, :, None].expand(-1, grad.shape[1], -1, grad.shape[-1])
            ctx.source._gradient().scatter_add_(-2, index, grad.to(ctx.source.dtype))
        _done(ctx)
        return None, None, None


class _SourceNode(torch.autograd.Function):
    """Identity whose backward hands on the pieces' accumulated gradient (runs after them)."""

    @staticmethod
    def forward(ctx, x: Tensor, source: ChunkSource) -> Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.source = source
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, None]:  # type: ignore[override]
        source = ctx.source
        pieces = source._release(spend=_done(ctx))
        if grad is None:
            return pieces, None
        return (grad if pieces is None else pieces.add_(grad)), None


class _NarrowNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, source: ChunkSource, dim: int, start: int, length: int) -> Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.source, ctx.dim, ctx.start, ctx.length = source, dim, start, length
        return x.narrow(dim, start, length)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[None, ...]:  # type: ignore[override]
        if grad is not None:
            ctx.source._gradient().narrow(ctx.dim, ctx.start, ctx.length).add_(grad)
        _done(ctx)
        return None, None, None, None, None


class _TakeNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, source: ChunkSource, dim: int, index: Tensor) -> Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.source, ctx.dim, ctx.index = source, dim % x.dim(), index
        return _take(x, dim, index)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[None, ...]:  # type: ignore[override]
        if grad is not None:
            dim, index = ctx.dim, ctx.index
            flat = grad.flatten(dim, dim + index.dim() - 1) if index.dim() > 1 else grad
            if index.dim() == 0:
                flat = grad.unsqueeze(dim)
            ctx.source._gradient().index_add_(dim, index.reshape(-1), flat.to(ctx.source._like[1]))
        _done(ctx)
        return None, None, None, None


class _MatmulNode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, x: Tensor, source: ChunkSource, transpose: bool) -> Tensor:  # type: ignore[override]
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(a, x)
        ctx.source, ctx.transpose = source, transpose
        return strided_matmul(a, x.transpose(-1, -2) if transpose else x)

    @staticmethod
    def backward(ctx, grad: Tensor | None) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        if grad is None:
            _done(ctx)
            return None, None, None, None
        a, x = ctx.saved_tensors
        grad_a = None
        if ctx.needs_input_grad[0]:
            grad_a = strided_matmul(grad.to(x.dtype), x if ctx.transpose else x.transpose(-1, -2)).to(a.dtype)
        buffer = ctx.source._gradient()
        g, a = grad.to(buffer.dtype), a.to(buffer.dtype)
        # y = a xᵀ: dx = gᵀ a; y = a x: dx = aᵀ g.
        left, right = (g.transpose(-1, -2), a) if ctx.transpose else (a.transpose(-1, -2), g)
        target, order = _batched_view(buffer)
        left3, right3 = (_batched_like(t, order, target) for t in (left, right))
        for index in itertools.product(*(range(size) for size in target.shape[:-3])):
            into = target[index]
            if into.is_contiguous():
                into.baddbmm_(left3[index], right3[index])
            else:  # in place, a strided batch would run one small product per matrix
                into.add_(torch.bmm(left3[index], right3[index]))
        _done(ctx)
        return grad_a, None, None, None


def _batched_view(x: Tensor) -> tuple[Tensor, list[int]]:
    """``x`` (..., r, c) as a view (*looped, batch, r, c) and the permutation of its dimensions
    used: ``batch`` merges the run of leading dimensions with the most elements that ``x``'s
    strides let merge without a copy (all of them for a contiguous tensor; for a permuted view
    such as (b, h, residue, block, e) of a (b, h, n, e) tensor, b·h or the residues), the
    other leading dimensions are looped over."""
    lead = x.dim() - 2
    spans = sorted(((i, j) for i in range(lead) for j in range(i + 1, lead + 1)), key=lambda s: -math.prod(x.shape[s[0] : s[1]]))
    for i, j in spans:
        order = [*range(i), *range(j, lead), *range(i, j), lead, lead + 1]
        looped = [x.shape[d] for d in order[: lead - (j - i)]]
        try:
            return x.permute(order).view(*looped, -1, *x.shape[-2:]), order
        except RuntimeError:  # these dimensions' strides do not merge
            continue
    return x.unsqueeze(-3), list(range(x.dim()))  # no leading dimension merges: batches of one


def _batched_like(t: Tensor, order: list[int], like: Tensor) -> Tensor:
    """``t`` (same leading dimensions as the tensor ``like`` was made from) permuted and merged
    the same way (a copy when ``t``'s own strides need one: a chunk-sized operand)."""
    return t.permute(order).reshape(*like.shape[:-2], *t.shape[-2:])


def strided_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` for equal leading dimensions, as batched matrix products over ``b``'s strides:
    a permuted view ``b`` is never copied (``torch.matmul`` would make it contiguous first);
    ``a`` is merged the same way (copied only if its strides need it)."""
    b3, order = _batched_view(b)
    a3 = _batched_like(a, order, b3)
    # The result is laid out in b3's order but indexed in a's (empty_strided: not a view, so a
    # custom autograd Function may return it and callers may modify it in place).
    permuted = [*(b.shape[d] for d in order[:-2]), a.shape[-2], b.shape[-1]]
    contiguous = [math.prod(permuted[i + 1 :]) for i in range(len(permuted))]
    strides = [0] * len(order)
    for position, dim in enumerate(order):
        strides[dim] = contiguous[position]
    shape = [*a.shape[:-2], a.shape[-2], b.shape[-1]]
    out = torch.empty_strided(shape, strides, dtype=torch.promote_types(a.dtype, b.dtype), device=b.device)
    out3 = out.permute(order).view(*b3.shape[:-2], *out.shape[-2:])
    for index in itertools.product(*(range(size) for size in b3.shape[:-3])):
        torch.bmm(a3[index], b3[index], out=out3[index])
    return out
