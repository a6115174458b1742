"""Every registered component passes the conformance kit (a newly registered plugin is
checked without writing a test), and the kit really catches broken components."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from torch import Tensor, nn

from plugformer import (
    Attention,
    AttentionState,
    Block,
    BuildContext,
    Capabilities,
    Component,
    FeedForward,
    KVCache,
    PositionEncoding,
    causal_allowed,
)
from plugformer.plugins import load_plugins
from plugformer.testing import check_component

COMPONENTS = load_plugins().registry.components()


@pytest.mark.parametrize("component", COMPONENTS, ids=[c.qualified_name for c in COMPONENTS])
def test_registered_component_conforms(component: Component) -> None:
    check_component(component)


# --- Deliberately broken components -------------------------------------------------------


@dataclass
class NoOptions:
    pass


def softmax_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, *, guard_empty_rows: bool = True) -> Tensor:
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if guard_empty_rows:
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)
    return scores.masked_fill(~allowed, float("-inf")).softmax(dim=-1) @ v


def visible(q: Tensor, key_padding_mask: Tensor | None, *, causal: bool, padding: bool, k: Tensor | None = None) -> Tensor:
    q_length = q.shape[-2]
    k_length = q_length if k is None else k.shape[-2]
    allowed = causal_allowed(q_length, k_length, q.device) if causal else torch.ones(q_length, k_length, dtype=torch.bool)
    if padding and key_padding_mask is not None:
        allowed = allowed & key_padding_mask[:, None, None, :]
    return allowed


class FutureLeakingAttention(Attention):
    """Claims to be causal but lets every query see every key."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        return softmax_attention(q, k, v, visible(q, key_padding_mask, causal=False, padding=True))


class MaskIgnoringAttention(Attention):
    """Claims key padding support but attends to padded keys too."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        return softmax_attention(q, k, v, visible(q, key_padding_mask, causal=self.causal, padding=False))


class EmptyRowNaNAttention(Attention):
    """Right about masks, but a query with no visible key (a padded one) gets NaN."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        allowed = visible(q, key_padding_mask, causal=self.causal, padding=True)
        return softmax_attention(q, k, v, allowed, guard_empty_rows=False)


class BiasIgnoringAttention(Attention):
    """Claims score_bias support but never asks the position for a bias."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        return softmax_attention(q, k, v, visible(q, key_padding_mask, causal=self.causal, padding=True))


class CorrectAttention(Attention):
    """Softmax attention that gets everything right, for subclasses to break one thing."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        allowed = visible(q, key_padding_mask, causal=self.causal, padding=True, k=k)
        return self.explicit_attend(q, k, v, allowed[None, None] if allowed.dim() == 2 else allowed, q_positions, k_positions)


class OffsetForgettingAttention(CorrectAttention):
    """Its cache forgets the offset: every call restarts the positions at 0 (right for one
    forward pass over the whole sequence, wrong for token-by-token decoding)."""

    def forward(self, x, *, positions=None, **kwargs):
        return super().forward(x, positions=torch.arange(x.shape[1])[None, :], **kwargs)


class ForgetfulStateAttention(CorrectAttention):
    """Declares incremental decoding, but its state keeps nothing: each call sees only its own tokens."""

    def new_state(self, batch_size, *, streaming=False):
        return None if streaming else _EmptyState()


class _EmptyState(AttentionState):
    def reorder(self, index):
        pass


class SharedLengthAttention(CorrectAttention):
    """Counts the tokens decoded on the module instead of the state (one length for every
    sequence and layer), so two sequences decoded in turn get wrong positions."""

    decoded = 0

    def forward(self, x, *, positions=None, state=None, **kwargs):
        if state is not None:
            positions = torch.arange(self.decoded, self.decoded + x.shape[1])[None, :]
            self.decoded += x.shape[1]
        return super().forward(x, positions=positions, state=state, **kwargs)


class BeamIgnoringAttention(CorrectAttention):
    """Its cache cannot be reordered: beam search continues every row from the wrong history."""

    def new_state(self, batch_size, *, streaming=False):
        return None if streaming else _UnorderedCache()


class _UnorderedCache(KVCache):
    def reorder(self, index):
        pass


class FullHeadedKeyValues(CorrectAttention):
    """Ignores n_kv_heads: projects keys and values to every query head."""

    def __init__(self, ctx):
        super().__init__(replace(ctx, n_kv_heads=None))


class ContextMaskIgnoringAttention(CorrectAttention):
    """As a cross-attention, attends to padded context tokens too."""

    def attend(self, q, k, v, *, key_padding_mask, q_positions, k_positions, state=None):
        return super().attend(q, k, v, key_padding_mask=None if self.cross else key_padding_mask,
                              q_positions=q_positions, k_positions=k_positions)


class CrossIgnoringBlock(Block):
    """Pre-norm, but never calls its cross-attention."""

    def __init__(self, parts):
        super().__init__(parts)
        self.norm1, self.norm2 = parts.make_norm(), parts.make_norm()

    def forward(self, x, inputs, state=None):
        x = x + self.self_attend(self.norm1(x), inputs, state)
        return x + self.ffn(self.norm2(x))


class PositionDroppingBlock(CrossIgnoringBlock):
    """Calls its attention without the positions: right for whole sequences, wrong when decoding."""

    def forward(self, x, inputs, state=None):
        h = self.norm1(x)
        x = x + self.attention(h, mask=inputs.mask, state=state.attention if state is not None else None)
        return x + self.ffn(self.norm2(x))


class MaskDroppingBlock(CrossIgnoringBlock):
    """Calls its attention without the key padding mask."""

    def forward(self, x, inputs, state=None):
        h = self.norm1(x)
        x = x + self.attention(h, positions=inputs.positions, state=state.attention if state is not None else None)
        return x + self.ffn(self.norm2(x))


class TokenMixingFFN(FeedForward):
    """Adds the mean over the sequence: not position-wise (and leaks the future)."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.proj = nn.Linear(ctx.d_model, ctx.d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x + x.mean(dim=1, keepdim=True))


class RandomBufferFFN(FeedForward):
    """Draws a random projection it never saves: a checkpoint cannot restore it."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.proj = nn.Linear(ctx.d_model, ctx.d_model)
        self.register_buffer("features", torch.randn(ctx.d_model, ctx.d_model), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x @ self.features)


class DetachedScaleFFN(FeedForward):
    """Uses its scale only through .detach(): the scale never learns."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.proj = nn.Linear(ctx.d_model, ctx.d_model)
        self.scale = nn.Parameter(torch.ones(ctx.d_model))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) * self.scale.detach()


class BatchStatisticsNorm(nn.Module):
    """Normalizes each position with statistics over the batch (as BatchNorm does)."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ctx.d_model))

    def forward(self, x: Tensor) -> Tensor:
        return (x - x.mean(dim=0)) / (x.std(dim=0, correction=0) + 1e-5) * self.weight


class IndexBias(PositionEncoding):
    """A score bias from indices 0..L−1 instead of the positions it is given: right for whole
    sequences, wrong for the blocks of a blockwise attention."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.n_heads = ctx.n_heads

    def score_bias(self, q_positions: Tensor, k_positions: Tensor) -> Tensor:
        q = torch.arange(q_positions.shape[-1]).expand(q_positions.shape)
        k = torch.arange(k_positions.shape[-1]).expand(k_positions.shape)
        distance = (q[..., :, None] - k[..., None, :]).abs().float().unsqueeze(1)
        return -distance.expand(distance.shape[0], self.n_heads, *distance.shape[2:])


class UndeclaredEmbedding(PositionEncoding):
    """Adds input embeddings without declaring input_embedding."""

    def __init__(self, ctx: BuildContext) -> None:
        super().__init__()
        self.d_model = ctx.d_model

    def embed(self, positions: Tensor) -> Tensor:
        return torch.zeros(positions.shape[0], self.d_model)


def broken(kind: str, name: str, factory, provides=()) -> Component:
    return Component(
        kind=kind,
        name=name,
        factory=factory,
        config=NoOptions,
        summary=f"Deliberately broken: {name}.",
        capabilities=Capabilities(provides=set(provides)),
    )


ATTENTION_FLAGS = {"causal", "bidirectional", "key_padding_mask"}
DECODING_FLAGS = ATTENTION_FLAGS | {"score_bias", "qk_transform", "incremental_decoding"}

BROKEN = {
    "attention leaks the future": (
        broken("attention", "future_leak", lambda config, ctx: FutureLeakingAttention(ctx), {"causal", "key_padding_mask"}),
        "causality",
    ),
    "attention ignores the key padding mask": (
        broken("attention", "mask_ignoring", lambda config, ctx: MaskIgnoringAttention(ctx), ATTENTION_FLAGS),
        "key padding mask",
    ),
    "attention gives NaN for queries without keys": (
        broken("attention", "empty_row_nan", lambda config, ctx: EmptyRowNaNAttention(ctx), ATTENTION_FLAGS),
        "NaN",
    ),
    "attention ignores the score bias": (
        broken("attention", "bias_ignoring", lambda config, ctx: BiasIgnoringAttention(ctx), ATTENTION_FLAGS | {"score_bias"}),
        "score bias is applied",
    ),
    "attention ignores the relative terms": (
        broken("attention", "relative_ignoring", lambda config, ctx: BiasIgnoringAttention(ctx), ATTENTION_FLAGS | {"relative_terms"}),
        "relative terms is applied",
    ),
    "attention cache forgets the position offset": (
        broken("attention", "offset_forgetting", lambda config, ctx: OffsetForgettingAttention(ctx), DECODING_FLAGS),
        "incremental decoding",
    ),
    "attention state keeps nothing": (
        broken("attention", "forgetful_state", lambda config, ctx: ForgetfulStateAttention(ctx), ATTENTION_FLAGS | {"incremental_decoding"}),
        "incremental decoding, token by token",
    ),
    "attention counts decoded tokens on the module": (
        broken("attention", "shared_length", lambda config, ctx: SharedLengthAttention(ctx), DECODING_FLAGS),
        "incremental decoding, token by token",
    ),
    "attention state ignores a beam-search reorder": (
        broken("attention", "beam_ignoring", lambda config, ctx: BeamIgnoringAttention(ctx), ATTENTION_FLAGS | {"incremental_decoding"}),
        "incremental decoding, beam-search reorder",
    ),
    "attention ignores n_kv_heads": (
        broken("attention", "full_headed", lambda config, ctx: FullHeadedKeyValues(ctx), ATTENTION_FLAGS),
        "key/value projection",
    ),
    "cross-attention ignores the context mask": (
        broken("attention", "context_mask_ignoring", lambda config, ctx: ContextMaskIgnoringAttention(ctx), ATTENTION_FLAGS | {"cross_attention"}),
        "cross-attention): context mask",
    ),
    "block ignores its cross-attention": (
        broken("block", "cross_ignoring", lambda config, ctx, parts: CrossIgnoringBlock(parts), {"cross_attention"}),
        "cross-attention",
    ),
    "block drops the positions": (
        broken("block", "position_dropping", lambda config, ctx, parts: PositionDroppingBlock(parts)),
        "incremental decoding",
    ),
    "block drops the key padding mask": (
        broken("block", "mask_dropping", lambda config, ctx, parts: MaskDroppingBlock(parts)),
        "key padding mask",
    ),
    "ffn mixes tokens": (broken("ffn", "token_mixing", lambda config, ctx: TokenMixingFFN(ctx)), "position-wise"),
    "ffn loses state in checkpoints": (
        broken("ffn", "random_buffer", lambda config, ctx: RandomBufferFFN(ctx)),
        "state_dict round trip",
    ),
    "ffn parameter gets no gradient": (
        broken("ffn", "detached_scale", lambda config, ctx: DetachedScaleFFN(ctx)),
        "gradients: parameter 'scale'",
    ),
    "norm uses batch statistics": (
        broken("norm", "batch_statistics", lambda config, ctx: BatchStatisticsNorm(ctx)),
        "batch independence",
    ),
    "score bias ignores the positions it is given": (
        broken("position", "index_bias", lambda config, ctx: IndexBias(ctx), {"score_bias"}),
        "score_bias",
    ),
    "position embeds without declaring it": (
        broken("position", "undeclared_embedding", lambda config, ctx: UndeclaredEmbedding(ctx)),
        "input_embedding",
    ),
}


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("standard", {"placement": "post"}),
        ("standard", {"placement": "sandwich"}),
        ("parallel", {"shared_norm": False}),
        ("deepnorm", {"alpha": 1.5, "beta": 0.5}),
    ],
    ids=["standard post", "standard sandwich", "parallel separate norms", "deepnorm given gains"],
)
def test_block_options_conform(registry, name: str, options: dict) -> None:
    """The registered blocks conform with their default options (above) and these."""
    component = registry.get("block", name)
    check_component(component, component.config(**options))


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_kit_catches_a_broken_component(case: str) -> None:
    component, check = BROKEN[case]
    with pytest.raises(AssertionError) as failure:
        check_component(component)
    message = str(failure.value)
    assert component.qualified_name in message and check in message, message


def test_the_kit_leaves_threads_and_random_state_alone(registry) -> None:
    component = registry.get("attention", "full")
    threads, state = torch.get_num_threads(), torch.random.get_rng_state()
    check_component(component)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), state)


# --- Behavioural kits of data tasks and objectives -------------------------------------------

from plugformer import DataTask, Objective, ObjectiveOutput  # noqa: E402
from plugformer.testing import check_data_task, check_objective_training, small_data_config  # noqa: E402

DATA_TASKS = [c for c in COMPONENTS if c.kind == "data"]
OBJECTIVES = [c for c in COMPONENTS if c.kind == "objective"]

#: Per built-in task, options beyond small_data_config's sizes that keep the kit fast.
SMALL_DATA_OPTIONS = {
    "listops": {"max_depth": 3, "min_length": 10, "max_length": 40},
    "mqar": {"seq_len": 32, "num_pairs": 4, "vocab_size": 64},
    "text": {"block_size": 32},
    "retro_text": {"block_size": 32, "chunk_size": 8, "encoder": "ngrams"},  # the parameter-free lexical encoder
}


def small_config(component: Component, tmp_path) -> object:
    """A small config of a registered data task; ``pairs`` reads files, written here."""
    options = dict(SMALL_DATA_OPTIONS.get(component.name, {}))
    if component.name == "pairs":
        import json

        for split, count in (("train", 40), ("validation", 12)):
            rows = [{"source": f"ab{'c' * (i % 5)}", "target": f"{'c' * (i % 5)}ba"} for i in range(count)]
            (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        options.update(train_file=str(tmp_path / "train.jsonl"), validation_file=str(tmp_path / "validation.jsonl"))
    fields = {f.name for f in __import__("dataclasses").fields(component.config)}
    return small_data_config(component, **{k: v for k, v in options.items() if k in fields})


@pytest.mark.parametrize("component", DATA_TASKS, ids=[c.qualified_name for c in DATA_TASKS])
def test_registered_data_task_keeps_the_batch_contract(component: Component, tmp_path) -> None:
    check_data_task(component, small_config(component, tmp_path), cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("component", OBJECTIVES, ids=[c.qualified_name for c in OBJECTIVES])
def test_registered_objective_learns_and_ignores_padding(component: Component, registry, tmp_path) -> None:
    """On the first registered data task that serves it (kit default), at small sizes."""
    from plugformer.testing import serving_data_tasks

    data = serving_data_tasks(registry, component)[0]
    check_objective_training(component, data=data, data_config=small_config(data, tmp_path))


@dataclass
class CopyOptions:
    train_examples: int = 32
    val_examples: int = 16
    batch_size: int = 8


class CopyTask(DataTask):
    """Correct padded batches (variable-length rows, attention_mask, labels -100 on padding
    and on the first half), for subclasses to break one thing."""

    vocab_size = 12
    max_length = 16

    def __init__(self, config: CopyOptions, ctx) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.rows = [torch.randint(3, self.vocab_size, (int(n),), generator=generator)
                     for n in torch.randint(4, self.max_length + 1, (config.train_examples,), generator=generator)]
        self.batch_size = config.batch_size

    def prepare(self) -> None:
        pass

    def collate(self, rows):
        ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = row, True
        labels = torch.where(mask, ids, torch.full_like(ids, -100))
        labels[:, :2] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _loader(self, shuffle: bool):
        from torch.utils.data import DataLoader

        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=shuffle, collate_fn=self.collate,
                          generator=torch.Generator().manual_seed(1) if shuffle else None)

    def train_dataloader(self):
        return self._loader(shuffle=True)

    def val_dataloader(self):
        return self._loader(shuffle=False)


class PaddingScoringTask(CopyTask):
    def collate(self, rows):
        batch = super().collate(rows)
        return {**batch, "labels": torch.where(batch["attention_mask"], batch["labels"], 0)}


class OutOfVocabularyTask(CopyTask):
    def collate(self, rows):
        batch = super().collate(rows)
        return {**batch, "input_ids": batch["input_ids"].masked_fill(~batch["attention_mask"], self.vocab_size)}


class MaskPaddingMismatchTask(CopyTask):
    def collate(self, rows):
        batch = super().collate(rows)
        mask = batch["attention_mask"].clone()
        mask[:, -1] = False  # the longest row's last real token is marked as padding
        return {**batch, "attention_mask": mask, "labels": batch["labels"].masked_fill(~mask, -100)}


class ShuffledValidationTask(CopyTask):
    def val_dataloader(self):
        from torch.utils.data import DataLoader

        return DataLoader(self.rows, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate)


def data_component(name: str, factory, requires=True) -> Component:
    return Component(
        kind="data", name=name, factory=factory, config=CopyOptions, summary=f"Deliberately broken: {name}.",
        capabilities=Capabilities(requires={"objective": {"causal_lm"}} if requires else {}),
    )


def test_the_data_kit_passes_a_correct_task() -> None:
    check_data_task(data_component("copy", CopyTask))


BROKEN_DATA = {
    "labels score padding": (data_component("padding_scoring", PaddingScoringTask), "labels score a padded position"),
    "ids outside the vocabulary": (data_component("out_of_vocabulary", OutOfVocabularyTask), "outside [0, vocab_size"),
    "mask and padding disagree": (data_component("mask_mismatch", MaskPaddingMismatchTask), "mask and padding disagree"),
    "validation batches change": (data_component("shuffled_validation", ShuffledValidationTask), "repeatable validation"),
    "no batch format declared": (data_component("undeclared", CopyTask, requires=False), "must require the batch format"),
}


@pytest.mark.parametrize("case", list(BROKEN_DATA))
def test_the_data_kit_catches_a_broken_task(case: str) -> None:
    component, expected = BROKEN_DATA[case]
    with pytest.raises(AssertionError) as failure:
        check_data_task(component)
    assert component.qualified_name in str(failure.value) and expected in str(failure.value), str(failure.value)


class TokenObjective(Objective):
    """Token cross-entropy over labels aligned with the hidden states, for subclasses to break."""

    def __init__(self, config, ctx) -> None:
        super().__init__()
        self.head = nn.Linear(ctx.d_model, ctx.vocab_size)

    def logits_of(self, hidden: Tensor) -> Tensor:
        return self.head(hidden)

    def forward(self, hidden: Tensor, batch) -> ObjectiveOutput:
        labels = self.labels_of(batch)
        loss = torch.nn.functional.cross_entropy(self.logits_of(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)
        return ObjectiveOutput(loss=loss, metrics={})

    def labels_of(self, batch) -> Tensor:
        return batch["labels"]


class IgnoreIndexScoringObjective(TokenObjective):
    """Scores the -100 positions as class 0."""

    def labels_of(self, batch) -> Tensor:
        return batch["labels"].clamp(min=0)


class PaddingPoolingObjective(TokenObjective):
    """Mixes the mean over every position, padding included, into each position's logits."""

    def logits_of(self, hidden: Tensor) -> Tensor:
        return self.head(hidden + hidden.mean(dim=1, keepdim=True))


class SquashedLogitsObjective(TokenObjective):
    """Logits squashed into ±0.01 (a temperature bug): the loss cannot fall."""

    def logits_of(self, hidden: Tensor) -> Tensor:
        return torch.tanh(self.head(hidden)) * 0.01


def objective_component(name: str, cls) -> Component:
    return Component(
        kind="objective", name=name, factory=cls, config=NoOptions, summary=f"Deliberately broken: {name}.",
        capabilities=Capabilities(provides={"causal_lm", "decoder"}, requires={"attention": {"causal"}}),
    )


COPY = data_component("copy", CopyTask)


def test_the_objective_kit_passes_a_correct_objective() -> None:
    check_objective_training(objective_component("token", TokenObjective), data=COPY)


BROKEN_OBJECTIVES = {
    "ignored labels are scored": (objective_component("ignore_scoring", IgnoreIndexScoringObjective), "padded positions are ignored"),
    "padding reaches the loss": (objective_component("padding_pooling", PaddingPoolingObjective), "padded positions are ignored"),
    "the loss cannot fall": (objective_component("squashed", SquashedLogitsObjective), "loss falls on a memorizable batch"),
}


@pytest.mark.parametrize("case", list(BROKEN_OBJECTIVES))
def test_the_objective_kit_catches_a_broken_objective(case: str) -> None:
    component, expected = BROKEN_OBJECTIVES[case]
    with pytest.raises(AssertionError) as failure:
        check_objective_training(component, data=COPY)
    assert component.qualified_name in str(failure.value) and expected in str(failure.value), str(failure.value)
