"""RETRO (Borgeaud et al. 2022): chunking and document ids, retrieval that excludes the query's
own document, the neighbours cached as a `datasets` column (a second preparation reads the
cache, a changed k does not), the `retro` block's chunked cross-attention is causal by chunk
(and the conformance kit catches one that is not), and `plugformer train
experiment=retro_small` trains end to end with a plugformer run as the frozen encoder."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import plugformer
from helpers import read_summary
from plugformer import BuildContext, ConfigError, DataContext, StepInputs
from plugformer.cli import main
from plugformer.testing import check_component
from plugformer.testing.block import kit_parts
from plugformer_plugins.block import retro as retro_block
from plugformer_plugins.data.retro_text import RetroTextConfig, RetroTextTask
from plugformer_plugins.retrieval import retro_index as rx

faiss = pytest.importorskip("faiss", reason="faiss is the retrieval extra (pip install 'plugformer[retrieval]')")

# Four documents, each after a title line; "The Second Walk" repeats the first one's text, so
# its chunks are the nearest (identical) neighbours of the first document's chunks.
WALK = (
    "The path went down to the river and along the bank past the mill. We stopped at the bridge "
    "and watched the water carry leaves under the arches, then climbed back up through the wood.\n"
)
FIRST = "The First Walk\n\n"
LETTER = (
    "\nA Letter Home\n\nDear Anna, the weather has turned and the apples are nearly ripe. Write soon and tell "
    "me about the new house and the garden and whether the roof still leaks in the corner.\n\n"
)
SECOND = "The Second Walk\n\n"
# Spaces that put the second walk 0 mod 8 characters after the first, so that (with one token
# per character) their chunks of 8 hold the same text.
GAP = " " * (-(len(WALK * 2) + len(LETTER) + len(SECOND)) % 8)
CORPUS = (
    FIRST + WALK * 2 + LETTER[:-2] + GAP + "\n\n" + SECOND + WALK * 2 + "\n"
    "Notes on Bread\n\nFlour, water, salt and time: bread asks for little else. The dough rises slowly in a "
    "cool kitchen and the crust is better for it, dark and crisp and full of small blisters.\n"
)


# --- chunks and documents ------------------------------------------------------------------


def test_documents_start_at_title_lines_and_chunks_carry_their_continuation() -> None:
    lines = ["On Rivers\n", "\n", "A river is never the same twice.\n", "She nodded.\n", "\n", "On Bread\n", "Flour.\n"]
    starts = rx.document_starts(lines, RetroTextConfig().document_start)
    assert starts == [True, False, False, False, False, True, False]  # "She nodded." ends like a sentence
    assert rx.document_starts(lines, None) == [False] * len(lines)
    docs = rx.document_ids([2, 1, 3, 1, 1, 2, 4], starts, before=4)
    assert docs.tolist() == [5] * 8 + [6] * 6

    ids = np.arange(10, dtype=np.int32)
    assert rx.chunk_count(len(ids), 4) == 2
    tokens = rx.neighbour_tokens(ids, np.array([0, 1, 2]), 4, pad_id=-1)
    assert tokens.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 7, 8, 9, -1, -1], [8, 9, -1, -1, -1, -1, -1, -1]]
    lo, hi = rx.document_spans(np.array([0, 0, 0, 1, 1, 1, 2, 2]), np.array([0, 2, 4, 6]), 4)
    assert lo.tolist() == [0, 0, 1, 2] and hi.tolist() == [1, 1, 2, 2]


def test_retrieval_never_returns_a_chunk_of_the_query_document() -> None:
    rng = np.random.default_rng(0)
    keys = rng.normal(size=(12, 8)).astype(np.float32)
    index = faiss.IndexFlatL2(8)
    index.add(keys)
    # Chunks 0-5 are document 0, 6-8 document 1, 9-11 document 2; the query is chunk 2 itself
    # (distance 0) with a continuation inside document 0.
    docs = np.repeat([0, 1, 2], [6, 3, 3])
    database = (docs, docs)
    nearest = rx.retrieve(index, keys[[2]], (np.array([0]), np.array([0])), database, k=3)[0]
    assert set(nearest.tolist()) <= set(range(6, 12)) and len(set(nearest.tolist())) == 3
    order = np.argsort(((keys[6:] - keys[2]) ** 2).sum(1))[:3] + 6
    assert nearest.tolist() == order.tolist()  # the three nearest of the other documents, nearest first
    # A query whose continuation reaches document 1 excludes that document too.
    spanning = rx.retrieve(index, keys[[5]], (np.array([0]), np.array([1])), database, k=3)[0]
    assert set(spanning.tolist()) == {9, 10, 11}
    # Too few qualifying chunks: the rest is -1, never a chunk of the query's documents.
    short = rx.retrieve(index, keys[[5]], (np.array([0]), np.array([1])), database, k=5)[0]
    assert sorted(short.tolist()) == [-1, -1, 9, 10, 11]
    drawn = rx.random_neighbours(12, (np.array([0, 0]), np.array([0, 1])), database, k=3, seed=0)
    assert (drawn[0] >= 6).all() and (drawn[1] >= 9).all()


# --- data preparation, with a tiny random Hugging Face encoder -------------------------------


def save_tiny_bert(folder: Path) -> Path:
    """A randomly initialized one-layer BERT and a character WordPiece vocabulary, saved with
    save_pretrained (no download)."""
    transformers = pytest.importorskip("transformers", reason="the hf extra")
    folder.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"-"))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=64,
    )
    transformers.BertModel(config).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def corpus_setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retro")
    (root / "corpus.txt").write_text(CORPUS)
    return {"root": root, "text": root / "corpus.txt", "bert": save_tiny_bert(root / "bert")}


def retro_task(setup: dict[str, Path], **options: object) -> RetroTextTask:
    settings: dict[str, object] = dict(
        train_files=[str(setup["text"])], validation_fraction=0.2, block_size=32, batch_size=4, chunk_size=8,
        neighbours=2, encoder=str(setup["bert"]),
    )
    config = RetroTextConfig(**{**settings, **options})  # type: ignore[arg-type]
    task = RetroTextTask(config, DataContext(cache_dir=setup["root"] / "cache"))
    task.prepare()
    return task


def table_of(task: RetroTextTask, split: str) -> np.ndarray:
    return task.splits[split].with_format("numpy")[:]["neighbours"]


def test_neighbours_exclude_the_query_document_and_are_cached_as_a_datasets_column(corpus_setup: dict[str, Path]) -> None:
    task = retro_task(corpus_setup)
    assert task.built and "neighbours" in task.splits["train"].column_names
    m, k = 8, 2
    train_ids, train_docs = task.token_streams()["train"]
    assert sorted(set(train_docs.tolist())) == [0, 1, 2]  # the last 20% of the lines (the bread) validate
    assert set(task.token_streams()["validation"][1].tolist()) == {3}
    database_lo, database_hi = rx.document_spans(train_docs, np.arange(len(train_ids) // m) * m, 2 * m)
    copies = 0
    for split in ("train", "validation"):
        ids, docs = task.token_streams()[split]
        table = task.splits[split].with_format("numpy")[:]
        neighbours, chosen = table["neighbours"], table["neighbour_ids"]
        assert neighbours.shape == (len(chosen), 32 // m, k, 2 * m) and chosen.shape == (len(chosen), 32 // m, k)
        assert (chosen >= 0).mean() > 0.9
        for row in range(len(chosen)):
            for u in range(32 // m):
                start = row * 32 + u * m
                query = set(docs[start : start + 2 * m].tolist())  # the chunk and its continuation
                for slot, j in enumerate(chosen[row, u].tolist()):
                    tokens = neighbours[row, u, slot]
                    if j < 0:
                        assert (tokens == task.pad_id).all()
                        continue
                    assert tokens.tolist() == rx.neighbour_tokens(train_ids, np.array([j]), m, task.pad_id)[0].tolist()
                    assert not set(range(database_lo[j], database_hi[j] + 1)) & query, (
                        f"{split} row {row} chunk {u} retrieved chunk {j} of its own document(s) {query}"
                    )
                    if split == "train" and slot == 0:
                        # Where another document holds this chunk's exact text (the walks), the
                        # nearest neighbour is such a copy: the same text, at distance 0.
                        text = ids[start : start + m].tolist()
                        copy_exists = any(
                            train_ids[i * m : i * m + m].tolist() == text
                            and not set(range(database_lo[i], database_hi[i] + 1)) & query
                            for i in range(len(database_lo))
                        )
                        if copy_exists:
                            copies += 1
                            assert tokens[:m].tolist() == text
    assert copies > 0
    again = retro_task(corpus_setup)
    assert not again.built, "a second preparation with the same encoder, corpus, chunk size and k must read the cache"
    assert np.array_equal(again.splits["train"].with_format("numpy")[:]["neighbours"], table_of(task, "train"))
    batch = again.collate([again.splits["validation"][i] for i in range(2)])
    assert batch["extras"]["retro_neighbours"].shape == (2, 4, 2, 16)
    assert torch.equal(batch["extras"]["retro_neighbours_mask"], batch["extras"]["retro_neighbours"] != again.pad_id)
    other_k = retro_task(corpus_setup, neighbours=1)
    assert other_k.built and table_of(other_k, "train").shape[2] == 1
    assert (task.index_folder() / "index.faiss").is_file() and other_k.index_folder() == task.index_folder()


def test_bad_retro_options_are_refused_with_one_message(corpus_setup: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="multiple of data.chunk_size"):
        retro_task(corpus_setup, chunk_size=5)
    with pytest.raises(ConfigError, match="data.encoder is not set"):
        retro_task(corpus_setup, encoder="")
    with pytest.raises(ConfigError, match="neither a plugformer run directory nor a Hugging Face"):
        retro_task(corpus_setup, encoder=str(corpus_setup["root"]))


# --- chunked cross-attention ---------------------------------------------------------------


def build_block(chunk_size: int = 4, d_model: int = 16) -> retro_block.RetroBlock:
    ctx = BuildContext(d_model=d_model, n_heads=2, n_layers=1, dropout=0.0, causal=True, max_length=64, vocab_size=30,
                       task={"retro_chunk_size": chunk_size})
    torch.manual_seed(0)
    return retro_block.COMPONENT.factory(retro_block.RetroBlockConfig(), ctx, kit_parts(ctx, cross=False)).eval()


def neighbour_inputs(batch: int, length: int, chunks: int, seed: int) -> dict[str, torch.Tensor]:
    tokens = torch.randint(1, 30, (batch, chunks, 2, 8), generator=torch.Generator().manual_seed(seed))
    return {"retro_neighbours": tokens, "retro_neighbours_mask": torch.ones_like(tokens, dtype=torch.bool)}


def test_tokens_only_see_the_neighbours_of_chunks_they_have_read() -> None:
    m, length = 4, 14
    block = build_block(m)
    x = torch.randn(2, length, 16, generator=torch.Generator().manual_seed(1))
    extras = neighbour_inputs(2, length, 4, seed=2)
    inputs = lambda e: StepInputs(mask=None, positions=torch.arange(length)[None], extras=e)  # noqa: E731
    with torch.no_grad():
        reference = block(x, inputs(extras))
        plain = block(x, inputs({}))
        assert torch.allclose(reference[:, : m - 1], plain[:, : m - 1], atol=1e-6)  # the first m-1 tokens see no chunk
        assert not torch.allclose(reference[:, m - 1 :], plain[:, m - 1 :], atol=1e-4)
        for u in range(4):
            changed = {key: value.clone() for key, value in extras.items()}
            changed["retro_neighbours"][:, u] = torch.randint(1, 30, changed["retro_neighbours"][:, u].shape)
            out = block(x, inputs(changed))
            first = u * m + m - 1  # the first token that may read chunk u's neighbours
            assert torch.allclose(out[:, :first], reference[:, :first], atol=1e-6), f"neighbours of chunk {u} leaked backwards"
            if first < length:
                assert not torch.allclose(out[:, first : first + m], reference[:, first : first + m], atol=1e-4)
        # Changing the tokens from position t on leaves the outputs before t unchanged (H_u conditioning is causal).
        for t in (3, 5, 9):
            perturbed = x.clone()
            perturbed[:, t:] = torch.randn(2, length - t, 16)
            assert torch.allclose(block(perturbed, inputs(extras))[:, :t], reference[:, :t], atol=1e-6)


def test_masked_neighbour_tokens_are_ignored_and_an_all_real_mask_equals_none() -> None:
    m, length = 4, 12
    block = build_block(m)
    x = torch.randn(2, length, 16, generator=torch.Generator().manual_seed(3))
    extras = neighbour_inputs(2, length, 3, seed=4)
    tokens, mask = extras["retro_neighbours"], extras["retro_neighbours_mask"]
    with torch.no_grad():
        everything = block.cca(x, None, tokens, mask)
        assert torch.equal(block.cca(x, None, tokens, None), everything)  # an all-True mask is no mask
        mask = mask.clone()
        mask[0, 1, 1, 3:] = False  # the tail of one neighbour
        mask[1, 2] = False  # every neighbour of one chunk: its readers' attention gives zeros (output = out bias)
        masked = block.cca(x, None, tokens, mask)
        assert not torch.allclose(masked[0, m - 1 + m : m - 1 + 2 * m], everything[0, m - 1 + m : m - 1 + 2 * m], atol=1e-4)
        readers = masked[1, m - 1 + 2 * m :]
        assert torch.allclose(readers, block.cca.attention.out.bias.expand_as(readers), atol=1e-6)
        assert not torch.allclose(everything[1, m - 1 + 2 * m :], readers, atol=1e-4)
        scrambled = tokens.clone()
        scrambled[~mask] = torch.randint(1, 30, (int((~mask).sum()),))
        assert torch.allclose(block.cca(x, None, scrambled, mask), masked, atol=1e-6)  # masked tokens are never read
        # Padded query positions (a key padding mask on the decoder) are not read by the encoder's cross-attention.
        padding = torch.ones(2, length, dtype=torch.bool)
        padding[:, 10:] = False
        changed = x.clone()
        changed[:, 10:] = torch.randn(2, 2, 16)
        assert torch.allclose(block.cca(changed, padding, tokens, mask)[:, : length - 2], block.cca(x, padding, tokens, mask)[:, : length - 2], atol=1e-6)


class LeakyCCA(retro_block.ChunkedCrossAttention):
    """Chunk u's own tokens read chunk u's neighbours (no shift by m - 1), encoded with the
    chunk's activations: tokens see what was retrieved and encoded from tokens after them."""

    def forward(self, h, mask, neighbours, neighbours_mask):  # noqa: ANN001, ANN201
        batch, length, d = h.shape
        m = self.chunk_size
        n = -(-length // m)
        chunks = torch.nn.functional.pad(h, (0, 0, 0, n * m - length)).view(batch * n, m, d)
        tokens, keep = neighbours[:, :n].flatten(0, 1), neighbours_mask[:, :n].flatten(0, 1)
        encoded = self.encoder(tokens, keep, chunks, torch.ones(batch * n, m, dtype=torch.bool))
        return self.attention(chunks, encoded, keep.reshape(batch * n, -1)).view(batch, n * m, d)[:, :length]


def test_the_retro_block_passes_the_kit_which_catches_a_leaking_chunk_shift(monkeypatch: pytest.MonkeyPatch) -> None:
    check_component(retro_block.COMPONENT)  # with neighbours from the block's kit_extras
    monkeypatch.setattr(retro_block, "ChunkedCrossAttention", LeakyCCA)
    with pytest.raises(AssertionError, match="causality"):
        check_component(retro_block.COMPONENT)


def test_the_block_refuses_a_chunk_size_other_than_the_data_s() -> None:
    ctx = BuildContext(d_model=16, n_heads=2, n_layers=1, dropout=0.0, causal=True, max_length=64, vocab_size=30,
                       task={"retro_chunk_size": 8})
    with pytest.raises(ConfigError, match="chunk_size=4 differs"):
        retro_block.COMPONENT.factory(replace(retro_block.RetroBlockConfig(), chunk_size=4), ctx, kit_parts(ctx, cross=False))


# --- end to end ------------------------------------------------------------------------------


@pytest.mark.slow
def test_retro_small_trains_from_the_cli_with_a_plugformer_run_as_encoder(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    encoder = tmp_path / "encoder"
    (tmp_path / "corpus.txt").write_text(CORPUS * 2)
    text = [f"data.train_files=[{tmp_path / 'corpus.txt'}]", "data.validation_fraction=0.2"]
    plugformer.train(plugformer.compose([
        "experiment=lm_small", *text, "data.block_size=32", "model.d_model=16", "model.n_layers=1", "model.n_heads=2",
        "logger=none", "callbacks.progress_bar=none", "trainer.max_steps=2", "trainer.val_check_interval=2",
        f"paths.cache_dir={cache}",
    ]), run_dir=encoder)
    run_dir = tmp_path / "retro"
    overrides = [
        "experiment=retro_small", *text, f"data.encoder={encoder}", "data.block_size=32", "data.chunk_size=8", "data.batch_size=8",
        "model.d_model=16", "model.n_heads=2", "model.plan.options.block.retro.encoder_layers=1", "logger=none",
        "callbacks.progress_bar=none", "trainer.max_steps=3", "trainer.val_check_interval=3",
        f"paths.cache_dir={cache}", f"run_dir={run_dir}",
    ]
    # The CLI's main in this process (test_cli runs the console entry `plugformer train` itself):
    # command-line parsing, Hydra composition and the run as `plugformer train` does them.
    assert main(["train", *overrides]) == 0
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and [layer["block"] for layer in summary["layers"]["decoder"]] == ["standard", "standard", "retro"]
    assert np.isfinite(summary["metrics"]["val/loss"])
    # The neighbours reach the trained model: replacing those of the last chunk changes only its readers' logits.
    run = plugformer.load_run(run_dir)
    batch = next(iter(run.data.val_dataloader()))
    changed = {**batch, "extras": dict(batch["extras"])}
    changed["extras"]["retro_neighbours"] = batch["extras"]["retro_neighbours"].clone()
    changed["extras"]["retro_neighbours"][:, 3] = torch.flip(batch["extras"]["retro_neighbours"][:, 3], dims=[0])
    with torch.no_grad():
        before, after = run.model(batch).logits, run.model(changed).logits
    assert torch.allclose(before[:, : 3 * 8 + 7], after[:, : 3 * 8 + 7], atol=1e-5)
    assert not torch.allclose(before[:, 3 * 8 + 7 :], after[:, 3 * 8 + 7 :], atol=1e-6)
