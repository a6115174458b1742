"""Reading and writing model directories: ``plugformer import-hf`` and ``plugformer export-hf``.

An imported run directory holds what ``plugformer train`` would have written for the same
model, minus the training: ``config.yaml`` (composed from ``experiment=plain`` and the
architecture's overrides), ``checkpoints/last.ckpt`` (the weights under ``state_dict`` with
the ``model.`` prefix and ``global_step`` 0, as Lightning saves them), the data task's
tokenizer, and ``hf_source.json`` (the HF config it came from). ``generate``, ``eval`` and
``load_run`` read it like any other run; it holds no optimizer or loop state, so ``resume=``
cannot continue from it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from plugformer.errors import ConfigError
from plugformer.hf._common import unsupported

SOURCE_FILE = "hf_source.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


def _safetensors() -> ModuleType:
    try:
        import safetensors.torch
    except ImportError:
        raise ConfigError(
            "Reading or writing Hugging Face model folders needs the safetensors package, which is not installed.",
            expected="plugformer's hf extra", fix="pip install 'plugformer[hf]' (or pip install safetensors)",
        ) from None
    return safetensors.torch


def _architectures() -> dict[str, ModuleType]:
    from plugformer.hf import gpt2, llama

    return {gpt2.MODEL_TYPE: gpt2, llama.MODEL_TYPE: llama}


def read_hf_config(model_dir: Path) -> tuple[dict[str, Any], ModuleType]:
    """config.json of ``model_dir`` and the converter module of its architecture."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(
            f"{model_dir} has no config.json.",
            expected="a local Hugging Face model directory (config.json and model.safetensors or pytorch_model.bin)",
            fix="pass the folder that save_pretrained() wrote (downloads are not made)",
        )
    config = json.loads(config_file.read_text())
    converters = _architectures()
    model_type = config.get("model_type")
    if model_type not in converters:
        raise unsupported(
            f"{model_dir}/config.json describes model_type={model_type!r} ({config.get('architectures')}).",
            expected=f"one of {sorted(converters)} (GPT2LMHeadModel, LlamaForCausalLM)",
            fix="convert a GPT-2 or Llama model; other architectures need a converter in plugformer/hf/",
        )
    return config, converters[model_type]


def read_hf_weights(model_dir: Path) -> dict[str, Any]:
    """The state dict of ``model_dir`` (sharded safetensors included), in float32."""
    import torch

    files = sorted(model_dir.glob("model*.safetensors"))
    if files:
        load_file = _safetensors().load_file
        state = {name: tensor for path in files for name, tensor in load_file(str(path)).items()}
    elif (model_dir / "pytorch_model.bin").is_file():
        state = torch.load(model_dir / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise ConfigError(
            f"{model_dir} has no weights.",
            expected=f"one of {', '.join(WEIGHT_FILES)} (or model-0000x-of-0000n.safetensors shards)",
            fix="save the model with save_pretrained() into that folder",
        )
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state.items()}


def data_overrides(model_dir: Path, user: Sequence[str], max_length: int | None) -> list[str]:
    """The data task of an imported run: text read with the model's own tokenizer when the
    folder has one, else bytes (ids 0..259); blocks no longer than the model's positions."""
    chosen = {o.split("=", 1)[0].lstrip("+~") for o in user}
    found: list[str] = []
    if not any(key == "data" or key.startswith("data/") for key in chosen):
        found.append("data=text")
    if "data.tokenizer" not in chosen:
        if any((model_dir / name).is_file() for name in _TOKENIZER_FILES):
            found += ["data.tokenizer=pretrained", f"data.tokenizer_path={model_dir}"]
        else:
            found.append("data.tokenizer=byte")
        found.append("data.sentinel_tokens=0")
    if max_length is not None and "data.block_size" not in chosen:
        found.append(f"data.block_size={min(128, max_length)}")
    return found


def import_hf(model_dir: str | Path, overrides: Sequence[str] = (), *, run_dir: str | Path | None = None) -> Path:
    """Convert the HF model in ``model_dir`` into a plugformer run directory (``run_dir``,
    default ``runs/hf/<folder name>``); ``overrides`` may choose the data task and its
    options (``data.train_files=[...]``). Returns the run directory."""
    import torch
    from omegaconf import OmegaConf, open_dict

    from plugformer.api import build, compose

    source = Path(model_dir).expanduser().resolve()
    config, converter = read_hf_config(source)
    architecture = converter.overrides(config)
    hf_state = read_hf_weights(source)
    vocab = int(config["vocab_size"])
    max_length = config.get("n_positions") if converter.MODEL_TYPE == "gpt2" else None
    directory = Path(run_dir or Path("runs") / "hf" / source.name).expanduser().resolve()
    if (directory / "checkpoints").exists():
        raise ConfigError(
            f"{directory} already holds a run (checkpoints/).",
            expected="a new or empty run directory", fix="pass another run_dir=<path>, or remove that folder",
        )
    cfg = compose([
        "experiment=plain", *architecture, f"model.vocab_size={vocab}", "experiment_name=hf_import",
        *data_overrides(source, overrides, max_length), *overrides, f"run_dir={directory}",
    ])
    built = build(cfg, run_dir=directory)
    state = converter.to_plugformer(hf_state, config)
    _load_exactly(built.model, state, source)
    with open_dict(cfg):
        cfg.run_dir = str(directory)
    (directory / "checkpoints").mkdir(parents=True, exist_ok=True)
    (directory / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    components = {slot: chosen.name for slot, chosen in built.chosen.items()}
    checkpoint = {
        "state_dict": {f"model.{name}": value for name, value in built.model.state_dict().items()},
        "global_step": 0, "epoch": 0, "plugformer": {"components": components},
    }
    from plugformer.training.checkpointing import replace_atomically

    replace_atomically(directory / "checkpoints" / "last.ckpt", lambda handle: torch.save(checkpoint, handle))
    (directory / SOURCE_FILE).write_text(json.dumps({"model_dir": str(source), "config": config}, indent=2) + "\n")
    return directory


def _load_exactly(model: Any, state: dict[str, Any], source: Path) -> None:
    """Copy ``state`` into ``model``; every parameter must be covered with its shape."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [f"{name} {tuple(state[name].shape)} vs {tuple(expected[name].shape)}" for name in state if name in expected and state[name].shape != expected[name].shape]
    if missing or wrong or set(state) - set(expected):
        raise unsupported(
            f"The weights of {source} do not fit the plugformer model built from its config: "
            f"missing {missing[:4]}, unexpected {sorted(set(state) - set(expected))[:4]}, shapes {wrong[:4]}.",
            expected="a checkpoint whose tensors match its config.json",
            fix="check that config.json belongs to these weights (and the data's vocabulary fits model.vocab_size)",
        )
    model.load_state_dict(state)


def export_hf(run_dir: str | Path, out_dir: str | Path, *, checkpoint: str = "best") -> Path:
    """Write ``config.json`` and ``model.safetensors`` for the run in ``run_dir`` into
    ``out_dir``, loadable by ``transformers.AutoModelForCausalLM.from_pretrained``."""
    from plugformer.api import load_run

    save_file = _safetensors().save_file

    run = load_run(run_dir, checkpoint=checkpoint)
    converter = _run_architecture(run.cfg)
    state = {name: tensor.detach().cpu() for name, tensor in run.model.state_dict().items()}
    source_file = run.run_dir / SOURCE_FILE
    source = json.loads(source_file.read_text())["config"] if source_file.is_file() else {}
    max_length = int(source.get("max_position_embeddings") or run.data.max_length)
    hf_config = converter.hf_config(run.cfg, state, max_length)
    # Own storage per tensor: safetensors refuses views that share memory (k/v halves).
    hf_state = {name: tensor.clone().contiguous() for name, tensor in converter.from_plugformer(state, run.cfg).items()}
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps({**hf_config, "torch_dtype": "float32"}, indent=2) + "\n")
    return out


def _run_architecture(cfg: Any) -> ModuleType:
    """The converter whose architecture the run's components form, or an error naming what differs."""
    from omegaconf import OmegaConf

    names = {slot: OmegaConf.select(cfg, f"model.{slot}.name") for slot in ("attention", "position", "norm", "ffn", "block")}
    names["objective"] = OmegaConf.select(cfg, "objective.name")
    shapes = {
        "gpt2": {"attention": "full", "position": "learned", "norm": "layernorm", "ffn": "mlp", "block": "standard", "objective": "causal_lm"},
        "llama": {"attention": "full", "position": "rope", "norm": "rmsnorm", "ffn": "glu", "block": "standard", "objective": "causal_lm"},
    }
    plan = OmegaConf.to_container(cfg.model.get("plan") or {}, resolve=True)
    if any(plan.get(key) for key in ("attention", "ffn", "block", "cross_attention", "layers")):
        raise unsupported(
            "The run has a layer plan (model.plan); Hugging Face GPT-2 and Llama have identical layers.",
            expected="the same components in every layer", fix="export runs without model.plan",
        )
    for model_type, shape in shapes.items():
        if names == shape:
            return _architectures()[model_type]
    differences = {t: {s: names[s] for s in shape if names[s] != shape[s]} for t, shape in shapes.items()}
    raise unsupported(
        f"The run's components {names} form neither GPT-2 nor Llama (differs from GPT-2 in {differences['gpt2']}, "
        f"from Llama in {differences['llama']}).",
        expected=f"GPT-2: {shapes['gpt2']}; Llama: {shapes['llama']}",
        fix="export a run built with one of these component sets",
    )


def import_command(arguments: Sequence[str]) -> int:
    """``plugformer import-hf MODEL_DIR [run_dir=PATH] [data overrides]``."""
    model_dirs = [a for a in arguments if "=" not in a]
    if len(model_dirs) != 1:
        raise ConfigError(
            f"import-hf takes one model directory, got {model_dirs or 'none'}.",
            expected="plugformer import-hf MODEL_DIR [run_dir=PATH] [data.OPTION=VALUE ...]",
            fix="name one local Hugging Face model folder",
        )
    run_dir = next((a.split("=", 1)[1] for a in arguments if a.startswith("run_dir=")), None)
    overrides = [a for a in arguments if "=" in a and not a.startswith("run_dir=")]
    directory = import_hf(model_dirs[0], overrides, run_dir=run_dir)
    print(f"imported {model_dirs[0]} into {directory}\n  try: plugformer generate {directory} --prompt ...", flush=True)
    return 0


def export_command(run_dir: str, out_dir: str, checkpoint: str) -> int:
    """``plugformer export-hf RUN_DIR OUT_DIR``."""
    out = export_hf(run_dir, out_dir, checkpoint=checkpoint)
    print(f"exported {run_dir} to {out} (config.json, model.safetensors)", flush=True)
    return 0
