"""State across batches: a data task that streams ordered segments and an attention that
remembers the previous segment (a test component, Transformer-XL's memory without its
relative positions). The training module carries the state from batch to batch, detached
each step, reset where the data says a new document starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from compose import compose_train
from plugformer import AttentionState, Capabilities, Component, DataTask, KVCache, hookimpl
from plugformer.plugins import load_plugins
from plugformer.training.run import train
from plugformer_plugins.attention.full import FullAttention, FullAttentionConfig

SEGMENT = 8


class SegmentMemoryAttention(FullAttention):
    """Full causal attention that, when streaming, also sees the previous segment's keys."""

    def new_state(self, batch_size: int, *, streaming: bool = False) -> AttentionState | None:
        if streaming:
            return KVCache(limit=SEGMENT)
        return super().new_state(batch_size, streaming=streaming)


@dataclass
class RepeatStreamConfig:
    streams: int = 8
    segments: int = 64
    vocab_size: int = 16
    seed: int = 0


class RepeatStream(DataTask):
    """Each of ``streams`` rows is a long sequence of random segments, each followed by an
    exact repeat: the repeat is predictable only from the previous segment. Batch t
    holds segment t of every stream (row i continues row i); ``reset`` marks the first
    segment of a new document (every 8th segment), where memory must be dropped."""

    streams = True

    def __init__(self, config: RepeatStreamConfig, ctx) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.max_length = SEGMENT

    def prepare(self) -> None:
        c = self.config
        generator = torch.Generator().manual_seed(c.seed)
        halves = torch.randint(1, c.vocab_size, (c.streams, c.segments // 2, SEGMENT), generator=generator)
        # The token after position j of a repeat is the previous segment's token j + 1, whose
        # position no visible key of the current segment has.
        stream = halves.repeat_interleave(2, dim=1).flatten(1)  # (streams, segments·SEGMENT)
        stream = torch.cat([stream, stream[:, :1]], dim=1)
        self.rows = []
        for t in range(c.segments):
            start = t * SEGMENT
            ids, labels = stream[:, start : start + SEGMENT], stream[:, start + 1 : start + SEGMENT + 1].clone()
            reset = torch.full((c.streams,), t % 8 == 0)
            self.rows.append((ids, labels, reset))

    def _loader(self) -> DataLoader:
        ids = torch.cat([r[0] for r in self.rows])
        labels = torch.cat([r[1] for r in self.rows])
        reset = torch.cat([r[2] for r in self.rows])
        return DataLoader(
            TensorDataset(ids, labels, reset),
            batch_size=self.config.streams,
            shuffle=False,
            collate_fn=lambda rows: {
                "input_ids": torch.stack([r[0] for r in rows]),
                "labels": torch.stack([r[1] for r in rows]),
                "reset": torch.stack([r[2] for r in rows]),
            },
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        return self._loader()


class StreamPlugin:
    carried: list[int] = []

    @hookimpl
    def lightning_callbacks(self, cfg) -> list:
        import lightning.pytorch as pl

        class RecordCarriedState(pl.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
                state = module._states.get("train")
                caches = [s for s in state.states() if isinstance(s, KVCache)] if state is not None else []
                StreamPlugin.carried.append(caches[0].length if caches else 0)

        return [RecordCarriedState()]

    @hookimpl
    def register_components(self, registry) -> None:
        registry.add(Component(
            kind="attention", name="segment_memory", factory=SegmentMemoryAttention, config=FullAttentionConfig,
            summary="test: full attention with the previous segment as memory",
            capabilities=Capabilities(provides={"causal", "key_padding_mask", "score_bias", "qk_transform"}),
        ))
        registry.add(Component(
            kind="data", name="repeat_stream", factory=RepeatStream, config=RepeatStreamConfig,
            summary="test: streamed segments, each repeated once",
            capabilities=Capabilities(requires={"objective": {"causal_lm"}}),
        ))


@pytest.fixture(scope="module")
def stream_plugins():
    return load_plugins(extra={"stream_plugin": StreamPlugin()})


def overrides(tmp_path: Path, attention: str, steps: int) -> list[str]:
    return [
        "data=repeat_stream", f"model/attention={attention}", "model/position=sinusoidal", "model.d_model=32",
        "model.n_layers=1", "model.n_heads=2", "logger=none", "callbacks.progress_bar=none", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={min(steps, 64)}", "trainer.limit_val_batches=16", "optim.lr=3e-3",
        "optim.warmup_steps=10", f"run_dir={tmp_path}",
    ]


def test_the_module_carries_detached_state_and_resets_rows(stream_plugins, tmp_path: Path) -> None:
    from plugformer.api import build
    from plugformer.training.module import TrainingModule
    from plugformer.config import optim_config

    cfg = compose_train(*overrides(tmp_path, "segment_memory", 1))
    built = build(cfg, plugins=stream_plugins)
    module = TrainingModule(built.model, optim_config(cfg), built.hooks, carry_state=built.data.streams)
    loader = built.data.train_dataloader()
    batches = iter(loader)
    first, second = next(batches), next(batches)
    module._step(first, "train")
    state = module._states["train"]
    cache = state.stacks["decoder"].layers[0].attention
    assert isinstance(cache, KVCache) and cache.length == SEGMENT
    assert not cache.keys.requires_grad, "the carried state must be detached after a step"
    carried = module.model(second, state=state).loss
    fresh = module.model(second).loss
    assert not torch.allclose(carried, fresh), "the memory of the previous batch changed nothing"
    # A reset row forgets its memory: its output equals the output without any state.
    state.reset(torch.tensor([True] + [False] * (second["input_ids"].shape[0] - 1)))
    hidden_reset = module.model.hidden_states(module.model.objective.model_inputs(second), state)
    hidden_fresh = module.model.hidden_states(module.model.objective.model_inputs(second))
    assert torch.allclose(hidden_reset[0], hidden_fresh[0], atol=1e-6)
    assert not torch.allclose(hidden_reset[1], hidden_fresh[1], atol=1e-4)


def test_a_stateless_model_gets_no_state_on_a_stream(stream_plugins, tmp_path: Path) -> None:
    from plugformer.api import build

    built = build(compose_train(*overrides(tmp_path, "full", 1)), plugins=stream_plugins)
    assert built.model.new_state(4, streaming=True).empty


def test_the_carried_memory_is_exactly_the_previous_batch(stream_plugins, tmp_path: Path) -> None:
    """With one layer and no position encoding, a segment that sees the previous batch's
    memory gets the same hidden states as the second half of one forward pass over both."""
    from plugformer.api import build
    from plugformer.config import optim_config
    from plugformer.training.module import TrainingModule

    cfg = compose_train(*overrides(tmp_path, "segment_memory", 1), "model/position=none")
    built = build(cfg, plugins=stream_plugins)
    module = TrainingModule(built.model.eval(), optim_config(cfg), built.hooks, carry_state=True)
    first, second = list(built.data.train_dataloader())[1:3]  # no reset at either
    with torch.no_grad():
        module._step(first, "val")
        state = module._states["val"]
        carried = module.model.hidden_states(module.model.objective.model_inputs(second), state)
        both = torch.cat([first["input_ids"], second["input_ids"]], dim=1)
        reference = module.model.hidden_states(module.model.objective.model_inputs({"input_ids": both}))
    assert torch.allclose(carried, reference[:, SEGMENT:], atol=1e-5)


@pytest.mark.slow
def test_a_streaming_run_trains_with_its_memory(stream_plugins, tmp_path: Path) -> None:
    """A real Lightning run over the stream with the memory attention: after every step the
    module holds the memory of that batch, through validations in between."""
    StreamPlugin.carried.clear()
    summary = train(compose_train(*overrides(tmp_path, "segment_memory", 64)), stream_plugins, tmp_path, run_id="stream01")
    assert summary["status"] == "finished" and "val/loss" in summary["metrics"]
    assert StreamPlugin.carried == [SEGMENT] * 64, "every training step should leave one segment of memory"
