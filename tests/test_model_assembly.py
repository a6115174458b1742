"""Model assembly v2 through the public API: layer plans, block kinds, grouped-query
attention and its cache, decoding with state, loss terms, techniques' context and the
Python API."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import plugformer
from compose import compose_train
from helpers import FAST
from plugformer import CapabilityError, Component, ConfigError, KVCache, PluginError, hookimpl
from plugformer.model.generation import greedy
from plugformer.plugins import load_plugins
from plugformer_plugins.attention.full import FullAttention
from plugformer_plugins.attention.local import SlidingWindowAttention
from plugformer_plugins.block.deepnorm import DeepNormBlock, deepnorm_gains
from plugformer_plugins.block.parallel import ParallelBlock
from plugformer_plugins.ffn.glu import GLU
from plugformer_plugins.ffn.mlp import MLP

SMALL = ["experiment=plain", "model.d_model=32", "data.train_examples=64", "data.val_examples=32", "data.batch_size=16", "logger=none"]


def built(*overrides: str, plugins=None) -> plugformer.Built:
    return plugformer.build(plugformer.compose([*SMALL, *overrides]), plugins=plugins)


# --- layer plans ------------------------------------------------------------------------------
def test_a_repeating_pattern_chooses_each_layers_attention_and_ffn() -> None:
    b = built("model.n_layers=6", "model/attention=local", "model.attention.window=4", "model.plan.attention=[local,local,full]", "model.plan.ffn=[mlp,glu]")
    layers = b.plan.describe()["decoder"]
    assert [layer["attention"] for layer in layers] == ["local", "local", "full"] * 2
    assert [layer["ffn"] for layer in layers] == ["mlp", "glu"] * 3
    blocks = b.model.decoder.blocks
    assert [type(block.attention) for block in blocks] == [SlidingWindowAttention, SlidingWindowAttention, FullAttention] * 2
    assert [type(block.ffn) for block in blocks] == [MLP, GLU] * 3
    assert blocks[0].attention.window == 4, "a name that is the group's choice keeps the group's options"


def test_single_layers_take_a_component_with_options_by_index() -> None:
    b = built(
        "model.n_layers=3", "+model.plan.layers.1.attention.name=local", "+model.plan.layers.1.attention.window=2",
        "+model.plan.layers.2.block=parallel", "+model.plan.options.attention.local.dilation=1",
    )
    blocks = b.model.decoder.blocks
    assert isinstance(blocks[1].attention, SlidingWindowAttention) and blocks[1].attention.window == 2
    assert isinstance(blocks[2], ParallelBlock) and isinstance(blocks[0].attention, FullAttention)


def test_a_plan_naming_a_missing_layer_or_slot_is_refused() -> None:
    with pytest.raises(ConfigError, match="layers that do not exist: 7"):
        built("model.n_layers=2", "+model.plan.layers.7.attention=local")
    with pytest.raises(ConfigError, match="model.plan.layers.1 sets atention"):
        built("model.n_layers=2", "+model.plan.layers.1.atention=local")


def test_capabilities_are_checked_layer_by_layer() -> None:
    with pytest.raises(CapabilityError) as refused:
        built("model.n_layers=3", "model/position=alibi", "model.plan.attention=[full,full,linear]")
    message = str(refused.value)
    assert "position 'alibi' needs score_bias" in message and "'linear'" in message and "layer 2 of the decoder" in message


def test_an_encoder_refuses_a_causal_only_attention_in_one_layer() -> None:
    from plugformer.model.builder import check_components, choose_components
    from plugformer_plugins.attention.full import FullAttentionConfig

    class Plugin:
        @hookimpl
        def register_components(self, registry) -> None:
            registry.add(Component(
                kind="attention", name="causal_only", factory=FullAttention, config=FullAttentionConfig, summary="test",
                capabilities=plugformer.Capabilities(provides={"causal", "key_padding_mask"}),
            ))

    extended = load_plugins(extra={"causal_only": Plugin()})
    cfg = plugformer.compose(["experiment=listops_small", "model.n_layers=2", "model.plan.attention=[full,causal_only]"])
    with pytest.raises(CapabilityError, match="needs bidirectional .*layer 1 of the encoder"):
        check_components(cfg, choose_components(cfg, extended.registry), extended.registry)


# --- blocks -----------------------------------------------------------------------------------
def test_deepnorm_gains_follow_the_paper() -> None:
    assert deepnorm_gains("decoder", 0, 6) == pytest.approx(((2 * 6) ** 0.25, (8 * 6) ** -0.25))
    n, m = 6, 6
    assert deepnorm_gains("encoder", n, m) == pytest.approx((0.81 * (n**4 * m) ** (1 / 16), 0.87 * (n**4 * m) ** (-1 / 16)))
    assert deepnorm_gains("decoder", n, m) == pytest.approx(((3 * m) ** 0.25, (12 * m) ** -0.25))


def test_deepnorm_blocks_end_in_a_norm_and_scale_their_initialization() -> None:
    b = built("model/block=deepnorm", "model.n_layers=4", "model.d_model=64")
    blocks = b.model.decoder.blocks
    assert all(isinstance(block, DeepNormBlock) for block in blocks)
    assert isinstance(b.model.decoder.final_norm, nn.Identity), "post-norm blocks need no final norm"
    alpha, beta = deepnorm_gains("decoder", 0, 4)
    assert blocks[0].alpha == pytest.approx(alpha)
    weights = blocks[0].attention.projection_weights()
    xavier = math.sqrt(2.0 / (64 + 64))
    assert weights["value"].std().item() == pytest.approx(beta * xavier, rel=0.15)
    assert weights["query"].std().item() == pytest.approx(xavier, rel=0.15)


# --- grouped-query attention and its cache ----------------------------------------------------
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_query_attention_shrinks_the_cache_by_the_head_ratio(kv_heads: int) -> None:
    b = built("model.n_heads=4", f"model.n_kv_heads={kv_heads}", "model.n_layers=2")
    attention = b.model.decoder.blocks[0].attention
    assert attention.key_value.out_features == 2 * kv_heads * 8
    state = b.model.new_state(2)
    with torch.no_grad():
        b.model.hidden_states(plugformer.ModelInputs(input_ids=torch.randint(0, 10, (2, 16))), state)
    cache = state.stacks["decoder"].layers[0].attention
    assert isinstance(cache, KVCache) and cache.length == 16
    # keys and values: 2 · batch · kv_heads · tokens · head_dim float32 values
    assert cache.nbytes() == 2 * 2 * kv_heads * 16 * 8 * 4


def test_n_kv_heads_must_divide_n_heads() -> None:
    with pytest.raises(ConfigError, match="n_kv_heads=3 does not divide"):
        built("model.n_heads=4", "model.n_kv_heads=3")


# --- decoding with state ----------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["full", "local", "linear"])
def test_greedy_decoding_with_state_equals_decoding_without(attention: str) -> None:
    b = built(f"model/attention={attention}", "model.attention.window=4" if attention == "local" else "model.n_layers=2", "model/position=rope")
    model = b.model.eval()
    prompt = torch.randint(0, b.data.vocab_size, (3, 7))
    fast = greedy(model, prompt, 6)
    tokens = prompt
    with torch.no_grad():
        for _ in range(6):
            logits = model.objective.logits(model.hidden_states(plugformer.ModelInputs(input_ids=tokens)))
            tokens = torch.cat([tokens, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(fast, tokens[:, 7:])


@pytest.mark.parametrize("attention", ["full", "local", "linear"])
def test_left_padded_prompts_decode_as_if_alone(attention: str) -> None:
    """Per-example positions and masks in the cache (sliding window + padding + cache
    crashed in flash-linear-attention #431)."""
    b = built("model/position=rope", f"model/attention={attention}", "model.n_layers=2", *(["model.attention.window=3"] if attention == "local" else []))
    model = b.model.eval()
    short, long = torch.randint(0, b.data.vocab_size, (1, 4)), torch.randint(0, b.data.vocab_size, (1, 7))
    padded = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, :3] = False
    together = greedy(model, padded, 5, attention_mask=mask)
    assert torch.equal(together[0], greedy(model, short, 5)[0])
    assert torch.equal(together[1], greedy(model, long, 5)[0])


def test_beam_search_can_reorder_the_state() -> None:
    b = built("model/position=rope")
    model = b.model.eval()
    tokens = torch.randint(0, b.data.vocab_size, (3, 6))
    order = torch.tensor([2, 0, 1])
    with torch.no_grad():
        state = model.new_state(3)
        model.hidden_states(plugformer.ModelInputs(input_ids=tokens[:, :5]), state)
        state.reorder(order)
        stepped = model.hidden_states(plugformer.ModelInputs(input_ids=tokens[order, 5:]), state)
        full = model.hidden_states(plugformer.ModelInputs(input_ids=tokens[order]))
    assert torch.allclose(stepped[:, 0], full[:, 5], atol=1e-5)


# --- losses and techniques --------------------------------------------------------------------
class TermPlugin:
    def __init__(self, name: str) -> None:
        self.name = name

    @hookimpl
    def extra_losses(self, model, batch, outputs, stage):
        return {self.name: outputs.loss.new_tensor(0.1)}


def test_two_contributors_of_one_loss_name_are_named(tmp_path: Path) -> None:
    plugins = load_plugins(extra={"first_terms": TermPlugin("aux"), "second_terms": TermPlugin("aux")})
    cfg = compose_train(*FAST, "logger=none", "trainer.max_steps=2", f"run_dir={tmp_path}")
    from plugformer.training.run import train

    with pytest.raises(PluginError) as clash:
        train(cfg, plugins, tmp_path, run_id="clash001")
    assert "first_terms" in str(clash.value) and "second_terms" in str(clash.value) and "'aux'" in str(clash.value)


class TeacherTechnique:
    """A technique that loads an earlier run as a frozen teacher."""

    seen: list = []

    def __init__(self, config, ctx) -> None:
        self.ctx = ctx
        teacher_dir = ctx.cfg.techniques.teacher.run
        self.teacher = ctx.add_frozen("teacher", ctx.load_run(teacher_dir).model)
        TeacherTechnique.seen.append(self)

    @hookimpl
    def extra_losses(self, model, batch, outputs, stage):
        with torch.no_grad():
            teacher_loss = self.teacher(batch).loss
        return {"teacher_gap": (outputs.loss - teacher_loss).detach() * 0.0}


class TeacherPlugin:
    @hookimpl
    def register_components(self, registry) -> None:
        from dataclasses import dataclass

        @dataclass
        class TeacherConfig:
            run: str = ""

        registry.add(Component(kind="technique", name="teacher", factory=TeacherTechnique, config=TeacherConfig, summary="test teacher"))


@pytest.mark.slow
def test_a_technique_loads_an_earlier_run_as_a_frozen_teacher(tmp_path: Path) -> None:
    teacher_dir = tmp_path / "teacher"
    summary = plugformer.train([*FAST, "logger=none", "trainer.max_steps=20", "trainer.val_check_interval=20"], run_dir=teacher_dir)
    assert summary["status"] == "finished"
    loaded = plugformer.load_run(teacher_dir)
    assert loaded.checkpoint.name == "best.ckpt" and loaded.summary["run_id"] == summary["run_id"]
    assert not loaded.model.training

    plugins = load_plugins(extra={"teacher_plugin": TeacherPlugin()})
    student_dir = tmp_path / "student"
    cfg = compose_train(*FAST, "logger=none", "trainer.max_steps=4", "+technique=teacher", f"techniques.teacher.run={teacher_dir}", f"run_dir={student_dir}")
    from plugformer.training.run import train

    student = train(cfg, plugins, student_dir, run_id="student1")
    assert student["status"] == "finished" and "val/loss_teacher_gap" in student["metrics"]
    technique = TeacherTechnique.seen[-1]
    assert technique.ctx.run_dir == student_dir and technique.ctx.cfg.run_dir == str(student_dir)
    assert technique.ctx.registry.get("attention", "full").name == "full"
    assert all(not p.requires_grad for p in technique.teacher.parameters())
    # Frozen: the teacher's weights are those of the teacher run, untouched by training...
    reloaded = plugformer.load_run(teacher_dir).model.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in technique.teacher.state_dict().items())
    # ...and kept out of the student's checkpoint.
    saved = torch.load(student_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert not any("teacher" in name for name in saved)


def test_frozen_modules_follow_the_model_and_stay_out_of_optimizer_and_state() -> None:
    from plugformer.config import optim_config
    from plugformer.training.module import TrainingModule
    from plugformer.training.optim import build_optimizer

    b = built()
    teacher = nn.Linear(4, 4).requires_grad_(False)
    module = TrainingModule(b.model, optim_config(b.cfg), b.hooks, frozen={"teacher": teacher})
    module.to(torch.float64)
    assert teacher.weight.dtype == torch.float64, "the frozen module did not follow the model"
    assert not any(name.startswith("teacher") or "frozen" in name for name in module.state_dict())
    optimizer, _ = build_optimizer(module.model, optim_config(b.cfg), 10)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert id(teacher.weight) not in optimized


# --- the Python API ---------------------------------------------------------------------------
def test_compose_build_and_a_forward_pass() -> None:
    b = built("model/attention=local", "model.attention.window=8")
    batch = next(iter(b.data.train_dataloader()))
    outputs = b.model(batch)
    assert outputs.loss.ndim == 0 and torch.isfinite(outputs.loss)
    assert b.chosen["attention"].name == "local" and b.plan.architecture == "decoder"


@pytest.mark.slow
def test_a_hybrid_plan_trains_from_the_command_line(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from helpers import read_summary, run_cli

    run_dir = tmp_path / "hybrid"
    result = run_cli(
        "train", *FAST, "model.n_layers=3", "model/attention=local", "model.attention.window=8",
        "model.plan.attention=[local,local,full]", "+model.plan.layers.1.ffn=glu", "trainer.max_steps=30",
        "trainer.val_check_interval=30", f"run_dir={run_dir}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    expected = [
        {"attention": "local", "ffn": "mlp", "block": "standard"},
        {"attention": "local", "ffn": "glu", "block": "standard"},
        {"attention": "full", "ffn": "mlp", "block": "standard"},
    ]
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["layers"] == {"decoder": expected}
    assert summary["components"]["attention"] == "local+full" and summary["components"]["ffn"] == "mlp+glu"
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["resolved_layers"] == {"decoder": expected}
    wandb = Path(sys.executable).with_name("wandb")
    inspected = subprocess.run([str(wandb), "leet", "inspect", "--summary", "--json", summary["wandb_dir"]], capture_output=True, text=True, timeout=120)
    record = json.loads(inspected.stdout)
    assert record["config"]["resolved_layers"] == {"decoder": expected}
    assert {"attention:local", "attention:full", "ffn:glu"} <= set(record["tags"])


def test_a_plan_names_the_components_its_layers_use_not_the_groups_defaults() -> None:
    from plugformer.compare import Run
    from plugformer.model.plan import components_in_use

    layers = {"encoder": [{"attention": "linformer", "ffn": "mlp"}, {"attention": "linformer", "ffn": "glu"}]}
    chosen = {"attention": "full", "ffn": "mlp", "norm": "rmsnorm"}
    assert components_in_use(chosen, layers) == {"attention": "linformer", "ffn": "mlp+glu", "norm": "rmsnorm"}
    assert components_in_use(chosen, {}) == chosen
    # A summary written before summary.json named the planned components compares by its layers.
    old = Run(path=Path("old"), config={}, summary={"components": chosen, "layers": layers})
    assert old.components["attention"] == "linformer"
