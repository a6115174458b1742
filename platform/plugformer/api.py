"""The Python API beside the CLI: compose a config, build what it describes, train it, and
load a finished run, with the same objects ``plugformer train`` uses::

    import plugformer

    cfg = plugformer.compose(["model/attention=local", "trainer.max_steps=200"])
    built = plugformer.build(cfg)            # model, data, layer plan, techniques
    summary = plugformer.train(cfg, run_dir="runs/notebook/local")
    run = plugformer.load_run("runs/notebook/local")
    run.model(batch)                          # the objective's ObjectiveOutput
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

from plugformer.errors import ConfigError

if TYPE_CHECKING:
    import pluggy

    from plugformer.compatibility import Chosen
    from plugformer.components import DataTask
    from plugformer.model.plan import ModelPlan
    from plugformer.model.transformer import Transformer
    from plugformer.plugins import Plugins
    from plugformer.techniques import TechniqueContext

CONFIG_MODULE = "plugformer.conf"


def compose(overrides: Sequence[str] = (), *, config_name: str = "train") -> DictConfig:
    """The config ``plugformer train <overrides>`` would run, composed by Hydra in-process
    (installed plugins loaded first, so their groups exist)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from plugformer.config import store_core_configs

    _session_plugins()
    store_core_configs()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


@dataclass
class Built:
    """Everything a config describes, built: the chosen components, the resolved layer plan,
    the prepared data task, the initialized model, the run's techniques (name → object), the
    techniques' context (frozen modules included) and the run's hook manager."""

    cfg: DictConfig
    chosen: dict[str, Chosen]
    plan: ModelPlan
    data: DataTask
    model: Transformer
    techniques: dict[str, Any]
    context: TechniqueContext
    hooks: pluggy.PluginManager


def build(cfg: DictConfig, *, plugins: Plugins | None = None, run_dir: str | Path | None = None, chosen: dict[str, Chosen] | None = None) -> Built:
    """Choose and check the components, create the techniques, prepare the data (cached) and
    build the model, calling the ``validate_config`` and ``model_built`` hooks, exactly as a
    training run does. Raises a :class:`plugformer.PlugformerError` for a refused config."""
    import lightning.pytorch as pl

    from plugformer.components import DataContext
    from plugformer.model.builder import build_model, check_components, choose_components, chosen_techniques
    from plugformer.plugins import call_hook
    from plugformer.techniques import TechniqueContext

    plugins = plugins or _session_plugins()
    registry = plugins.registry
    chosen = chosen or choose_components(cfg, registry)
    plan = check_components(cfg, chosen, registry)
    context = TechniqueContext(cfg=cfg, registry=registry, run_dir=Path(run_dir or cfg.get("run_dir") or "."), plugins=plugins)
    techniques = {name: t.component.factory(t.config, context) for name, t in chosen_techniques(cfg, registry).items()}
    hooks = plugins.run_manager(techniques)
    call_hook(hooks, "validate_config", expect=object, cfg=cfg, registry=registry)  # a raising plugin is named
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data_choice = chosen["data"]
    data = data_choice.component.factory(data_choice.config, DataContext(cache_dir=Path(cfg.paths.cache_dir), seed=cfg.seed, run_dir=Path(run_dir) if run_dir else None))
    data.prepare()
    chosen = _sized_to_data(cfg, chosen, int(data.max_length))
    model = build_model(cfg, chosen, data, plan)
    model.max_positions = _max_positions(chosen, plan)
    call_hook(hooks, "model_built", expect=object, model=model, cfg=cfg)
    return Built(cfg=cfg, chosen=chosen, plan=plan, data=data, model=model, techniques=techniques, context=context, hooks=hooks)


def _sized_to_data(cfg: DictConfig, chosen: dict[str, Chosen], length: int) -> dict[str, Chosen]:
    """The position component's ``max_length: null`` (learned positions: rows of the table)
    means the data's longest sequence: set it, in the chosen config object and in ``cfg``, so
    the run's config.yaml records the size the model was built with (a resume, ``eval`` and
    ``generate`` rebuild exactly that table, and refuse longer sequences by its capability)."""
    from dataclasses import fields, replace

    position = chosen["position"]
    names = {f.name for f in fields(position.config)} if hasattr(position.config, "__dataclass_fields__") else set()
    if "max_length" not in names or position.config.max_length is not None:
        return chosen
    with open_dict(cfg):
        cfg.model.position.max_length = length
    return {**chosen, "position": replace(position, config=replace(position.config, max_length=length))}


def _max_positions(chosen: dict[str, Chosen], plan: ModelPlan) -> int | None:
    """The longest sequence every component of the model handles (their ``max_length``
    capabilities), or None when none has a limit; generation refuses to go beyond it."""
    components = [chosen["position"], *(c for layer in plan.layers() for c in layer.slots().values())]
    limits = [c.component.capabilities_for(c.config).max_length for c in components]
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else None


def train(cfg: DictConfig | Sequence[str], *, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Train a config (or the config of these overrides) into ``run_dir`` (default: the
    config's ``run_dir``) and return its summary, as ``plugformer train`` would. Raises the
    run's error after writing its summary.json."""
    from plugformer.resume import new_run_id, write_run_id
    from plugformer.training.run import CONFIG_FILE
    from plugformer.training.run import train as train_run

    if not isinstance(cfg, DictConfig):
        cfg = compose(list(cfg))
    directory = Path(run_dir or cfg.run_dir).expanduser().resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.run_dir = str(directory)
    run_id = new_run_id()
    (directory / CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write_run_id(directory, run_id)
    return train_run(cfg, _session_plugins(), directory, run_id=run_id)


@dataclass
class LoadedRun:
    """An earlier run: its config, its model (weights of the chosen checkpoint, eval mode),
    its data task (prepared, so ``data.tokenizer`` is there when the task has one), its
    summary, and the checkpoint file the weights came from."""

    run_dir: Path
    cfg: DictConfig
    model: Transformer
    data: DataTask
    summary: dict[str, Any]
    checkpoint: Path
    hooks: Any = None

    @property
    def tokenizer(self) -> Any:
        """The data task's tokenizer, or None for tasks without one (synthetic token ids)."""
        return getattr(self.data, "tokenizer", None)

    def generate(self, input_ids: Any, max_new_tokens: int = 64, *, attention_mask: Any = None, **options: Any) -> Any:
        """The tokens decoding appends to ``input_ids`` (a decoder's prompt, left-padded
        with ``attention_mask``; an encoder–decoder's source), with the model's state when
        its attention decodes incrementally. ``options`` are :class:`DecodingConfig` fields
        (strategy, temperature, top_k, top_p, min_p, num_beams, length_penalty, seed,
        use_cache); start and end tokens come from the data task's facts."""
        from plugformer.model.generation import DecodingConfig, generate

        facts = dict(self.data.facts)
        config = DecodingConfig(max_new_tokens=max_new_tokens, **options)
        return generate(
            self.model, input_ids, config, attention_mask=attention_mask, start_id=facts.get("start_id"), eos_id=facts.get("eos_id")
        )

    def complete(self, prompts: Sequence[str], max_new_tokens: int = 64, **options: Any) -> list[str]:
        """Text in, text out, as ``plugformer generate`` prints it: each prompt's
        continuation (decoder), target (encoder–decoder), filled-in text (masked LM) or class
        (classifier). ``options`` as for :meth:`generate`."""
        from plugformer.model.generation import DecodingConfig
        from plugformer.prompting import complete

        config = DecodingConfig(max_new_tokens=max_new_tokens, **options)
        return [c.output for c in complete(self, list(prompts), config)]

    def evaluate(self, overrides: Sequence[str] = (), **options: Any) -> dict[str, Any]:
        """``plugformer eval`` on this run (see :func:`plugformer.evaluation.evaluate`)."""
        from plugformer.evaluation import evaluate

        return evaluate(self.run_dir, overrides, checkpoint=str(self.checkpoint), **options)


def load_run(run_dir: str | Path, *, checkpoint: str = "best", plugins: Plugins | None = None) -> LoadedRun:
    """Load the model, config and data task of the run in ``run_dir``; ``checkpoint`` is
    "best", "last" or a path to a checkpoint file."""
    import torch

    from plugformer.model.builder import choose_components
    from plugformer.sharded_checkpoint import is_sharded_checkpoint, load_model_state

    directory = Path(run_dir).expanduser().resolve()
    config_file = directory / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(
            f"{directory} is not a run directory: it has no config.yaml.",
            expected="a folder that `plugformer train` wrote (config.yaml, checkpoints/, summary.json)",
            fix="pass the run directory that `plugformer train` printed",
        )
    path = Path(checkpoint) if checkpoint not in ("best", "last") else directory / "checkpoints" / f"{checkpoint}.ckpt"
    if checkpoint == "best" and not path.exists():
        path = directory / "checkpoints" / "last.ckpt"
    if not path.exists():
        raise ConfigError(
            f"{directory} has no checkpoint {path.name}.",
            expected="checkpoints/best.ckpt or checkpoints/last.ckpt",
            fix="pick one with checkpoint='last' or a path, or train the run further",
        )
    cfg = OmegaConf.load(config_file)
    assert isinstance(cfg, DictConfig)
    plugins = plugins or _session_plugins()
    built = build(cfg, plugins=plugins, run_dir=directory, chosen=choose_components(cfg, plugins.registry))
    if is_sharded_checkpoint(path):  # trainer=fsdp's sharded checkpoint: a directory
        state = load_model_state(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    weights = {name.removeprefix("model."): value for name, value in state.items() if name.startswith("model.")}
    built.model.load_state_dict(weights)
    summary_file = directory / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    return LoadedRun(
        run_dir=directory, cfg=cfg, model=built.model.eval(), data=built.data, summary=summary, checkpoint=path, hooks=built.hooks
    )


_PLUGINS: Plugins | None = None


def _session_plugins() -> Plugins:
    """The installed plugins, loaded once per process."""
    global _PLUGINS
    if _PLUGINS is None:
        from plugformer.plugins import load_plugins

        _PLUGINS = load_plugins()
    return _PLUGINS
