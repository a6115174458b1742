"""plugformer.attention.ChunkSource: pieces read through it (narrow, take, rows, matmul, and a
permuted view sharing the buffer) give the values and gradients of plain slicing, inside
recomputed_chunks, and the whole tensor's own gradient is added to the pieces'."""

from __future__ import annotations

import torch

from plugformer.attention import ChunkSource, recomputed_chunks


def _run(use_source: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 4, dtype=torch.double, requires_grad=True)
    a = torch.randn(2, 3, 5, 12, dtype=torch.double)
    b = torch.randn(2, 3, 5, 4, dtype=torch.double)
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
            column = blocked.narrow(2, 1, 1)
        else:
            piece = x[..., start:stop, :]
            taken = x[:, :, index]
            picked = x.gather(-2, rows[:, None, :, None].expand(-1, 3, -1, 4))
            times = a @ x + (b @ x.transpose(-1, -2)).sum(-1, keepdim=True)
            column = x.unflatten(-2, (4, 3)).transpose(-3, -2)[:, :, 1:2]
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
