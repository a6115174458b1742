"""Config composition: defaults, component groups, typed overrides, experiments, debug."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from compose import compose_train
from plugformer import CapabilityError
from plugformer.compatibility import check_requirements
from plugformer.model.builder import choose_components


def test_defaults_choose_one_component_per_kind(registry) -> None:
    cfg = compose_train()
    chosen = choose_components(cfg, registry)
    assert {k: c.name for k, c in chosen.items()} == {
        "attention": "full", "position": "learned", "norm": "layernorm",
        "ffn": "mlp", "block": "standard", "objective": "causal_lm", "data": "mqar",
    }
    check_requirements(chosen, registry)
    assert cfg.trainer.accelerator == "cpu" and "wandb" in cfg.logger


def test_component_options_are_typed_from_the_registered_dataclass(registry) -> None:
    cfg = compose_train("model/position=sinusoidal", "model.position.base=500")
    assert cfg.model.position.name == "sinusoidal" and cfg.model.position.base == 500.0
    with pytest.raises(ConfigCompositionException):
        compose_train("model.position.base=far")
    with pytest.raises(ConfigCompositionException):
        compose_train("model.d_model=wide")
    with pytest.raises(ConfigCompositionException):
        compose_train("model.block.placement=sideways")


def test_unknown_component_lists_the_choices(registry) -> None:
    with pytest.raises(MissingConfigException) as error:
        compose_train("model/attention=nope")
    assert "full" in str(error.value)


def test_trainer_arguments_pass_through() -> None:
    cfg = compose_train("trainer.max_steps=7", "+trainer.accumulate_grad_batches=2")
    assert cfg.trainer.max_steps == 7 and cfg.trainer.accumulate_grad_batches == 2


def test_experiment_and_debug_groups() -> None:
    cfg = compose_train("experiment=mqar_small", "debug=fast")
    assert cfg.experiment_name == "mqar_small"
    assert cfg.data.vocab_size == 8192 and cfg.model.n_heads == 1
    assert cfg.trainer.max_steps == 5


def test_loggers_can_be_combined_or_removed() -> None:
    assert set(compose_train("logger=[wandb,tensorboard]").logger) == {"wandb", "tensorboard"}
    assert not compose_train("logger=none").logger


def test_run_dir_defaults_under_the_experiment() -> None:
    cfg = compose_train("experiment_name=study")
    assert str(cfg.run_dir).startswith("runs/study/")
    assert OmegaConf.select(cfg, "resume") is None


def test_objective_and_data_requirements_are_checked(registry) -> None:
    from dataclasses import dataclass

    from plugformer import Capabilities, Chosen, Component

    @dataclass
    class Empty:
        pass

    encoder_only = Component(
        kind="attention", name="encoder_only", factory=None, config=Empty, summary="",
        capabilities=Capabilities(provides={"bidirectional"}),
    )
    chosen = choose_components(compose_train(), registry)
    chosen["attention"] = Chosen(encoder_only, Empty())
    with pytest.raises(CapabilityError) as error:
        check_requirements(chosen, registry)
    message = str(error.value)
    assert "objective 'causal_lm' needs causal" in message and "'encoder_only'" in message
    assert "full" in message


def test_the_default_run_is_the_hybrid_recall_recipe() -> None:
    import plugformer

    def mixers(*overrides: str) -> list[str]:
        built = plugformer.build(plugformer.compose([*overrides, "logger=none", "data.train_examples=64", "data.val_examples=16"]))
        return [type(block.attention).__name__ for block in built.model.decoder.blocks]

    cfg = plugformer.compose([])
    assert cfg.experiment_name == "default" and cfg.data.name == "mqar"
    assert (cfg.data.num_pairs, cfg.data.vocab_size, cfg.model.position.name) == (8, 256, "none")
    assert mixers() == ["ShortConv", "FullAttention"]
    # model/attention chooses the attention layers of the alternating pattern ...
    assert mixers("model/attention=local", "model.n_layers=4") == ["ShortConv", "SlidingWindowAttention"] * 2
    # ... an explicit plan replaces it, and experiment=plain has the attention in every layer.
    assert mixers("model.plan.attention=[local,full]") == ["SlidingWindowAttention", "FullAttention"]
    assert mixers("experiment=plain") == ["FullAttention", "FullAttention"]
    assert plugformer.compose(["experiment=plain"]).model.position.name == "learned"
