"""The share technique (ALBERT): layers really share one set of Parameters (one gradient
from every layer, fewer parameters by the expected amount), factorized embeddings have the
V×E and E→d shapes with the tied head going through them, sharing survives a checkpoint
and a resume, and the technique works with prune and quantize or is refused with distill
where it cannot work."""

from __future__ import annotations

import csv
import math
import types
from pathlib import Path

import pytest
import torch

import plugformer
from plugformer import ConfigError
from plugformer.plugins import Plugins
from plugformer.training.run import train
from plugformer_plugins.technique.factorized import FactorizedEmbedding, FactorizedHead
from plugformer_plugins.technique.quantize import prepare_qat, quantize_model
from plugformer_plugins.technique.share import Share, ShareConfig

from compose import compose_train
from helpers import FAST

TINY = [*FAST, "logger=none", "data.train_examples=320", "data.val_examples=64", "model.n_heads=4", "model.n_layers=3", "model.dropout=0.0"]


def build(plugins: Plugins, tmp_path: Path, *overrides: str) -> plugformer.Built:
    return plugformer.build(compose_train(*TINY, f"run_dir={tmp_path}", *overrides), plugins=plugins)


def shared(*options: str) -> list[str]:
    return ["+technique=share", *(f"techniques.share.{option}" for option in options)]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("mode,parts", [("all", ("attention", "ffn", "norms")), ("attention", ("attention",)), ("ffn", ("ffn",))])
def test_layers_share_the_same_parameters_and_the_count_shrinks(mode: str, parts: tuple[str, ...], tmp_path: Path, plugins: Plugins) -> None:
    plain = build(plugins, tmp_path).model
    model = build(plugins, tmp_path, *shared(f"layers={mode}")).model
    blocks = model.blocks
    for part in parts:
        assert all(getattr(block, part) is getattr(blocks[0], part) for block in blocks)
        first = dict(getattr(blocks[0], part).named_parameters())
        assert all(p is first[name] for block in blocks[1:] for name, p in getattr(block, part).named_parameters())
    unshared_parts = {"attention", "ffn", "norms"} - set(parts)
    for part in unshared_parts:  # what the mode does not name stays per layer
        assert getattr(blocks[1], part) is not getattr(blocks[0], part)
    per_layer = sum(count(getattr(plain.blocks[0], part)) for part in parts)
    assert per_layer > 0
    assert model.num_parameters() == plain.num_parameters() - (len(blocks) - 1) * per_layer


def test_one_gradient_accumulates_from_every_layer(tmp_path: Path, plugins: Plugins) -> None:
    """The shared weights' gradient is the sum of the per-layer gradients of an unshared
    model whose layers all hold those same weights."""
    plain = build(plugins, tmp_path)
    model = build(plugins, tmp_path, *shared("layers=all")).model
    unshared = plain.model
    state = model.state_dict()  # a key per layer, each the one shared tensor
    unshared.load_state_dict(state)
    batch = unshared.objective.prepare_batch(next(iter(plain.data.train_dataloader())))
    for m in (model, unshared):
        m.train()
        m(batch).loss.backward()
    for name, parameter in model.blocks[0].attention.named_parameters():
        summed = sum(dict(block.attention.named_parameters())[name].grad for block in unshared.blocks)
        torch.testing.assert_close(parameter.grad, summed, rtol=1e-4, atol=1e-6)
    assert not torch.equal(model.blocks[0].attention.query.weight.grad, unshared.blocks[0].attention.query.weight.grad)


def test_hybrid_plans_share_within_each_kind_of_layer(tmp_path: Path, plugins: Plugins) -> None:
    built = plugformer.build(
        compose_train("experiment=default", "model.n_layers=4", "model.d_model=32", "logger=none", "data.train_examples=320",
                      "data.val_examples=64", f"run_dir={tmp_path}", *shared("layers=attention")),
        plugins=plugins,
    )
    blocks = built.model.blocks  # short_conv, full, short_conv, full
    assert blocks[2].attention is blocks[0].attention and blocks[3].attention is blocks[1].attention
    assert blocks[1].attention is not blocks[0].attention
    assert built.techniques["share"].summary["share/groups/decoder.attention"] == "0,2 1,3"


def test_factorized_embedding_shapes_count_and_tied_head(tmp_path: Path, plugins: Plugins) -> None:
    plain = build(plugins, tmp_path).model
    model = build(plugins, tmp_path, *shared("layers=none", "embedding_size=8")).model
    vocab, d = plain.token_embedding.weight.shape
    embedding = model.token_embedding
    assert isinstance(embedding, FactorizedEmbedding)
    assert embedding.table.weight.shape == (vocab, 8) and embedding.projection.weight.shape == (d, 8)
    assert model.num_parameters() == plain.num_parameters() - vocab * d + vocab * 8 + 8 * d
    head = model.objective.head
    assert isinstance(head, FactorizedHead) and head.embedding is embedding
    assert {id(p) for p in head.parameters()} <= {id(p) for p in embedding.parameters()}
    hidden = torch.randn(2, 5, d)
    torch.testing.assert_close(head(hidden), hidden @ embedding.projection.weight @ embedding.table.weight.t())
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(embedding(ids), embedding.weight[ids])  # the effective V×d table
    summary = build(plugins, tmp_path, *shared("layers=none", "embedding_size=8")).techniques["share"].summary
    assert summary["share/tied_heads"] == 1 and summary["share/params_saved"] == vocab * d - vocab * 8 - 8 * d


def val_losses(run_dir: Path) -> list[float]:
    with open(run_dir / "metrics.csv") as handle:
        return [float(row["val/loss"]) for row in csv.DictReader(handle) if row.get("val/loss")]


def test_training_learns_and_checkpoints_keep_the_sharing(tmp_path: Path, plugins: Plugins) -> None:
    common = [*TINY, *shared("layers=all", "embedding_size=8"), "optim.lr=1e-2", "optim.warmup_steps=0", f"run_dir={tmp_path}"]
    cfg = compose_train(*common, "trainer.max_steps=20", "trainer.val_check_interval=10")
    summary = train(cfg, plugins, tmp_path, run_id="share")
    assert summary["status"] == "finished", summary.get("error")
    losses = val_losses(tmp_path)
    assert len(losses) == 2 and losses[-1] < math.log(256) - 0.3  # an untrained model's loss is about ln(256)
    unshared_params = summary["extra"]["share/params_unshared"]
    assert summary["params"] == summary["extra"]["share/params"] == summary["extra"]["report/params"] < unshared_params
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    names = [n for n in state if ".blocks.0.attention." in n]
    assert names and all(torch.equal(state[n], state[n.replace(".blocks.0.", ".blocks.2.")]) for n in names)

    resumed = compose_train(*common, "trainer.max_steps=30", "trainer.val_check_interval=10")
    summary = train(resumed, plugins, tmp_path, run_id="share", ckpt_path=str(tmp_path / "checkpoints" / "last.ckpt"))
    assert summary["status"] == "finished" and summary["global_step"] == 30

    loaded = plugformer.load_run(tmp_path, checkpoint="last", plugins=plugins).model
    blocks = loaded.blocks
    assert all(block.attention.query.weight is blocks[0].attention.query.weight for block in blocks)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert torch.equal(blocks[0].attention.query.weight, saved["model.stacks.decoder.blocks.1.attention.query.weight"])
    assert isinstance(loaded.token_embedding, FactorizedEmbedding)
    assert loaded.objective.head.embedding is loaded.token_embedding


def test_pruning_a_shared_model_masks_each_shared_layer_once(tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train(
        *TINY, "trainer.max_steps=6", "trainer.val_check_interval=6", '+technique=[prune,share]', "techniques.share.layers=all",
        "techniques.prune.sparsity=0.5", "techniques.prune.end_step=4", "techniques.prune.frequency=2", f"run_dir={tmp_path}",
    )
    summary = train(cfg, plugins, tmp_path, run_id="shareprune")
    assert summary["status"] == "finished", summary.get("error")
    extra = summary["extra"]
    assert extra["prune/sparsity"] == pytest.approx(0.5, abs=1e-3)
    layers = [k for k in extra if k.startswith("prune/sparsity/")]
    assert len(layers) == 5  # the one shared layer's query, key_value, out, up, down, not three copies
    assert extra["prune/params"] == summary["params"] == extra["share/params"]


@pytest.mark.parametrize("qat", [False, True])
def test_quantized_copies_keep_the_sharing(qat: bool, tmp_path: Path, plugins: Plugins) -> None:
    model = build(plugins, tmp_path, *shared("layers=all")).model
    if qat:
        prepare_qat(model, include_head=True)
        assert all(block.attention.query is model.blocks[0].attention.query for block in model.blocks)
        assert type(model.blocks[2].ffn.up).__name__ == "Linear" and model.blocks[2].ffn.up.__module__.startswith("torch.ao")
    quantized = quantize_model(model)
    int8 = torch.ao.nn.quantized.dynamic.Linear
    assert isinstance(quantized.blocks[0].attention.query, int8)
    assert all(block.attention is quantized.blocks[0].attention for block in quantized.blocks)
    ids = torch.randint(0, 200, (2, 12))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    assert torch.isfinite(quantized(batch).loss)


def test_distillation_is_refused_where_it_cannot_work_with_sharing(plugins: Plugins) -> None:
    def ctx(*distill: str) -> types.SimpleNamespace:
        cfg = compose_train("+technique=[share,distill]", "techniques.distill.teacher=/nowhere", *(f"techniques.distill.{o}" for o in distill))
        return types.SimpleNamespace(cfg=cfg)

    with pytest.raises(ConfigError, match="init_from_teacher"):
        Share(ShareConfig(layers="ffn"), ctx("init_from_teacher=true"))
    with pytest.raises(ConfigError, match="hidden_weight"):
        Share(ShareConfig(layers="attention"), ctx("hidden_weight=1.0"))
    Share(ShareConfig(layers="ffn"), ctx("hidden_weight=1.0"))  # block outputs stay per layer
    Share(ShareConfig(layers="all"), ctx())  # logit distillation of a shared student


def test_bad_options_are_refused_with_one_message(tmp_path: Path, plugins: Plugins) -> None:
    with pytest.raises(ConfigError, match="not a sharing mode"):
        build(plugins, tmp_path, *shared("layers=every"))
    with pytest.raises(ConfigError, match="embedding_size=32 is not below model.d_model=32"):
        build(plugins, tmp_path, *shared("embedding_size=32"))
