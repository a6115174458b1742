"""Peak memory of one forward+backward pass against depth: standard (pre-norm) blocks store
every layer's activations, reversible blocks recompute them in the backward pass. Also
reformer (LSH) against full attention at a long length.

Each measurement builds a stack of registered components (d_model=256, 4 heads, mlp
feed-forward, layernorm, no position, dropout 0 so that full attention takes torch's fused
kernel, the fairest baseline; the reformer still draws its rotations at random, replayed by
the reversible recomputation) in a fresh subprocess and runs forward+backward on a random
input that requires grad, with a random output gradient.

- memory, CPU: how far one pass raises the process's peak resident memory (VmHWM, reset
  through /proc/self/clear_refs) above its resident memory just before the pass, with
  glibc's mmap threshold at 64 KiB so freed tensors go back to the system (as in
  attention_scaling.py). Counts activations, saved tensors, temporaries and parameter
  gradients, not parameters or the input;
- memory, CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the pass;
- time: median of ``--repeats`` passes after one warm-up pass.

Writes the section "Reversible layers" of BENCHMARKS.md (between HTML comment markers).
Usage:

    .venv/bin/python benchmarks/reversible_memory.py [--depths 2 4 8 12] [--length 1024]
        [--batch 4] [--long 4096] [--threads N] [--out BENCHMARKS.md]

``--worker SPEC`` (JSON) runs one measurement and prints it as JSON; the tests use it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import measure_pass, write_section  # noqa: E402
from _report import run_worker as run_measurement  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
D_MODEL, HEADS = 256, 4
START, END = "<!-- reversible-memory:start -->", "<!-- reversible-memory:end -->"
READING = (
    "Reading: what a reversible stack still adds per layer is its parameter gradients "
    f"(12·d_model² floats ≈ {12 * D_MODEL**2 * 4 / 2**20:.1f} MiB at d_model={D_MODEL}); its activations are those of "
    "one layer at a time. Full attention is torch's fused causal kernel here, which keeps no n×n matrix either, so "
    "at 4K LSH attention does not save memory against it: its score tensors (about 2n slots × 2·chunk_size keys "
    "per head and round, kept for the backward pass) outweigh the fused kernel's O(n) state. The Reformer's saving "
    "is against attention that materializes n×n scores (an explicit mask, as with padding, see \"Attention "
    "scaling\"), and it combines with reversible layers, which keep one layer's attention activations at a time."
)


def measure(spec: dict) -> dict:
    """One forward+backward measurement of the stack ``spec`` describes (block, attention,
    depth, length, batch, d_model, heads, device, repeats, threads, options)."""
    import torch
    from torch import nn

    from plugformer import BlockParts, BuildContext
    from plugformer.model.transformer import Stack
    from plugformer.plugins import load_plugins

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    device = spec["device"]
    registry = load_plugins().registry
    d_model, heads, depth, length = spec["d_model"], spec["heads"], spec["depth"], spec["length"]
    ctx = BuildContext(d_model=d_model, n_heads=heads, n_layers=depth, dropout=spec.get("dropout", 0.0),
                       causal=True, max_length=length, vocab_size=1)

    def make(kind: str, name: str, options: dict | None = None, **changes):  # noqa: ANN202
        component = registry.get(kind, name)
        return component.factory(component.config(**(options or {})), ctx.__class__(**{**ctx.__dict__, **changes}))

    blocks = []
    for i in range(depth):
        parts = BlockParts(
            attention=make("attention", spec["attention"], spec.get("attention_options"), layer_index=i),
            ffn=make("ffn", "mlp"),
            make_norm=lambda: make("norm", "layernorm"),
        )
        block = registry.get("block", spec["block"])
        blocks.append(block.factory(block.config(**spec.get("block_options", {})), ctx, parts))
    stack = Stack("decoder", make("position", "none"), blocks, make("norm", "layernorm"), 0.0).to(device).train()
    x = torch.randn(spec["batch"], length, d_model, device=device, requires_grad=True)
    grad = torch.randn(spec["batch"], length, d_model, device=device)

    def step() -> None:
        stack(x, mask=None).backward(grad)
        x.grad = None
        stack.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return measure_pass(step, device, spec.get("repeats", 3))


def run_worker(spec: dict) -> dict | None:
    """``measure(spec)`` in a fresh process (no allocator state carried over); None if it failed."""
    return run_measurement(__file__, spec, REPO)


def _cell(result: dict | None, metric: str) -> str:
    return f"{result[metric]:.1f}" if result else "failed"


def depth_table(results: dict, depths: list[int], blocks: list[str]) -> list[str]:
    header = ["layers"] + [f"{b} MiB" for b in blocks] + [f"{b} ms" for b in blocks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for depth in depths:
        row = [str(depth)] + [_cell(results.get((b, depth)), "memory_mib") for b in blocks]
        row += [_cell(results.get((b, depth)), "time_ms") for b in blocks]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def growth(results: dict, block: str, depths: list[int]) -> str:
    first, last = results.get((block, depths[0])), results.get((block, depths[-1]))
    if not (first and last):
        return f"{block}: not measured"
    per_layer = (last["memory_mib"] - first["memory_mib"]) / (depths[-1] - depths[0])
    return f"{block} {per_layer:.1f} MiB per layer"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[2, 4, 8, 12])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--long", type=int, default=4096, help="length of the reformer-vs-full comparison")
    parser.add_argument("--long-depth", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return

    import torch

    depths = sorted(args.depths)
    base = dict(d_model=D_MODEL, heads=HEADS, repeats=args.repeats, threads=args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines = [
        START,
        "## Reversible layers",
        "",
        f"Peak memory and time of one forward+backward pass of a causal stack (d_model={D_MODEL}, {HEADS} heads, "
        f"mlp feed-forward, layernorm, dropout 0) against depth, at length {args.length}, batch {args.batch}, "
        "with full attention (fused SDPA): `standard` is the pre-norm block, `reversible` the RevNet block "
        "(activations recomputed in the backward pass), `reversible+chunks` the same with `ffn_chunks=4`. "
        "Memory on CPU: rise of the peak resident memory (VmHWM) during the pass over the resident memory "
        "before it, each measurement in a fresh process (glibc mmap threshold 64 KiB); it counts activations, "
        "temporaries and parameter gradients, not parameters or the input. On CUDA: "
        "`torch.cuda.max_memory_allocated()` minus the memory allocated before the pass. Time: median of "
        f"{args.repeats} passes after a warm-up. Measured {datetime.date.today().isoformat()}, torch "
        f"{torch.__version__}, {args.threads or torch.get_num_threads()} CPU thread(s), 1-minute load "
        f"{os.getloadavg()[0]:.1f} (times are noisy on a shared machine). Reproduce with "
        f"`.venv/bin/python benchmarks/reversible_memory.py --depths {' '.join(map(str, depths))} "
        f"--length {args.length} --batch {args.batch} --long {args.long} --repeats {args.repeats} "
        f"--threads {args.threads or torch.get_num_threads()}`.",
        "",
    ]
    variants = {
        "standard": dict(block="standard"),
        "reversible": dict(block="reversible"),
        "reversible+chunks": dict(block="reversible", block_options={"ffn_chunks": 4}),
    }
    for device in devices:
        results = {}
        for depth in depths:
            for name, variant in variants.items():
                spec = {**base, **variant, "attention": "full", "depth": depth, "length": args.length,
                        "batch": args.batch, "device": device}
                results[(name, depth)] = value = run_worker(spec)
                if value:
                    print(f"{device} {name:>17} depth {depth:>2}: {value['memory_mib']:8.1f} MiB {value['time_ms']:8.1f} ms")
        lines += [f"### {device}: memory against depth", "", *depth_table(results, depths, list(variants)), ""]
        lines += [
            f"Growth from {depths[0]} to {depths[-1]} layers: "
            + ", ".join(growth(results, name, depths) for name in variants) + ".",
            "",
        ]
        long_results = {}
        for attention, options in (("full", None), ("reformer", {"chunk_size": 64, "n_hashes": 2})):
            for block in ("standard", "reversible"):
                spec = {**base, "block": block, "attention": attention, "attention_options": options,
                        "depth": args.long_depth, "length": args.long, "batch": 1, "device": device}
                long_results[(attention, block)] = value = run_worker(spec)
                if value:
                    print(f"{device} {attention:>8} {block:>10} @ {args.long}: {value['memory_mib']:8.1f} MiB {value['time_ms']:8.1f} ms")
        lines += [
            f"### {device}: reformer against full attention at length {args.long}",
            "",
            f"{args.long_depth} layers, batch 1; reformer with chunk_size=64, n_hashes=2, n_buckets from the length "
            f"({2 * max(1, round(args.long / 128))}).",
            "",
            "| attention | block | MiB | ms |",
            "|---|---|---:|---:|",
        ]
        for (attention, block), value in long_results.items():
            lines.append(f"| {attention} | {block} | {_cell(value, 'memory_mib')} | {_cell(value, 'time_ms')} |")
        lines += ["", READING, ""]
    lines.append(END)
    write_section(args.out.resolve(), "\n".join(lines), START, END)


if __name__ == "__main__":
    main()
