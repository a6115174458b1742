"""kNN-LM (Khandelwal et al. 2020) over a real faiss index: `plugformer index` writes a
loadable datastore with one entry per scored token (flat, IVF and HNSW), `plugformer eval
knn_lm.*` reports the perplexity with and without retrieval on the same tokens, λ = 0 leaves
the perplexity unchanged, and a datastore of the evaluated text itself lowers it."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

import plugformer
from plugformer import ConfigError
from plugformer.cli import main

pytestmark = pytest.mark.slow  # end-to-end: a training run, then the index command

RUN = [
    "experiment=lm_small", "data.block_size=32", "data.batch_size=16", "model.d_model=32", "model.n_layers=1",
    "model.n_heads=2", "model.dropout=0.0", "logger=none", "callbacks.progress_bar=none", "trainer.max_steps=30",
    "trainer.val_check_interval=30",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("knn")
    plugformer.train(plugformer.compose([*RUN, f"paths.cache_dir={root / 'cache'}"]), run_dir=root / "lm")
    return root / "lm"


def scored_tokens(run_dir: Path) -> int:
    run = plugformer.load_run(run_dir)
    return sum(int((batch["labels"] != -100).sum()) for batch in run.data.val_dataloader())


def test_index_command_writes_a_loadable_datastore_with_one_entry_per_token(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import faiss

    # The CLI's main in this process: a subprocess would add only ~20 s of imports (the
    # console entry itself is tested in test_cli).
    status = main(["index", str(run_dir), "split=validation"])
    out, err = capsys.readouterr()
    assert status == 0, err
    path = run_dir / "knn_lm" / "validation-flat"
    info = json.loads((path / "datastore.json").read_text())
    expected = scored_tokens(run_dir)
    assert info["entries"] == expected and info["dimension"] == 32 and info["type"] == "flat"
    index = faiss.read_index(str(path / "index.faiss"))
    assert index.ntotal == expected and index.d == 32
    assert torch.load(path / "values.pt").shape == (expected,)
    assert f"{expected} entries" in out


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_hold_every_entry(run_dir: Path, kind: str) -> None:
    import faiss

    from plugformer_plugins.retrieval.knn_lm import build_datastore

    lightning_loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    for logger in lightning_loggers:
        logger.setLevel(logging.NOTSET)
    info = build_datastore(run_dir, [], split="validation", options={"type": kind, "nlist": 4, "m": 8})
    # Lightning is quieted only while the datastore is built (a later train() logs as usual).
    assert [logger.level for logger in lightning_loggers] == [logging.NOTSET] * 2
    index = faiss.read_index(str(Path(info["path"]) / "index.faiss"))
    assert index.ntotal == info["entries"] == scored_tokens(run_dir)
    assert kind.upper() in type(index).__name__.upper()


def test_eval_reports_both_perplexities_and_the_own_text_datastore_helps(run_dir: Path) -> None:
    if not (run_dir / "knn_lm" / "validation-flat").is_dir():
        from plugformer_plugins.retrieval.knn_lm import build_datastore

        build_datastore(run_dir, [], split="validation")
    # The function behind `plugformer eval` (its CLI plumbing is tested in test_eval_generate).
    plugformer.evaluate(
        run_dir, ["knn_lm.index=validation-flat", "knn_lm.lambda=0.25", "knn_lm.k=8", "knn_lm.temperature=1"], track=False
    )
    entry = json.loads((run_dir / "eval.json").read_text())["evaluations"][-1]
    assert entry["overrides"] == ["knn_lm.index=validation-flat", "knn_lm.lambda=0.25", "knn_lm.k=8", "knn_lm.temperature=1"]
    metrics = entry["metrics"]
    assert metrics["knn_lm/tokens"] == scored_tokens(run_dir)
    # Every evaluated (state, next token) pair is in the datastore at distance 0: it must help.
    assert metrics["knn_lm/target_in_neighbours"] > 0.9
    assert metrics["knn_lm/perplexity"] < metrics["knn_lm/lm_perplexity"]
    # The LM-only perplexity over tokens is the core's (batch-weighted) one, up to batch weighting.
    assert metrics["knn_lm/lm_perplexity"] == pytest.approx(metrics["perplexity"], rel=0.05)


def test_lambda_zero_leaves_the_perplexity_unchanged(run_dir: Path) -> None:
    from plugformer_plugins.retrieval.knn_lm import build_datastore

    build_datastore(run_dir, [], split="train", options={"name": "train-small", "type": "flat"})
    entry = plugformer.evaluate(run_dir, ["knn_lm.index=train-small", "knn_lm.lambda=0"], track=False, limit_batches=2)
    metrics = entry["metrics"]
    assert metrics["knn_lm/perplexity"] == metrics["knn_lm/lm_perplexity"]
    assert metrics["knn_lm/tokens"] > 0


def test_bad_knn_options_get_one_clear_message(run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="plugformer index"):
        plugformer.evaluate(run_dir, ["knn_lm.index=no-such-datastore"], track=False, limit_batches=1)
    with pytest.raises(ConfigError, match="knn_lm.kk"):
        plugformer.evaluate(run_dir, ["knn_lm.kk=3"], track=False, limit_batches=1)
    with pytest.raises(ConfigError, match="no installed plugin"):
        plugformer.evaluate(run_dir, ["nothing.x=1"], track=False, limit_batches=1)
    from plugformer_plugins.retrieval.knn_lm import build_datastore

    with pytest.raises(ConfigError, match="index.type='annoy'"):
        build_datastore(run_dir, [], options={"type": "annoy"})
