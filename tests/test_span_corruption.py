"""T5 span corruption: the noise statistics, the source/target format (they interleave back to
the text), sentinel order, seeded validation noise, refusals at build time, the conformance
kit, and a short training run on the shipped corpus."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from plugformer import BuildContext, ConfigError
from plugformer.testing import check_component
from plugformer_plugins.objective.seq2seq import IGNORE_INDEX
from plugformer_plugins.objective.span_corruption import (
    COMPONENT,
    SpanCorruption,
    SpanCorruptionConfig,
    noise_mask,
    span_counts,
)

VOCAB = 120
PAD, START, EOS = 0, 1, 2
SENTINELS = list(range(VOCAB - 1, VOCAB - 41, -1))  # 40 sentinels, counting down as in T5
TEXT_IDS = (5, VOCAB - 41)  # ordinary tokens


def objective(max_length: int = 128, sentinels: list[int] = SENTINELS, **config: float) -> SpanCorruption:
    ctx = BuildContext(
        d_model=8, n_heads=1, n_layers=1, dropout=0.0, causal=True, max_length=max_length, vocab_size=VOCAB,
        task={"sentinel_ids": sentinels, "eos_id": EOS, "start_id": START, "pad_id": PAD},
    )
    return SpanCorruption(SpanCorruptionConfig(**config), ctx)


def blocks(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(*TEXT_IDS, (batch, length), generator=torch.Generator().manual_seed(seed))


def rebuild(source: list[int], target: list[int]) -> list[int]:
    """The text that ``source`` and ``target`` encode: each sentinel in the source replaced
    by the target's tokens behind the same sentinel (padding and -100 dropped, both checked
    to end with eos)."""
    source = [t for t in source if t != PAD]
    target = [t for t in target if t != IGNORE_INDEX]
    assert source[-1] == EOS and target[-1] == EOS and EOS not in source[:-1] + target[:-1]
    spans: dict[int, list[int]] = {}
    current = None
    for token in target[:-1]:
        if token in SENTINELS:
            current = spans.setdefault(token, [])
        else:
            assert current is not None, "the target starts with a sentinel"
            current.append(token)
    text: list[int] = []
    for token in source[:-1]:
        text.extend(spans.pop(token) if token in SENTINELS else [token])
    assert not spans, "every span of the target has its sentinel in the source"
    return text


def runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in a 1-d bool tensor."""
    lengths, count = [], 0
    for value in mask.tolist() + [False]:
        if value:
            count += 1
        elif count:
            lengths.append(count)
            count = 0
    return lengths


def test_noise_share_and_span_length_match_the_settings() -> None:
    length, rows = 512, 400
    mask = noise_mask(torch.full((rows,), length), length, 0.15, 3.0, torch.Generator().manual_seed(0))
    spans = [runs(row) for row in mask]
    # T5's counts: round(512 · 0.15) = 77 noise tokens in round(77 / 3) = 26 spans, every row.
    assert mask.sum(dim=1).tolist() == [77] * rows
    assert all(len(s) == 26 for s in spans)
    assert mask.float().mean().item() == pytest.approx(0.15, abs=0.005)
    lengths = torch.tensor([n for s in spans for n in s], dtype=torch.float64)
    assert lengths.mean().item() == pytest.approx(3.0, abs=0.05)
    # A random segmentation, not fixed spans: lengths from 1 up, geometric-like spread.
    assert lengths.min() == 1 and lengths.max() >= 10 and lengths.std() > 1.5
    # As in T5, a non-noise span first and a noise span last; in between, every position is
    # noise about equally often.
    assert not mask[:, 0].any() and mask[:, -1].all()
    per_position = mask[:, 16:-16].float().mean(dim=0)
    assert per_position.min() > 0.05 and per_position.max() < 0.27


@pytest.mark.parametrize("density,mean_span", [(0.15, 3.0), (0.5, 1.0), (0.3, 8.0)])
def test_span_counts_follow_t5(density: float, mean_span: float) -> None:
    for length in (2, 3, 10, 17, 128, 511):
        noise, spans = (int(v) for v in span_counts(torch.tensor(length), density, mean_span))
        expected_noise = min(max(round(length * density), 1), length - 1)
        assert noise == expected_noise
        assert spans == min(max(round(expected_noise / mean_span), 1), expected_noise, length - expected_noise)
    assert [int(v) for v in span_counts(torch.tensor(1), density, mean_span)] == [0, 0]


def test_source_and_target_interleave_back_to_the_text() -> None:
    made = objective()
    ids = blocks(64, 128)
    batch = made.prepare_batch({"input_ids": ids, "labels": ids.roll(-1, dims=1)})
    assert set(batch) == {"input_ids", "attention_mask", "labels", "decoder_input_ids", "decoder_attention_mask"}
    # 128 tokens: 19 noise tokens in 6 spans; source 109 + 6 + eos, target 19 + 6 + eos.
    assert batch["input_ids"].shape == (64, 116) and batch["labels"].shape == (64, 26)
    assert batch["attention_mask"].all() and batch["decoder_attention_mask"].all()
    for row in range(64):
        assert rebuild(batch["input_ids"][row].tolist(), batch["labels"][row].tolist()) == ids[row].tolist()
    assert (batch["decoder_input_ids"][:, 0] == START).all()
    assert torch.equal(batch["decoder_input_ids"][:, 1:], batch["labels"][:, :-1])


def test_padded_rows_are_corrupted_by_their_own_length() -> None:
    made = objective()
    ids = blocks(6, 40, seed=1)
    lengths = torch.tensor([40, 33, 20, 9, 2, 1])
    mask = torch.arange(40)[None, :] < lengths[:, None]
    batch = made.prepare_batch({"input_ids": ids.masked_fill(~mask, PAD), "attention_mask": mask})
    for row, length in enumerate(lengths.tolist()):
        source, target = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        assert rebuild(source, target) == ids[row, :length].tolist()
        noise, spans = (int(v) for v in span_counts(torch.tensor(length), 0.15, 3.0))
        assert int(batch["attention_mask"][row].sum()) == length - noise + spans + 1
        assert int(batch["decoder_attention_mask"][row].sum()) == noise + spans + 1
        assert all(t == PAD for t in source[length - noise + spans + 1:])
    assert batch["labels"][5].tolist()[0] == EOS  # one token: nothing to corrupt


def test_sentinels_come_in_order() -> None:
    made = objective(mean_span_length=2.0, noise_density=0.3)
    batch = made.prepare_batch({"input_ids": blocks(16, 100, seed=2)})
    for source, target in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        in_source = [t for t in source if t in SENTINELS]
        in_target = [t for t in target if t in SENTINELS]
        assert in_source == in_target == SENTINELS[: len(in_source)] and len(in_source) == 15


def test_validation_noise_repeats_and_training_noise_does_not() -> None:
    made = objective()
    ids = blocks(8, 128, seed=3)
    made.eval()
    first, again = made.prepare_batch({"input_ids": ids}), made.prepare_batch({"input_ids": ids.clone()})
    assert all(torch.equal(first[key], again[key]) for key in first)
    made.train()
    torch.manual_seed(0)
    one, two = made.prepare_batch({"input_ids": ids}), made.prepare_batch({"input_ids": ids})
    assert not torch.equal(one["input_ids"], two["input_ids"])
    torch.manual_seed(0)
    assert torch.equal(made.prepare_batch({"input_ids": ids})["labels"], one["labels"])  # the run's seed decides


def test_too_few_sentinels_is_refused() -> None:
    objective(max_length=128, sentinels=SENTINELS[:6])  # 6 spans fit exactly
    with pytest.raises(ConfigError, match=r"(?s)7 spans.*only 6 sentinel.*data\.sentinel_tokens to 7") as error:
        objective(max_length=136, sentinels=SENTINELS[:6])  # round(20.4) = 20 noise tokens, 7 spans
    assert error.value.expected and error.value.fix


def test_missing_facts_and_overlong_sources_are_refused() -> None:
    with pytest.raises(ConfigError, match="declares no sentinel_ids"):
        objective(sentinels=[])
    with pytest.raises(ConfigError, match="sources of 9 tokens from blocks of 8"):
        objective(max_length=8)  # one noise token in one span: 7 + 1 + eos
    with pytest.raises(ConfigError, match="targets of"):
        objective(max_length=64, noise_density=0.99, mean_span_length=30.0)


def test_the_loss_runs_on_a_prepared_batch() -> None:
    made = objective()
    batch = made.prepare_batch({"input_ids": blocks(4, 128, seed=4)})
    out = made(torch.randn(4, batch["labels"].shape[1], 8), batch)
    assert out.loss.isfinite() and set(out.metrics) == {"accuracy", "sequence_accuracy", "perplexity"}
    assert made.tokens_in({"input_ids": blocks(4, 128)}) == 4 * 128


def test_the_conformance_kit_builds_it() -> None:
    check_component(COMPONENT)


# --- training on the shipped corpus ------------------------------------------------------------


def test_span_corruption_trains_on_text(tmp_path: Path) -> None:
    """A tiny encoder–decoder on the shipped corpus: validation loss falls within 60 steps
    (3.17 → 2.76 when written; about 7 s on one thread). The decoding metrics, off by
    default, see the corrupted batches too."""
    import plugformer

    summary = plugformer.train(
        [
            "experiment=t5_small", "logger=csv", "callbacks.progress_bar=none",
            "model.d_model=32", "model.n_layers=1", "model.n_heads=2",
            "data.block_size=64", "data.batch_size=16",
            "trainer.max_steps=60", "trainer.val_check_interval=20", "optim.lr=3e-3", "optim.warmup_steps=10",
            "objective.generation_metric=true", "objective.bleu=true",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ],
        run_dir=tmp_path / "run",
    )
    assert summary["status"] == "finished" and summary["components"]["objective"] == "span_corruption"
    with open(tmp_path / "run" / "metrics.csv") as handle:
        losses = [float(row["val/loss"]) for row in csv.DictReader(handle) if row.get("val/loss")]
    assert len(losses) == 3 and losses[-1] < losses[0] - 0.25, losses
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert metrics["val/loss"] == pytest.approx(losses[-1], rel=1e-4)
    assert 0.0 <= metrics["val/exact_match"] <= 1.0 and 0.0 <= metrics["val/bleu"] <= 100.0
