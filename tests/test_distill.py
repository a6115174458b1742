"""The distill technique: logit, hidden-state and attention-map losses from a frozen teacher
run, DistilBERT initialisation, and the teacher kept out of the optimizer and checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import plugformer
from plugformer import ConfigError
from plugformer.plugins import Plugins
from plugformer.training.run import train
from plugformer_plugins.technique.distill_losses import logit_distillation
from plugformer_plugins.technique.layers import uniform_layer_map

from compose import compose_train
from helpers import FAST

TINY = [*FAST, "logger=none", "data.train_examples=320", "data.val_examples=64", "model.n_heads=2"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, plugins: Plugins) -> Path:
    """A finished 2-layer teacher of width 48."""
    run_dir = tmp_path_factory.mktemp("teacher")
    cfg = compose_train(*TINY, "model.n_layers=2", "model.d_model=48", "trainer.max_steps=10", "trainer.val_check_interval=10")
    assert plugformer.train(cfg, run_dir=run_dir)["status"] == "finished"
    return run_dir


def test_logit_distillation_is_hinton_kl_times_t_squared() -> None:
    student, teacher = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    assert logit_distillation(teacher, teacher, 2.0, None).abs() < 1e-6
    t = 3.0
    p = torch.softmax(teacher / t, -1)
    expected = (p * (p.log() - torch.log_softmax(student / t, -1))).sum(-1).mean() * t**2
    assert torch.allclose(logit_distillation(student, teacher, t, None), expected, atol=1e-5)
    scored = torch.zeros(3, 5, dtype=torch.bool)
    scored[0, 1] = True
    one = (p[0, 1] * (p[0, 1].log() - torch.log_softmax(student[0, 1] / t, -1))).sum() * t**2
    assert torch.allclose(logit_distillation(student, teacher, t, scored), one, atol=1e-5)


def test_uniform_layer_map_ends_on_the_last_teacher_layer() -> None:
    assert uniform_layer_map(2, 4) == [1, 3] and uniform_layer_map(1, 3) == [2] and uniform_layer_map(3, 3) == [0, 1, 2]


def test_a_narrower_student_learns_from_logits_hidden_states_and_attention_maps(teacher_dir: Path, tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train(
        *TINY, "model.n_layers=1", "trainer.max_steps=6", "trainer.val_check_interval=6",
        "+technique=distill", f"techniques.distill.teacher={teacher_dir}", "techniques.distill.alpha=0.7",
        "techniques.distill.hidden_weight=1.0", "techniques.distill.attention_weight=1.0", f"run_dir={tmp_path}",
    )
    summary = train(cfg, plugins, tmp_path, run_id="distill1")
    assert summary["status"] == "finished", summary.get("error")
    metrics = summary["metrics"]
    kd, task = metrics["val/loss_distill_kd"], metrics["val/loss_distill_task"]
    assert kd > 0 and metrics["val/loss_distill_hidden"] > 0 and metrics["val/loss_distill_attention"] > 0
    assert task == pytest.approx(-0.7 * metrics["val/loss"], rel=1e-4)  # the total holds (1-α)·task
    parts = metrics["val/loss"] + kd + task + metrics["val/loss_distill_hidden"] + metrics["val/loss_distill_attention"]
    assert metrics["val/total_loss"] == pytest.approx(parts, rel=1e-4)
    assert summary["extra"]["distill/layer_map/decoder"] == [1]

    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    names = list(checkpoint["state_dict"])
    assert not any("teacher" in name for name in names)
    # The width projection (32 → 48) is trained and saved; the teacher's parameters are not optimized.
    assert checkpoint["state_dict"]["auxiliary.distill_hidden_projection.weight"].shape == (48, 32)
    optimized = sum(len(group["params"]) for group in checkpoint["optimizer_states"][0]["param_groups"])
    student = plugformer.load_run(tmp_path, checkpoint="last").model
    assert optimized == len(list(student.parameters())) + 1


def test_student_starts_from_every_kth_teacher_layer(teacher_dir: Path, tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train(
        *TINY, "model.n_layers=1", "model.d_model=48", "+technique=distill", f"techniques.distill.teacher={teacher_dir}",
        "techniques.distill.init_from_teacher=true", "techniques.distill.init_stride=2", f"run_dir={tmp_path}",
    )
    built = plugformer.build(cfg, plugins=plugins, run_dir=tmp_path)
    teacher = plugformer.load_run(teacher_dir).model
    student_block, teacher_block = built.model.stacks["decoder"].blocks[0], teacher.stacks["decoder"].blocks[0]
    for name, value in student_block.state_dict().items():
        assert torch.equal(value, teacher_block.state_dict()[name]), name
    assert torch.equal(built.model.token_embedding.weight, teacher.token_embedding.weight)
    assert not torch.equal(student_block.state_dict()["attention.query.weight"], teacher.stacks["decoder"].blocks[1].state_dict()["attention.query.weight"])


def test_initialising_from_a_teacher_of_another_width_is_refused(teacher_dir: Path, tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train(
        *TINY, "model.n_layers=1", "+technique=distill", f"techniques.distill.teacher={teacher_dir}",
        "techniques.distill.init_from_teacher=true", f"run_dir={tmp_path}",
    )
    with pytest.raises(ConfigError, match="init_from_teacher"):
        plugformer.build(cfg, plugins=plugins, run_dir=tmp_path)


def test_initialisation_reaches_layers_that_other_techniques_wrap(teacher_dir: Path, tmp_path: Path, plugins: Plugins) -> None:
    cfg = compose_train(
        *TINY, "model.n_layers=1", "model.d_model=48", "+technique=[prune,distill]", "techniques.prune.sparsity=0.5",
        "trainer.max_steps=8", f"techniques.distill.teacher={teacher_dir}", "techniques.distill.init_from_teacher=true",
        f"run_dir={tmp_path}",
    )
    built = plugformer.build(cfg, plugins=plugins, run_dir=tmp_path)
    query = built.model.stacks["decoder"].blocks[0].attention.query
    assert hasattr(query, "weight_orig")  # pruning's reparametrisation is in place...
    teacher = plugformer.load_run(teacher_dir).model
    assert torch.equal(query.weight_orig, teacher.stacks["decoder"].blocks[0].attention.query.weight)  # ...and got the weights


SEQ2SEQ = [
    "experiment=reverse_small", *FAST, "logger=none", "data.train_examples=320", "data.val_examples=64", "data.test_examples=64",
    "model.n_heads=2", "trainer.val_check_interval=4",
]


def test_sequence_level_distillation_trains_on_the_teachers_greedy_output(tmp_path: Path, plugins: Plugins) -> None:
    from plugformer.model.generation import DecodingConfig, generate
    from plugformer_plugins.technique.distill import teacher_targets

    teacher_dir = tmp_path / "teacher"
    cfg = compose_train(*SEQ2SEQ, "trainer.max_steps=8", f"run_dir={teacher_dir}")
    assert plugformer.train(cfg, run_dir=teacher_dir)["status"] == "finished"
    student_dir = tmp_path / "student"
    cfg = compose_train(
        *SEQ2SEQ, "trainer.max_steps=4", "+technique=distill", f"techniques.distill.teacher={teacher_dir}",
        "techniques.distill.sequence_level=true", "techniques.distill.alpha=0", f"run_dir={student_dir}",
    )
    summary = train(cfg, plugins, student_dir, run_id="seqkd")
    assert summary["status"] == "finished", summary.get("error")
    metrics = summary["metrics"]
    # With α = 0 the optimized loss is the student's loss on the teacher's targets alone.
    assert metrics["train/total_loss"] == pytest.approx(metrics["train/loss_distill_sequence"], rel=1e-4)
    assert metrics["train/loss_distill_task"] == pytest.approx(-metrics["train/loss"], rel=1e-4)
    assert "val/loss_distill_sequence" not in metrics  # validation keeps the gold targets

    teacher = plugformer.load_run(teacher_dir)
    batch = next(iter(teacher.data.val_dataloader()))
    facts = dict(teacher.data.facts)
    targets = teacher_targets(teacher.model, batch, facts)
    generated = generate(teacher.model, batch["input_ids"], DecodingConfig(max_new_tokens=batch["labels"].shape[1]),
                         attention_mask=batch.get("attention_mask"), start_id=facts["start_id"], eos_id=facts["eos_id"])
    scored = targets["labels"] != -100
    assert torch.equal(targets["labels"][scored], generated[scored]) and "decoder_input_ids" not in targets
    first_end = (generated == facts["eos_id"]).float().argmax(dim=1)
    ended = (generated == facts["eos_id"]).any(dim=1)
    for row in torch.nonzero(ended).flatten().tolist():
        assert scored[row, : first_end[row] + 1].all() and not scored[row, first_end[row] + 1 :].any()
