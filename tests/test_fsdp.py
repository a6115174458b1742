"""trainer=fsdp: the strategy the platform builds (block classes as FSDP units, options
mapped onto torch's FSDP, clear errors), sharded checkpoints read in one process and
written atomically, and a real 2-process CPU run (gloo) that shards, checkpoints and resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import plugformer
from compose import PLAIN
from helpers import FAST, read_summary, run_cli
from plugformer import ConfigError
from plugformer.resume import choose_checkpoint, read_checkpoint
from plugformer.sharded_checkpoint import load_model_state, tensor_shapes
from plugformer.training.checkpointing import remove_orphan_temporaries, replace_directory_atomically, temporary_sibling
from plugformer.training.fsdp import ClippingFSDPPrecision, FSDPStrategy, block_classes, fsdp_config, fsdp_trainer_arguments

SMALL = ["model.d_model=32", "data.train_examples=64", "data.val_examples=32", "data.batch_size=16", "logger=none"]


def compose_train(*overrides: str):
    return plugformer.compose([PLAIN, *overrides])  # loads the installed plugins first


def built_model(*overrides: str) -> torch.nn.Module:
    return plugformer.build(compose_train(*SMALL, *overrides)).model


def trainer_options(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_train("trainer=fsdp", *overrides).trainer, resolve=True)


# --- the strategy ------------------------------------------------------------------------------
def test_trainer_fsdp_composes_typed_options() -> None:
    options = trainer_options("trainer.fsdp.activation_checkpointing=true")
    assert options["strategy"] == "fsdp" and options["precision"] == "bf16-mixed"
    assert options["fsdp"] == {
        "sharding_strategy": "FULL_SHARD", "activation_checkpointing": True, "state_dict_type": "sharded",
        "reduce_in_fp32": True, "cpu_offload": False,
    }
    with pytest.raises(Exception, match="sharding_strategy"):
        compose_train("trainer=fsdp", "trainer.fsdp.sharding_strategy=EVERYTHING")


def test_the_wrap_policy_takes_every_block_class_the_plan_built() -> None:
    from plugformer_plugins.block.parallel import ParallelBlock
    from plugformer_plugins.block.standard import StandardBlock

    model = built_model("model.n_layers=3", "model.plan.block=[standard,parallel]")
    assert block_classes(model) == {StandardBlock, ParallelBlock}
    # A plugin's own block class is a unit too; reversible blocks run outside forward and are not.
    plugin_block = type("PluginBlock", (StandardBlock,), {})
    model.decoder.blocks[2].__class__ = plugin_block
    assert block_classes(model) == {StandardBlock, ParallelBlock, plugin_block}
    assert block_classes(built_model("model/block=reversible")) == set()

    arguments = fsdp_trainer_arguments(trainer_options(), model)
    strategy = arguments["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {StandardBlock, ParallelBlock, plugin_block}
    assert strategy.kwargs["use_orig_params"] is True
    assert not strategy._activation_checkpointing_kwargs
    assert "fsdp" not in arguments and "precision" not in arguments
    assert [type(p) for p in arguments["plugins"]] == [ClippingFSDPPrecision]


def test_options_map_onto_torch_fsdp() -> None:
    from torch.distributed.fsdp import ShardingStrategy

    model = built_model()
    args = fsdp_trainer_arguments(trainer_options(
        "trainer.fsdp.sharding_strategy=SHARD_GRAD_OP", "trainer.fsdp.activation_checkpointing=true",
        "trainer.fsdp.state_dict_type=full", "trainer.fsdp.reduce_in_fp32=false",
    ), model)
    strategy = args["strategy"]
    assert strategy.sharding_strategy is ShardingStrategy.SHARD_GRAD_OP
    assert strategy._state_dict_type == "full"
    assert set(strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes) == block_classes(model)
    assert strategy.mixed_precision.param_dtype is torch.bfloat16 and strategy.mixed_precision.reduce_dtype is torch.bfloat16
    assert args["plugins"][0].precision == "bf16-mixed"

    default = fsdp_trainer_arguments(trainer_options(), model)["strategy"]
    assert default.sharding_strategy is ShardingStrategy.FULL_SHARD and default._state_dict_type == "sharded"
    assert default.mixed_precision.param_dtype is torch.bfloat16 and default.mixed_precision.reduce_dtype is torch.float32
    hybrid = fsdp_trainer_arguments(trainer_options("trainer.fsdp.sharding_strategy=HYBRID_SHARD"), model)["strategy"]
    assert hybrid.sharding_strategy is ShardingStrategy.HYBRID_SHARD
    full_precision = fsdp_trainer_arguments(trainer_options("trainer.precision=32-true"), model)["strategy"]
    assert full_precision.mixed_precision is None


def test_options_fsdp_cannot_honour_are_refused() -> None:
    model = built_model()
    with pytest.raises(ConfigError, match="32-bit only") as refused:
        fsdp_trainer_arguments(trainer_options("trainer.accelerator=cpu"), model)
    assert "trainer.precision=32-true" in refused.value.fix
    with pytest.raises(ConfigError, match="HYBRID_SHARD needs GPUs"):
        fsdp_trainer_arguments(trainer_options("trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.fsdp.sharding_strategy=HYBRID_SHARD"), model)
    with pytest.raises(ConfigError, match="does not support trainer.precision=64-true"):
        fsdp_trainer_arguments(trainer_options("trainer.precision=64-true"), model)
    # A config read back from YAML (resume) is untyped: checked here, with the choices named.
    with pytest.raises(ConfigError, match="trainer.fsdp.sharding_strategy") as bad:
        fsdp_config({"sharding_strategy": "EVERYTHING"})
    assert "SHARD_GRAD_OP" in bad.value.expected
    with pytest.raises(ConfigError, match="found no block to shard"):
        fsdp_trainer_arguments(trainer_options(), built_model("model/block=reversible"))


def test_a_bad_fsdp_option_on_the_command_line_is_one_message(tmp_path: Path) -> None:
    result = run_cli("train", "trainer=fsdp", "trainer.fsdp.sharding_strategy=EVERYTHING", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "sharding_strategy" in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]


# --- sharded checkpoints -----------------------------------------------------------------------
def write_sharded_checkpoint(path: Path, state: dict[str, torch.Tensor], step: int) -> None:
    """What FSDPStrategy writes, by one process: the model's tensors under "model" (DCP) and meta.pt."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    path.mkdir(parents=True)
    save({"model": state}, storage_writer=FileSystemWriter(str(path)), no_dist=True)
    torch.save({"global_step": step, "plugformer": {"components": {"attention": "full"}}}, path / "meta.pt")


def test_a_sharded_checkpoint_reads_back_in_one_process(tmp_path: Path) -> None:
    state = {"model.token_embedding.weight": torch.randn(5, 3), "model.head.bias": torch.randn(5)}
    folder = tmp_path / "checkpoints" / "last.ckpt"
    write_sharded_checkpoint(folder, state, step=7)
    assert tensor_shapes(folder) == {"model.token_embedding.weight": (5, 3), "model.head.bias": (5,)}
    loaded = load_model_state(folder)
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    info = read_checkpoint(folder)
    assert (info.global_step, info.components, info.shapes["model.head.bias"]) == (7, {"attention": "full"}, (5,))
    assert choose_checkpoint(tmp_path, "last").global_step == 7
    (folder / "meta.pt").unlink()  # a directory without Lightning's metadata is no checkpoint
    with pytest.raises(ConfigError, match="corrupt, truncated or missing"):
        choose_checkpoint(tmp_path, "last")


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_a_checkpoint_directory_is_replaced_in_one_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool) -> None:
    import plugformer.training.checkpointing as checkpointing

    if not exchange:  # systems without RENAME_EXCHANGE
        monkeypatch.setattr(checkpointing, "_exchange", lambda a, b: False)
    final = tmp_path / "last.ckpt"
    old = temporary_sibling(final)
    old.mkdir()
    (old / "shard").write_text("old")
    replace_directory_atomically(old, final)
    assert (final / "shard").read_text() == "old"
    new = temporary_sibling(final)
    assert new.name.startswith(".last.ckpt.") and new.name.endswith(".tmp")
    new.mkdir()
    (new / "shard").write_text("new")
    replace_directory_atomically(new, final)
    assert (final / "shard").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # the previous content is gone
    # A write killed before its swap leaves a temporary directory; the next run removes it.
    orphan = temporary_sibling(final)
    orphan.mkdir()
    (orphan / "shard").write_text("half")
    assert remove_orphan_temporaries(tmp_path) == [orphan]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# --- a real run: 2 processes on CPU with gloo --------------------------------------------------
CPU_FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


@pytest.mark.slow
def test_two_cpu_processes_shard_checkpoint_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    settings = [*CPU_FSDP, "trainer.fsdp.activation_checkpointing=true", "trainer.val_check_interval=3", *FAST, "model.n_layers=2"]
    env = {"OMP_NUM_THREADS": "1"}
    # Two processes starting on a loaded machine took up to 5 minutes here: a generous timeout.
    result = run_cli("train", *settings, "trainer.max_steps=6", f"run_dir={run_dir}", env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "strategy FSDP (2 processes)" in result.stdout, result.stdout
    assert "last ckpt" in result.stdout, result.stdout  # the closing block names the sharded checkpoint
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["global_step"] == 6
    sharding = summary["sharding"]
    assert sharding["activation_checkpointing"] is True and sharding["sharding_strategy"] == "FULL_SHARD"
    # Each rank holds its own half of the parameters: both blocks and the root are units.
    assert sharding["wrapped_classes"] == ["StandardBlock"] and sharding["units"] == 3
    assert sum(sharding["parameters_per_rank"]) == sharding["parameters"] == summary["params"]
    assert all(abs(local - sharding["parameters"] / 2) <= 64 for local in sharding["parameters_per_rank"])

    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and {"__0_0.distcp", "__1_0.distcp", "meta.pt", ".metadata"} <= {p.name for p in last.iterdir()}
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(str(last)).read_metadata().state_dict_metadata
    assert any(name.startswith("optimizer_0.state.") and name.endswith(".exp_avg") for name in stored)  # AdamW's moments
    # The shards put together are the trained model: its validation loss is the run's.
    run = plugformer.load_run(run_dir, checkpoint="last")
    with torch.no_grad():
        losses = [(run.model(b).loss.item(), b["input_ids"].shape[0]) for b in run.data.val_dataloader()]
    assert summary["metrics"]["val/loss"] == pytest.approx(sum(l * n for l, n in losses) / sum(n for _, n in losses), abs=1e-4)

    resumed = run_cli("train", f"resume={run_dir}", "trainer.max_steps=8", env=env, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 6" in resumed.stdout, resumed.stdout
    summary = read_summary(run_dir)
    assert summary["status"] == "finished" and summary["global_step"] == 8
    assert read_checkpoint(last).global_step == 8


# --- the memory preflight ----------------------------------------------------------------------
def test_the_memory_preflight_counts_each_rank_s_shard_of_the_weights() -> None:
    from plugformer.api import _session_plugins
    from plugformer.memory import estimate
    from plugformer.model.builder import check_components, choose_components

    registry = _session_plugins().registry

    def weights(*overrides: str, processes: int = 2) -> int:
        cfg = compose_train(*SMALL, *overrides)
        chosen = choose_components(cfg, registry)
        return estimate(cfg, chosen, check_components(cfg, chosen, registry), processes=processes, device="cpu").parts["weights, gradients, AdamW"]

    unsharded = weights("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    params = unsharded // 16
    assert weights(*CPU_FSDP) == 16 * params // 2  # FULL_SHARD: everything split over 2 ranks
    assert weights(*CPU_FSDP, "trainer.fsdp.sharding_strategy=SHARD_GRAD_OP") == 4 * params + 12 * params // 2
    assert weights(*CPU_FSDP, "+trainer.num_nodes=2") == 16 * params // 4
