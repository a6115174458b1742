"""What ``plugformer train`` shows the user, and where library output goes instead.

The console gets one header before training (:func:`header`), a progress bar with the
objective's main metric and the loss (:class:`RichMetricsBar`, :class:`TQDMMetricsBar`) and
one closing block (:func:`closing_block`), all printed by rank 0 only. Library output goes
to the run's ``train.log`` instead (:mod:`plugformer.training.library_output`).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

if TYPE_CHECKING:
    import lightning.pytorch as pl


# --- the objective's main metric --------------------------------------------------------

def main_metric(objective: Any) -> tuple[str, str]:
    """The objective's main metric as ``(val/<name>, mode)``: its ``main_metric`` attribute
    (a name from its metrics, or "loss") and ``main_metric_mode`` ("max" or "min"; by
    default "min" for loss and perplexity, "max" for anything else). Objectives that declare
    none: ``val/loss``, lower is better."""
    name = str(getattr(objective, "main_metric", None) or "loss")
    name = name.split("/", 1)[1] if name.startswith(("val/", "train/", "test/")) else name
    mode = getattr(objective, "main_metric_mode", None) or ("min" if name in ("loss", "perplexity") else "max")
    return f"val/{name}", str(mode)


def _objective(module: Any) -> Any:
    return getattr(getattr(module, "model", None), "objective", None)


def bar_metrics(trainer: pl.Trainer, module: Any) -> dict[str, float]:
    """What the progress bar shows: ``train/loss``, ``val/loss`` and the objective's main
    metric, as numbers (no ``v_num``)."""
    metric, _ = main_metric(_objective(module))
    shown: dict[str, float] = {}
    for name in ("train/loss", "val/loss", metric):
        value = trainer.callback_metrics.get(name)
        if value is not None and name not in shown:
            shown[name] = float(value.item() if hasattr(value, "item") else value)
    return shown


class _ShownMetrics:
    """What both progress bars share: they show :func:`bar_metrics`, and they redraw the
    training bar at most every ``update_interval_s`` seconds instead of after every step.

    Metrics are read again only every ``log_every_n_steps`` training steps and outside
    training: reading a loss on the GPU waits for the device, which the training step otherwise
    avoids. Formatting the metrics and updating the bar after every step was the largest
    per-step cost of the default logging (BENCHMARKS.md, "Platform overhead per step"), so a
    training batch's end updates the bar only when ``update_interval_s`` has passed since the
    last update, and always at the first batch, the last batch of an epoch and the run's last
    step; a skipped update is caught up before validation and at the end of an epoch or of
    training, so the bar always ends showing the exact final count and metrics.

    A mixin: ``class Bar(_ShownMetrics, LightningProgressBar)``."""

    update_interval_s: float = 0.5

    def __init__(self, *args: Any, update_interval_s: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if update_interval_s is not None:
            self.update_interval_s = float(update_interval_s)
        self._shown: dict[str, float] = {}
        self._shown_step = -1
        self._last_update: float | None = None  # perf_counter of the last training-bar update
        self._pending: int | None = None  # batch_idx of a training batch end not yet shown

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        step = trainer.global_step
        due = step != self._shown_step and (not self._shown or step % max(1, trainer.log_every_n_steps) == 0)
        if due or not trainer.training:
            self._shown, self._shown_step = bar_metrics(trainer, pl_module), step
        return self._shown  # type: ignore[return-value]

    def _update_due(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        if self._last_update is None or time.perf_counter() - self._last_update >= self.update_interval_s:
            return True
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        return last_step or batch_idx + 1 >= self.total_train_batches

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self._update_due(trainer, batch_idx):
            self._pending = batch_idx
            return
        self._pending = None
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)  # type: ignore[misc]
        self._last_update = time.perf_counter()

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Show the last training batch end that was skipped (Lightning's bars read neither
        its outputs nor its batch)."""
        if self._pending is not None:
            batch_idx, self._pending = self._pending, None
            super().on_train_batch_end(trainer, pl_module, None, None, batch_idx)  # type: ignore[misc]
            self._last_update = time.perf_counter()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        super().on_validation_start(trainer, pl_module)  # type: ignore[misc]

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        super().on_train_epoch_end(trainer, pl_module)  # type: ignore[misc]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)
        super().on_train_end(trainer, pl_module)  # type: ignore[misc]


class RichMetricsBar(_ShownMetrics, RichProgressBar):
    """Lightning's rich progress bar showing :func:`bar_metrics`, drawn at most
    ``refresh_rate`` times a second (Lightning's default, 100, redraws a terminal after
    nearly every step of a small model; rich's own default is 10)."""

    def __init__(self, *args: Any, refresh_rate: int = 10, **kwargs: Any) -> None:
        super().__init__(*args, refresh_rate=refresh_rate, **kwargs)

    def _get_train_description(self, current_epoch: int) -> str:
        # Lightning writes "Epoch 0/-2" when max_epochs is -1 (runs bounded by max_steps).
        epochs = self.trainer.max_epochs
        text = f"Epoch {current_epoch}" + (f"/{epochs - 1}" if epochs is not None and epochs > 0 else "")
        return f"{text:{len(self.validation_description)}}" if len(self.validation_description) > len(text) else text


class TQDMMetricsBar(_ShownMetrics, TQDMProgressBar):
    """Lightning's tqdm progress bar showing :func:`bar_metrics`."""


# --- the header -------------------------------------------------------------------------

def _rows(rows: list[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    lines = []
    for label, text in rows:
        first, *rest = text.splitlines() or [""]
        lines.append(f"  {label:<{width}}  {first}")
        lines.extend(f"  {'':<{width}}  {line}" for line in rest)
    return "\n".join(lines)


def layer_lines(plan: dict[str, list[dict[str, str]]]) -> list[str]:
    """The layer plan, one line per run of identical consecutive layers:
    ``decoder 0-11  attention=full ffn=mlp block=standard``."""
    lines = []
    for stack, layers in plan.items():
        start = 0
        for index in range(1, len(layers) + 1):
            if index == len(layers) or layers[index] != layers[start]:
                span = f"{start}" if index - 1 == start else f"{start}-{index - 1}"
                lines.append(f"{stack} {span:<5} " + " ".join(f"{slot}={name}" for slot, name in layers[start].items()))
                start = index
    return lines


def data_sizes(data: Any) -> str:
    """Examples per split, the longest sequence and the batch size of a data task."""
    name = getattr(data, "name", type(data).__name__)
    splits = getattr(data, "splits", None)
    parts = []
    if splits is not None:
        try:
            parts.append(", ".join(f"{split} {splits[split].num_rows:,}" for split in splits) + " examples")
        except (AttributeError, KeyError, TypeError):
            pass
    if getattr(data, "max_length", None):
        parts.append(f"sequences up to {data.max_length} tokens")
    if getattr(data, "batch_size", None):
        parts.append(f"batch size {data.batch_size}")
    return f"{name}: " + "; ".join(parts) if parts else str(name)


def wandb_facts(loggers: list[Any]) -> dict[str, Any]:
    """The W&B run of these loggers: mode (offline, online, disabled), project, group,
    local folder and URL; mode "disabled" when no W&B logger is used."""
    from plugformer.training.tracking import is_wandb, wandb_run_dir

    for logger in loggers:
        if not is_wandb(logger):
            continue
        run = logger.experiment
        if getattr(run, "disabled", False) or type(run).__name__ == "RunDisabled":
            return {"mode": "disabled"}
        offline = bool(getattr(getattr(run, "settings", None), "_offline", False) or getattr(run, "offline", False))
        folder = wandb_run_dir([logger])
        return {
            "mode": "offline" if offline else "online",
            "project": getattr(run, "project", None),
            "group": getattr(run, "group", None),
            "dir": str(folder) if folder else None,
            "url": None if offline else getattr(run, "url", None),
        }
    return {"mode": "disabled"}


def wandb_from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """What :func:`wandb_facts` says, from a summary alone (a run that failed before its
    header): the local folder, offline or online by its name."""
    folder = summary.get("wandb_dir")
    if not folder:
        return {"mode": "disabled"}
    return {"mode": "offline" if Path(folder).name.startswith("offline-run-") else "online", "dir": folder}


def _wandb_text(facts: dict[str, Any]) -> str:
    if facts["mode"] == "disabled":
        return "disabled (logger=wandb to track the run)"
    text = f"{facts['mode']}, project {facts.get('project')}, group {facts.get('group')}"
    where = facts.get("url") or facts.get("dir")
    return f"{text}\n{where}" if where else text


def device_text(trainer: pl.Trainer, threads: str) -> str:
    accelerator = type(trainer.accelerator).__name__.replace("Accelerator", "").lower() or "?"
    strategy = type(trainer.strategy).__name__.replace("Strategy", "")
    processes = trainer.world_size
    nodes = f" on {trainer.num_nodes} nodes" if trainer.num_nodes > 1 else ""
    return (
        f"{accelerator} x{trainer.num_devices}{nodes}, strategy {strategy} ({processes} process{'es' if processes > 1 else ''}), "
        f"precision {trainer.precision}\n{threads}"
    )


def _schedule(trainer: pl.Trainer) -> str:
    steps = f"{trainer.max_steps} steps" if trainer.max_steps and trainer.max_steps > 0 else f"{trainer.max_epochs} epochs"
    interval = trainer.val_check_interval
    if isinstance(interval, int) or (isinstance(interval, float) and interval > 1):
        every = f"validation every {int(interval)} steps"
    else:
        every = "validation every epoch" if interval == 1.0 else f"validation every {interval:g} epoch"
    return f"{steps}, {every} and at the end"


def header(
    *, experiment: str | None, run_dir: Path, components: dict[str, str], plan: dict[str, list[dict[str, str]]],
    params: int | None, data: Any, trainer: pl.Trainer, wandb: dict[str, Any], threads: str, memory: str,
    main: tuple[str, str], resumed_from: int | None = None, log_file: Path | None = None,
) -> str:
    """The block printed once before training: what is trained, on what data, where it is
    recorded and on which devices."""
    verb = f"resuming from step {resumed_from}" if resumed_from is not None else "training from scratch"
    kinds = " ".join(f"{kind}={name}" for kind, name in components.items() if kind not in ("objective", "data"))
    rows = [
        ("model", f"{kinds}\n" + "\n".join(layer_lines(plan))),
        ("objective", f"{components.get('objective')} (main metric {main[0]}, {'higher' if main[1] == 'max' else 'lower'} is better)"),
        ("parameters", f"{params:,}" if params is not None else "?"),
        ("data", data_sizes(data)),
        ("schedule", _schedule(trainer)),
        ("device", device_text(trainer, threads)),
        ("memory", memory.removeprefix("memory ")),
        ("run dir", str(run_dir) + (f"  (library messages: {log_file.name})" if log_file else "")),
        ("W&B", _wandb_text(wandb)),
    ]
    return f"plugformer: run {experiment or ''}, {verb}" + "\n" + _rows(rows)


# --- the closing block ------------------------------------------------------------------

def _number(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.4g}"


def best_of(history: list[dict[str, float]], metric: str, mode: str) -> tuple[float, int] | None:
    """The best finite value of ``metric`` over the validations in ``history``, with its step."""
    values = [(row[metric], int(row.get("step", 0))) for row in history if metric in row and math.isfinite(row[metric])]
    if not values:
        return None
    return (max if mode == "max" else min)(values, key=lambda pair: pair[0])


def wandb_view_command() -> str:
    """``wandb leet`` (W&B's terminal viewer of local runs) when the installed wandb has
    it, else ``wandb sync`` (upload the run, then look at it in the browser)."""
    try:
        from wandb.cli import cli as wandb_cli

        return "wandb leet" if "leet" in getattr(wandb_cli.cli, "commands", {}) else "wandb sync"
    except Exception:  # noqa: BLE001 - an old or broken wandb CLI: name the command every version has
        return "wandb sync"


def closing_block(
    summary: dict[str, Any], *, summary_path: Path, main: tuple[str, str], history: list[dict[str, float]],
    monitor: str | None, checkpoints: dict[str, str], wandb: dict[str, Any],
) -> str:
    """The block printed once when a run ends, finished or failed: final and best metrics
    (best with its step: the objective's main metric over the validation ``history``, and
    the checkpoint ``monitor``'s best from the summary), wall time, tokens/s, where the
    checkpoints, summary and W&B run are, and the commands to look at them."""
    status = summary.get("status", "failed")
    first = f"plugformer: run {status} after {summary.get('wall_time_s', 0):.1f}s at step {summary.get('global_step', 0)}"
    if summary.get("tokens_per_second"):
        first += f", {summary['tokens_per_second']:,.0f} tokens/s while training"
    rows: list[tuple[str, str]] = []
    if summary.get("error"):
        rows.append(("error", str(summary["error"]).strip().splitlines()[0][:500]))
    metrics = summary.get("metrics") or {}
    final = [name for name in dict.fromkeys((main[0], "val/loss", "train/loss")) if name in metrics]
    final += sorted(name for name in metrics if name.startswith(("val/", "test/")) and name not in final)
    # total_loss is worth showing only when extra terms (MoE balance, distillation) make it differ.
    final = [n for n in final if not (n.endswith("/total_loss") and metrics[n] == metrics.get(n.replace("total_loss", "loss")))]
    if final:
        rows.append(("final", "  ".join(f"{name}={_number(metrics[name])}" for name in final)))
    bests = []
    best_main = best_of(history, *main)
    if best_main is not None:
        bests.append(f"{main[0]}={_number(best_main[0])} at step {best_main[1]}")
    saved = summary.get("best") or {}
    if monitor and monitor != main[0] and saved.get(monitor) is not None:
        bests.append(f"{monitor}={_number(saved[monitor])} at step {int(saved.get('step', 0))} (the checkpoint's monitor)")
    if bests:
        rows.append(("best", "\n".join(bests)))
    rows.extend(checkpoints.items())
    rows.append(("summary", str(summary_path)))
    if wandb.get("mode") not in (None, "disabled"):
        rows.append(("W&B", wandb.get("url") or f"{wandb['mode']} run {wandb.get('dir')}"))
    look = []
    if wandb.get("mode") == "offline" and wandb.get("dir"):
        view = wandb_view_command()
        look.append(f"{view} {wandb['dir']}")
        if view != "wandb sync":
            look.append(f"wandb sync {wandb['dir']}   (uploads it to W&B)")
    if status == "finished":
        look.append(f"plugformer compare {summary.get('run_dir')}")
    if look:
        rows.append(("look with", "\n".join(look)))
    return first + "\n" + _rows(rows)


def checkpoint_paths(trainer: Any) -> dict[str, str]:
    """The best and last checkpoints of a run that exist (files, or directories: sharded)."""
    found: dict[str, str] = {}
    for callback in getattr(trainer, "checkpoint_callbacks", None) or []:
        best = getattr(callback, "best_model_path", "")
        last = getattr(callback, "last_model_path", "")
        if best and Path(best).exists():
            found.setdefault("checkpoint", best)
        if last and Path(last).exists():
            found.setdefault("last ckpt", last)
    return found

