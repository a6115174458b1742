"""The relative positions shaw (Shaw et al. 2018) and t5 (Raffel et al. 2020): T5's buckets
by hand, which parameters a model holds, Shaw against a direct implementation of the
paper's equations, blockwise (local) equal to full attention, cached decoding equal to one
forward, refusals and the kit."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from compose import compose_train
from plugformer import Attention, BuildContext, Capabilities, CapabilityError, Component
from plugformer.model.builder import build_model, check_components, choose_components
from plugformer.plugins import load_plugins
from plugformer.testing import check_component
from plugformer_plugins.attention.full import FullAttention, FullAttentionConfig
from plugformer_plugins.attention.local import LocalAttentionConfig, SlidingWindowAttention
from plugformer_plugins.position.shaw import ShawConfig, ShawPosition, ShawTables
from plugformer_plugins.position.t5 import T5BiasConfig, T5RelativeBias, relative_position_bucket

REGISTRY = load_plugins().registry


# --- T5 buckets ---------------------------------------------------------------------------

# relative position j − i → bucket, for 32 buckets and max distance 128, computed by hand from
# n/2 + ⌊log(d / (n/2)) / log(128 / (n/2)) · n/2⌋ (n buckets per side, capped at n − 1).
BIDIRECTIONAL = {  # 16 buckets a side, 8 exact: 8 + ⌊log(d/8)/log(16)·8⌋
    0: 0, -1: 1, -7: 7, -8: 8, -11: 8, -12: 9, -16: 10, -32: 12, -64: 14, -127: 15, -128: 15, -1000: 15,
    1: 17, 7: 23, 8: 24, 16: 26, 32: 28, 64: 30, 128: 31, 1000: 31,
}
CAUSAL = {  # 32 buckets for i − j ≥ 0, 16 exact: 16 + ⌊log(d/16)/log(8)·16⌋; future keys → 0
    0: 0, -5: 5, -15: 15, -16: 16, -31: 21, -32: 21, -64: 26, -127: 31, -128: 31, -1000: 31, 1: 0, 50: 0,
}


@pytest.mark.parametrize(("bidirectional", "table"), [(True, BIDIRECTIONAL), (False, CAUSAL)], ids=["bidirectional", "causal"])
def test_t5_buckets_by_hand(bidirectional: bool, table: dict[int, int]) -> None:
    relative = torch.tensor(list(table))
    buckets = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert dict(zip(table, buckets.tolist(), strict=True)) == table


def test_t5_bias_is_a_function_of_j_minus_i_per_head() -> None:
    position = T5RelativeBias(T5BiasConfig(), context(causal=False))
    bias = position.score_bias(torch.arange(6)[None, :], torch.arange(6)[None, :])
    assert bias.shape == (1, 2, 6, 6)
    buckets = relative_position_bucket(torch.tensor([3 - 1]), bidirectional=True, num_buckets=32, max_distance=128)
    assert torch.equal(bias[0, :, 1, 3], position.bias[buckets[0]].float())


# --- Parameters in a model ---------------------------------------------------------------


def build(*overrides: str) -> nn.Module:
    cfg = compose_train("model.d_model=32", "model.n_heads=4", "model.n_layers=3", "logger=none", *overrides)
    chosen = choose_components(cfg, REGISTRY)
    plan = check_components(cfg, chosen, REGISTRY)
    return build_model(cfg, chosen, SimpleNamespace(max_length=64, vocab_size=50, facts={}), plan)


def attention_positions(model: nn.Module) -> list[object]:
    return [m.position for m in model.modules() if isinstance(m, Attention)]


def position_parameters(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters() if ".position." in name}


def test_t5_bias_is_shared_across_layers() -> None:
    model = build("model/position=t5")
    assert position_parameters(model) == {"stacks.decoder.position.bias": (32, 4)}
    positions = attention_positions(model)
    assert len(positions) == 3 and all(p is positions[0] for p in positions)


@pytest.mark.parametrize(("share", "tables"), [(False, 3), (True, 1)], ids=["per_layer", "shared"])
def test_shaw_owns_tables_per_layer(share: bool, tables: int) -> None:
    model = build("model/position=shaw", f"model.position.share_layers={share}")
    expected = {
        f"stacks.decoder.position.layers.{i}.{table}": (33, 8) for i in range(tables) for table in ("key_table", "value_table")
    }
    assert position_parameters(model) == expected
    views = attention_positions(model)
    assert all(isinstance(view, ShawTables) for view in views)
    assert len({id(view) for view in views}) == tables


# --- Shaw in attention -------------------------------------------------------------------


def context(*, causal: bool, position: object = None, n_layers: int = 2) -> BuildContext:
    return BuildContext(
        d_model=16, n_heads=2, n_layers=n_layers, dropout=0.0, causal=causal, max_length=64, vocab_size=10, position=position
    )


def shaw(max_distance: int = 3) -> ShawPosition:
    position = ShawPosition(ShawConfig(max_distance=max_distance), context(causal=True)).double()
    with torch.no_grad():  # larger than the initialization, so that the terms matter
        for parameter in position.parameters():
            parameter.normal_(0.0, 0.5)
    return position


def paper_reference(attention: Attention, tables: ShawTables, x: Tensor, mask: Tensor, *, causal: bool) -> Tensor:
    """Shaw et al. 2018, eqs. (3)–(4), pair by pair: e_ij = q_i·(k_j + a^K_ij)/√d,
    z_i = Σ_j α_ij (v_j + a^V_ij), a_ij = w_clip(j − i, k)."""
    batch, length, d_model = x.shape
    heads, d = attention.n_heads, attention.head_dim
    k_max = tables.max_distance
    q = attention.query(x).view(batch, length, heads, d)
    k, v = attention.key_value(x).view(batch, length, 2, heads, d).unbind(dim=2)
    z = torch.zeros(batch, length, heads, d, dtype=x.dtype)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                keys = [j for j in range(length) if bool(mask[b, j]) and (j <= i or not causal)]
                a_k = [tables.key_table[min(max(j - i, -k_max), k_max) + k_max] for j in keys]
                a_v = [tables.value_table[min(max(j - i, -k_max), k_max) + k_max] for j in keys]
                e = torch.stack([q[b, i, h] @ (k[b, j, h] + a) / math.sqrt(d) for j, a in zip(keys, a_k, strict=True)])
                alpha = e.softmax(dim=0)
                z[b, i, h] = sum(alpha[n] * (v[b, j, h] + a_v[n]) for n, j in enumerate(keys))
    return attention.out(z.reshape(batch, length, d_model))


def inputs(length: int = 9) -> tuple[Tensor, Tensor]:
    x = torch.randn(2, length, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[1, -3:] = False
    return x, mask


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_shaw_with_full_attention_follows_the_paper(causal: bool) -> None:
    position = shaw()
    tables = position.for_layer(1)
    torch.manual_seed(0)
    attention = FullAttention(FullAttentionConfig(), context(causal=causal, position=tables)).double().eval()
    plain = FullAttention(FullAttentionConfig(), context(causal=causal)).double().eval()
    plain.load_state_dict(attention.state_dict())
    x, mask = inputs()
    with torch.no_grad():
        out = attention(x, mask=mask)
        expected = paper_reference(attention, tables, x, mask, causal=causal)
        without = plain(x, mask=mask)
    real = mask[:, :, None]
    torch.testing.assert_close(out * real, expected * real, rtol=1e-9, atol=1e-9)
    assert (out - without).abs().max() > 1e-2, "the relative terms changed nothing"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("name", ["shaw", "t5"])
def test_local_attention_covering_the_sequence_equals_full(name: str, causal: bool) -> None:
    length = 11
    if name == "shaw":
        position = shaw().for_layer(0)
    else:
        position = T5RelativeBias(T5BiasConfig(num_buckets=8, max_distance=6), context(causal=causal)).double()
        with torch.no_grad():
            position.bias.normal_(0.0, 0.5)
    torch.manual_seed(0)
    full = FullAttention(FullAttentionConfig(), context(causal=causal, position=position)).double().eval()
    local = SlidingWindowAttention(LocalAttentionConfig(window=length), context(causal=causal, position=position)).double().eval()
    local.load_state_dict(full.state_dict())
    x, mask = inputs(length)
    with torch.no_grad():
        torch.testing.assert_close(local(x, mask=mask), full(x, mask=mask), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("attention", ["full", "local"])
@pytest.mark.parametrize("name", ["shaw", "t5"])
def test_decoding_with_a_cache_equals_one_forward(name: str, attention: str) -> None:
    if name == "shaw":
        position = shaw().for_layer(0)
    else:
        position = T5RelativeBias(T5BiasConfig(num_buckets=8, max_distance=6), context(causal=True)).double()
    ctx = context(causal=True, position=position)
    torch.manual_seed(0)
    layer = FullAttention(FullAttentionConfig(), ctx) if attention == "full" else SlidingWindowAttention(LocalAttentionConfig(window=3), ctx)
    layer = layer.double().eval()
    x, _ = inputs()
    with torch.no_grad():
        whole = layer(x)
        state = layer.new_state(x.shape[0])
        steps = [layer(x[:, t : t + 1], positions=torch.tensor([[t]]), state=state) for t in range(x.shape[1])]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-9, atol=1e-9)


def test_shaw_values_never_depend_on_clipped_distance_beyond_k() -> None:
    tables = shaw(max_distance=2).for_layer(0)
    weights = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    weights[..., 7] = 1.0  # the query at 0 attends only to the key at 7: distance 7, clipped to 2
    out = tables.relative_values(weights, torch.tensor([[0]]), torch.arange(8)[None, :])
    torch.testing.assert_close(out[0, 0, 0], tables.value_table[4])


# --- Refusals and the kit ----------------------------------------------------------------


@pytest.mark.parametrize("position", ["shaw", "t5"])
def test_linear_attention_refuses_relative_positions(position: str) -> None:
    cfg = compose_train("model/attention=linear", f"model/position={position}", "logger=none")
    with pytest.raises(CapabilityError) as error:
        check_components(cfg, choose_components(cfg, REGISTRY), REGISTRY)
    message = str(error.value)
    assert "'linear'" in message and f"'{position}'" in message, message


class IndexShaw(ShawTables):
    """Distances from indices 0..L−1 instead of the positions given: right for whole
    sequences, wrong for blocks."""

    def _index(self, q_positions: Tensor, k_positions: Tensor, leading: torch.Size) -> Tensor:
        q = torch.arange(q_positions.shape[-1]).expand(q_positions.shape)
        k = torch.arange(k_positions.shape[-1]).expand(k_positions.shape)
        return super()._index(q, k, leading)


class DetachedViews(ShawPosition):
    """Per-layer views built outside the module: their parameters are never registered."""

    def for_layer(self, index: int) -> ShawTables:
        return ShawTables(2, self.layers[0].key_table.shape[1])


@dataclass
class NoOptions:
    pass


def broken(name: str, factory) -> Component:
    return Component(
        kind="position", name=name, factory=factory, config=NoOptions, summary=f"Deliberately broken: {name}.",
        capabilities=Capabilities(provides={"relative_terms"}, requires={"attention": {"relative_terms"}}),
    )


@pytest.mark.parametrize(
    ("component", "check"),
    [
        (broken("index_shaw", lambda config, ctx: IndexShaw(3, ctx.head_dim)), "relative_terms"),
        (broken("detached_views", lambda config, ctx: DetachedViews(ShawConfig(), ctx)), "for_layer"),
    ],
    ids=["positions ignored", "views outside the module"],
)
def test_the_kit_catches_broken_relative_terms(component: Component, check: str) -> None:
    with pytest.raises(AssertionError) as failure:
        check_component(component)
    assert component.qualified_name in str(failure.value) and check in str(failure.value), str(failure.value)
