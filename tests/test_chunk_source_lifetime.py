"""ChunkSource's lifetime contract: a tracked source lets go of its tensor once its own backward
has run, so q/k/v (views of the projections' outputs) are freed before the projections'
backward, as with fused attention; a spent source refuses to be read; retain_graph keeps it.

Liveness is checked on the projection output's storage through a weak storage reference (the
Python tensor object dies early either way, the storage is what holds the memory)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from conftest import small_context
from plugformer.attention import ChunkSource, recomputed_chunks
from plugformer.plugins import load_plugins


class _StorageProbe:
    """Records whether ``module``'s output storage is still alive when its gradient arrives
    (i.e. just before the module's own backward runs)."""

    def __init__(self, module: nn.Module) -> None:
        self.alive_at_backward: list[bool] = []
        module.register_forward_hook(self._forward)

    def _forward(self, module: nn.Module, inputs: object, out: torch.Tensor) -> None:
        weak = out.untyped_storage()._weak_ref()
        out.register_hook(lambda grad: self.alive_at_backward.append(not torch.UntypedStorage._expired(weak)))


def _chunked(x: torch.Tensor, projection: nn.Linear) -> torch.Tensor:
    """Three sources of one projection's output read in recomputed chunks through every kind
    of piece (narrow, take, rows, matmul, a permuted view)."""
    q, k, v = projection(x).chunk(3, dim=-1)
    q_src, k_src, v_src = (ChunkSource(t.unsqueeze(1)) for t in (q, k, v))
    blocked = v_src.view(lambda t: t.unflatten(-2, (4, 4)).transpose(-3, -2))
    index = torch.tensor([0, 5, 5, 15])

    def chunk(start: int, stop: int) -> torch.Tensor:
        scores = k_src.matmul(q_src.narrow(-2, start, stop - start), transpose=True)
        out = v_src.matmul(scores.softmax(-1)) + k_src.rows(torch.full((1, stop - start), start))
        return out + v_src.take(2, index).sum(2, keepdim=True) + blocked.narrow(2, 1, 1).sum((2, 3))

    return recomputed_chunks(chunk, 16, 4, dim=-2)


def test_sources_free_the_projection_output_before_its_backward() -> None:
    torch.manual_seed(0)
    projection = nn.Linear(8, 12)
    probe = _StorageProbe(projection)
    x = torch.randn(1, 16, 8, requires_grad=True)
    out = _chunked(x, projection)
    out.sum().backward()
    assert probe.alive_at_backward == [False]
    assert x.grad is not None and projection.weight.grad is not None


def test_spent_source_refuses_to_be_read_and_retain_graph_keeps_it() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 3, dtype=torch.double, requires_grad=True)

    def run(retain: bool) -> tuple[ChunkSource, torch.Tensor, torch.Tensor]:
        src = ChunkSource(x * 2)
        out = recomputed_chunks(lambda a, b: src.narrow(1, a, b - a).exp(), 8, 2, dim=1)
        first = torch.autograd.grad(out.sum(), x, retain_graph=retain)[0]
        return src, out, first

    src, out, first = run(retain=True)
    second = torch.autograd.grad(out.sum(), x)[0]  # the recomputation reads the source again
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, 2 * (2 * x.detach()).exp())
    with pytest.raises(RuntimeError, match="ChunkSource read after its backward pass released it"):
        src.narrow(1, 0, 2)
    src, _, _ = run(retain=False)
    with pytest.raises(RuntimeError, match="build a new ChunkSource"):
        src.tensor


@pytest.mark.parametrize("name", ["local", "sinkhorn", "sparse_fixed"])
def test_chunked_attention_frees_q_k_v_before_the_projections_backward(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As fused attention does: q (query projection) and k/v (key/value projection) are gone
    when each projection's backward starts."""
    import plugformer.attention as attention_module

    monkeypatch.setattr(attention_module, "CHUNK_ELEMENTS", 256)  # several recomputed ranges
    component = load_plugins().registry.get("attention", name)
    config = component.config()
    fields = {f.name for f in dataclasses.fields(config)}
    if "block_size" in fields:
        config = dataclasses.replace(config, block_size=8)
    if "max_blocks" in fields:
        config = dataclasses.replace(config, max_blocks=16)
    torch.manual_seed(0)
    module = component.factory(config, small_context(causal=False, max_length=128)).train()
    probes = [_StorageProbe(module.query), _StorageProbe(module.key_value)]
    x = torch.randn(1, 128, 32, requires_grad=True)
    module(x).sum().backward()
    assert [p.alive_at_backward for p in probes] == [[False], [False]]
