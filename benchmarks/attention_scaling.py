"""How time and memory of every registered attention grow with the sequence length.

Measures one forward+backward pass of a single attention layer, built through the registered
components with their default configs (d_model=256, 4 heads, batch 1), bidirectional as in
the Long Range Arena (``--causal`` for decoders; a variant that lacks the mode is skipped),
on CPU and, when available, on CUDA. Variants: every registered attention (``plugformer
plugins``), and ``full+mask``: full attention given a key padding mask (one padded token),
which is what a padded batch sees. Every (device, variant, length) runs in a fresh
subprocess, so one measurement cannot inherit another's allocator state.

- time: median of ``--repeats`` forward+backward passes after one warm-up pass;
- memory, CPU: how far one forward+backward pass raises the process's peak resident memory
  above its resident memory just before the pass. The peak (VmHWM) is reset through
  /proc/self/clear_refs, and glibc's mmap threshold is fixed at 64 KiB so freed tensors go
  back to the operating system instead of staying in malloc's arenas. This counts
  activations, saved tensors, temporaries and gradients, not the parameters or the input;
- memory, CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the pass.

Writes the section "Attention scaling" of BENCHMARKS.md (between HTML comment markers, other
sections are kept): time and memory per length, and at 4K each variant's speed-up over full
attention beside LRA's Table 2 and its memory growth from 4K to 8K (≤ 2.1 is linear), with a
log-log plot. Usage:

    .venv/bin/python benchmarks/attention_scaling.py [--lengths 1024 2048 ...] [--repeats 5]
        [--threads N] [--variants full local ...] [--causal] [--out BENCHMARKS.md] [--plot PNG]
        [--results raw.json]

``--results`` keeps the measurements in a JSON file, so that a few variants can be measured
again (with full and full+mask, their baselines) and the table is assembled from both runs,
saying which rows were measured when.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as host  # the standard-library module; never the project's platform/ folder
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import measure_pass, write_section  # noqa: E402
from _report import run_worker as run_measurement  # noqa: E402
D_MODEL, HEADS, BATCH = 256, 4, 1
#: LRA (Tay et al. 2021), Table 2: steps per second relative to the vanilla Transformer at 4K.
LRA_SPEEDUP_4K = {"local": 5.3, "linformer": 5.5, "linear": 5.6, "performer": 5.7, "reformer": 0.8, "bigbird": 1.1}
#: memory(8K) / memory(4K) at or below this counts as linear growth.
LINEAR_GROWTH = 2.1
START, END = "<!-- attention-scaling:start -->", "<!-- attention-scaling:end -->"


# --- worker: one measurement in a fresh process -------------------------------------------


def registered_attentions() -> list[str]:
    from plugformer.plugins import load_plugins

    return list(load_plugins().registry.names("attention"))


def supports(variant: str, causal: bool) -> bool:
    from plugformer.plugins import load_plugins

    component = load_plugins().registry.get("attention", variant.removesuffix("+mask"))
    return ("causal" if causal else "bidirectional") in component.capabilities_for().provides


def config_for_length(config_class: type, length: int) -> object:
    """The default config, with a declared maximum length raised to ``length`` (Linformer's and
    the Synthesizer's ``max_length``, Sinkhorn's ``max_blocks``): everything else as published."""
    import dataclasses
    import math

    names = {f.name for f in dataclasses.fields(config_class)}
    config = config_class()
    if "max_length" in names and config.max_length < length:
        config = dataclasses.replace(config, max_length=length)
    if {"max_blocks", "block_size"} <= names and config.max_blocks * config.block_size < length:
        config = dataclasses.replace(config, max_blocks=math.ceil(length / config.block_size))
    return config


def measure(variant: str, length: int, device: str, repeats: int, threads: int | None, causal: bool) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from plugformer import BuildContext
    from plugformer.plugins import load_plugins

    name, masked = variant.removesuffix("+mask"), variant.endswith("+mask")
    component = load_plugins().registry.get("attention", name)
    ctx = BuildContext(
        d_model=D_MODEL, n_heads=HEADS, n_layers=1, dropout=0.0, causal=causal, max_length=length, vocab_size=1
    )
    attention = component.factory(config_for_length(component.config, length), ctx).to(device)
    x = torch.randn(BATCH, length, D_MODEL, device=device, requires_grad=True)
    grad = torch.randn(BATCH, length, D_MODEL, device=device)
    mask = None
    if masked:
        mask = torch.ones(BATCH, length, dtype=torch.bool, device=device)
        mask[:, -1] = False

    def step() -> None:
        attention(x, mask=mask).backward(grad)
        x.grad = None
        attention.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return measure_pass(step, device, repeats)


# --- driver --------------------------------------------------------------------------------


def run_worker(variant: str, length: int, device: str, repeats: int, threads: int | None, causal: bool) -> dict | None:
    spec = {"variant": variant, "length": length, "device": device, "repeats": repeats, "threads": threads, "causal": causal}
    return run_measurement(__file__, spec, REPO)


def machine(threads: int | None) -> dict:
    import torch

    cpu = host.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        found = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "python": host.python_version(),
        "load": os.getloadavg()[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def overtakes(results: Results, variant: str, baseline: str, metric: str, lengths: list[int]) -> int | None:
    """The shortest length from which ``variant`` beats ``baseline`` at every longer length."""
    first = None
    for length in reversed(lengths):
        mine, theirs = results.get((variant, length)), results.baseline(variant, baseline, length)
        if mine is None or theirs is None or mine[metric] >= theirs[metric]:
            break
        first = length
    return first


def comparison(results: Results, variant: str, baseline: str, lengths: list[int]) -> str:
    """'<variant> is faster than <baseline> from length n on and uses less memory ...'."""
    phrases = {
        "time_ms": ("is faster than", "is not faster than"),
        "memory_mib": ("uses less memory than", "does not use less memory than"),
    }
    parts = []
    for metric, (beats, never) in phrases.items():
        length = overtakes(results, variant, baseline, metric, lengths)
        if length is None:
            parts.append(f"{never} {baseline} up to length {lengths[-1]}")
        elif length == lengths[0]:
            parts.append(f"{beats} {baseline} at every measured length")
        else:
            parts.append(f"{beats} {baseline} from length {length} on")
    return f"{variant} {parts[0]} and {parts[1]}"


def growth(results: dict, variant: str, lengths: list[int]) -> float | None:
    """memory(longest) / memory(the length before), or None when either is missing."""
    if len(lengths) < 2:
        return None
    a, b = results.get((variant, lengths[-1])), results.get((variant, lengths[-2]))
    return a["memory_mib"] / b["memory_mib"] if a and b and b["memory_mib"] > 0 else None


def findings(results: Results, lengths: list[int], variants: list[str], device: str) -> str:
    """Where each variant overtakes full attention, and which variants' memory grows linearly."""
    sentences = []
    for baseline in ("full", "full+mask"):
        if baseline in variants:
            mine = [comparison(results, v, baseline, lengths) for v in variants if v not in ("full", "full+mask")]
            if mine:
                sentences.append("; ".join(mine) + ".")
    if len(lengths) >= 2:
        factor = lengths[-1] / lengths[-2]
        linear = [v for v in variants if (g := growth(results, v, lengths)) is not None and g <= LINEAR_GROWTH * factor / 2]
        other = [f"{v} ({g:.2f})" for v in variants if (g := growth(results, v, lengths)) is not None and v not in linear]
        sentences.append(
            f"Memory grows linearly from {lengths[-2]} to {lengths[-1]} (ratio ≤ {LINEAR_GROWTH * factor / 2:g}) for "
            f"{', '.join(linear) or 'none'}; faster for {', '.join(other) or 'none'}."
        )
    return f"On {device}: " + " ".join(sentences)


def table(results: dict, lengths: list[int], variants: list[str], metric: str) -> list[str]:
    """Variants as rows, lengths as columns, one metric."""
    lines = ["| variant | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for variant in variants:
        cells = []
        for length in lengths:
            value = results.get((variant, length))
            cells.append(f"{value[metric]:.1f}" if value else "failed")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return lines


def summary(results: Results, lengths: list[int], variants: list[str], costs: dict[str, str]) -> list[str]:
    """At the reference length (4096, or the longest below it): speed-up over full (the fused
    kernel) and over full+mask (the explicit n×n path, what LRA's vanilla Transformer runs)
    beside LRA's Table 2, memory relative to full, and memory growth to the longest length."""
    at = max((n for n in lengths if n <= 4096), default=lengths[-1])

    def speedup(base: dict | None, mine: dict | None) -> str:
        return f"{base['time_ms'] / mine['time_ms']:.2f}×" if mine and base else "—"

    lines = [
        f"| variant | cost class | speed-up over full at {at} | over full+mask (n×n) | LRA Table 2 (4K) | "
        f"memory / full at {at} | memory {lengths[-1]} / {lengths[-2] if len(lengths) > 1 else lengths[-1]} |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        mine = results.get((variant, at))
        full, explicit = results.baseline(variant, "full", at), results.baseline(variant, "full+mask", at)
        memory = f"{mine['memory_mib'] / full['memory_mib']:.2f}" if mine and full and full["memory_mib"] > 0 else "—"
        lra = f"{LRA_SPEEDUP_4K[variant]}×" if variant in LRA_SPEEDUP_4K else "—"
        g = growth(results, variant, lengths)
        lines.append(
            f"| {variant} | {costs.get(variant, '')} | {speedup(full, mine)} | {speedup(explicit, mine)} | {lra} | "
            f"{memory} | {f'{g:.2f}' if g else '—'} |"
        )
    return lines + ["", BESIDE_LRA]


#: Why our ratios differ from LRA's Table 2 (facts about the two set-ups, not about one run).
BESIDE_LRA = (
    "Beside LRA: LRA's Table 2 times whole models (6 layers, d_model 512) in JAX on accelerators "
    "against a vanilla Transformer whose attention forms the n×n score matrix. Here one layer runs "
    "on one CPU thread, and `full` is PyTorch's fused `scaled_dot_product_attention`, which never "
    "forms that matrix and runs as one tight kernel, so a variant gains less over it than over "
    "an n×n baseline. `full+mask` takes the explicit n×n path, the closer match to LRA's baseline: read "
    "that column beside LRA's. The sub-quadratic variants are Python-level compositions of "
    "matrix products run chunk by chunk under recomputation (each chunk's scores are formed "
    "twice, once in the forward pass and once in the backward pass), which is how they keep "
    "their memory near the fused kernel's (see the memory table); the fused kernel pays neither cost."
)


def plot(all_results: dict, lengths: list[int], variants: list[str], path: Path, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(13, 5))
    colors = plt.get_cmap("tab20")
    for device, results in all_results.items():
        style = "-" if device == "cpu" else "--"
        for index, variant in enumerate(variants):
            points = [(n, results[(variant, n)]) for n in lengths if results.get((variant, n))]
            if not points:
                continue
            ns = [n for n, _ in points]
            label = variant if len(all_results) == 1 else f"{variant} ({device})"
            kwargs = {"marker": "o", "markersize": 3, "color": colors(index % 20), "label": label}
            time_ax.plot(ns, [r["time_ms"] for _, r in points], style, **kwargs)
            memory_ax.plot(ns, [r["memory_mib"] for _, r in points], style, **kwargs)
    for ax, label in ((time_ax, "forward+backward time (ms)"), (memory_ax, "peak memory of the pass (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = time_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), frameon=False)
    fig.suptitle(f"One {mode} attention layer, d_model={D_MODEL}, {HEADS} heads, batch {BATCH}")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


BASELINES = ("full", "full+mask")


class Results(dict):
    """One device's measurements, ``(variant, length) → value``. ``archive``: measurements of
    the baselines that a later run replaced, by the time of the run that made them, so that a
    variant kept from an earlier run is still compared with the baselines of its own run."""

    def __init__(self, values: dict | None = None, archive: dict | None = None) -> None:
        super().__init__(values or {})
        self.archive: dict[str, dict] = archive or {}

    def replace(self, key: tuple[str, int], value: dict | None) -> None:
        old = self.get(key)
        if key[0] in BASELINES and old and value and old.get("measured") != value.get("measured"):
            self.archive.setdefault(str(old.get("measured")), {})[key] = old
        self[key] = value

    def baseline(self, variant: str, baseline: str, length: int) -> dict | None:
        """``baseline`` at ``length`` as measured in the run that measured ``variant`` there."""
        mine, theirs = self.get((variant, length)), self.get((baseline, length))
        stamp = mine.get("measured") if mine else None
        if theirs and stamp and theirs.get("measured") != stamp:
            return self.archive.get(stamp, {}).get((baseline, length), theirs)
        return theirs


def _keyed(raw: dict) -> dict:
    return {(key.rsplit("@", 1)[0], int(key.rsplit("@", 1)[1])): value for key, value in raw.items()}


def _flat(values: dict) -> dict:
    return {f"{v}@{n}": value for (v, n), value in values.items()}


def load_results(path: Path | None) -> dict[str, Results]:
    """Earlier measurements from ``--results``: device → Results."""
    if path is None or not path.exists():
        return {}
    raw = json.loads(path.read_text())
    return {
        device: Results(_keyed(stored["results"]), {when: _keyed(v) for when, v in stored.get("archive", {}).items()})
        for device, stored in raw.items()
    }


def save_results(path: Path, all_results: dict[str, Results]) -> None:
    raw = {
        device: {"results": _flat(results), "archive": {when: _flat(v) for when, v in results.archive.items()}}
        for device, results in all_results.items()
    }
    path.write_text(json.dumps(raw, indent=1, sort_keys=True))


def when_measured(all_results: dict[str, dict]) -> str:
    """Which variants were measured when, for a table assembled from several runs."""
    runs: dict[str, set[str]] = {}
    for results in all_results.values():
        for (variant, _), value in results.items():
            if value:
                runs.setdefault(str(value.get("measured", "an earlier run")), set()).add(variant)
    if len(runs) <= 1:
        return ""
    parts = [f"{when}: {', '.join(sorted(variants))}" for when, variants in sorted(runs.items())]
    return (
        " Assembled from measurements at different times (`--results`): " + "; ".join(parts) + ". Each variant's "
        "speed-ups, memory ratio and comparisons are against full and full+mask as measured in its own run."
    )


def section(
    all_results: dict, args: argparse.Namespace, info: dict, out: Path, png: Path, variants: list[str], skipped: list[str],
    lengths: list[int],
) -> str:
    from plugformer.plugins import load_plugins

    registry = load_plugins().registry
    costs = {v: registry.get("attention", v.removesuffix("+mask")).capabilities_for().cost or "" for v in variants}
    mode = "causal" if args.causal else "bidirectional"
    command = (
        f"`.venv/bin/python benchmarks/attention_scaling.py --lengths {' '.join(map(str, lengths))} "
        f"--repeats {args.repeats} --threads {info['threads']}{' --causal' if args.causal else ''}"
        + (f" --variants {' '.join(args.variants)}" if args.variants else "")
        + (f" --results {args.results.name}" if args.results else "") + "`"
    )
    lines = [
        START,
        "## Attention scaling",
        "",
        f"One forward+backward pass of a single {mode} attention layer (d_model={D_MODEL}, {HEADS} heads of "
        f"{D_MODEL // HEADS}, batch {BATCH}), every registered attention built with its default config "
        "(`plugformer plugins` lists them; docs/attention.md has each one's settings; a declared maximum "
        "length, Linformer's and the Synthesizer's `max_length` and Sinkhorn's `max_blocks`, raised to the "
        "measured length). full is "
        "`scaled_dot_product_attention` (a fused kernel that never forms the n×n matrix); full+mask is the "
        "same component given a key padding mask with one padded token, as in a padded batch, which takes "
        f"the explicit-mask path. Time: median of {args.repeats} passes after one warm-up. Memory on CPU: how "
        "far one pass raises the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) "
        "above its resident memory just before the pass, each measurement in a fresh process with glibc's "
        "mmap threshold at 64 KiB so that freed tensors are returned to the system; it counts activations, "
        "saved tensors, temporaries and gradients, not parameters or the input. Memory on CUDA: "
        "`torch.cuda.max_memory_allocated()` minus the memory allocated before the pass.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['threads']} "
        f"thread(s), Python {info['python']}" + (f", GPU {info['gpu']}" if "gpu" in info else "")
        + f"; 1-minute load average {info['load']:.1f} at the end; measured "
        f"{datetime.date.today().isoformat()}. Reproduce with {command}."
        + (f" Not measured ({mode} mode not provided): {', '.join(skipped)}." if skipped else "")
        + when_measured(all_results),
        "",
    ]
    for device, results in all_results.items():
        lines += [f"### {device}", "", *summary(results, lengths, variants, costs), ""]
        lines += ["Time (ms):", "", *table(results, lengths, variants, "time_ms"), ""]
        lines += ["Memory (MiB):", "", *table(results, lengths, variants, "memory_mib"), ""]
        lines += [findings(results, lengths, variants, device), ""]
    lines += [f"![attention scaling]({os.path.relpath(png, out.parent)})", "", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--variants", nargs="+", help="attention names, or full+mask (default: all registered, and full+mask)")
    parser.add_argument("--causal", action="store_true", help="causal layers (default: bidirectional, as in LRA)")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "attention_scaling.png")
    parser.add_argument(
        "--results", type=Path, help="a JSON file of earlier measurements: the variants and lengths measured now replace "
        "theirs, the others are kept and shown (with when each was measured), and everything is saved back",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(spec["variant"], spec["length"], spec["device"], spec["repeats"], spec["threads"], spec["causal"])))
        return

    import torch

    lengths = sorted(args.lengths)
    wanted = args.variants or [*registered_attentions(), "full+mask"]
    unknown = [v for v in wanted if v.removesuffix("+mask") not in registered_attentions()]
    if unknown:
        parser.error(f"unknown attention(s) {unknown}; registered: {registered_attentions()}")
    variants = [v for v in wanted if supports(v, args.causal)]
    skipped = [v for v in wanted if v not in variants]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    all_results = load_results(args.results)  # device → Results
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for device in devices:
        results = all_results.setdefault(device, Results())
        for length in lengths:
            for variant in variants:
                value = run_worker(variant, length, device, args.repeats, args.threads, args.causal)
                results.replace((variant, length), value and {**value, "measured": now, "load": os.getloadavg()[0]})
                if value:
                    print(f"{device} {variant:>12} {length:>6}: {value['time_ms']:9.1f} ms {value['memory_mib']:9.1f} MiB", flush=True)
    if args.results:
        save_results(args.results, all_results)
        lengths = sorted({n for results in all_results.values() for _, n in results})
        measured = {v for results in all_results.values() for v, _ in results}
        variants = [v for v in [*registered_attentions(), "full+mask"] if v in measured]
    out, png = args.out.resolve(), args.plot.resolve()
    mode = "causal" if args.causal else "bidirectional"
    plot(all_results, lengths, variants, png, mode)
    write_section(out, section(all_results, args, machine(args.threads), out, png, variants, skipped, lengths), START, END)
    for device, results in all_results.items():
        print(findings(results, lengths, variants, device))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
