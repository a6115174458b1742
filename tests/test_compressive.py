"""The Compressive Transformer: evicted memories become compressed slots (mean pooling and
strided convolution at rate c), the segment sees [compressed; memory; segment], and the
attention-reconstruction loss trains the compressor only, reported as a named loss term."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compose import compose_train
from plugformer.plugins import load_plugins
from plugformer_plugins.attention.compressive import CompressiveAttention, CompressiveMemory

PLUGINS = load_plugins()


def build_model(*overrides: str):
    from plugformer.api import build

    cfg = compose_train(
        "model/attention=compressive", "model/position=xl_relative", "model.attention.mem_len=8",
        "model.attention.compressed_len=4", "model.attention.rate=2", "model.d_model=32", "model.n_heads=2",
        "model.n_layers=2", "model.dropout=0.0", "logger=none", *overrides,
    )
    return build(cfg, plugins=PLUGINS).model


def run_segments(model, ids: torch.Tensor, segment: int, state) -> list[torch.Tensor]:
    outputs = []
    for start in range(0, ids.shape[1], segment):
        outputs.append(model.hidden_states(model.objective.model_inputs({"input_ids": ids[:, start : start + segment]}), state))
    return outputs


@pytest.mark.parametrize("compression", ["mean", "conv"])
def test_evicted_memories_are_compressed_at_rate_c(compression: str) -> None:
    """Segments of 6 with a memory of 8 and c = 2: after three segments the memory holds the
    last 8 (up to 8 + c − 1) hidden states and the compressed memory the pooled older ones;
    with mean pooling, slot s is exactly the mean of evicted states 2s and 2s + 1."""
    model = build_model(f"model.attention.compression={compression}").eval()
    ids = torch.randint(1, 20, (2, 18), generator=torch.Generator().manual_seed(0))
    state = model.new_state(2, streaming=True)
    attention = model.decoder.blocks[0].attention
    seen: list[torch.Tensor] = []
    attention.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].detach()), with_kwargs=True)
    with torch.no_grad():
        run_segments(model, ids, 6, state)
    layer = state.stacks["decoder"].layers[0].attention
    assert isinstance(layer, CompressiveMemory)
    inputs = torch.cat(seen, dim=1)  # the 18 hidden states layer 0 received
    # 6, then 12 → 4 evicted (a multiple of c) leaving 8, then 14 → 6 evicted leaving 8.
    assert layer.memory.length == 8 and torch.equal(layer.memory.hidden, inputs[:, 10:])
    assert layer.compressed.length == 4  # 5 slots made, the oldest dropped (compressed_len=4)
    expected_mean = inputs[:, :10].view(2, 5, 2, -1).mean(dim=2)[:, 1:]
    if compression == "mean":
        assert torch.allclose(layer.compressed.hidden, expected_mean, atol=1e-6)
    else:  # initialized to mean pooling, a learned convolution afterwards
        assert torch.allclose(layer.compressed.hidden, expected_mean, atol=1e-5)
        assert isinstance(attention.compressor.conv, torch.nn.Conv1d) and attention.compressor.conv.stride == (2,)


def test_the_compressed_memory_is_seen_by_the_segment() -> None:
    """The output of a segment changes when only its compressed memory changes."""
    model = build_model("model.attention.compression=mean").eval()
    ids = torch.randint(1, 20, (2, 24), generator=torch.Generator().manual_seed(1))
    state = model.new_state(2, streaming=True)
    with torch.no_grad():
        run_segments(model, ids[:, :18], 6, state)
        before = model.hidden_states(model.objective.model_inputs({"input_ids": ids[:, 18:]}), _copy(state))
        for layer in state.stacks["decoder"].layers:
            layer.attention.compressed.hidden = layer.attention.compressed.hidden + 1.0
        after = model.hidden_states(model.objective.model_inputs({"input_ids": ids[:, 18:]}), state)
    assert not torch.allclose(before, after, atol=1e-4)


def _copy(state):
    import copy

    return copy.deepcopy(state)


def test_the_reconstruction_loss_trains_only_the_compressor() -> None:
    """Once memories are evicted the layer reports a positive ``compression`` term; its
    gradient reaches the convolution and nothing else (stop-gradient on the attention and
    on the hidden states), and the language-model output gives the compressor none."""
    model = build_model("model.attention.compression=conv").train()
    ids = torch.randint(1, 20, (2, 18), generator=torch.Generator().manual_seed(2))
    state = model.new_state(2, streaming=True)
    with torch.no_grad():
        run_segments(model, ids[:, :12], 6, state)
    attention: CompressiveAttention = model.decoder.blocks[1].attention
    with torch.no_grad():  # move the compressor away from mean pooling so that the loss is not ~0
        attention.compressor.conv.weight.add_(0.05 * torch.randn_like(attention.compressor.conv.weight))
    out = model.hidden_states(model.objective.model_inputs({"input_ids": ids[:, 12:]}), state)
    term = attention.aux_losses()["compression"]
    assert term.dim() == 0 and float(term.detach()) > 0
    term.backward(retain_graph=True)
    trained = {name for name, p in model.named_parameters() if p.grad is not None and bool(p.grad.any())}
    assert trained == {"stacks.decoder.blocks.1.attention.compressor.conv.weight", "stacks.decoder.blocks.1.attention.compressor.conv.bias"}
    model.zero_grad()
    out.pow(2).sum().backward()
    assert all(p.grad is None or not bool(p.grad.any()) for p in attention.compressor.parameters())


def test_the_term_is_logged_as_a_named_loss(tmp_path: Path) -> None:
    """The training module adds the layers' terms as one ``compression`` term: logged as
    ``<stage>/loss_compression`` and part of ``<stage>/total_loss``."""
    from plugformer.api import build
    from plugformer.config import optim_config
    from plugformer.training.module import TrainingModule

    cfg = compose_train(
        "model/attention=compressive", "model.attention.mem_len=8", "model.attention.compressed_len=4",
        "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "logger=none", "data.batch_size=4",
        "data.train_examples=64", "data.val_examples=16",
    )
    built = build(cfg, plugins=PLUGINS)
    module = TrainingModule(built.model, optim_config(cfg), built.hooks, carry_state=True)
    batches = iter(built.data.train_dataloader())
    logged: dict[str, torch.Tensor] = {}
    module.log = lambda name, value, **kwargs: logged.__setitem__(name, value)  # type: ignore[method-assign]
    module._step(next(batches), "train")
    total = module._step(next(batches), "train")  # the memory (8) overflows: evictions
    assert "train/loss_compression" in logged
    assert torch.allclose(total, logged["train/loss"] + logged["train/loss_compression"])
