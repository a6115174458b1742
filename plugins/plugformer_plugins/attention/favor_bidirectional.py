"""Bidirectional FAVOR+ (Performer) attention as two autograd Functions with hand-written backwards.

Forward, chunk by chunk over the keys: the key features φ(k) = exp(wᵀx − ‖x‖²/2 − ‖w‖²/2 −
top) (x = k·d^−¼, ``top`` the largest key exponent over the real keys, found online: the sums
are rescaled when a later chunk raises it) and the sums [S | z] = [Σ φ(k)vᵀ | Σ φ(k)]; then
over the queries φ(q) = exp(wᵀx + ‖w‖²/2 − max_f(…)) and out = φ(q)S / max(φ(q)·z, tiny).
Only q, k, v, the (features × head_dim) sums and ``top`` are kept for the backward pass,
which recomputes each chunk's features once and runs the chain rule in closed form:

    u = S g,  den = φ(q)·z,  dφ(q) = (u − z (φ(q)·u)/den) / den,
    dS = Σ φ(q) (g/den)ᵀ,  dz = Σ φ(q) d(den),  dq = d^−¼ (dφ(q) ⊙ φ(q)) w,
    dφ(k) = dS v + dz,  dv = φ(k)ᵀ dS,  dk = d^−¼ ((dφ(k) ⊙ φ(k)) w − x Σ_f dφ(k)_f φ(k)_f).

The two maxima are constants that cancel (no gradient), as in autograd through
:meth:`PerformerAttention.feature_maps`. A query that sees no (non-underflowed) key (den <
tiny) outputs the constant 0 and passes no gradient (autograd through the clamped
denominator gives S g/tiny there: inf and NaN for an example whose keys are all padded). Against autograd through recomputed chunks this
saves one recomputation of the forward pass, the per-chunk checkpoint and a few dozen
small kernels per chunk. Not twice differentiable.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def _log_k(k: Tensor, start: int, stop: int, w: Tensor, half_norms: Tensor, scale: float, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """x = k·d^−¼ of keys [start, stop) and their exponents wᵀx − ‖x‖²/2 − ‖w‖²/2 (−inf at padded keys)."""
    xk = k.narrow(-2, start, stop - start).to(w.dtype) * scale
    log_k = torch.matmul(xk, w.T).sub_(half_norms).sub_(0.5 * (xk * xk).sum(dim=-1, keepdim=True))
    if mask is not None:
        log_k.masked_fill_(~mask[:, None, start:stop, None], float("-inf"))
    return xk, log_k


def _phi_q(q: Tensor, start: int, stop: int, w: Tensor, half_norms: Tensor, scale: float) -> Tensor:
    """φ(q) of queries [start, stop), each row shifted by its largest exponent."""
    log_q = torch.matmul(q.narrow(-2, start, stop - start).to(w.dtype) * scale, w.T).add_(half_norms)
    return log_q.sub_(log_q.amax(dim=-1, keepdim=True)).exp_()


def favor_bidirectional(q: Tensor, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Tensor | None, step: int) -> Tensor:
    """FAVOR+ attention of q (b, h, Lq, d) over k (b, h, Lk, d), v (b, h, Lk, e), with the
    random features w (m, d) in the compute dtype (at least float32), ``key_padding_mask``
    (b, Lk) bool or None (True: a real key), ``step`` tokens per chunk → (b, h, Lq, e) in v's
    dtype; zeros for a query that sees no (non-underflowed) key. The output's memory is laid
    out (b, Lq, h, e), so the caller's transpose-and-merge of the heads is a view.

    Two autograd nodes: the queries' backward runs first and hands on dS and dz, and the
    incoming gradient and q are released before the keys' backward allocates dk and dv."""
    sums, norm = _KeySums.apply(k, v, w, key_padding_mask, step)
    return _QueryOut.apply(q, sums, norm, w, step, v.dtype)


class _KeySums(torch.autograd.Function):
    """[S | z] = [Σ φ(k)vᵀ | Σ φ(k)] (b, h, m, e) and (b, h, m, 1), keys taken ``step`` at a time."""

    @staticmethod
    def forward(ctx, k: Tensor, v: Tensor, w: Tensor, key_padding_mask: Tensor | None, step: int) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        dtype = w.dtype
        scale = k.shape[-1] ** -0.25
        half_norms = 0.5 * (w * w).sum(dim=-1)
        batch, heads, k_length = k.shape[0], k.shape[1], k.shape[-2]
        sums = torch.zeros(batch, heads, w.shape[0], v.shape[-1], dtype=dtype, device=k.device)
        norm = torch.zeros(batch, heads, w.shape[0], 1, dtype=dtype, device=k.device)
        top = torch.full((batch, heads, 1, 1), float("-inf"), dtype=dtype, device=k.device)
        for start in range(0, k_length, step):
            stop = min(k_length, start + step)
            _, log_k = _log_k(k, start, stop, w, half_norms, scale, key_padding_mask)
            new_top = torch.maximum(top, log_k.amax(dim=(-2, -1), keepdim=True))
            shift = torch.where(torch.isfinite(new_top), new_top, torch.zeros_like(new_top))
            if start:  # the earlier chunks' sums, re-based on the new largest exponent (0 while none is real)
                rebase = torch.exp(top - shift)
                sums.mul_(rebase)
                norm.mul_(rebase)
            top = new_top
            phi_k = log_k.sub_(shift).exp_()
            sums.add_(torch.matmul(phi_k.transpose(-1, -2), v.narrow(-2, start, stop - start).to(dtype)))
            norm.add_(phi_k.sum(dim=-2).unsqueeze(-1))
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
        ctx.save_for_backward(k, v, w, top)
        ctx.key_padding_mask, ctx.step = key_padding_mask, step
        return sums, norm

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_sums: Tensor, grad_norm: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        k, v, w, top = ctx.saved_tensors
        mask, step = ctx.key_padding_mask, ctx.step
        dtype = w.dtype
        scale = k.shape[-1] ** -0.25
        half_norms = 0.5 * (w * w).sum(dim=-1)
        need_k, need_v = ctx.needs_input_grad[:2]
        grad_k = torch.empty_like(k) if need_k else None
        grad_v = torch.empty_like(v) if need_v else None
        grad_sums, grad_norm = grad_sums.to(dtype), grad_norm.to(dtype)
        grad_sums_t, grad_norm_t = grad_sums.transpose(-1, -2), grad_norm.transpose(-1, -2)
        for start in range(0, k.shape[-2], step):
            stop = min(k.shape[-2], start + step)
            xk, log_k = _log_k(k, start, stop, w, half_norms, scale, mask)
            phi_k = log_k.sub_(top).exp_()  # 0 at padded keys: no gradient reaches them
            if need_v:
                grad_v.narrow(-2, start, stop - start).copy_(torch.matmul(phi_k, grad_sums))
            if need_k:
                values = v.narrow(-2, start, stop - start).to(dtype)
                grad_log_k = torch.matmul(values, grad_sums_t).add_(grad_norm_t).mul_(phi_k)  # dφ(k) ⊙ φ(k)
                grad_x = torch.matmul(grad_log_k, w).sub_(xk * grad_log_k.sum(dim=-1, keepdim=True))
                grad_k.narrow(-2, start, stop - start).copy_(grad_x.mul_(scale))
        return grad_k, grad_v, None, None, None


class _QueryOut(torch.autograd.Function):
    """out = φ(q)S / max(φ(q)·z, tiny), queries taken ``step`` at a time."""

    @staticmethod
    def forward(ctx, q: Tensor, sums: Tensor, norm: Tensor, w: Tensor, step: int, out_dtype: torch.dtype) -> Tensor:  # type: ignore[override]
        dtype = w.dtype
        scale = q.shape[-1] ** -0.25
        half_norms = 0.5 * (w * w).sum(dim=-1)
        tiny = torch.finfo(dtype).tiny
        batch, heads, length, e = q.shape[0], q.shape[1], q.shape[-2], sums.shape[-1]
        # (b, Lq, h, e) memory seen as (b, h, Lq, e): not a view, so a Function may return it.
        out = torch.empty_strided(
            (batch, heads, length, e), (length * heads * e, e, heads * e, 1), dtype=out_dtype, device=q.device
        )
        for start in range(0, length, step):
            stop = min(length, start + step)
            phi_q = _phi_q(q, start, stop, w, half_norms, scale)
            denominator = torch.matmul(phi_q, norm).clamp_min_(tiny)
            out.narrow(-2, start, stop - start).copy_(torch.matmul(phi_q, sums).div_(denominator))
        ctx.save_for_backward(q, sums, norm, w)
        ctx.step = step
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        q, sums, norm, w = ctx.saved_tensors
        step = ctx.step
        dtype = w.dtype
        scale = q.shape[-1] ** -0.25
        half_norms = 0.5 * (w * w).sum(dim=-1)
        tiny = torch.finfo(dtype).tiny
        need_q = ctx.needs_input_grad[0]
        grad_q = torch.empty_like(q) if need_q else None
        grad_sums, grad_norm = torch.zeros_like(sums), torch.zeros_like(norm)
        sums_t, norm_t = sums.transpose(-1, -2), norm.transpose(-1, -2)
        for start in range(0, q.shape[-2], step):
            stop = min(q.shape[-2], start + step)
            phi_q = _phi_q(q, start, stop, w, half_norms, scale)
            g = grad.narrow(-2, start, stop - start).to(dtype)
            raw = torch.matmul(phi_q, norm)  # φ(q)·z, (b, h, c, 1)
            # 1/den, and 0 where no key is seen (den < tiny): that output is the constant 0,
            # whose gradient would otherwise be S g/tiny, overflowing to inf and NaN.
            inverse = raw.reciprocal().masked_fill_(raw < tiny, 0.0)
            u = torch.matmul(g, sums_t).mul_(inverse)  # S g / den, (b, h, c, m)
            # d(den) = −(g·out)/den, with g·out = φ(q)·(S g) / den.
            grad_den = (phi_q * u).sum(dim=-1, keepdim=True).mul_(inverse).neg_()
            phi_q_t = phi_q.transpose(-1, -2)
            grad_sums.add_(torch.matmul(phi_q_t, g * inverse))
            grad_norm.add_(torch.matmul(phi_q_t, grad_den))
            if need_q:
                grad_log_q = u.add_(grad_den * norm_t).mul_(phi_q)  # dφ(q) ⊙ φ(q)
                grad_q.narrow(-2, start, stop - start).copy_(torch.matmul(grad_log_q, w).mul_(scale))
        return grad_q, grad_sums, grad_norm, None, None, None
