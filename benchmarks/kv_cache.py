"""The key/value cache of multi-, grouped- and multi-query attention while decoding.

Builds a decoder through the Python API (full attention, rope, d_model=512, 8 heads of 64,
4 layers) with ``model.n_kv_heads`` = 8 (multi-head), 2 (grouped-query) and 1
(multi-query), fills its decoding state with a prompt of ``--prompt`` tokens for a batch of
``--batch``, then decodes ``--steps`` tokens one at a time with the cache. Reports the bytes
the caches hold (keys and values of every layer, read from the caches themselves), their
ratio to multi-head attention, and the median time per decoded token.

Writes the section "Key/value cache" of BENCHMARKS.md between HTML comment markers. Usage:

    .venv/bin/python benchmarks/kv_cache.py [--prompt 1024] [--steps 32] [--batch 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform as host  # the standard-library module; never the project's platform/ folder
import re
import statistics
import time
from pathlib import Path

import torch

import plugformer
from plugformer import KVCache, ModelInputs

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- kv-cache:start -->", "<!-- kv-cache:end -->"
HEADS = 8


def measure(kv_heads: int, prompt: int, steps: int, batch: int) -> dict:
    cfg = plugformer.compose([
        "model.d_model=512", f"model.n_heads={HEADS}", f"model.n_kv_heads={kv_heads}", "model.n_layers=4",
        "model/position=rope", "data.train_examples=64", "data.val_examples=32", "logger=none",
    ])
    model = plugformer.build(cfg).model.eval()
    vocab = model.token_embedding.num_embeddings
    state = model.new_state(batch)
    times = []
    with torch.no_grad():
        model.hidden_states(ModelInputs(input_ids=torch.randint(0, vocab, (batch, prompt))), state)
        token = torch.randint(0, vocab, (batch, 1))
        for _ in range(steps):
            start = time.perf_counter()
            hidden = model.hidden_states(ModelInputs(input_ids=token), state)
            token = model.objective.logits(hidden).argmax(-1)
            times.append(time.perf_counter() - start)
    cache_bytes = sum(s.nbytes() for s in state.states() if isinstance(s, KVCache))
    params = sum(p.numel() for p in model.parameters())
    return {"kv_heads": kv_heads, "cache_bytes": cache_bytes, "ms_per_token": 1000 * statistics.median(times), "params": params}


def render(rows: list[dict], args: argparse.Namespace) -> str:
    base = rows[0]["cache_bytes"]
    lines = [
        START,
        "## Key/value cache",
        "",
        f"Decoding with the cache: a decoder of 4 layers, d_model=512, {HEADS} query heads of 64, full attention "
        f"with rope, batch {args.batch}; the cache is filled with a prompt of {args.prompt} tokens, then "
        f"{args.steps} tokens are decoded one at a time. Cache bytes are read from the caches (keys and values of "
        "every layer, float32) after decoding; time is the median per decoded token.",
        "",
        f"Machine: {host.processor() or host.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s); 1-minute load average {os.getloadavg()[0]:.1f} at the end; measured "
        f"{datetime.date.today()}. Reproduce with `.venv/bin/python benchmarks/kv_cache.py --prompt {args.prompt} "
        f"--steps {args.steps} --batch {args.batch} --threads {args.threads}`.",
        "",
        "| n_kv_heads | attention | cache MiB | cache vs multi-head | expected | ms per token | parameters |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        kind = "multi-head" if row["kv_heads"] == HEADS else "multi-query" if row["kv_heads"] == 1 else "grouped-query"
        lines.append(
            f"| {row['kv_heads']} | {kind} | {row['cache_bytes'] / 2**20:.1f} | {row['cache_bytes'] / base:.4f} | "
            f"{row['kv_heads'] / HEADS:.4f} | {row['ms_per_token']:.1f} | {row['params']:,} |"
        )
    lines += ["", END]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(REPO / "BENCHMARKS.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(kv, args.prompt, args.steps, args.batch) for kv in (HEADS, 2, 1)]
    section = render(rows, args)
    print(section)
    out = Path(args.out)
    text = out.read_text() if out.exists() else "# Benchmarks\n"
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    out.write_text(text)


if __name__ == "__main__":
    main()
