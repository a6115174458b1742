"""Masked language modelling: the masks prepare_batch draws (statistics, specials and padding,
eval-mode determinism), a loss that only sees the selected positions, the build-time facts,
and a short encoder training on the shipped text through the Python API."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from plugformer import BuildContext, ConfigError
from plugformer.testing import check_component
from plugformer_plugins.objective.masked_lm import COMPONENT, IGNORE_INDEX, MaskedLM, MaskedLMConfig

VOCAB = 100
PAD, UNK, CLS, MASK = 0, 1, 2, 3
SPECIALS = [PAD, UNK, CLS, MASK]


def context(**task: object) -> BuildContext:
    facts = {"mask_id": MASK, "special_ids": SPECIALS, "pad_id": PAD, **task}
    return BuildContext(
        d_model=16, n_heads=2, n_layers=1, dropout=0.0, causal=False, max_length=256, vocab_size=VOCAB,
        stack="encoder", encoder_layers=1, task=facts,
    )


def objective(**options: object) -> MaskedLM:
    return MaskedLM(MaskedLMConfig(**options), context())


def random_batch(rows: int = 256, length: int = 128, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ordinary tokens, a CLS at position 0, some UNKs, and right padding of varying length."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIALS), VOCAB, (rows, length), generator=generator)
    ids[:, 0] = CLS
    ids[torch.rand(rows, length, generator=generator) < 0.02] = UNK
    lengths = torch.randint(length // 2, length + 1, (rows,), generator=generator)
    attention_mask = torch.arange(length)[None, :] < lengths[:, None]
    ids = ids.masked_fill(~attention_mask, PAD)
    next_token = torch.roll(ids, -1, dims=1)  # what the text task gives; masked LM replaces it
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": next_token}


# --- masking ---------------------------------------------------------------------------------


def test_selection_and_replacement_follow_bert_80_10_10() -> None:
    batch = random_batch()
    original = batch["input_ids"].clone()
    masked = objective().train().prepare_batch(batch)
    assert torch.equal(batch["input_ids"], original), "the data's batch must not be modified"
    labels, ids = masked["labels"], masked["input_ids"]
    selected = labels != IGNORE_INDEX
    candidates = batch["attention_mask"] & ~torch.isin(original, torch.tensor(SPECIALS))

    assert not (selected & ~candidates).any(), "specials and padding are never selected"
    assert torch.equal(labels[selected], original[selected])
    assert (labels[~selected] == IGNORE_INDEX).all()
    assert torch.equal(ids[~selected], original[~selected]), "unselected tokens are left alone"
    assert selected.sum() / candidates.sum() == pytest.approx(0.15, abs=0.01)

    count = selected.sum()
    to_mask = (ids == MASK) & selected
    replaced = (ids != original) & ~to_mask & selected
    kept = (ids == original) & selected
    # A random replacement equals the original 1 time in 96 (kept, then).
    assert to_mask.sum() / count == pytest.approx(0.8, abs=0.02)
    assert replaced.sum() / count == pytest.approx(0.1 * 95 / 96, abs=0.015)
    assert kept.sum() / count == pytest.approx(0.1 + 0.1 / 96, abs=0.015)
    assert not torch.isin(ids[replaced], torch.tensor(SPECIALS)).any(), "random replacements are never special"
    assert torch.equal(ids[~batch["attention_mask"]], original[~batch["attention_mask"]])


def test_every_example_with_a_candidate_gets_a_selected_token() -> None:
    ids = torch.tensor([[CLS, 10, 11, PAD], [CLS, 12, PAD, PAD], [CLS, PAD, PAD, PAD]])
    batch = {"input_ids": ids, "attention_mask": ids != PAD}
    for seed in range(20):
        torch.manual_seed(seed)
        selected = objective(mask_probability=0.01).train().prepare_batch(batch)["labels"] != IGNORE_INDEX
        assert selected.sum(dim=1).tolist()[:2] == [1, 1]
        assert not selected[2].any(), "an example of specials only has nothing to select"
        assert not selected[:, 0].any()


def test_without_an_attention_mask_padding_ids_are_never_selected() -> None:
    batch = random_batch(rows=64)
    del batch["attention_mask"]
    selected = objective(mask_probability=0.9).train().prepare_batch(batch)["labels"] != IGNORE_INDEX
    assert not (selected & (batch["input_ids"] == PAD)).any()


def test_eval_masks_repeat_and_training_masks_change() -> None:
    batch = random_batch(rows=32)
    model = objective()
    model.eval()
    first, second = model.prepare_batch(batch), model.prepare_batch(batch)
    assert torch.equal(first["input_ids"], second["input_ids"]) and torch.equal(first["labels"], second["labels"])
    model.train()
    first, second = model.prepare_batch(batch), model.prepare_batch(batch)
    assert not torch.equal(first["labels"], second["labels"]), "dynamic masking: fresh masks per training batch"


# --- the loss --------------------------------------------------------------------------------


def test_the_loss_only_depends_on_selected_positions() -> None:
    torch.manual_seed(0)
    model = objective()
    batch = model.train().prepare_batch(random_batch(rows=8, length=32))
    selected = batch["labels"] != IGNORE_INDEX
    hidden = torch.randn(8, 32, 16)
    out = model(hidden, batch)
    changed = hidden.clone()
    changed[~selected] = torch.randn(int((~selected).sum()), 16) * 10
    again = model(changed, batch)
    assert not torch.allclose(out.logits[~selected], again.logits[~selected])
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert again.metrics["accuracy"].item() == out.metrics["accuracy"].item()
    # And it does depend on the selected ones, as cross-entropy over them alone.
    expected = torch.nn.functional.cross_entropy(out.logits[selected], batch["labels"][selected])
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["perplexity"].item() == pytest.approx(out.loss.exp().item(), rel=1e-6)
    out.loss.backward()


def test_accuracy_counts_selected_positions_and_nothing_selected_is_no_nan() -> None:
    model = objective(head_transform=False)
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 1], labels[0, 2] = 7, 8
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
        model.head.bias[7] = 5.0  # every position predicts 7
    out = model(torch.zeros(1, 4, 16), {"input_ids": torch.full((1, 4), 9), "labels": labels})
    assert out.metrics["accuracy"].item() == 0.5
    empty = model(torch.zeros(1, 4, 16), {"input_ids": torch.full((1, 4), 9), "labels": torch.full((1, 4), IGNORE_INDEX)})
    assert empty.loss.item() == 0.0 and empty.metrics["accuracy"].item() == 0.0


def test_the_head_is_tied_and_counts_real_tokens() -> None:
    embedding = torch.nn.Embedding(VOCAB, 16)
    ctx = context()
    model = MaskedLM(MaskedLMConfig(), replace(ctx, token_embedding=embedding))
    assert model.head.weight is embedding.weight
    assert model.logits(torch.zeros(2, 3, 16)).shape == (2, 3, VOCAB)
    batch = random_batch(rows=4)
    assert model.tokens_in(batch) == int(batch["attention_mask"].sum())


# --- facts and options -----------------------------------------------------------------------


def test_a_task_without_a_mask_token_is_refused_with_a_fix() -> None:
    ctx = context()
    facts = {k: v for k, v in ctx.task.items() if k != "mask_id"}
    with pytest.raises(ConfigError, match="mask token") as raised:
        MaskedLM(MaskedLMConfig(), replace(ctx, task=facts))
    assert raised.value.expected and raised.value.fix


def test_replacement_shares_over_one_are_refused() -> None:
    with pytest.raises(ConfigError, match="replace_mask"):
        objective(replace_mask=0.95, replace_random=0.1)


def test_the_component_passes_the_conformance_kit_and_needs_a_mask_token() -> None:
    check_component(COMPONENT)
    capabilities = COMPONENT.capabilities_for()
    assert {"masked_lm", "token_blocks", "encoder"} <= capabilities.provides
    assert capabilities.requires == {"attention": {"bidirectional"}, "data": {"mask_token"}}


# --- training --------------------------------------------------------------------------------


def val_metric(run_dir: Path, name: str) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row[name]) for row in csv.DictReader(handle) if row.get(name)]


@pytest.mark.slow
def test_a_tiny_encoder_learns_masked_tokens(tmp_path: Path) -> None:
    """mlm_small's encoder with one layer, on blocks of 64 characters for 100 steps: the
    validation loss falls clearly (about 2.8 to 2.2; some 20 s on one idle thread)."""
    import plugformer

    cfg = plugformer.compose(
        [
            "experiment=mlm_small", "logger=csv", "callbacks.progress_bar=none",
            "model.n_layers=1", "data.block_size=64", "trainer.max_steps=100", "trainer.val_check_interval=25",
            "trainer.limit_val_batches=4", "optim.lr=2e-3", "optim.warmup_steps=10",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    summary = plugformer.train(cfg, run_dir=tmp_path / "run")
    assert summary["status"] == "finished"
    assert summary["components"]["objective"] == "masked_lm"
    losses = val_metric(tmp_path / "run", "val/loss")
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.3, losses
    assert 0.0 <= summary["metrics"]["val/accuracy"] <= 1.0
