"""Performer (FAVOR+) attention: against softmax attention and an explicit quadratic form of
its own features, causality across chunk boundaries, the redraw schedule, checkpoints,
grouped-query heads and numerical stability."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from conftest import small_context
from plugformer.testing import check_component
from plugformer_plugins.attention.favor_bidirectional import favor_bidirectional
from plugformer_plugins.attention.performer import PerformerAttention, PerformerConfig, default_num_features, draw_features


def build(causal: bool, seed: int = 0, **options) -> PerformerAttention:
    torch.manual_seed(seed)
    ctx = small_context(causal=causal, d_model=options.pop("d_model", 32), n_heads=4, n_kv_heads=options.pop("n_kv_heads", None))
    return PerformerAttention(PerformerConfig(**options), ctx).double().eval()


def qkv(length: int, batch: int = 2, heads: int = 4, head_dim: int = 8, scale: float = 0.5, seed: int = 1) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, heads, length, head_dim, generator=generator, dtype=torch.float64) for _ in range(3)]


def attend(module: PerformerAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    positions = torch.arange(q.shape[-2])[None, :]
    return module.attend(q, k, v, key_padding_mask=mask, q_positions=positions, k_positions=positions)


def relative_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def padding() -> Tensor:
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, :5] = False
    mask[1, -7:] = False
    return mask


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_many_features_approach_softmax_attention(causal: bool) -> None:
    q, k, v = qkv(40)
    mask = padding()
    allowed = mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(40, 40, dtype=torch.bool).tril()
    exact = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    real = mask[:, None, :, None]
    few = relative_error(attend(build(causal, num_features=8), q, k, v, mask) * real, exact * real)
    many = relative_error(attend(build(causal, num_features=8192), q, k, v, mask) * real, exact * real)
    assert many < 0.03, many
    assert many < few / 4, (few, many)


def explicit_favor(module: PerformerAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """The textbook estimator: φ(x) = exp(wᵀx − ‖x‖²/2)/√m on x·d^−¼, an explicit (n × n)
    matrix of kernel estimates, masked and row-normalized."""
    w = module.features.double()
    m, d = w.shape

    def phi(x: Tensor) -> Tensor:
        x = x * d**-0.25
        return torch.exp(x @ w.T - 0.5 * (x * x).sum(-1, keepdim=True)) / math.sqrt(m)

    kernel = phi(q) @ phi(k).transpose(-1, -2)
    if module.causal:
        kernel = kernel.tril()
    if mask is not None:
        kernel = kernel * mask[:, None, None, :]
    return (kernel @ v) / kernel.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize(("length", "chunk_size"), [(40, 64), (40, 7), (64, 16), (5, 1)])
def test_stabilized_chunked_sums_equal_the_explicit_estimator(causal: bool, length: int, chunk_size: int) -> None:
    module = build(causal, num_features=24, chunk_size=chunk_size)
    q, k, v = qkv(length)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, : length // 4 + 1] = False  # left padding: the first real key comes late
    real = mask[:, None, :, None]
    got = attend(module, q, k, v, mask)
    expected = explicit_favor(module, q, k, v, mask).nan_to_num()
    torch.testing.assert_close(got * real, expected * real, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("cut", [1, 63, 64, 65, 100])
def test_causal_output_before_a_change_stays_the_same(cut: int) -> None:
    module = build(True, num_features=16, chunk_size=64)
    q, k, v = qkv(130)
    reference = attend(module, q, k, v)
    q2, k2, v2 = (t.clone() for t in (q, k, v))
    for t in (q2, k2, v2):
        t[:, :, cut:] = 5.0 * torch.randn_like(t[:, :, cut:])
    out = attend(module, q2, k2, v2)
    torch.testing.assert_close(out[:, :, :cut], reference[:, :, :cut], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(out[:, :, cut:], reference[:, :, cut:])


def test_features_are_redrawn_on_schedule_and_never_in_eval() -> None:
    module = build(True, num_features=16, redraw_interval=3)
    x = torch.randn(2, 6, 32, dtype=torch.float64)
    drawn = module.features.clone()
    module.eval()
    for _ in range(5):
        module(x)
    assert torch.equal(module.features, drawn), "eval calls must neither redraw nor count"
    module.train()
    seen = []
    for _ in range(7):
        module(x)
        seen.append(module.features.clone())
    # Calls 1–3 use the initial draw, 4–6 a second one, 7 a third.
    assert all(torch.equal(f, drawn) for f in seen[:3])
    assert not torch.equal(seen[3], drawn) and all(torch.equal(f, seen[3]) for f in seen[3:6])
    assert not torch.equal(seen[6], seen[3])
    module.eval()
    first, second = module(x), module(x)
    assert torch.equal(first, second)


def test_interval_zero_never_redraws() -> None:
    module = build(False, num_features=16, redraw_interval=0).train()
    drawn = module.features.clone()
    for _ in range(5):
        module(torch.randn(1, 4, 32, dtype=torch.float64))
    assert torch.equal(module.features, drawn)


def test_state_dict_restores_the_features_and_the_schedule() -> None:
    original = build(True, seed=0, num_features=16, redraw_interval=4).train()
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    for _ in range(6):  # one redraw, two calls into the second draw
        original(x)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(True, seed=99, num_features=16, redraw_interval=4)
    assert not torch.equal(fresh.features, original.features)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh.features, original.features)
    assert int(fresh.calls_since_draw) == 2
    original.eval()
    torch.testing.assert_close(fresh(x), original(x), rtol=0, atol=0)


def test_orthogonal_features_are_orthogonal_within_blocks() -> None:
    torch.manual_seed(0)
    w = draw_features(20, 8, orthogonal=True)
    for start in (0, 8):
        block = w[start : start + 8]
        gram = block @ block.T
        off_diagonal = gram - torch.diag(torch.diagonal(gram))
        assert float(off_diagonal.abs().max()) < 1e-4 * float(gram.diagonal().max())
    norms = w.norm(dim=-1)
    assert norms.std() > 0.05, "row norms should be drawn (chi distribution), not all equal"
    assert default_num_features(64) == round(64 * math.log(64))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_large_scores_stay_finite_in_float32(causal: bool) -> None:
    module = build(causal, num_features=32).float()
    q, k, v = (t.float() for t in qkv(50, scale=6.0))
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[0, :10] = False
    q.requires_grad_(True)
    out = attend(module, q, k, v, mask)
    assert torch.isfinite(out).all()
    (out * mask[:, None, :, None]).sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_grouped_query_heads_equal_repeated_key_value_heads(causal: bool, kv_heads: int) -> None:
    """n_kv_heads projects fewer key/value heads; the result equals multi-head attention
    whose key/value heads are those heads repeated."""
    grouped = build(causal, num_features=16, n_kv_heads=kv_heads)
    full = build(causal, num_features=16)
    assert grouped.key_value.out_features == 2 * kv_heads * 8
    with torch.no_grad():
        shared = {name: t for name, t in grouped.state_dict().items() if not name.startswith("key_value")}
        full.load_state_dict(shared, strict=False)
        weight, bias = grouped.key_value.weight.view(2, kv_heads, 8, 32), grouped.key_value.bias.view(2, kv_heads, 8)
        full.key_value.weight.copy_(weight.repeat_interleave(4 // kv_heads, dim=1).reshape(-1, 32))
        full.key_value.bias.copy_(bias.repeat_interleave(4 // kv_heads, dim=1).reshape(-1))
    x = torch.randn(2, 10, 32, dtype=torch.float64)
    torch.testing.assert_close(grouped(x), full(x))


def test_a_longer_decode_crosses_chunk_boundaries() -> None:
    module = build(True, num_features=16, chunk_size=4)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    expected = module(x)
    state = module.new_state(2)
    steps = [module(x[:, t : t + 1], positions=torch.tensor([[t]]), state=state) for t in range(11)]
    torch.testing.assert_close(torch.cat(steps, dim=1), expected)


def test_short_chunks_and_few_iid_features_conform(registry) -> None:
    component = registry.get("attention", "performer")
    check_component(component, PerformerConfig(num_features=5, chunk_size=3, orthogonal=False))


@pytest.mark.parametrize("step", [3, 64])
def test_bidirectional_backward_equals_autograd_through_the_features(step: int) -> None:
    """favor_bidirectional's hand-written backward against autograd through feature_maps (the
    explicit φ(q), φ(k)), over several chunks: keys growing along the sequence (each chunk
    raises the largest exponent, so the sums are re-based), padding, and an example whose keys
    are all padded (no real key: zeros)."""
    module = build(False, num_features=24)
    q, k, v = qkv(20, batch=3)
    k = k * torch.linspace(0.2, 6.0, 20, dtype=torch.float64)[:, None]
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, :4] = False
    mask[1, -3:] = False
    mask[2] = False
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    got = favor_bidirectional(q, k, v, module.features, mask, step)
    phi_q, phi_k = module.feature_maps(q, k, mask)
    denominator = (phi_q @ phi_k.sum(dim=-2).unsqueeze(-1)).clamp_min(torch.finfo(torch.float64).tiny)
    expected = (phi_q @ (phi_k.transpose(-1, -2) @ v)) / denominator
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert got[2].abs().max() == 0
    grad = torch.randn_like(got)
    grad_expected = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), grad), grad_expected):
        # Autograd through the clamped denominator gives the all-padded example S g/tiny (inf,
        # NaN); here its constant zero output passes no gradient.
        torch.testing.assert_close(a[:2], b[:2], rtol=1e-9, atol=1e-11)
        assert a[2].abs().max() == 0
    # Only k needs a gradient: the same one.
    k_only = favor_bidirectional(q.detach(), k, v.detach(), module.features, mask, step)
    (grad_k,) = torch.autograd.grad(k_only, (k,), grad)
    torch.testing.assert_close(grad_k[:2], grad_expected[1][:2], rtol=1e-9, atol=1e-11)
