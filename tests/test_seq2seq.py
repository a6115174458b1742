"""Sequence to sequence: the seq2seq objective's loss and metrics, the algorithmic and pairs
data tasks, and encoder–decoder training through the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from plugformer import BuildContext, DataContext, DataError
from plugformer_plugins.data.algorithmic import (
    EOS_ID,
    FIRST_SYMBOL,
    START_ID,
    AlgorithmicConfig,
    AlgorithmicTask,
    Operation,
)
from plugformer_plugins.data.pairs import PairsConfig, PairsTask, read_pairs, PairsFormat
from plugformer_plugins.data.seq2seq_batches import collate_pairs
from plugformer_plugins.objective.seq2seq import (
    IGNORE_INDEX,
    Seq2Seq,
    Seq2SeqConfig,
    bleu_from_statistics,
    bleu_statistics,
    corpus_bleu,
    decoded_texts,
    shift_right,
)

VOCAB = 8


def objective(**task: int) -> Seq2Seq:
    """A seq2seq objective whose head is the identity (d_model == vocab), so hidden = logits."""
    ctx = BuildContext(
        d_model=VOCAB, n_heads=1, n_layers=1, dropout=0.0, causal=True, max_length=16, vocab_size=VOCAB,
        task={"start_id": START_ID, "eos_id": EOS_ID, "pad_id": 0, **task},
    )
    made = Seq2Seq(Seq2SeqConfig(), ctx)
    with torch.no_grad():
        made.head.weight.copy_(torch.eye(VOCAB))
    return made


def hand_batch() -> dict[str, torch.Tensor]:
    """Two examples: sources of 3 and 2 tokens, targets (with eos) of 4 and 2 tokens."""
    sources = [torch.tensor([3, 4, 5]), torch.tensor([6, 7])]
    targets = [torch.tensor([5, 4, 3, EOS_ID]), torch.tensor([7, EOS_ID])]
    return collate_pairs(sources, targets, pad_id=0, start_id=START_ID)


def perfect_hidden(labels: torch.Tensor) -> torch.Tensor:
    """Logits that put 20 on the right token (garbage, token 0, on padding)."""
    return 20.0 * torch.nn.functional.one_hot(labels.clamp(min=0), VOCAB).float()


# --- the objective -------------------------------------------------------------------------


def test_collate_shifts_targets_right_behind_the_start_token() -> None:
    batch = hand_batch()
    assert batch["input_ids"].tolist() == [[3, 4, 5], [6, 7, 0]]
    assert batch["attention_mask"].tolist() == [[True, True, True], [True, True, False]]
    assert batch["labels"].tolist() == [[5, 4, 3, EOS_ID], [7, EOS_ID, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["decoder_input_ids"].tolist() == [[START_ID, 5, 4, 3], [START_ID, 7, 0, 0]]
    assert batch["decoder_attention_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert torch.equal(shift_right(batch["labels"], START_ID), batch["decoder_input_ids"])


def test_perfect_logits_give_accuracy_one() -> None:
    batch = hand_batch()
    out = objective()(perfect_hidden(batch["labels"]), batch)
    assert out.metrics["accuracy"].item() == 1.0
    assert out.metrics["sequence_accuracy"].item() == 1.0
    assert out.loss.item() < 1e-6


def test_one_wrong_token_fails_only_its_example() -> None:
    batch = hand_batch()
    hidden = perfect_hidden(batch["labels"])
    hidden[0, 1] = 20.0 * torch.nn.functional.one_hot(torch.tensor(6), VOCAB).float()  # 4 → 6
    hidden[1, 3] = 20.0 * torch.nn.functional.one_hot(torch.tensor(3), VOCAB).float()  # padding: ignored
    out = objective()(hidden, batch)
    assert out.metrics["sequence_accuracy"].item() == 0.5
    assert out.metrics["accuracy"].item() == pytest.approx(5 / 6)
    assert out.loss.item() > 1.0


def test_label_smoothing_raises_the_loss_of_perfect_logits() -> None:
    batch = hand_batch()
    smoothed = objective()
    smoothed.label_smoothing = 0.1
    assert smoothed(perfect_hidden(batch["labels"]), batch).loss.item() > 0.1


def test_model_inputs_and_counts() -> None:
    batch = hand_batch()
    made = objective()
    inputs = made.model_inputs(batch)
    assert inputs.input_ids is batch["input_ids"] and inputs.decoder_input_ids is batch["decoder_input_ids"]
    derived = made.model_inputs({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    assert torch.equal(derived.decoder_input_ids, batch["decoder_input_ids"])
    assert torch.equal(derived.decoder_attention_mask, batch["decoder_attention_mask"])
    assert made.tokens_in(batch) == 5 + 6
    assert made.examples_in(batch) == 2
    assert made.logits(torch.zeros(2, 3, VOCAB)).shape == (2, 3, VOCAB)


def test_the_head_is_tied_to_the_token_embedding() -> None:
    embedding = torch.nn.Embedding(VOCAB, 4)
    ctx = BuildContext(d_model=4, n_heads=1, n_layers=1, dropout=0.0, causal=True, max_length=8, vocab_size=VOCAB, token_embedding=embedding)
    assert Seq2Seq(Seq2SeqConfig(), ctx).head.weight is embedding.weight


def test_bleu_is_100_on_a_perfect_copy_and_lower_on_a_damaged_one() -> None:
    labels = torch.tensor([[5, 4, 3, 6, 7, EOS_ID], [7, 6, 5, 4, 3, EOS_ID], [3, 3, 4, 5, EOS_ID, IGNORE_INDEX]])
    # Greedy decoding repeats the end token after it; the text stops at the first one.
    perfect = labels.masked_fill(labels == IGNORE_INDEX, EOS_ID)
    hypotheses, references = decoded_texts(perfect, labels, EOS_ID)
    assert references == ["5 4 3 6 7", "7 6 5 4 3", "3 3 4 5"] and hypotheses == references
    assert corpus_bleu(hypotheses, references) == pytest.approx(100.0)
    damaged = perfect.clone()
    damaged[0, 2], damaged[2, 3] = 7, EOS_ID  # a wrong token, a target cut short
    score = corpus_bleu(*decoded_texts(damaged, labels, EOS_ID))
    assert 0.0 < score < 100.0
    assert corpus_bleu(["9 9 9 9"] * 3, references) == pytest.approx(0.0)


def test_bleu_statistics_of_parts_add_up_to_the_corpus_score() -> None:
    import sacrebleu

    hypotheses = ["the cat sat on the mat", "a dog ran", "hello there world", "one two three four five"]
    references = ["the cat sat on a mat", "the dog ran away", "hello world", "one two three four five"]
    parts = bleu_statistics(hypotheses[:2], references[:2]) + bleu_statistics(hypotheses[2:], references[2:])
    assert bleu_from_statistics(parts) == pytest.approx(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def test_bleu_texts_come_through_the_tokenizer() -> None:
    class Letters:
        def decode(self, ids: list[int]) -> str:
            return "".join("abcdefgh"[i] for i in ids)

    hypotheses, references = decoded_texts(torch.tensor([[3, 4, 2, 2]]), torch.tensor([[3, 4, 5, 2]]), EOS_ID, Letters())
    assert (hypotheses, references) == (["de"], ["def"])


def test_no_start_token_and_no_decoder_inputs_is_a_data_error() -> None:
    ctx = BuildContext(d_model=VOCAB, n_heads=1, n_layers=1, dropout=0.0, causal=True, max_length=8, vocab_size=VOCAB)
    batch = hand_batch()
    with pytest.raises(DataError, match="start"):
        Seq2Seq(Seq2SeqConfig(), ctx).model_inputs({k: batch[k] for k in ("input_ids", "labels")})


# --- the algorithmic task ------------------------------------------------------------------


def algorithmic(tmp_path: Path, **options) -> AlgorithmicTask:
    values = dict(vocab_size=10, min_length=2, max_length=7, train_examples=300, val_examples=50, test_examples=50)
    values.update(options)
    task = AlgorithmicTask(AlgorithmicConfig(**values), DataContext(cache_dir=tmp_path))
    task.prepare()
    return task


def pairs_of(task: AlgorithmicTask, split: str) -> list[tuple[list[int], list[int]]]:
    assert task.splits is not None
    return [(row["input_ids"].tolist(), row["labels"].tolist()) for row in task.splits[split]]


@pytest.mark.parametrize(
    ("operation", "expected"),
    [(Operation.reverse, lambda s: s[::-1]), (Operation.sort, sorted), (Operation.copy, list)],
    ids=["reverse", "sort", "copy"],
)
def test_targets_follow_the_operation(operation: Operation, expected, tmp_path: Path) -> None:
    task = algorithmic(tmp_path, task=operation)
    for source, target in pairs_of(task, "train"):
        assert 2 <= len(source) <= 7 and all(FIRST_SYMBOL <= t < 10 for t in source)
        assert target == list(expected(source)) + [EOS_ID]
    assert task.vocab_size == 10 and task.max_length == 8
    assert task.facts == {"start_id": START_ID, "eos_id": EOS_ID, "pad_id": 0}


def test_sources_are_distinct_across_splits(tmp_path: Path) -> None:
    task = algorithmic(tmp_path)
    sources = [tuple(s) for split in ("train", "validation", "test") for s, _ in pairs_of(task, split)]
    assert len(sources) == len(set(sources)) == 400


def test_splits_are_cached_and_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = pairs_of(algorithmic(tmp_path), "validation")

    def never(self):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(AlgorithmicTask, "build_splits", never)
    assert pairs_of(algorithmic(tmp_path), "validation") == first
    monkeypatch.undo()
    assert pairs_of(algorithmic(tmp_path / "other"), "validation") == first


def test_batches_have_the_seq2seq_keys(tmp_path: Path) -> None:
    batch = next(iter(algorithmic(tmp_path).train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "labels"}
    assert (batch["decoder_input_ids"][:, 0] == START_ID).all()


def test_too_few_distinct_sources_is_refused(tmp_path: Path) -> None:
    from plugformer import ConfigError

    with pytest.raises(ConfigError, match="distinct sources"):
        AlgorithmicTask(AlgorithmicConfig(vocab_size=5, min_length=1, max_length=3, train_examples=100), DataContext(cache_dir=tmp_path))


# --- the pairs task -------------------------------------------------------------------------


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_pairs_from_tsv_and_jsonl(tmp_path: Path) -> None:
    train = write(tmp_path / "train.tsv", "abc\tcba\n\nhello\tolleh\n")
    lines = [json.dumps({"in": "ab", "out": "ba"}), json.dumps({"in": "zz", "out": "z"})]
    validation = write(tmp_path / "val.jsonl", "\n".join(lines) + "\n")
    config = PairsConfig(train_file=train, validation_file=validation, source_key="in", target_key="out", batch_size=2)
    task = PairsTask(config, DataContext(cache_dir=tmp_path / "cache"))
    task.prepare()
    tok = task.tokenizer
    assert tok is not None and task.facts["start_id"] == tok.start_id and task.facts["eos_id"] == tok.eos_id
    assert task.max_length == 6  # "olleh" + eos
    batch = next(iter(task.val_dataloader()))
    assert tok.decode(batch["input_ids"][0].tolist()) == "ab"
    assert tok.decode(batch["labels"][0].tolist()) == "ba"
    assert batch["labels"][1].tolist()[:2] == [tok.encode("z")[0], tok.eos_id]
    assert tok.decode(tok.encode("aq")) == "a\ufffd"  # a character unseen in training: <unk>
    assert task.test_dataloader().dataset.num_rows == 2  # no test file: validation
    config.test_file = write(tmp_path / "test.tsv", "cab\tbac\n")
    with_test = PairsTask(config, DataContext(cache_dir=tmp_path / "cache"))
    with_test.prepare()
    assert with_test.test_dataloader().dataset.num_rows == 1


@pytest.mark.parametrize(
    ("name", "text", "fmt", "message"),
    [
        ("bad.tsv", "a\tb\nonly one column\n", PairsFormat.auto, r"bad.tsv, line 2: 1 tab-separated column"),
        ("bad.tsv", "a\tb\tc\n", PairsFormat.tsv, r"line 1: 3 tab-separated column"),
        ("bad.jsonl", '{"source": "a", "target": "b"}\n{"source": "a"\n', PairsFormat.auto, r"bad.jsonl, line 2: invalid JSON"),
        ("bad.jsonl", '\n{"src": "a", "target": "b"}\n', PairsFormat.jsonl, r"line 2: no string values for the keys 'source'"),
        ("bad.tsv", "\tb\n", PairsFormat.tsv, r"line 1: an empty source"),
        ("empty.tsv", "\n  \n", PairsFormat.auto, r"holds no source/target pairs"),
    ],
)
def test_malformed_pair_files_name_the_file_and_line(name: str, text: str, fmt: PairsFormat, message: str, tmp_path: Path) -> None:
    path = tmp_path / name
    write(path, text)
    with pytest.raises(DataError, match=message) as error:
        read_pairs(path, fmt, "source", "target", "data.train_file")
    assert "Fix:" in str(error.value)


def test_a_missing_pairs_file_is_a_data_error(tmp_path: Path) -> None:
    config = PairsConfig(train_file=str(tmp_path / "nope.tsv"), validation_file=str(tmp_path / "nope.tsv"))
    with pytest.raises(DataError, match="data.train_file=.*nope.tsv.* is not a file"):
        PairsTask(config, DataContext(cache_dir=tmp_path)).prepare()
    config = PairsConfig(train_file=write(tmp_path / "t.tsv", "a\tb\n"), validation_file=str(tmp_path / "v.tsv"), tokenizer="byte")
    with pytest.raises(DataError, match="data.validation_file=.*v.tsv.* is not a file"):
        PairsTask(config, DataContext(cache_dir=tmp_path)).prepare()
    with pytest.raises(DataError, match="data.validation_file is not set"):
        PairsTask(PairsConfig(train_file="x.tsv"), DataContext(cache_dir=tmp_path))


# --- training through the Python API ----------------------------------------------------------

TINY = [
    "experiment=reverse_small",
    "logger=csv",
    "callbacks.progress_bar=none",
    "model.d_model=32",
    "model.n_layers=1",
    "data.train_examples=256",
    "data.val_examples=64",
    "data.test_examples=0",
    "data.batch_size=32",
]


def test_encoder_decoder_trains_through_the_api(tmp_path: Path) -> None:
    import plugformer

    cfg = plugformer.compose(
        [*TINY, "trainer.max_steps=4", "trainer.val_check_interval=4", "objective.bleu=true", f"paths.cache_dir={tmp_path / 'cache'}"]
    )
    summary = plugformer.train(cfg, run_dir=tmp_path / "run")
    assert summary["status"] == "finished"
    assert summary["components"]["objective"] == "seq2seq" and summary["components"]["data"] == "algorithmic"
    metrics = json.loads((tmp_path / "run" / "summary.json").read_text())["metrics"]
    assert 0.0 <= metrics["val/sequence_accuracy"] <= 1.0 and "val/accuracy" in metrics
    assert 0.0 <= metrics["val/exact_match"] <= 1.0
    assert metrics["val/generated_sequence_accuracy"] == metrics["val/exact_match"]  # its first name, kept
    assert 0.0 <= metrics["val/bleu"] <= 100.0
    run = plugformer.load_run(tmp_path / "run", checkpoint="last")
    batch = next(iter(run.data.val_dataloader()))
    generated = run.generate(batch["input_ids"][:4], 5, attention_mask=batch["attention_mask"][:4])  # start/end from the facts
    assert generated.shape == (4, 5)


@pytest.mark.slow
def test_a_tiny_model_learns_to_reverse(tmp_path: Path) -> None:
    """Lengths 2-5 over 6 symbols: chance of a whole sequence right is below 1/36. About
    20 s on one CPU thread (it reaches 1.0 in 200 steps)."""
    import plugformer

    cfg = plugformer.compose(
        [
            "experiment=reverse_small", "logger=none", "callbacks.progress_bar=none",
            "model.d_model=64", "model.n_layers=1",
            "data.vocab_size=9", "data.min_length=2", "data.max_length=5",
            "data.train_examples=4000", "data.val_examples=200", "data.test_examples=0",
            "trainer.max_steps=200", "trainer.val_check_interval=200", "optim.lr=3e-3", "optim.warmup_steps=30",
            f"paths.cache_dir={tmp_path / 'cache'}",
        ]
    )
    summary = plugformer.train(cfg, run_dir=tmp_path / "run")
    metrics = summary["metrics"]
    assert metrics["val/sequence_accuracy"] > 0.8, metrics
    # Greedy decoding with the caches gets an example right exactly when teacher forcing does.
    assert metrics["val/exact_match"] == pytest.approx(metrics["val/sequence_accuracy"], abs=0.02)
