"""Data tasks (ListOps, text) and the classification objective."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from plugformer import BuildContext, ConfigError, DataContext, DataError
from plugformer_plugins.data import listops, text
from plugformer_plugins.data.listops import CLS_ID, ListOpsConfig, ListOpsTask, decode, evaluate
from plugformer_plugins.data.text import CORPUS_DIR, TextConfig, TextTask
from plugformer_plugins.objective.classification import Classification, ClassificationConfig, Pooling, pool

SMALL_LISTOPS = dict(max_depth=4, max_args=5, min_length=8, max_length=40, train_examples=300, val_examples=50, test_examples=50)


def listops_task(tmp_path: Path, **overrides) -> ListOpsTask:
    return ListOpsTask(ListOpsConfig(**{**SMALL_LISTOPS, **overrides}), DataContext(cache_dir=tmp_path))


def all_examples(task: ListOpsTask) -> list[tuple[list[int], int]]:
    assert task.splits is not None
    return [
        (row["input_ids"].tolist(), int(row["labels"]))
        for split in ("train", "validation", "test")
        for row in task.splits[split]
    ]


# --- ListOps ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        ("7", 7),
        ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
        ("[MIN 4 [MAX 1 7 ] 9 ]", 4),
        ("[MED 1 2 3 4 ]", 2),  # (2 + 3) / 2 = 2.5, truncated
        ("[MED 3 8 ]", 5),  # 5.5, truncated
        ("[MED 9 1 5 ]", 5),
        ("[SM 9 9 5 ]", 3),  # 23 mod 10
        ("[SM [MED 0 9 ] [MIN 7 [SM 5 5 ] ] 3 ]", 7),  # 4 + 0 + 3
        ("<cls> [MAX 1 2 ]", 2),
    ],
)
def test_listops_evaluates_hand_written_expressions(expression: str, value: int) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize("expression", ["[MAX 1 2", "1 2", "[FOO 1 ]", "]", "[MIN ]"])
def test_listops_rejects_malformed_expressions(expression: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expression)


def test_listops_examples_respect_the_generator_contract(tmp_path: Path) -> None:
    task = listops_task(tmp_path)
    task.prepare()
    examples = all_examples(task)
    assert len(examples) == 400
    assert task.facts == {"num_classes": 10} and task.vocab_size == len(listops.VOCAB) and task.max_length == 40
    for ids, label in examples:
        assert ids[0] == CLS_ID
        assert 8 < len(ids) - 1 < 40  # strictly inside the window, CLS not counted
        assert 0 <= label <= 9
        assert evaluate(decode(ids)) == label
    assert len({tuple(ids) for ids, _ in examples}) == len(examples)  # unique across all splits


def test_listops_generation_is_deterministic_for_a_seed() -> None:
    config = ListOpsConfig(**SMALL_LISTOPS)
    assert listops.generate(config, 100, seed=3) == listops.generate(config, 100, seed=3)
    assert listops.generate(config, 100, seed=3) != listops.generate(config, 100, seed=4)


def test_listops_generates_lra_sized_examples_quickly() -> None:
    config = ListOpsConfig(max_depth=10, max_args=10, min_length=500, max_length=2000)
    expressions, labels = listops.generate(config, 30, seed=0)
    assert all(500 < len(e) < 2000 for e in expressions)
    assert [evaluate(decode(e)) for e in expressions] == labels


def _naive_draw(rng: random.Random, config: ListOpsConfig, depth: int = 1) -> list[int]:
    """The plain generator: no forced operator root, no early stop."""
    if depth >= config.max_depth or rng.random() >= listops.OPERATOR_PROBABILITY:
        return [2 + rng.randrange(10)]
    out = [12 + rng.randrange(4)]
    for _ in range(rng.randint(2, config.max_args)):
        out += _naive_draw(rng, config, depth + 1)
    return out + [16]


def test_listops_shortcuts_keep_the_distribution_of_accepted_lengths() -> None:
    config = ListOpsConfig(max_depth=4, max_args=4, min_length=5, max_length=20)
    rng = random.Random(0)
    fast: Counter[int] = Counter()
    while sum(fast.values()) < 20000:
        drawn = listops.sample_expression(rng, config)
        if drawn is not None:
            fast[len(drawn[0])] += 1
    naive: Counter[int] = Counter()
    while sum(naive.values()) < 20000:
        length = len(_naive_draw(rng, config))
        if config.min_length < length < config.max_length:
            naive[length] += 1
    distance = sum(abs(fast[n] - naive[n]) for n in set(fast) | set(naive)) / 2 / 20000
    assert distance < 0.03


def test_listops_rejects_impossible_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_length"):
        listops_task(tmp_path, min_length=50, max_length=40)


def _entries(root: Path) -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")}


def test_listops_second_prepare_loads_from_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = listops_task(tmp_path)
    first.prepare()
    entries = _entries(tmp_path / "listops")
    assert len(entries) == 1

    def must_not_build(self: ListOpsTask):
        raise AssertionError("the splits were built again instead of loaded")

    monkeypatch.setattr(ListOpsTask, "build_splits", must_not_build)
    second = listops_task(tmp_path)
    second.prepare()
    assert _entries(tmp_path / "listops") == entries
    assert all_examples(second) == all_examples(first)

    monkeypatch.undo()
    listops_task(tmp_path, seed=99).prepare()
    assert len(_entries(tmp_path / "listops")) == 2


# --- text ---------------------------------------------------------------------------------


def text_task(tmp_path: Path, **overrides) -> TextTask:
    config = TextConfig(**{"block_size": 64, "bpe_vocab_size": 400, **overrides})
    return TextTask(config, DataContext(cache_dir=tmp_path))


def corpus_text() -> str:
    return "".join(p.read_text(encoding="utf-8") for p in sorted(CORPUS_DIR.glob("*.txt")))


@pytest.mark.parametrize("tokenizer", ["char", "byte", "bpe"])
def test_text_tokenizers_round_trip_the_shipped_corpus(tmp_path: Path, tokenizer: str) -> None:
    task = text_task(tmp_path, tokenizer=tokenizer)
    task.prepare()
    assert task.tokenizer is not None
    source = corpus_text()
    ids = task.tokenizer.encode(source)
    assert 0 not in ids and max(ids) < task.vocab_size
    assert task.tokenizer.decode(ids) == source
    first_block = task.splits["train"][0]["input_ids"].tolist()
    assert source.startswith(task.tokenizer.decode(first_block))


def test_text_blocks_are_shifted_by_one_and_contiguous(tmp_path: Path) -> None:
    task = text_task(tmp_path)
    task.prepare()
    train = task.splits["train"]
    assert task.max_length == 64 and len(train) > 10
    for index in range(3):
        block, following = train[index], train[index + 1]
        assert block["input_ids"].shape == block["labels"].shape == (64,)
        assert torch.equal(block["input_ids"][1:], block["labels"][:-1])
        assert block["labels"][-1] == following["input_ids"][0]
    batch = next(iter(task.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape and bool(batch["attention_mask"].all())


def test_text_local_files_with_validation_and_unknown_characters(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("abc cab bca\n" * 40)
    (tmp_path / "valid.txt").write_text("abz zz\n" * 10)
    task = text_task(tmp_path / "cache", train_files=[str(tmp_path / "a*.txt")], validation_files=[str(tmp_path / "valid.txt")], block_size=8)
    task.prepare()
    # pad, unk, the characters, then bos, eos, mask and data.sentinel_tokens sentinels
    assert task.vocab_size == 2 + len(set("abc \n")) + 3 + task.config.sentinel_tokens
    validation_ids = [i for row in task.splits["validation"] for i in row["input_ids"].tolist()]
    assert text.CharTokenizer.UNK_ID in validation_ids


def test_text_tokenizer_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text_task(tmp_path, tokenizer="bpe").prepare()

    def must_not_train(*args, **kwargs):
        raise AssertionError("the tokenizer was trained again")

    monkeypatch.setattr(text.BPETokenizer, "train", must_not_train)
    task = text_task(tmp_path, tokenizer="bpe")
    task.prepare()
    assert task.vocab_size == 400


def test_text_missing_files_raise_a_data_error(tmp_path: Path) -> None:
    task = text_task(tmp_path, train_files=[str(tmp_path / "nowhere" / "*.txt")])
    with pytest.raises(DataError, match="matches no file"):
        task.prepare()


def test_text_hub_dataset_without_network_raises_a_clear_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    task = text_task(tmp_path, hub_name="plugformer-tests/no-such-dataset")
    with pytest.raises(DataError) as raised:
        task.prepare()
    message = str(raised.value)
    assert "plugformer-tests/no-such-dataset" in message and "Hub" in message
    assert "data.train_files" in message and "HF_DATASETS_OFFLINE" in message
    assert len(message.splitlines()) <= 4


# --- classification -----------------------------------------------------------------------


def classification_context(**overrides) -> BuildContext:
    values = dict(d_model=4, n_heads=1, n_layers=1, dropout=0.0, causal=False, max_length=8, vocab_size=10, task={"num_classes": 4})
    return BuildContext(**{**values, **overrides})


def test_pooling_picks_the_right_positions() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert torch.equal(pool(hidden, mask, Pooling.cls), hidden[:, 0])
    expected = torch.stack([hidden[0, :3].mean(0), hidden[1, :2].mean(0)])
    assert torch.allclose(pool(hidden, mask, Pooling.mean), expected)
    assert torch.allclose(pool(hidden, None, Pooling.mean), hidden.mean(1))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_classification_loss_and_accuracy(pooling: str) -> None:
    objective = Classification(ClassificationConfig(pooling=Pooling(pooling)), classification_context())
    with torch.no_grad():
        objective.head.weight.copy_(torch.eye(4))
        objective.head.bias.zero_()
    # Each example's real positions hold its logits; the padded position holds noise.
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    hidden = logits[:, None, :].repeat(1, 3, 1)
    hidden[0, 2] = 100.0
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    labels = torch.tensor([0, 1, 1])
    out = objective(hidden, {"input_ids": torch.ones(3, 3, dtype=torch.long), "attention_mask": mask, "labels": labels})
    assert torch.allclose(out.logits, logits)
    assert torch.allclose(out.loss, F.cross_entropy(logits, labels))
    assert out.metrics["accuracy"].item() == pytest.approx(2 / 3)


def test_classification_needs_the_number_of_classes() -> None:
    with pytest.raises(ConfigError, match="number of classes"):
        Classification(ClassificationConfig(), classification_context(task={}))


def test_classification_asks_for_an_encoder(registry) -> None:
    component = registry.get("objective", "classification")
    requires = component.capabilities_for().requires["attention"]
    assert {"bidirectional", "key_padding_mask"} <= requires and "causal" not in requires
    assert "classification" in registry.get("data", "listops").capabilities_for().requires["objective"]
    assert "token_blocks" in registry.get("data", "text").capabilities_for().requires["objective"]
