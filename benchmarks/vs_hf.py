"""A training step (forward + backward + AdamW) of plugformer's GPT-2 and Llama equivalents
against Hugging Face transformers' own models, on the same batches, side by side.

Each HF model is built from a config (random weights, no download), saved, and converted
with ``plugformer import-hf``, so both sides hold the same weights and compute the same
function (tests/test_hf_parity.py checks the logits). Both are trained by the same plain
PyTorch loop (no Lightning; the platform's per-step overhead is benchmarks/overhead.py's
subject): ``loss.backward(); optimizer.step(); optimizer.zero_grad()`` with AdamW. HF gets
``labels`` (it shifts them itself), plugformer the shifted labels its data tasks produce.

Variants: eager float32; ``compile``: ``torch.compile`` of each model's forward, both sides
alike; ``bf16``: bf16 autocast. The variants other than eager run at ``--variant-sizes``. Timing: one warm-up
step, then ``--repeats`` rounds; in each round every side runs ``--steps`` steps, in an
order that alternates from round to round (A B, B A, ...), so a loaded machine slows both
alike. The table gives the median seconds per step and the throughput ratio
plugformer / HF (above 1: plugformer faster).

Writes the section "vs Hugging Face" of BENCHMARKS.md (between HTML comment markers).
Usage (1 thread, as measured here):

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_hf.py [--sizes 128 256] [--variants eager compile bf16] [--variant-sizes 128]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from _report import write_section

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- vs-hf:start -->", "<!-- vs-hf:end -->"
TARGET = 1.25


def hf_config(arch: str, d_model: int, layers: int, vocab: int, length: int) -> Any:
    import transformers

    heads = max(2, d_model // 32)
    if arch == "gpt2":
        return transformers.GPT2Config(
            vocab_size=vocab, n_positions=length, n_embd=d_model, n_layer=layers, n_head=heads,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
        )
    return transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=64 * -(-8 * d_model // 192), num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=length, tie_word_embeddings=False,
    )


def build_pair(arch: str, d_model: int, layers: int, vocab: int, length: int, folder: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(HF model, plugformer model) with the same weights, in training mode."""
    import transformers

    from plugformer import load_run
    from plugformer.hf import import_hf

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config(arch, d_model, layers, vocab, length))
    hf.save_pretrained(folder / "hf")
    run_dir = import_hf(folder / "hf", ["logger=none"], run_dir=folder / "run")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return hf.to(device).train(), load_run(run_dir, checkpoint="last").model.to(device).train()


def make_steps(hf: torch.nn.Module, pf: torch.nn.Module, batch: torch.Tensor, compile_: bool, bf16: bool) -> dict[str, Callable[[], float]]:
    """One training-step closure per side; each returns the loss."""
    device = batch.device.type
    autocast = (lambda: torch.autocast(device, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    inputs, labels = batch[:, :-1], batch[:, 1:]
    pf_batch = {"input_ids": inputs, "labels": labels}

    def hf_loss(model: torch.nn.Module) -> torch.Tensor:
        logits = model(input_ids=inputs).logits  # the same loss plugformer's objective computes
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())

    def pf_loss(model: torch.nn.Module) -> torch.Tensor:
        return model(pf_batch).loss

    # As on the steps `plugformer train` does not log: the loss only, no accuracy (HF computes none).
    pf.objective.metrics_due = False
    steps = {}
    for name, model, loss_of in (("HF", hf, hf_loss), ("plugformer", pf, pf_loss)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        forward = torch.compile(model) if compile_ else model

        def step(forward: Any = forward, optimizer: torch.optim.Optimizer = optimizer, loss_of: Any = loss_of) -> float:
            with autocast():
                loss = loss_of(forward)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())  # a host sync per step on both sides (CUDA: the step is finished)

        steps[name] = step
    return steps


def measure(steps: dict[str, Callable[[], float]], n_steps: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per step of each side, rounds interleaved in alternating
    order. CPU time is this thread's (``time.thread_time``): time spent waiting for a core
    that other processes hold does not count, so on a loaded machine it is the steadier
    measure (with one thread, the step's own work)."""
    for step in steps.values():
        step()  # warm-up (and compilation)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in steps}
    order = list(steps)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            wall, cpu = time.perf_counter(), time.thread_time()
            for _ in range(n_steps):
                steps[name]()
            times[name].append(((time.perf_counter() - wall) / n_steps, (time.thread_time() - cpu) / n_steps))
    return {
        name: (statistics.median(w for w, _ in values), statistics.median(c for _, c in values)) for name, values in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--archs", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--variants", nargs="+", default=["eager", "compile", "bf16"], choices=["eager", "compile", "bf16", "compile+bf16"])
    parser.add_argument("--variant-sizes", type=int, nargs="+", default=[128], help="sizes that get the variants other than eager")
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="vs_hf_") as tmp:
        for arch in args.archs:
            for d_model in args.sizes:
                folder = Path(tmp) / f"{arch}_{d_model}"
                hf, pf = build_pair(arch, d_model, args.layers, args.vocab, args.length + 1, folder)
                batch = torch.randint(0, 256, (args.batch, args.length + 1), generator=torch.Generator().manual_seed(1))
                batch = batch.to(next(pf.parameters()).device)
                for variant in [v for v in args.variants if v == "eager" or d_model in args.variant_sizes]:
                    steps = make_steps(hf, pf, batch, "compile" in variant, "bf16" in variant)
                    median = measure(steps, args.steps, args.repeats)
                    (hf_wall, hf_cpu), (pf_wall, pf_cpu) = median["HF"], median["plugformer"]
                    rows.append((arch, d_model, variant, hf_wall, pf_wall, hf_wall / pf_wall, hf_cpu, pf_cpu, hf_cpu / pf_cpu))
                    print(
                        f"{arch} d={d_model} {variant}: wall HF {hf_wall * 1e3:.1f} ms, plugformer {pf_wall * 1e3:.1f} ms "
                        f"(ratio {hf_wall / pf_wall:.3f}); CPU HF {hf_cpu * 1e3:.1f} ms, plugformer {pf_cpu * 1e3:.1f} ms "
                        f"(ratio {hf_cpu / pf_cpu:.3f})", flush=True,
                    )
    if not args.no_write:
        write_section(args.out, report(rows, args), START, END)


NOTES = (
    "What a profile (torch.profiler, plugformer vs HF Llama at d_model 128, steps interleaved) shows: both sides spend "
    "over half the step in the same `aten::mm` GEMMs and the same SDPA flash kernel for CPU, so at equal math the eager "
    "step is at parity, not 25% faster. plugformer's edge is fewer, larger matmuls (fused key/value and gate/up "
    "projections: 63 vs 87 `aten::mm` calls per step, forward and backward) and fewer tensors for AdamW to update. Its "
    "objective computes no accuracy here, as on every training step `plugformer train` does not log (HF computes none). "
    "It recomputes the rotary angles in every layer (HF once per forward): length × head_dim/2 values, microseconds. "
    "Native grouped-query SDPA (`enable_gqa`) measured faster than repeating key/value heads on this CPU, so it stays. "
    "An earlier table, measured under a load average of 13, had a 1.32× row (gpt2 at d_model 256); on a quiet machine "
    "the same row is at parity, so that lead was noise. On this CPU `torch.compile` gains little for either side, and "
    "bf16 autocast was about 10× slower than float32 for both (no bf16 matrix units; not rerun). Without a GPU, "
    "nothing here says how the two compare on CUDA, where the script runs unchanged. The training loop's own per-step "
    "cost (Lightning, logging) is not in these numbers: both sides use the same plain loop (see \"Platform overhead "
    "per step\")."
)


def report(rows: list[tuple], args: argparse.Namespace) -> str:
    import transformers

    device = "cuda" if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} thread(s)"
    load = os.getloadavg()
    lines = [
        START, "## vs Hugging Face: a training step", "",
        f"`benchmarks/vs_hf.py` ({datetime.date.today()}, torch {torch.__version__}, transformers {transformers.__version__}, {device}; "
        f"{args.layers} layers, batch {args.batch} × {args.length} tokens, vocabulary {args.vocab}, AdamW; "
        f"median of {args.repeats} interleaved rounds of {args.steps} steps). Measured on the shared 2-core machine, load "
        f"average {load[0]:.1f} at the end ({'other processes were running: absolute times are inflated, ' if load[0] > 2 else ''}"
        "the ratio is what counts). "
        f"Ratio = HF seconds per step / plugformer seconds per step (plugformer's throughput relative to HF's; target ≥ {TARGET}). "
        "CPU = the benchmark thread's CPU seconds (time waiting for a core held by another process not counted), the steadier figure under load. "
        f"Made by `{' '.join([f'OMP_NUM_THREADS={torch.get_num_threads()} .venv/bin/python benchmarks/vs_hf.py', *sys.argv[1:]])}`.",
        "",
        "| model | d_model | variant | HF wall s/step | plugformer wall s/step | wall ratio | HF CPU s/step | plugformer CPU s/step | CPU ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {a} | {d} | {v} | {hw:.4f} | {pw:.4f} | {rw:.2f}× | {hc:.4f} | {pc:.4f} | {rc:.2f}× |"
        for a, d, v, hw, pw, rw, hc, pc, rc in rows
    ]
    best = max(rows, key=lambda row: row[8])
    met = [row for row in rows if row[8] >= TARGET]
    verdict = (
        f"Target ≥ {TARGET}× met by {len(met)} of {len(rows)} rows." if met else
        f"Target ≥ {TARGET}× not met: the best CPU ratio is {best[8]:.2f}× ({best[0]} d_model {best[1]}, {best[2]})."
    )
    lines += ["", verdict, "", NOTES, END]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
