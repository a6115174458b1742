"""plugformer.attention.ChunkSource: pieces read through it (narrow, take, rows, matmul, and a
permuted view sharing the buffer) give the values and gradients of plain slicing, inside
recomputed_chunks, and the whole tensor's own gradient is added to the pieces'."""

from __future__ import annotations

import torch

import pytest

from plugformer.attention import ChunkSource, recomputed_chunks
from plugformer.chunk_source import strided_matmul


def _run(use_source: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 4, dtype=torch.double, requires_grad=True)
    a = torch.randn(2, 3, 5, 12, dtype=torch.double)
    b = torch.randn(2, 3, 5, 4, dtype=torch.double)
    c = torch.randn(2, 3, 3, 5, 4, dtype=torch.double)  # against each residue's 4 blocks
    index = torch.tensor([[0, 11, 11], [5, 6, 0]])
    rows = torch.tensor([[3, 3], [1, 10]])
    src = ChunkSource(x) if use_source else None
    blocked = src.view(lambda t: t.unflatten(-2, (4, 3)).transpose(-3, -2)) if use_source else None

    def chunk(start: int, stop: int) -> torch.Tensor:
        if use_source:
            piece = src.narrow(-2, start, stop - start)
            taken = src.take(2, index)
            picked = src.rows(rows)
            times = src.matmul(a) + src.matmul(b, transpose=True).sum(-1, keepdim=True)
            column = blocked.narrow(2, 1, 1) + blocked.matmul(c, transpose=True).sum((2, 3))[:, :, None, :, None]
        else:
            piece = x[..., start:stop, :]
            taken = x[:, :, index]
            picked = x.gather(-2, rows[:, None, :, None].expand(-1, 3, -1, 4))
            times = a @ x + (b @ x.transpose(-1, -2)).sum(-1, keepdim=True)
            residues = x.unflatten(-2, (4, 3)).transpose(-3, -2)
            column = residues[:, :, 1:2] + (c @ residues.transpose(-1, -2)).sum((2, 3))[:, :, None, :, None]
        total = taken.sum((2, 3)) + picked.sum(2) + times.sum(2) + column.sum((2, 3))
        return piece.tanh() * total[:, :, None, :]

    out = recomputed_chunks(chunk, 12, 5, dim=-2)
    whole = src.tensor if use_source else x
    out = out + whole.exp()
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    return out.detach(), grad


def test_pieces_equal_plain_slicing() -> None:
    plain, sourced = _run(False), _run(True)
    torch.testing.assert_close(sourced[0], plain[0])
    torch.testing.assert_close(sourced[1], plain[1])


def test_untracked_source_gives_plain_views() -> None:
    x = torch.randn(1, 2, 6, 3)
    with torch.no_grad():
        src = ChunkSource(x.requires_grad_())
        assert not src.tracked
        assert src.narrow(-2, 2, 3).data_ptr() == x[..., 2:5, :].data_ptr()


def test_untracked_source_matmul_passes_the_gradient_of_its_left_factor() -> None:
    """Keys that need no gradient, mixed by weights that do (sinkhorn's P in evaluation)."""
    x = torch.randn(2, 3, 8, 5).transpose(-1, -2)  # a permuted view: strided_matmul's case
    a = torch.randn(2, 3, 4, 5, requires_grad=True)
    src = ChunkSource(x)
    assert not src.tracked
    (grad,) = torch.autograd.grad(src.matmul(a).square().sum(), a)
    a_plain = a.detach().requires_grad_()
    (expected,) = torch.autograd.grad(torch.matmul(a_plain, x).square().sum(), a_plain)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("shape", [(2, 3, 8, 5), (1, 4, 8, 5), (3, 1, 8, 5)])
def test_strided_matmul_of_a_permuted_view_equals_matmul(shape: tuple[int, ...]) -> None:
    """The residue layout (b, h, residue, block, e) of a (b, h, n, e) tensor, whose leading
    dimensions do not merge: the same product as torch.matmul, in a tensor that is no view."""
    x = torch.randn(*shape, dtype=torch.double)
    residues = x.unflatten(-2, (4, 2)).transpose(-3, -2)  # (b, h, 2, 4, e)
    a = torch.randn(*residues.shape[:-2], 3, residues.shape[-1], dtype=torch.double)
    product = strided_matmul(a, residues.transpose(-1, -2))
    torch.testing.assert_close(product, a @ residues.transpose(-1, -2))
    assert product._base is None  # safe to return from an autograd Function, to modify in place
