"""What plugformer's training path costs per step over a hand-written PyTorch loop, and how
much of a step waits for data.

Overhead. The same config is trained three ways, in this one process, for the same steps:

- ``plain``: a PyTorch loop written out here (AdamW, the warm-up schedule, gradient clipping),
  over the model and the training batches that ``plugformer.build(cfg)`` makes, so both sides
  train the identical network on identical batches (the script checks that the losses of the
  first steps agree);
- ``plugformer``: ``plugformer train``'s path (Lightning, real) with the default logging:
  metrics.csv, W&B offline, the rich progress bar, the non-finite guard;
- ``plugformer, logging off``: the same with ``logger=none callbacks.progress_bar=none`` and
  ``trainer.log_every_n_steps`` beyond the last step (metrics.csv stays, but gets no row while
  the steps are timed).

A step's time is the time from one training batch's start to the next one's (after the batch
was fetched, in both loops), so it includes data loading, the optimizer, logging and every
callback; the first ``--warmup`` steps and start-up are excluded, and validation only runs
after the last timed step. A repeat's figure is the mean step time over its timed steps; the
three ways run interleaved, in a rotating order, ``--repeats`` times, so a loaded machine
slows them alike. The table gives the median over repeats with min–max, and the overhead as
the median of each repeat's ratio to the plain loop of the same repeat.

Platform cost in milliseconds. The same three ways on a tiny model (``TINY``), whose own step
is so short that what the training path adds per step stands out: each repeat's CPU time per
step minus the plain loop's, divided by the default model's plain CPU step time, is the
overhead the default model pays, measured more precisely than the difference of two large,
noisy times.

Data wait. ``summary.json``'s ``data_wait_fraction`` (also logged as
``train/data_wait_fraction``) of short runs of the default run and of ``experiment=listops_small``
(padded sequences) with and without length bucketing.

Writes the section "Platform overhead" of BENCHMARKS.md (between HTML comment markers; other
sections are kept). Usage (one thread, as the CLI would choose on a loaded machine):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead.py [--parts model tiny data] [--repeats 7]
        [--steps 60] [--warmup 10] [--tiny-steps 200] [--tiny-warmup 20] [--data-steps 100]
        [--results raw.json] [--no-write] [config overrides...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

from _report import write_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- overhead:start -->", "<!-- overhead:end -->"
TARGET = 0.01
LOSS_CHECK_STEPS = 5

#: How the plugformer variants differ from the default run's config.
LOGGING_OFF = ["logger=none", "callbacks.progress_bar=none"]
PLAIN, DEFAULT, OFF = "plain PyTorch loop", "plugformer (CSV + W&B offline, progress bar)", "plugformer, logging off"
#: A model whose step is so short that the training path's own cost per step stands out.
TINY = ["model.d_model=16", "data.batch_size=4"]
PARTS = ("model", "tiny", "data")


class StepClock:
    """A run-level plugin (the ``lightning_callbacks`` hook, as any plugin would add one) whose
    callback notes the time each training batch starts and the loss of the first steps."""

    def __init__(self) -> None:
        self.starts: list[tuple[float, float]] = []
        self.losses: list[float] = []

    def callback(self) -> Any:
        import lightning.pytorch as pl

        clock = self

        class _Clock(pl.Callback):
            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
                clock.starts.append((time.perf_counter(), time.process_time()))

            def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
                if len(clock.losses) < LOSS_CHECK_STEPS:
                    clock.losses.append(float(outputs["loss"].detach()))

        return _Clock()


def mean_step(starts: list[tuple[float, float]], warmup: int, steps: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds per step over steps ``warmup`` .. ``warmup + steps`` (batch
    start to batch start); CPU: this process's, all its threads."""
    window = starts[warmup : warmup + steps + 1]
    if len(window) < steps + 1:
        raise RuntimeError(f"only {len(starts)} steps were timed, {warmup + steps + 1} needed")
    return (window[-1][0] - window[0][0]) / steps, (window[-1][1] - window[0][1]) / steps


def compose(overrides: list[str]) -> Any:
    import plugformer

    return plugformer.compose(overrides)


def run_plain(overrides: list[str], total_steps: int) -> tuple[list[float], list[float]]:
    """The hand-written loop: batch start times and the first losses."""
    import plugformer
    from plugformer.config import optim_config
    from plugformer.training.optim import build_optimizer

    cfg = compose(overrides)
    built = plugformer.build(cfg)
    model, data = built.model, built.data
    model.train()
    model.objective.metrics_due = False  # a hand-written loop computes the loss only
    optimizer, scheduler = build_optimizer(model, optim_config(cfg), total_steps)
    clip = float(cfg.trainer.gradient_clip_val)
    starts: list[tuple[float, float]] = []
    losses: list[float] = []
    step = 0
    while step < total_steps:
        for batch in data.train_dataloader():
            starts.append((time.perf_counter(), time.process_time()))
            batch = model.objective.prepare_batch(batch)
            loss = model(batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if len(losses) < LOSS_CHECK_STEPS:
                losses.append(float(loss.detach()))
            step += 1
            if step >= total_steps:
                break
    return starts, losses


def run_plugformer(overrides: list[str], run_dir: Path) -> tuple[list[float], list[float], dict[str, Any]]:
    """``plugformer train``'s path in this process: batch start times, first losses, summary."""
    from omegaconf import open_dict

    from plugformer.hookspecs import hookimpl
    from plugformer.plugins import load_plugins
    from plugformer.resume import new_run_id, write_run_id
    from plugformer.training.run import train

    clock = StepClock()

    class ClockPlugin:
        @hookimpl
        def lightning_callbacks(self, cfg: Any) -> list[Any]:
            return [clock.callback()]

    cfg = compose([*overrides, f"run_dir={run_dir}"])
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plugins = load_plugins()
    plugins.manager.register(ClockPlugin(), name="benchmark:step-clock")
    run_id = new_run_id()
    write_run_id(run_dir, run_id)
    summary = train(cfg, plugins, run_dir, run_id=run_id)
    return clock.starts, clock.losses, summary


def quiet() -> Callable[[], None]:
    """Send this process's stdout (progress bars, run headers) to /dev/null; returns the undo."""
    sys.stdout.flush()
    saved = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)

    def restore() -> None:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)

    return restore


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values) * scale)} ({fmt.format(min(values) * scale)}–{fmt.format(max(values) * scale)})"


def measure_overhead(workdir: Path, overrides: list[str], steps: int, warmup: int, repeats: int, tag: str) -> dict[str, Any]:
    """The three ways, interleaved ``repeats`` times: per repeat, mean wall and CPU seconds per step."""
    total = warmup + steps + 1
    base = [*overrides, f"trainer.max_steps={total}", f"trainer.val_check_interval={total}"]
    variants: dict[str, Callable[[int], tuple[list[tuple[float, float]], list[float]]]] = {
        PLAIN: lambda r: run_plain(base, total),
        DEFAULT: lambda r: run_plugformer(base, workdir / f"{tag}-default-{r}")[:2],
        OFF: lambda r: run_plugformer([*base, *LOGGING_OFF, f"trainer.log_every_n_steps={total + 1}"], workdir / f"{tag}-off-{r}")[:2],
    }
    names = list(variants)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    losses: dict[str, list[float]] = {}
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for name in order:
            restore = quiet()
            try:
                starts, first_losses = variants[name](repeat)
            finally:
                restore()
            step_wall, step_cpu = mean_step(starts, warmup, steps)
            wall[name].append(step_wall)
            cpu[name].append(step_cpu)
            losses.setdefault(name, first_losses)
            print(f"  {tag} repeat {repeat + 1}/{repeats} {name}: {1000 * step_wall:.2f} ms/step, {1000 * step_cpu:.2f} CPU ms/step", flush=True)
    return {"wall": wall, "cpu": cpu, "losses": losses, "overrides": overrides, "steps": steps, "warmup": warmup, "repeats": repeats}


def paired(times: dict[str, list[float]], name: str, relative: bool = True) -> list[float]:
    """Each repeat's time of ``name`` against the plain loop's in the same repeat: ratio - 1, or difference."""
    return [t / p - 1 if relative else t - p for t, p in zip(times[name], times[PLAIN])]


def losses_agree(part: dict[str, Any]) -> bool:
    """Whether the first losses of the three ways agree (identical network and batches)."""
    if "losses" not in part:
        return bool(part["losses_agree"])
    reference = part["losses"][PLAIN]
    return all(
        len(losses) == len(reference) and all(abs(a - b) <= 1e-5 * max(1.0, abs(b)) for a, b in zip(losses, reference))
        for losses in part["losses"].values()
    )


def measure_data_wait(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, Any]]:
    steps = args.data_steps
    runs = {
        "default run (MQAR, no padding)": [],
        "listops_small, length bucketing (its default)": ["experiment=listops_small", "data.bucket_by_length=true"],
        "listops_small, no bucketing": ["experiment=listops_small", "data.bucket_by_length=false"],
    }
    results = {}
    for index, (name, overrides) in enumerate(runs.items()):
        run = [*overrides, f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "test_after_fit=false", *LOGGING_OFF]
        restore = quiet()
        try:
            _, _, summary = run_plugformer(run, workdir / f"data-{index}")
        finally:
            restore()
        results[name] = {"fraction": summary["data_wait_fraction"], "tokens_per_second": summary["tokens_per_second"]}
        print(f"  {name}: data wait {summary['data_wait_fraction']:.4f}", flush=True)
    return results


def verdict(ratios: list[float]) -> str:
    """Whether the median of ``ratios`` meets :data:`TARGET`."""
    median = statistics.median(ratios)
    return "met" if median <= TARGET else f"missed by {100 * (median - TARGET):.2f} points"


#: How each part's subsection of the section starts (to keep the parts a run did not measure).
HEADINGS = {"model": "### The default run's model", "tiny": "### What the platform costs per step", "data": "### Data wait"}
NOTES = "Notes (written by hand"
KEPT_HEADING, KEPT_FROM = "Parts not measured again", "That measurement: "


def earlier_section(out: Path) -> dict[str, str]:
    """The section now in ``out``, in pieces: each part's subsection by part name, with the
    paragraph of the measurement it came from under ``<part>_machine``, and ``notes`` (the
    hand-written notes); absent pieces are left out."""
    text = out.read_text() if out.exists() else ""
    if START not in text or END not in text:
        return {}
    body = text.split(START, 1)[1].split(END, 1)[0]
    body, _, notes = body.partition(NOTES)
    pieces: dict[str, str] = {"notes": NOTES + notes.rstrip()} if notes else {}
    machine = next((line.strip() for line in body.splitlines() if line.startswith("Machine:")), "")
    kept_from = KEPT_FROM.join(body.split(KEPT_FROM)[1:]).split("\n", 1)[0].strip() if KEPT_FROM in body else machine
    top, _, kept = body.partition("\n### " + KEPT_HEADING)
    for source, where in ((top, machine), (kept.replace("\n#### ", "\n### "), kept_from)):
        for block in source.split("\n### "):
            for part, heading in HEADINGS.items():
                if ("### " + block).startswith(heading):
                    pieces[part] = ("### " + block).strip()
                    pieces[f"{part}_machine"] = where.removeprefix("Machine: ")
    return pieces


def kept_plain_cpu(model_table: str) -> float | None:
    """The plain loop's median CPU seconds per step from a kept default-model table."""
    for line in model_table.splitlines():
        if line.startswith(f"| {PLAIN} |"):
            return float(line.split("|")[4].split()[0]) / 1000
    return None


def load_words(meta: dict[str, Any]) -> str:
    """How busy the machine was, from the highest 1-minute load average seen (older results
    without one count as heavily loaded)."""
    peak = meta.get("peak_load", float("inf"))
    if peak < 1.6:
        return "on an otherwise idle machine"
    return "**under load** from other processes" if peak < 4 else "**under heavy load** from other processes"


def report(results: dict[str, Any], earlier: dict[str, str] | None = None) -> str:
    """The section. Parts not in ``results`` but in ``earlier`` (:func:`earlier_section`) are
    kept as they were, under their own measurement's paragraph, and so are the notes."""
    meta, model, tiny, data_wait = results["meta"], results.get("model"), results.get("tiny"), results.get("data")
    earlier = earlier or {}
    kept = [part for part in PARTS if results.get(part) is None and part in earlier]
    lines = [
        START,
        "## Platform overhead per step",
        "",
        "The same model trained on the same batches for the same steps by a plain PyTorch loop (AdamW, the warm-up schedule, "
        "gradient clipping at 1.0, over the model and training batches `plugformer.build(cfg)` makes) and by `plugformer train`'s "
        "path (Lightning) with the default logging (metrics.csv, W&B offline, rich progress bar, non-finite guard) and with "
        "logging off (`logger=none callbacks.progress_bar=none`, no metrics row while timed). Step time: batch start to the "
        "next batch start (data loading, optimizer, logging and callbacks included), mean over the timed steps after the "
        "warm-up steps, start-up and validation excluded; the three ways interleaved in a rotating order in one process, "
        "repeated. Overhead: median over repeats of each repeat's ratio to the plain loop of the same repeat (min–max in "
        "brackets). CPU: this process's CPU time per step (all its threads; W&B's writer is a separate service process and is "
        "not counted), which load from other processes disturbs less than wall time.",
        "",
        f"Machine: {meta['cores']} cores, torch {meta['torch']} with {meta['threads']} thread, Python {meta['python']}; measured "
        f"{meta['date']} {load_words(meta)} (1-minute load average {meta['load']}; the benchmark itself counts 1): single "
        "figures vary from run to run, so read the spread. Reproduce (all parts) with "
        "`OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead.py` (defaults: 7 repeats of 60 steps after 10; the tiny model "
        "7 repeats of 200 steps after 20; data-wait runs of 100 steps); this section was measured with "
        f"{'; '.join(f'`{command}`' for command in meta['commands'])}.",
    ]
    if model is not None:
        lines += [
            "",
            f"### The default run's model ({model['repeats']} repeats of {model['steps']} steps after {model['warmup']})",
            "",
            f"`plugformer train` (MQAR, a 2-layer hybrid decoder, d_model 128, batch 64 of 64 tokens). The first "
            f"{LOSS_CHECK_STEPS} losses of the three ways {'agree' if losses_agree(model) else 'DIFFER'} (identical network and batches).",
            "",
            "| way | ms per step | overhead | CPU ms per step | CPU overhead | target ≤ 1% (CPU; wall) |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name in model["wall"]:
            wall, cpu = model["wall"][name], model["cpu"][name]
            if name == PLAIN:
                lines.append(f"| {name} | {spread(wall, 1000, '{:.1f}')} | — | {spread(cpu, 1000, '{:.1f}')} | — | |")
                continue
            wall_ratio, cpu_ratio = paired(model["wall"], name), paired(model["cpu"], name)
            lines.append(
                f"| {name} | {spread(wall, 1000, '{:.1f}')} | {spread(wall_ratio, 100, '{:+.1f}')} % | {spread(cpu, 1000, '{:.1f}')} | "
                f"{spread(cpu_ratio, 100, '{:+.1f}')} % | {verdict(cpu_ratio)}; {verdict(wall_ratio)} |"
            )
    if tiny is not None:
        plain_cpu = statistics.median(model["cpu"][PLAIN]) if model is not None else None
        if plain_cpu is None and "model" in kept:
            plain_cpu = kept_plain_cpu(earlier["model"])
        lines += [
            "",
            f"### What the platform costs per step, in milliseconds (a tiny model, {tiny['repeats']} repeats of {tiny['steps']} "
            f"steps after {tiny['warmup']})",
            "",
            f"The same three ways on `{' '.join(tiny['overrides'])}`, whose own step is so short that what the training path adds "
            "per step stands out: the platform's cost per step is each repeat's CPU time per step minus the plain loop's in the "
            "same repeat (median, min–max). Divided by the default run's plain CPU step time (the default model's table), it is the overhead that "
            f"model pays, measured far more precisely than the difference of two large noisy times. The first {LOSS_CHECK_STEPS} "
            f"losses {'agree' if losses_agree(tiny) else 'DIFFER'}.",
            "",
            "| way | ms per step | CPU ms per step | platform CPU ms per step | share of the default run's CPU step | target ≤ 1% |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for name in tiny["wall"]:
            wall, cpu = tiny["wall"][name], tiny["cpu"][name]
            if name == PLAIN:
                lines.append(f"| {name} | {spread(wall, 1000, '{:.2f}')} | {spread(cpu, 1000, '{:.2f}')} | — | — | |")
                continue
            cost = paired(tiny["cpu"], name, relative=False)
            share = [c / plain_cpu for c in cost] if plain_cpu else None
            lines.append(
                f"| {name} | {spread(wall, 1000, '{:.2f}')} | {spread(cpu, 1000, '{:.2f}')} | {spread(cost, 1000, '{:+.2f}')} | "
                + (f"{spread(share, 100, '{:+.2f}')} % | {verdict(share)} |" if share else "— | |")
            )
    if data_wait is not None:
        lines += [
            "",
            "### Data wait",
            "",
            "`data_wait_fraction` in summary.json (logged as `train/data_wait_fraction`): the share of training time between one "
            "batch's end and the next one's start (fetching and collating the next batch, moving it to the device, the loop's "
            "bookkeeping), over all training steps but the first, validation excluded. "
            f"Runs of {data_wait['steps']} steps with `data.num_workers=0` (the default of every task: the splits are in memory) "
            "and logging off.",
            "",
            "| run | data wait | tokens/s |",
            "|---|---:|---:|",
        ]
        for name, values in data_wait["runs"].items():
            lines.append(f"| {name} | {100 * values['fraction']:.2f} % | {values['tokens_per_second']:.0f} |")
    if kept:
        lines += [
            "",
            f"### {KEPT_HEADING}",
            "",
            "The run above measured only what it names; these parts are kept from the earlier measurement"
            + (" (the tiny model's share above divides by the plain loop's CPU step time of the kept default-model table)"
               if "model" in kept and tiny is not None else "")
            + ". " + KEPT_FROM + earlier.get(f"{kept[0]}_machine", "not recorded"),
        ]
        for part in kept:
            lines += ["", "#" + earlier[part]]
    if "notes" in earlier:
        lines += ["", earlier["notes"]]
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", choices=PARTS, default=list(PARTS),
                        help="what to measure (default: all; none: only render --results)")
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats of the three ways (default 7)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per repeat, default model (default 60)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before them (default 10)")
    parser.add_argument("--tiny-steps", type=int, default=200, help="timed steps per repeat, tiny model (default 200)")
    parser.add_argument("--tiny-warmup", type=int, default=20, help="untimed steps before them (default 20)")
    parser.add_argument("--data-steps", type=int, default=100, help="steps of each data-wait run (default 100)")
    parser.add_argument("--results", type=Path, help="a JSON file of raw results: parts not measured now are read from it, "
                        "and everything is saved back (to assemble the section from parts measured separately)")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md", help="the file whose section is replaced")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing it")
    parser.add_argument("overrides", nargs="*", help="config overrides of the measured run (default: the default run)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    os.chdir(REPO)
    results: dict[str, Any] = json.loads(args.results.read_text()) if args.results and args.results.exists() else {}
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="plugformer-overhead-") as tmp:
        if "model" in args.parts:
            results["model"] = measure_overhead(Path(tmp), args.overrides, args.steps, args.warmup, args.repeats, "model")
        if "tiny" in args.parts:
            results["tiny"] = measure_overhead(Path(tmp), [*args.overrides, *TINY], args.tiny_steps, args.tiny_warmup, args.repeats, "tiny")
        if "data" in args.parts:
            results["data"] = {"steps": args.data_steps, "runs": measure_data_wait(args, Path(tmp))}
    meta = results.get("meta", {})
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/overhead.py " + " ".join(sys.argv[1:])
    if not args.parts:
        results["meta"] = meta
        text = report(results, earlier_section(args.out))
        print(text)
        if not args.no_write:
            write_section(args.out, text, START, END)
        return
    results["meta"] = {
        "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
        "date": datetime.date.today().isoformat(),
        "load": ", ".join(filter(None, [meta.get("load"), f"{load_start:.1f}–{os.getloadavg()[0]:.1f}"])),
        "peak_load": max(meta.get("peak_load", 0.0), load_start, os.getloadavg()[0]),
        "commands": [*meta.get("commands", []), command],
    }
    if args.results:
        args.results.write_text(json.dumps(results, indent=1))
    text = report(results, earlier_section(args.out))
    print(text)
    if not args.no_write:
        write_section(args.out, text, START, END)


if __name__ == "__main__":
    main()
