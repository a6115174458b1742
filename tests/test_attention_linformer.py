"""Linformer attention against a dense reference written head by head from the paper's
formula softmax(Q(EK)ᵀ/√d)(FV), with padded keys removed through an explicit boolean mask."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import Tensor

from compose import compose_train
from conftest import small_context
from helpers import FAST
from plugformer import CapabilityError, ConfigError
from plugformer.plugins import load_plugins
from plugformer.training.run import train
from plugformer_plugins.attention import linformer
from plugformer_plugins.attention.linformer import LinformerConfig, Sharing


def build(config: LinformerConfig, *, n_kv_heads: int | None = None):
    ctx = small_context(causal=False, d_model=32, n_heads=4, n_kv_heads=n_kv_heads)
    return linformer.COMPONENT.factory(config, ctx).eval().double()


def dense_linformer(module, x: Tensor, mask: Tensor | None) -> Tensor:
    """Head by head: E_h, F_h (k × n) from the module's parameters, keys and values of padded
    tokens removed by the boolean mask, softmax over the k projected slots."""
    batch, length, d_model = x.shape
    heads, head_dim, kv_heads = module.n_heads, module.head_dim, module.n_kv_heads
    q = module.query(x).view(batch, length, heads, head_dim)
    k, v = module.key_value(x).view(batch, length, 2, kv_heads, head_dim).unbind(2)
    real = torch.ones(batch, length, dtype=torch.bool) if mask is None else mask
    out = torch.zeros(batch, length, heads, head_dim, dtype=x.dtype)
    for h in range(heads):
        g = h // (heads // kv_heads)  # the key/value head this query head reads
        e = module.key_projection[h] if module.sharing is Sharing.none else module.key_projection
        f = e if module.value_projection is None else (
            module.value_projection[h] if module.sharing is Sharing.none else module.value_projection
        )
        for b in range(batch):
            keep = real[b]
            projected_k = e[:, :length][:, keep] @ k[b, keep, g]  # (k, head_dim)
            projected_v = f[:, :length][:, keep] @ v[b, keep, g]
            weights = torch.softmax(q[b, :, h] @ projected_k.T / head_dim**0.5, dim=-1)
            out[b, :, h] = weights @ projected_v
    return module.out(out.reshape(batch, length, d_model))


def padding(batch: int, length: int) -> Tensor:
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :2] = False
    mask[1, -3:] = False
    mask[2, length // 2] = False
    return mask


@pytest.mark.parametrize("sharing", list(Sharing))
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
@pytest.mark.parametrize(("length", "max_length", "k"), [(20, 20, 6), (13, 32, 6), (9, 16, 12)])
def test_linformer_matches_the_formula(sharing, n_kv_heads, length, max_length, k):
    torch.manual_seed(0)
    module = build(LinformerConfig(max_length=max_length, k=k, sharing=sharing), n_kv_heads=n_kv_heads)
    x = torch.randn(3, length, 32, dtype=torch.float64)
    mask = padding(3, length)
    with torch.no_grad():
        torch.testing.assert_close(module(x, mask=mask), dense_linformer(module, x, mask), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(module(x), dense_linformer(module, x, None), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("sharing", list(Sharing))
def test_padding_is_invisible(sharing):
    """Changing padded tokens leaves the real outputs unchanged; a right-padded sequence gives
    the outputs of the unpadded one (the first n columns of E and F are the ones used); an
    example without a real token returns zeros before the output projection."""
    torch.manual_seed(1)
    module = build(LinformerConfig(max_length=24, k=5, sharing=sharing))
    x = torch.randn(3, 24, 32, dtype=torch.float64)
    mask = padding(3, 24)
    with torch.no_grad():
        reference = module(x, mask=mask)
        noisy = torch.where(mask[..., None], x, 5 * torch.randn_like(x))
        torch.testing.assert_close(module(noisy, mask=mask)[mask], reference[mask])
        short = torch.ones(1, 24, dtype=torch.bool)
        short[:, 17:] = False
        torch.testing.assert_close(module(x[:1], mask=short)[:, :17], module(x[:1, :17]))
        empty = torch.zeros(1, 24, dtype=torch.bool)
        torch.testing.assert_close(module(x[:1], mask=empty)[0], module.out.bias.expand(24, -1))


def test_linformer_is_not_causal_and_refuses_a_decoder():
    """Every projected slot mixes all positions: an early output depends on later tokens,
    which is why the component provides only "bidirectional"."""
    torch.manual_seed(2)
    module = build(LinformerConfig(max_length=16, k=4))
    x = torch.randn(1, 16, 32, dtype=torch.float64)
    changed = x.clone()
    changed[:, 10:] = torch.randn(1, 6, 32, dtype=torch.float64)
    with torch.no_grad():
        assert not torch.allclose(module(x)[:, :10], module(changed)[:, :10])
    provides = linformer.COMPONENT.capabilities_for().provides
    assert "bidirectional" in provides and "causal" not in provides and "incremental_decoding" not in provides
    with pytest.raises(ConfigError, match="causal"):
        linformer.COMPONENT.factory(LinformerConfig(), small_context(causal=True))


def test_sharing_variants_own_the_projections_they_say():
    heads, k, n = 4, 6, 20
    none = build(LinformerConfig(max_length=n, k=k, sharing=Sharing.none))
    headwise = build(LinformerConfig(max_length=n, k=k, sharing=Sharing.headwise))
    key_value = build(LinformerConfig(max_length=n, k=k, sharing=Sharing.key_value))
    assert none.key_projection.shape == none.value_projection.shape == (heads, k, n)
    assert headwise.key_projection.shape == headwise.value_projection.shape == (k, n)
    assert key_value.key_projection.shape == (k, n) and key_value.value_projection is None
    grouped = build(LinformerConfig(max_length=n, k=k), n_kv_heads=1)
    assert grouped.key_value.out_features == 2 * 8  # one key/value head of head_dim 8


def test_capabilities_declare_the_maximum_length_and_linear_cost():
    capabilities = linformer.COMPONENT.capabilities_for(LinformerConfig(max_length=300))
    assert capabilities.max_length == 300 and capabilities.cost == "linear"
    module = build(LinformerConfig(max_length=8, k=4))
    with pytest.raises(ValueError, match="max_length=8"):
        module(torch.randn(1, 9, 32, dtype=torch.float64))


def test_memory_grows_as_n_times_k():
    """At length 2048 an n × n score tensor per head holds 4.2M entries; Linformer's largest
    saved tensor is the (heads, n, k) weights (or the (n, d_model) activations)."""
    torch.manual_seed(3)
    length, k = 2048, 32
    module = build(LinformerConfig(max_length=length, k=k)).float().train()
    largest = 0

    def keep_size(tensor: Tensor) -> Tensor:
        nonlocal largest
        largest = max(largest, tensor.numel())
        return tensor

    x = torch.randn(1, length, 32, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(keep_size, lambda t: t):
        module(x).sum().backward()
    assert largest <= max(module.n_heads * length * k, length * 3 * 32), largest


PLUGINS = load_plugins()
LISTOPS = ["data=listops", "objective=classification", "data.min_length=10", "data.max_length=30",
           "data.max_depth=2", "data.train_examples=64", "data.val_examples=16", "data.test_examples=0",
           "data.batch_size=16", "logger=none", "trainer.max_steps=2", "trainer.val_check_interval=2",
           "trainer.limit_val_batches=1"]


def test_the_builder_refuses_data_longer_than_max_length(tmp_path: Path):
    cfg = compose_train("model/attention=linformer", "model.attention.max_length=16", f"run_dir={tmp_path}", *FAST, *LISTOPS)
    with pytest.raises(CapabilityError) as error:
        train(cfg, PLUGINS, tmp_path, run_id="linf0000")
    assert "'linformer'" in str(error.value) and "max_length" in str(error.value)
    assert not (tmp_path / "checkpoints").exists()


def test_the_builder_refuses_a_causal_objective(tmp_path: Path):
    cfg = compose_train("model/attention=linformer", "logger=none", f"run_dir={tmp_path}", *FAST)
    with pytest.raises(CapabilityError, match="causal"):
        train(cfg, PLUGINS, tmp_path, run_id="linf0001")


def test_an_encoder_trains_with_key_value_sharing_and_grouped_query_heads(tmp_path: Path):
    cfg = compose_train(
        "model/attention=linformer", "model.attention.max_length=64", "model.attention.k=16",
        "model.attention.sharing=key_value", "model.n_kv_heads=2", f"run_dir={tmp_path}", *FAST, *LISTOPS,
    )
    summary = train(cfg, PLUGINS, tmp_path, run_id="linf0002")
    assert summary["status"] == "finished" and summary["global_step"] == 2
