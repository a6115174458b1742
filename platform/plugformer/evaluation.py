"""``plugformer eval``: score a finished run on any split or data, lengths included.

The run's model (its best or last checkpoint) is evaluated by the same Lightning
validation loop that training uses, so ``eval/loss`` on the training's validation split
equals that checkpoint's ``val/loss``. Data overrides (``data.block_size=256``,
``data.validation_files=[held_out.txt]``) build a new data task that reads tokens exactly
as training did (the tokenizer saved in the run directory). Results are added to
``eval.json`` beside ``summary.json`` (one entry per split, checkpoint and overrides) and,
for a run tracked in W&B, logged to the same W&B run as ``eval/*``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from plugformer.errors import CapabilityError, ConfigError

EVAL_FILE = "eval.json"
SPLITS = ("train", "validation", "test")


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within the block, Lightning's start-up notes (accelerators, tips, batch limits) and
    the datasets progress bars are silenced: they say nothing about an evaluation; warnings
    stay. On exit the Lightning logger levels, the warnings filters and the datasets
    progress-bar switch are as they were, so a later ``train()`` in the same process still
    writes Lightning's notices to train.log."""
    import datasets

    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning")]
    levels = [logger.level for logger in loggers]
    bars_were_disabled = datasets.are_progress_bars_disabled()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        if not bars_were_disabled:
            datasets.disable_progress_bars()
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)
            if not bars_were_disabled and datasets.are_progress_bars_disabled():
                datasets.enable_progress_bars()


@quiet_libraries()
def evaluate(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    *,
    split: str = "validation",
    checkpoint: str = "best",
    limit_batches: int | None = None,
    allow_untrained_positions: bool = False,
    track: bool = True,
) -> dict[str, Any]:
    """Evaluate the run in ``run_dir`` on ``split`` of its data task with ``overrides``
    (``data.<option>=<value>``); returns the entry written to ``eval.json``: the metrics
    (``loss``, ``perplexity`` and the objective's), the evaluated and trained lengths, the
    number of batches and the time taken. ``track``: also log to the run's W&B run. Library
    noise is quiet while it runs (:func:`quiet_libraries`)."""
    import lightning.pytorch as pl

    from plugformer.api import load_run
    from plugformer.plugins import call_hook
    from plugformer.training.module import TrainingModule

    if split not in SPLITS:
        raise ConfigError(f"Unknown split {split!r}.", expected=f"one of {', '.join(SPLITS)}", fix="pass --split validation")
    data_overrides, plugin_options = split_overrides(overrides)
    run = load_run(run_dir, checkpoint=checkpoint)
    for namespace in plugin_options:
        if namespace in run.cfg:  # the run's own settings (model.*, optim.*) are not eval options
            _with_overrides(run.cfg, [o for o in overrides if o.split(".", 1)[0].lstrip("+~") == namespace])
    cfg = _with_overrides(run.cfg, data_overrides)
    data = _evaluation_data(run, cfg, data_overrides)
    _check_lengths(run, cfg, data.max_length, allow_untrained_positions)
    loaders = {"train": data.train_dataloader, "validation": data.val_dataloader, "test": data.test_dataloader}
    plugin_metrics = _plugin_metrics(run, plugin_options, lambda: loaders[split](), split, limit_batches)
    loader = loaders[split]()
    module = TrainingModule(run.model, cfg.optim, run.hooks, carry_state=bool(getattr(data, "streams", False)))
    callbacks = [c for _, contributed in call_hook(run.hooks, "lightning_callbacks", expect=list, cfg=cfg) for c in contributed]
    trainer = pl.Trainer(
        accelerator="auto", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=limit_batches or 1.0,
        default_root_dir=str(run.run_dir),
    )
    started = time.perf_counter()
    trainer.validate(module, dataloaders=loader, verbose=False)
    seconds = time.perf_counter() - started
    metrics = {name.split("/", 1)[1]: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("val/")}
    if "loss" in metrics:
        metrics["perplexity"] = math.exp(min(metrics["loss"], 700.0))
    metrics.update(plugin_metrics)
    entry = {
        "split": split,
        "checkpoint": run.checkpoint.name,
        "overrides": list(overrides),
        "metrics": dict(sorted(metrics.items())),
        "max_length": int(data.max_length),
        "trained_max_length": int(run.data.max_length),
        "batches": int(trainer.num_val_batches[0]) if trainer.num_val_batches else 0,
        "seconds": round(seconds, 3),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    count = record_evaluation(run.run_dir, entry)
    if track and "wandb" in (run.cfg.get("logger") or {}):
        from plugformer.training.tracking import log_evaluation

        log_evaluation(run.cfg, run.run_dir, entry, step=int(run.summary.get("global_step", 0)) + count)
    return entry


def split_overrides(overrides: Sequence[str]) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """``data.*`` overrides, and the options of every other namespace (``knn_lm.k=8`` →
    {"knn_lm": {"k": 8}}, values typed as on the Hydra command line) for the plugins'
    ``evaluation_metrics`` hook."""
    data = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").startswith("data.")]
    others = [o for o in overrides if o not in data]
    for override in others:
        key = override.split("=", 1)[0]
        if "=" not in override or "." not in key or key.startswith(("+", "~")):
            raise ConfigError(
                f"plugformer eval takes data overrides and plugin options, not {override!r}.",
                expected="data.<option>=<value> (data.block_size=256) or <plugin namespace>.<option>=<value> (knn_lm.k=8)",
                fix="the model and objective come from the run; change only how the data is read, or pass a plugin's options",
            )
    parsed = OmegaConf.to_container(OmegaConf.from_dotlist(others)) if others else {}
    return data, {str(name): dict(options) for name, options in parsed.items()}  # type: ignore[union-attr]


def _plugin_metrics(
    run: Any, options: dict[str, dict[str, Any]], make_loader: Any, split: str, limit_batches: int | None
) -> dict[str, float]:
    """The ``evaluation_metrics`` of the plugin owning each namespace, as ``<namespace>/<name>``."""
    import itertools

    from plugformer.plugins import call_hook

    metrics: dict[str, float] = {}
    for namespace, values in options.items():
        loader = make_loader()
        if limit_batches:
            loader = list(itertools.islice(loader, limit_batches))
        answers = call_hook(
            run.hooks, "evaluation_metrics", expect=dict, namespace=namespace, options=values, run=run, loader=loader, split=split
        )
        if not answers:
            raise ConfigError(
                f"plugformer eval takes data overrides only, and no installed plugin takes the evaluation options {namespace}.*.",
                expected="data.<option>=<value>, or options of a plugin that implements evaluation_metrics (knn_lm.*)",
                fix=f"check the spelling of {namespace!r}, or install the plugin that provides it",
            )
        for _, contributed in answers:
            metrics.update({f"{namespace}/{name}": float(value) for name, value in contributed.items()})
    return metrics


def data_with_overrides(run: Any, overrides: Sequence[str], *, allow_untrained_positions: bool = False) -> Any:
    """The data task of a loaded run with ``data.*`` ``overrides`` applied (the run's own task
    when there are none), reading tokens as training did, its lengths checked against the
    model as ``plugformer eval`` checks them; for plugins that score or index a run's data."""
    cfg = _with_overrides(run.cfg, overrides)
    data = _evaluation_data(run, cfg, overrides)
    _check_lengths(run, cfg, data.max_length, allow_untrained_positions)
    return data


def _with_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "=" not in override or not key.startswith("data."):
            raise ConfigError(
                f"plugformer eval takes data overrides only (and plugins' evaluation options), not {override!r}.",
                expected="data.<option>=<value>, e.g. data.block_size=256 or data.validation_files=[held_out.txt]",
                fix="the model and objective come from the run; change only how the data is read",
            )
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))  # type: ignore[return-value]


def _evaluation_data(run: Any, cfg: DictConfig, overrides: Sequence[str]) -> Any:
    """The run's data task, or (with overrides) a new one reading tokens as training did."""
    if not overrides:
        return run.data
    from plugformer.api import _session_plugins
    from plugformer.components import DataContext
    from plugformer.model.builder import choose_components

    chosen = choose_components(cfg, _session_plugins().registry)["data"]
    data = chosen.component.factory(chosen.config, DataContext(cache_dir=Path(cfg.paths.cache_dir), seed=cfg.seed, run_dir=run.run_dir))
    data.prepare()
    if data.vocab_size != run.data.vocab_size:
        raise ConfigError(
            f"With these overrides the data has a vocabulary of {data.vocab_size}, the run was trained on {run.data.vocab_size}.",
            expected="data read with the run's vocabulary",
            fix="keep the options that define the vocabulary (tokenizer, vocab_size) as they were in training",
        )
    return data


def _check_lengths(run: Any, cfg: DictConfig, length: int, allow_untrained_positions: bool) -> None:
    """Refuse lengths a component cannot handle; refuse lengths beyond training for a
    position encoding with per-position parameters (they were never trained there)."""
    from plugformer.api import _session_plugins
    from plugformer.compatibility import check_length
    from plugformer.model.builder import check_components, choose_components

    registry = _session_plugins().registry
    chosen = choose_components(cfg, registry)
    plan = check_components(cfg, chosen, registry)
    trained = int(run.data.max_length)
    position = chosen["position"]
    if length > trained and "length_extrapolation" not in position.provides() and not allow_untrained_positions:
        raise CapabilityError(
            f"position {position.name!r} has parameters per position and was trained on sequences of at most "
            f"{trained}; positions {trained}..{length - 1} of this evaluation were never trained.",
            expected=f"an evaluation length of at most {trained}, or a position encoding that provides length_extrapolation "
            "(alibi, rope, sinusoidal, t5, shaw, none)",
            fix=f"evaluate at data lengths <= {trained}, or pass --allow-untrained-positions to score them anyway",
        )
    for layer in plan.layers():
        try:
            check_length({**layer.slots(), "position": chosen["position"]}, length)
        except CapabilityError as error:  # the model was built with this limit: only the data can change
            raise CapabilityError(
                f"{error.what} The run's model was built with that limit (a learned position table has as many "
                "rows as the training data's longest sequence, unless model.position.max_length was set).",
                expected="evaluation lengths within the model's limit",
                fix="evaluate at shorter data lengths; to score longer ones, train with a larger "
                "model.position.max_length or a position encoding without a maximum (rope, alibi)",
            ) from None


def record_evaluation(run_dir: Path, entry: dict[str, Any]) -> int:
    """Add ``entry`` to ``run_dir/eval.json``, replacing an earlier one with the same split,
    checkpoint and overrides; written atomically. Returns how many evaluations the run has
    had, this one included (``evaluations_done`` in the file)."""
    path = Path(run_dir) / EVAL_FILE
    recorded = json.loads(path.read_text()) if path.is_file() else {}
    entries, done = recorded.get("evaluations", []), int(recorded.get("evaluations_done", 0)) + 1
    same = lambda e: (e["split"], e["checkpoint"], e["overrides"]) == (entry["split"], entry["checkpoint"], entry["overrides"])
    entries = [e for e in entries if not same(e)] + [entry]
    staging = path.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps({"evaluations_done": done, "evaluations": entries}, indent=2) + "\n")
    os.replace(staging, path)
    return done


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Every combination of the comma-separated (or Hydra range/choice) values in
    ``overrides``, as in ``plugformer train -m``."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    axes = []
    for override in parsed:
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.get_value_element_as_str()]
        axes.append([f"{key}={value}" for value in values])
    return [list(combination) for combination in itertools.product(*axes)]


def format_entry(run_dir: Path, entry: dict[str, Any]) -> str:
    shown = ", ".join(f"{name} {value:.4g}" for name, value in entry["metrics"].items())
    where = " ".join(entry["overrides"]) or "as trained"
    return (
        f"{run_dir} [{where}] {entry['split']} (length {entry['max_length']}, trained {entry['trained_max_length']}): "
        f"{shown} ({entry['batches']} batches, {entry['seconds']:.1f} s)"
    )


def eval_command(run_dirs: Sequence[str], overrides: Sequence[str], *, sweep: bool, split: str, checkpoint: str, limit_batches: int | None, allow_untrained_positions: bool) -> int:
    """``plugformer eval``: each run directory under each combination of overrides."""
    if not run_dirs:
        raise ConfigError("No run directory given.", expected="plugformer eval RUN_DIR [data.OPTION=VALUE ...]", fix="name a run directory")
    combinations = expand_sweep(overrides)
    if len(combinations) > 1 and not sweep:
        raise ConfigError(
            f"The overrides {' '.join(overrides)} name several values; that is a sweep.",
            expected="one value per option, or -m to evaluate every combination",
            fix="add -m (plugformer eval RUN_DIR -m data.block_size=128,256)",
        )
    from plugformer.errors import PlugformerError, report_user_error

    failed = 0
    for run_dir in run_dirs:
        for combination in combinations:
            try:
                entry = evaluate(
                    run_dir, combination, split=split, checkpoint=checkpoint, limit_batches=limit_batches,
                    allow_untrained_positions=allow_untrained_positions,
                )
            except PlugformerError as error:
                if len(run_dirs) * len(combinations) == 1:
                    raise
                failed += 1  # one refused evaluation does not stop a sweep
                print(f"{run_dir} [{' '.join(combination)}]: refused", flush=True)
                report_user_error(error)
                continue
            print(format_entry(Path(run_dir), entry), flush=True)
    return 1 if failed else 0
