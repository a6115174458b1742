"""How time and memory of full, local and linear attention grow with the sequence length.

Measures one forward+backward pass of a single attention layer, built through the registered
components with their default configs (d_model=256, 4 heads, batch 1, causal), on CPU and,
when available, on CUDA. Variants: ``full``, ``local`` and ``linear`` without a padding
mask, and ``full+mask``: full attention given a key padding mask (one padded token), which
is what a padded training batch sees. Every (device, variant, length) runs in a fresh
subprocess, so one measurement cannot inherit another's allocator state.

- time: median of ``--repeats`` forward+backward passes after one warm-up pass;
- memory, CPU: how far one forward+backward pass raises the process's peak resident memory
  above its resident memory just before the pass. The peak (VmHWM) is reset through
  /proc/self/clear_refs, and glibc's mmap threshold is fixed at 64 KiB so freed tensors go
  back to the operating system instead of staying in malloc's arenas. This counts
  activations, saved tensors, temporaries and gradients, not the parameters or the input;
- memory, CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the pass.

Writes the section "Attention scaling" of BENCHMARKS.md (between HTML comment markers, other
sections are kept) and a log-log plot. Usage:

    .venv/bin/python benchmarks/attention_scaling.py [--lengths 512 1024 ...] [--repeats 5]
        [--threads N] [--variants full local ...] [--out BENCHMARKS.md] [--plot PNG]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as host  # the standard-library module; never the project's platform/ folder
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("full", "local", "linear", "full+mask")
D_MODEL, HEADS, BATCH = 256, 4, 1
START, END = "<!-- attention-scaling:start -->", "<!-- attention-scaling:end -->"


# --- worker: one measurement in a fresh process -------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(variant: str, length: int, device: str, repeats: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)

    from plugformer import BuildContext
    from plugformer.plugins import load_plugins

    name, masked = variant.removesuffix("+mask"), variant.endswith("+mask")
    component = load_plugins().registry.get("attention", name)
    ctx = BuildContext(
        d_model=D_MODEL, n_heads=HEADS, n_layers=1, dropout=0.0, causal=True, max_length=length, vocab_size=1
    )
    attention = component.factory(component.config(), ctx).to(device)
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

    step()  # warm-up: lazy initialization, kernel selection, thread pools
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set size
        before = _status_kib("VmRSS")
        step()
        peak = (_status_kib("VmHWM") - before) * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"time_ms": 1000 * statistics.median(times), "memory_mib": peak / 2**20}


# --- driver --------------------------------------------------------------------------------


def run_worker(variant: str, length: int, device: str, repeats: int, threads: int | None) -> dict | None:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    spec = {"variant": variant, "length": length, "device": device, "repeats": repeats, "threads": threads}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True, text=True, env=env, cwd=REPO
    )
    if done.returncode != 0:
        print(f"  {device} {variant} {length}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


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


def overtakes(results: dict, variant: str, baseline: str, metric: str, lengths: list[int]) -> int | None:
    """The shortest length from which ``variant`` beats ``baseline`` at every longer length."""
    first = None
    for length in reversed(lengths):
        mine, theirs = results.get((variant, length)), results.get((baseline, length))
        if mine is None or theirs is None or mine[metric] >= theirs[metric]:
            break
        first = length
    return first


def comparison(results: dict, variant: str, baseline: str, lengths: list[int]) -> str:
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


def findings(results: dict, lengths: list[int], variants: list[str], device: str) -> str:
    """Where local and linear overtake full in time and memory, and how their memory grows."""
    sentences = []
    for baseline in ("full", "full+mask"):
        if baseline in variants:
            mine = [comparison(results, v, baseline, lengths) for v in ("local", "linear") if v in variants]
            if mine:
                sentences.append("; ".join(mine) + ".")
    if len(lengths) >= 2:
        last, before = lengths[-1], lengths[-2]
        factor = last / before
        ratios = []
        for variant in variants:
            a, b = results.get((variant, last)), results.get((variant, before))
            if a and b and b["memory_mib"] > 0:
                ratios.append(f"{variant} {a['memory_mib'] / b['memory_mib']:.2f}")
        sentences.append(
            f"Memory growth, memory({last}) / memory({before}): {', '.join(ratios)} (for {factor:g}× the "
            f"length, {factor:g} is linear growth and {factor ** 2:g} quadratic)."
        )
    return f"On {device}: " + " ".join(sentences)


def table(results: dict, lengths: list[int], variants: list[str]) -> list[str]:
    def cell(variant: str, length: int, metric: str) -> str:
        value = results.get((variant, length))
        return f"{value[metric]:.1f}" if value else "failed"

    header = ["length"] + [f"{v} ms" for v in variants] + [f"{v} MiB" for v in variants]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for length in lengths:
        row = [str(length)] + [cell(v, length, "time_ms") for v in variants]
        row += [cell(v, length, "memory_mib") for v in variants]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def plot(all_results: dict, lengths: list[int], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for device, results in all_results.items():
        style = "-" if device == "cpu" else "--"
        for variant in variants:
            points = [(n, results[(variant, n)]) for n in lengths if results.get((variant, n))]
            if not points:
                continue
            ns = [n for n, _ in points]
            label = f"{variant} ({device})"
            time_ax.plot(ns, [r["time_ms"] for _, r in points], style, marker="o", label=label)
            memory_ax.plot(ns, [r["memory_mib"] for _, r in points], style, marker="o", label=label)
    for ax, label in ((time_ax, "forward+backward time (ms)"), (memory_ax, "peak memory of the pass (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"One causal attention layer, d_model={D_MODEL}, {HEADS} heads, batch {BATCH}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def section(all_results: dict, args: argparse.Namespace, info: dict, out: Path, png: Path) -> str:
    lengths, variants = sorted(args.lengths), list(args.variants)
    command = (
        f"`.venv/bin/python benchmarks/attention_scaling.py --lengths {' '.join(map(str, lengths))} "
        f"--repeats {args.repeats} --threads {info['threads']} --variants {' '.join(variants)}`"
    )
    lines = [
        START,
        "## Attention scaling",
        "",
        f"One forward+backward pass of a single attention layer (d_model={D_MODEL}, {HEADS} heads of "
        f"{D_MODEL // HEADS}, batch {BATCH}, causal), built through the registered components with default "
        "configs: full is `scaled_dot_product_attention` with `is_causal` (fused kernel, no n×n matrix); "
        "full+mask is the same component given a key padding mask with one padded token, as in a padded "
        "batch, so it builds an explicit n×n mask; local has window=64, dilation=1; linear has "
        f"chunk_size=64. Time: median of {args.repeats} passes after one warm-up. Memory on CPU: how far "
        "one pass raises the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs) "
        "above its resident memory just before the pass, each measurement in a fresh process with "
        "glibc's mmap threshold at 64 KiB so that freed tensors are returned to the system; it counts "
        "activations, saved tensors, temporaries and gradients, not parameters or the input. Memory on "
        "CUDA: `torch.cuda.max_memory_allocated()` minus the memory allocated before the pass.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} with {info['threads']} "
        f"thread(s), Python {info['python']}" + (f", GPU {info['gpu']}" if "gpu" in info else "")
        + f"; 1-minute load average {info['load']:.1f} at the end (other work shared the machine, so "
        f"times are noisy); measured {datetime.date.today().isoformat()}. Reproduce with {command}.",
        "",
    ]
    for device, results in all_results.items():
        lines += [f"### {device}", "", *table(results, lengths, variants), ""]
        lines += [findings(results, lengths, variants, device), ""]
    lines += [f"![attention scaling]({os.path.relpath(png, out.parent)})", "", END]
    return "\n".join(lines)


def write_section(out: Path, text: str) -> None:
    """Replace the section between the markers, or append it; other sections stay as they are."""
    current = out.read_text() if out.exists() else "# Benchmarks\n"
    if START in current and END in current:
        head, rest = current.split(START, 1)
        updated = head + text + rest.split(END, 1)[1]
    else:
        updated = current.rstrip("\n") + "\n\n" + text + "\n"
    out.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "attention_scaling.png")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(measure(spec["variant"], spec["length"], spec["device"], spec["repeats"], spec["threads"])))
        return

    import torch

    lengths = sorted(args.lengths)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    all_results: dict[str, dict] = {}
    for device in devices:
        results = all_results.setdefault(device, {})
        for length in lengths:
            for variant in args.variants:
                results[(variant, length)] = value = run_worker(variant, length, device, args.repeats, args.threads)
                if value:
                    print(f"{device} {variant:>9} {length:>6}: {value['time_ms']:9.1f} ms {value['memory_mib']:9.1f} MiB")
    out, png = args.out.resolve(), args.plot.resolve()
    plot(all_results, lengths, list(args.variants), png)
    write_section(out, section(all_results, args, machine(args.threads), out, png))
    for device, results in all_results.items():
        print(findings(results, lengths, list(args.variants), device))
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
