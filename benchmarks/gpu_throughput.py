"""Training throughput and MFU of a GPT-2-small-sized plugformer model on one GPU.

The model: ``experiment=plain`` with 12 layers, d_model 768, 12 heads, a 1024-token context,
learned positions, pre-LN blocks, a tied head and GPT-2's vocabulary padded to 50,304
(about 124M parameters), built by ``plugformer.build`` exactly as ``plugformer train``
builds it. Each step is forward + backward + AdamW on random tokens (throughput does not
depend on the data) in bf16 autocast, by a plain PyTorch loop (the platform's per-step cost
is benchmarks/overhead.py's subject), with attention restricted to SDPA's flash kernel (a
step that could not use it fails rather than silently timing another kernel); ``--compile``
adds a ``torch.compile`` variant.

MFU (model FLOPs utilisation) = achieved model FLOPs/s over the GPU's dense bf16 peak.
Model FLOPs per token, as in the PaLM paper (appendix B) and nanoGPT: ``6·N + 12·L·d·T``,
N the parameters without the position table, L layers, d the model width, T the context
(the attention's score and value matmuls, forward and backward, counted in full as is
usual). Peaks by device name: H100/H200 SXM 989 TFLOP/s, H100 PCIe 756, A100 312, L4 121,
A10 125, RTX 4090 165 (dense, no sparsity); an unknown GPU needs ``--peak-tflops``.

Writes the section "GPU throughput" of BENCHMARKS.md (between HTML comment markers); without
a CUDA device it says so, writes nothing and exits with status 1. Usage (a few minutes):

    .venv/bin/python benchmarks/gpu_throughput.py [--batch 8] [--steps 30] [--compile]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from _report import write_section

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- gpu-throughput:start -->", "<!-- gpu-throughput:end -->"

#: Dense bf16 tensor-core peaks in TFLOP/s, by a lower-case fragment of the device name; the first match wins.
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100", 989.0),  # SXM (and NVL, per GPU)
    ("a100", 312.0),
    ("l4", 121.0),
    ("a10", 125.0),
    ("4090", 165.0),
]

GPT2_SMALL = [
    "experiment=plain", "model.n_layers=12", "model.d_model=768", "model.n_heads=12", "model.dropout=0.0",
    "model/position=learned", "model.position.max_length=1024", "model.vocab_size=50304",
    "data.train_examples=64", "data.val_examples=32", "logger=none",
]


def peak_tflops(name: str) -> float | None:
    lowered = name.lower()
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment in lowered), None)


def model_flops_per_token(params: int, position_params: int, layers: int, d_model: int, context: int) -> float:
    """6·N (N without the position table) + 12·L·d·T."""
    return 6.0 * (params - position_params) + 12.0 * layers * d_model * context


def build_model(extra: list[str]) -> tuple[torch.nn.Module, Any]:
    import plugformer

    cfg = plugformer.compose([*GPT2_SMALL, *extra])
    return plugformer.build(cfg).model, cfg


def position_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".position." in f".{name}")


def time_variant(model: torch.nn.Module, *, batch: int, context: int, vocab: int, steps: int, warmup: int, compile_model: bool) -> dict[str, float]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device = torch.device("cuda")
    model = model.to(device).train()
    model.objective.metrics_due = False  # training steps compute the loss only
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    forward = torch.compile(model) if compile_model else model
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, vocab, (batch, context), device=device, generator=generator),
         "labels": torch.randint(0, vocab, (batch, context), device=device, generator=generator)}
        for _ in range(4)
    ]

    def step(i: int) -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            loss = forward(batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(i)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="sequences of 1024 tokens per step")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also time a torch.compile variant")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, if not in the table")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("gpu_throughput: no CUDA device (torch.cuda.is_available() is False); nothing measured, BENCHMARKS.md unchanged.", file=sys.stderr)
        return 1
    name = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or peak_tflops(name)
    if peak is None:
        print(f"gpu_throughput: no bf16 peak known for {name!r}; pass --peak-tflops <dense bf16 TFLOP/s>.", file=sys.stderr)
        return 1

    rows = []
    for variant in ["eager", *(["compile"] if args.compile else [])]:
        model, cfg = build_model([])
        context, layers, d_model = int(cfg.model.position.max_length), int(cfg.model.n_layers), int(cfg.model.d_model)
        vocab = int(cfg.model.vocab_size)
        params = sum(p.numel() for p in model.parameters())
        flops_token = model_flops_per_token(params, position_parameters(model), layers, d_model, context)
        measured = time_variant(model, batch=args.batch, context=context, vocab=vocab, steps=args.steps, warmup=args.warmup, compile_model=variant == "compile")
        tokens_s = args.batch * context / measured["step_s"]
        mfu = tokens_s * flops_token / (peak * 1e12)
        rows.append((variant, params, measured["step_s"], tokens_s, mfu, measured["peak_gib"]))
        print(f"{variant}: {measured['step_s'] * 1000:.1f} ms/step, {tokens_s:,.0f} tokens/s, MFU {100 * mfu:.1f}%, peak {measured['peak_gib']:.1f} GiB", flush=True)
        del model
        torch.cuda.empty_cache()

    text = report(rows, name, peak, args)
    print(text)
    if not args.no_write:
        write_section(args.out, text, START, END)
        print(f"wrote the GPU throughput section of {args.out}")
    return 0


def report(rows: list[tuple], name: str, peak: float, args: argparse.Namespace) -> str:
    lines = [
        START, "## GPU throughput: GPT-2-small-sized training (bf16, SDPA flash)", "",
        f"Measured {datetime.date.today().isoformat()} on {name} (dense bf16 peak {peak:g} TFLOP/s), torch {torch.__version__}, "
        f"batch {args.batch} × 1024 tokens, median of {args.steps} steps after {args.warmup} warm-up steps; "
        "`.venv/bin/python benchmarks/gpu_throughput.py" + (" --compile" if args.compile else "") + "`.",
        "",
        "| variant | parameters | ms/step | tokens/s | MFU | peak memory (GiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, params, step_s, tokens_s, mfu, peak_gib in rows:
        lines.append(f"| {variant} | {params / 1e6:.1f}M | {step_s * 1000:.1f} | {tokens_s:,.0f} | {100 * mfu:.1f}% | {peak_gib:.1f} |")
    lines += [
        "",
        "A plain PyTorch loop (forward, backward, fused AdamW) on the model `plugformer.build` makes; "
        "MFU counts 6·N + 12·L·d·T FLOPs per token (N without the position table) over the peak. "
        "See the script's docstring for the model and the peaks table.",
        END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
