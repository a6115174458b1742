"""Memorizing attention (Wu et al. 2022): exact faiss retrieval of the stored keys, a memory
without gradients, reset and FIFO eviction per row, the conformance kit, and the memory
carried by the training module across the batches of a stream."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compose import compose_train
from conftest import small_context
from plugformer import Capabilities, Component, hookimpl
from plugformer.plugins import load_plugins
from plugformer.testing import check_component
from plugformer_plugins.attention.memorizing import (
    COMPONENT, KnnMemory, MemorizingAttention, MemorizingAttentionConfig,
)
from test_state_across_batches import SEGMENT, RepeatStream, RepeatStreamConfig

HEADS, DIM = 4, 8


def filled_memory(rows: int, tokens: int, capacity: int = 1000, seed: int = 0) -> tuple[KnnMemory, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(rows, HEADS, tokens, DIM, generator=generator)
    values = torch.randn(rows, HEADS, tokens, DIM, generator=generator)
    memory = KnnMemory(rows, HEADS, DIM, capacity)
    memory.add(keys, values, None)
    return memory, keys, values


def test_retrieval_returns_the_true_top_k_stored_keys() -> None:
    memory, keys, values = filled_memory(rows=2, tokens=300)
    queries = torch.randn(2, HEADS, 5, DIM, generator=torch.Generator().manual_seed(1))
    got_keys, got_values, valid = memory.search(queries, 7)
    assert valid.all()
    scores = torch.einsum("bhld,bhnd->bhln", queries, keys)
    best = scores.topk(7, dim=-1).indices  # brute force, the reference
    for row in range(2):
        for head in range(HEADS):
            expected = keys[row, head][best[row, head]]  # (5, 7, DIM)
            assert torch.allclose(got_keys[row, head], expected, atol=1e-5)
            assert torch.allclose(got_values[row, head], values[row, head][best[row, head]], atol=1e-5)


def test_a_short_memory_marks_missing_neighbours_and_padding_is_not_stored() -> None:
    memory = KnnMemory(2, HEADS, DIM, 100)
    k = torch.randn(2, HEADS, 4, DIM)
    memory.add(k, k, torch.tensor([[True, True, False, False], [True, True, True, True]]))
    assert (memory.size(0), memory.size(1)) == (2, 4)
    _, _, valid = memory.search(torch.randn(2, HEADS, 3, DIM), 3)
    assert valid[0].sum(-1).eq(2).all() and valid[1].all()


def test_fifo_eviction_keeps_the_newest_tokens() -> None:
    memory, keys, _ = filled_memory(rows=1, tokens=10, capacity=16)
    newer = torch.randn(1, HEADS, 10, DIM)
    memory.add(newer, newer, None)
    assert memory.size(0) == 16
    assert torch.equal(memory.keys[0], torch.cat([keys[0], newer[0]], 1)[:, -16:])
    assert memory.indexes[0][0].ntotal == 16


def test_reset_clears_only_the_marked_rows() -> None:
    memory, _, _ = filled_memory(rows=3, tokens=20)
    memory.reset(torch.tensor([False, True, False]))
    assert [memory.size(r) for r in range(3)] == [20, 0, 20]
    _, _, valid = memory.search(torch.randn(3, HEADS, 2, DIM), 4)
    assert not valid[1].any() and valid[0].all() and valid[2].all()


def test_the_memory_holds_no_gradient_and_none_flows_to_an_earlier_segment() -> None:
    torch.manual_seed(0)
    attention = MemorizingAttention(MemorizingAttentionConfig(top_k=4), small_context(n_heads=HEADS, d_model=HEADS * DIM))
    memory = attention.new_state(2, streaming=True)
    assert isinstance(memory, KnnMemory)
    first = torch.randn(2, 6, HEADS * DIM, requires_grad=True)
    second = torch.randn(2, 6, HEADS * DIM, requires_grad=True)
    attention(first, state=memory)
    assert memory.size(0) == 6 and not memory.keys[0].requires_grad and memory.keys[0].grad_fn is None
    out = attention(second, state=memory)
    out.square().sum().backward()
    assert first.grad is None, "a gradient reached the earlier segment through the memory"
    assert second.grad is not None and attention.gate.grad is not None and attention.gate.grad.abs().sum() > 0


def test_retrieved_memory_changes_the_output_and_reset_restores_the_memoryless_one() -> None:
    torch.manual_seed(0)
    attention = MemorizingAttention(MemorizingAttentionConfig(top_k=4), small_context(n_heads=HEADS, d_model=HEADS * DIM)).eval()
    x1, x2 = torch.randn(2, 6, HEADS * DIM), torch.randn(2, 6, HEADS * DIM)
    with torch.no_grad():
        memory = attention.new_state(2, streaming=True)
        first = attention(x1, state=memory)
        assert torch.allclose(first, attention(x1)), "an empty memory must equal no memory"
        memory.reset(torch.tensor([True, False]))
        second = attention(x2, state=memory)
        alone = attention(x2)
    assert torch.allclose(second[0], alone[0], atol=1e-6)
    assert not torch.allclose(second[1], alone[1], atol=1e-4)


def test_the_conformance_kit_passes() -> None:
    check_component(COMPONENT)
    check_component(COMPONENT, MemorizingAttentionConfig(top_k=1, memory_size=3, gate_init=-2.0))


class MemorizingStreamPlugin:
    @hookimpl
    def register_components(self, registry) -> None:
        registry.add(Component(
            kind="data", name="repeat_stream_m", factory=RepeatStream, config=RepeatStreamConfig,
            summary="test: streamed segments, each repeated once",
            capabilities=Capabilities(requires={"objective": {"causal_lm"}}),
        ))


def test_the_training_module_carries_the_memory_across_batches(tmp_path: Path) -> None:
    from plugformer.api import build
    from plugformer.config import optim_config
    from plugformer.training.module import TrainingModule

    plugins = load_plugins(extra={"memorizing_stream": MemorizingStreamPlugin()})
    cfg = compose_train(
        "data=repeat_stream_m", "model/attention=memorizing", "model.attention.memory_size=12", "model/position=none",
        "model.d_model=16", "model.n_layers=1", "model.n_heads=2", "logger=none", f"run_dir={tmp_path}",
    )
    built = build(cfg, plugins=plugins)
    module = TrainingModule(built.model, optim_config(cfg), built.hooks, carry_state=built.data.streams)
    batches = list(built.data.train_dataloader())[:9]
    for batch in batches[:8]:
        module._step(batch, "train")
    memory = module._states["train"].stacks["decoder"].layers[0].attention
    assert isinstance(memory, KnnMemory)
    assert memory.size(0) == 12, "FIFO: the last 12 of the 7 segments since the reset"
    module._step(batches[8], "train")  # a document boundary for every row (segment 8)
    assert memory.size(0) == SEGMENT, "reset at the boundary, then this segment stored"
