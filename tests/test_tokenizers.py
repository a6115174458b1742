"""Tokenizers of the text task: special tokens, round trips, pretrained Hugging Face files,
the tokenizer saved in (and reused from) the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from plugformer import ConfigError, DataContext
from plugformer_plugins.data import text
from plugformer_plugins.data.text import TextConfig, TextTask
from plugformer_plugins.data.tokenization import tokenizer_from_json

TRAIN_TEXT = "The cat sat on the mat. A dog ran after the cat, and the cat ran away.\n" * 30
SPECIAL_TEXT = "The c<mask>t sat <extra_id_0> the <extra_id_3> mat.</s><s>"


def write(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content, encoding="utf-8")
    return path


def make_task(tmp_path: Path, *, run_dir: Path | None = None, train: str = TRAIN_TEXT, **overrides) -> TextTask:
    corpus = write(tmp_path / "data" / f"train-{abs(hash(train))}.txt", train)
    config = TextConfig(**{"train_files": [str(corpus)], "block_size": 16, "bpe_vocab_size": 320, **overrides})
    task = TextTask(config, DataContext(cache_dir=tmp_path / "cache", run_dir=run_dir))
    task.prepare()
    return task


def tiny_bpe_json(directory: Path, config: dict | None = None) -> Path:
    """A tiny byte-level BPE saved as tokenizer.json (+ tokenizer_config.json)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>", "[PAD]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator([TRAIN_TEXT.splitlines()], trainer=trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    if config is not None:
        write(directory / "tokenizer_config.json", json.dumps(config))
    return directory


def tiny_wordpiece(directory: Path) -> Path:
    """A BERT-style vocab.txt with a tokenizer_config.json declaring its special tokens."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a", "dog", ".", ",", "##s"]
    write(directory / "vocab.txt", "\n".join(vocab) + "\n")
    write(directory / "tokenizer_config.json", json.dumps({
        "do_lower_case": True, "pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
        "sep_token": "[SEP]", "mask_token": {"content": "[MASK]", "__type": "AddedToken"},
    }))
    return directory


def assert_facts_are_sound(task: TextTask, sentinels: int) -> None:
    facts = task.facts
    single = [facts["pad_id"], facts["bos_id"], facts["eos_id"], facts["mask_id"]]
    ids = single + facts["sentinel_ids"]
    assert len(set(ids)) == len(ids), facts
    assert all(0 <= i < task.vocab_size for i in facts["special_ids"])
    assert set(ids) <= set(facts["special_ids"]) and facts["special_ids"] == sorted(set(facts["special_ids"]))
    assert len(facts["sentinel_ids"]) == sentinels
    assert facts["start_id"] == facts["bos_id"]
    assert task.pad_id == facts["pad_id"]


# --- built-in kinds ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
def test_round_trip_with_special_strings(tmp_path: Path, kind: str) -> None:
    task = make_task(tmp_path, tokenizer=kind)
    tok = task.tokenizer
    assert tok is not None
    plain = "The cat sat on the mat."
    assert tok.decode(tok.encode(plain)) == plain
    ids = tok.encode(SPECIAL_TEXT)
    facts = task.facts
    for special in (facts["mask_id"], facts["sentinel_ids"][0], facts["sentinel_ids"][3], facts["eos_id"], facts["bos_id"]):
        assert special in ids
    assert tok.decode(ids, skip_special=False) == SPECIAL_TEXT
    assert tok.decode(ids) == "The ct sat  the  mat."
    assert "<" not in tok.decode(ids)
    # The prompt the brief names: the mask is one id between the characters' ids.
    masked = tok.encode("The c<mask>t")
    assert masked.count(facts["mask_id"]) == 1 and tok.decode(masked, skip_special=False) == "The c<mask>t"
    again = tokenizer_from_json(tok.to_json())
    assert again.encode(SPECIAL_TEXT) == ids and again.vocab_size == tok.vocab_size and again.special == tok.special


@pytest.mark.parametrize("kind", ["char", "byte", "bpe"])
@pytest.mark.parametrize("sentinels", [0, 5])
def test_facts_are_distinct_and_within_the_vocabulary(tmp_path: Path, kind: str, sentinels: int) -> None:
    task = make_task(tmp_path, tokenizer=kind, sentinel_tokens=sentinels)
    assert task.facts["pad_id"] == 0
    assert_facts_are_sound(task, sentinels)
    if kind == "char":
        assert text.CharTokenizer.UNK_ID in task.facts["special_ids"]


def test_sentinel_capability_follows_the_count() -> None:
    with_sentinels = text.COMPONENT.capabilities_for(TextConfig())
    assert {"mask_token", "eos_token", "sentinel_tokens"} <= with_sentinels.provides
    assert with_sentinels.requires["objective"] == frozenset({"token_blocks"})
    assert "sentinel_tokens" not in text.COMPONENT.capabilities_for(TextConfig(sentinel_tokens=0)).provides


def test_bpe_vocab_size_must_leave_room_for_the_specials(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="bpe_vocab_size"):
        TextTask(TextConfig(tokenizer="bpe", bpe_vocab_size=270), DataContext(cache_dir=tmp_path))


# --- pretrained -------------------------------------------------------------------------------


def test_pretrained_tokenizer_json_with_specials_from_its_config(tmp_path: Path) -> None:
    directory = tiny_bpe_json(tmp_path / "tok", {"pad_token": "[PAD]", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"})
    task = make_task(tmp_path, tokenizer="pretrained", tokenizer_path=str(directory), sentinel_tokens=4)
    tok = task.tokenizer
    hf = Tokenizer.from_file(str(directory / "tokenizer.json"))
    facts = task.facts
    # Declared ones keep their ids; the missing mask and sentinels were added at the end.
    assert facts["pad_id"] == hf.token_to_id("[PAD]") == task.pad_id != 0
    assert facts["eos_id"] == facts["bos_id"] == hf.token_to_id("<|endoftext|>")
    assert facts["mask_id"] >= hf.get_vocab_size() and len(facts["sentinel_ids"]) == 4
    assert task.vocab_size == hf.get_vocab_size() + 5
    assert all(0 <= i < task.vocab_size for i in facts["special_ids"])
    prompt = "the c<mask>t sat <extra_id_1> mat<|endoftext|>"
    ids = tok.encode(prompt)
    assert facts["mask_id"] in ids and facts["sentinel_ids"][1] in ids and facts["eos_id"] in ids
    assert tok.decode(ids, skip_special=False) == prompt
    assert tok.decode(tok.encode("The cat sat.")) == "The cat sat."
    assert tokenizer_from_json(tok.to_json()).encode(prompt) == ids
    # The packed blocks use the pretrained ids.
    assert int(task.splits["train"][0]["input_ids"].max()) < task.vocab_size


def test_pretrained_wordpiece_vocab_txt(tmp_path: Path) -> None:
    directory = tiny_wordpiece(tmp_path / "bert")
    task = make_task(tmp_path, tokenizer="pretrained", tokenizer_path=str(directory), sentinel_tokens=2)
    tok = task.tokenizer
    facts = task.facts
    assert (facts["pad_id"], facts["bos_id"], facts["eos_id"], facts["mask_id"]) == (0, 2, 3, 4)  # [PAD] [CLS] [SEP] [MASK]
    assert facts["sentinel_ids"] == [15, 16] and task.vocab_size == 17
    assert 1 in facts["special_ids"]  # [UNK]
    ids = tok.encode("The cat [MASK] on the <extra_id_1> mat.")
    assert ids == [5, 6, 4, 8, 5, 16, 9, 12]
    assert tok.decode(ids) == "the cat on the mat."
    assert tok.decode(ids, skip_special=False) == "the cat [MASK] on the <extra_id_1> mat."
    assert tok.encode("zebra") == [1]


def test_pretrained_without_config_uses_known_spellings_and_adds_the_rest(tmp_path: Path) -> None:
    directory = tiny_bpe_json(tmp_path / "tok")
    task = make_task(tmp_path, tokenizer="pretrained", tokenizer_path=str(directory / "tokenizer.json"), sentinel_tokens=3)
    hf = Tokenizer.from_file(str(directory / "tokenizer.json"))
    assert task.facts["pad_id"] == hf.token_to_id("[PAD]")
    assert task.facts["bos_id"] == task.facts["eos_id"] == hf.token_to_id("<|endoftext|>")
    assert_facts_are_sound_ignoring_shared_bos_eos(task, 3)


def assert_facts_are_sound_ignoring_shared_bos_eos(task: TextTask, sentinels: int) -> None:
    facts = task.facts
    ids = [facts["pad_id"], facts["eos_id"], facts["mask_id"], *facts["sentinel_ids"]]
    assert len(set(ids)) == len(ids) and len(facts["sentinel_ids"]) == sentinels
    assert all(0 <= i < task.vocab_size for i in facts["special_ids"])


def test_pretrained_cache_follows_the_file_content(tmp_path: Path) -> None:
    directory = tiny_bpe_json(tmp_path / "tok", {"pad_token": "[PAD]"})
    first = make_task(tmp_path, tokenizer="pretrained", tokenizer_path=str(directory))
    write(directory / "tokenizer_config.json", json.dumps({"pad_token": "<|endoftext|>"}))
    second = make_task(tmp_path, tokenizer="pretrained", tokenizer_path=str(directory))
    assert first.facts["pad_id"] != second.facts["pad_id"]


@pytest.mark.parametrize("where", ["missing", "empty", "unset"])
def test_pretrained_path_problems_raise_a_config_error(tmp_path: Path, where: str) -> None:
    path = {"missing": str(tmp_path / "no-such-tokenizer"), "empty": str(tmp_path), "unset": None}[where]
    (tmp_path / "notes.md").write_text("not a tokenizer")
    with pytest.raises(ConfigError) as error:
        make_task(tmp_path / "work", tokenizer="pretrained", tokenizer_path=path)
    message = str(error.value)
    assert "data.tokenizer_path" in message and "Fix:" in message
    if where == "missing":
        assert "does not exist" in message and "no-such-tokenizer" in message
    if where == "empty":
        assert "holds no tokenizer files" in message and "notes.md" in message and "vocab.txt" in message


# --- the run directory ------------------------------------------------------------------------


def test_run_directory_tokenizer_is_reused_when_the_text_changes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = make_task(tmp_path, run_dir=run_dir, train="abc abc cab\n" * 40)
    saved = run_dir / "tokenizer.json"
    assert saved.is_file() and not list(run_dir.glob("*.tmp"))
    second = make_task(tmp_path, run_dir=run_dir, train="abc xyz abz\n" * 40)
    assert second.tokenizer.to_json() == first.tokenizer.to_json() == saved.read_text()
    assert second.facts == first.facts
    unk = text.CharTokenizer.UNK_ID
    assert second.tokenizer.encode("axz") == [first.tokenizer.encode("a")[0], unk, unk]
    assert unk in second.splits["train"][:]["input_ids"].flatten().tolist()
    # Without the run directory the new text gets its own tokenizer.
    fresh = make_task(tmp_path, train="abc xyz abz\n" * 40)
    assert unk not in fresh.tokenizer.encode("axz")


def test_run_directory_tokenizer_wins_over_the_configured_kind(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    byte = make_task(tmp_path, run_dir=run_dir, tokenizer="byte")
    with pytest.warns(UserWarning, match="using the run's tokenizer"):
        again = make_task(tmp_path, run_dir=run_dir, tokenizer="char")
    assert again.tokenizer.kind == "byte" and again.vocab_size == byte.vocab_size


def test_a_run_tokenizer_can_be_named_as_a_pretrained_path(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    trained = make_task(tmp_path, run_dir=run_dir, tokenizer="bpe")
    reused = make_task(tmp_path / "other", tokenizer="pretrained", tokenizer_path=str(run_dir / "tokenizer.json"))
    assert reused.tokenizer.encode(SPECIAL_TEXT) == trained.tokenizer.encode(SPECIAL_TEXT)
    assert reused.facts == trained.facts
