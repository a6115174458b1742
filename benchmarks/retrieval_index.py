"""Build and lookup time of the faiss indexes behind kNN-LM (``plugformer index
index.type=flat|ivf|hnsw``), at a few datastore sizes.

The datastore is synthetic but shaped like one: ``--dim``-dimensional keys drawn from a
mixture of 256 Gaussian clusters (hidden states cluster by context), built with the same
``build_index`` that ``plugformer index`` uses (IVF: ``--nlist`` cells, searched with
``--nprobe``; HNSW: ``--m`` links, searched with efSearch ``--ef``). Queries are ``--queries``
fresh draws from the same mixture, searched for ``--k`` neighbours in one batch (as
``plugformer eval`` does per batch of tokens) and one at a time (a decoder generating token
by token). Recall@k is the share of the exact (flat) neighbours that the approximate index
returns.

Writes the section "Retrieval index" of BENCHMARKS.md between HTML comment markers. Usage:

    .venv/bin/python benchmarks/retrieval_index.py [--sizes 10000 100000] [--dim 128] [--threads 1]

With ``--retro`` it measures RETRO's chunk index instead (``data=retro_text``) on the shipped
corpus, through the data task itself: the training chunks encoded by ``--retro-encoder``
(``ngrams``, or a plugformer run or Hugging Face directory), the index built (flat, IVF,
HNSW), and every chunk of both splits searched for k neighbours with the same-document
exclusion (the time per chunk includes the filtering and any re-search). It writes the
section "RETRO chunk index":

    .venv/bin/python benchmarks/retrieval_index.py --retro [--retro-encoder runs/retro_encoder] [--chunk-size 16]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform as host  # the standard-library module; never the project's platform/ folder
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _report import write_section  # noqa: E402

START, END = "<!-- retrieval-index:start -->", "<!-- retrieval-index:end -->"
NOTE = (  # about the measured shape; numbers quoted here come from the table of the last run
    "Reading: the exact (flat) index costs nothing to build and its search grows linearly with the entries "
    "(batched CPU time 51 → 240 → 749 µs per query from 10K to 100K); IVF stays near 30–65 µs of CPU per query "
    "at full recall here and HNSW near 80–180 µs at recall 0.98–1.0, while their builds cost seconds to minutes "
    "(k-means training; graph insertion). For the datastores of docs/results/retrieval.md (37K entries) "
    "all three give the same perplexity; an approximate index pays off from roughly 10^5 entries on."
)


def mixture(n: int, dim: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    return (centres[picks] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)


def measure(kind: str, keys: np.ndarray, queries: np.ndarray, args: argparse.Namespace, exact: np.ndarray | None) -> dict:
    import faiss

    from plugformer_plugins.retrieval.knn_lm import IndexOptions, build_index

    started, cpu = time.perf_counter(), time.process_time()
    index = build_index(keys, IndexOptions(type=kind, nlist=args.nlist, m=args.m))
    build, build_cpu = time.perf_counter() - started, time.process_time() - cpu
    if kind == "ivf":
        index.nprobe = args.nprobe
    if kind == "hnsw":
        index.hnsw.efSearch = args.ef
    index.search(queries[:8], args.k)  # warm-up: first-call set-up is not lookup time
    started, cpu = time.perf_counter(), time.process_time()
    _, ids = index.search(queries, args.k)
    batched, batched_cpu = time.perf_counter() - started, time.process_time() - cpu
    single = []
    for row in queries[: args.single]:
        started = time.perf_counter()
        index.search(row[None, :], args.k)
        single.append(time.perf_counter() - started)
    recall = 1.0 if exact is None else float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact)]))
    return {
        "kind": kind, "entries": index.ntotal, "build_s": build, "build_cpu_s": build_cpu, "bytes": faiss.serialize_index(index).nbytes,
        "batched_us": 1e6 * batched / len(queries), "batched_cpu_us": 1e6 * batched_cpu / len(queries), "single_us": 1e6 * float(np.median(single)), "recall": recall, "ids": ids,
    }


RETRO_START, RETRO_END = "<!-- retro-index:start -->", "<!-- retro-index:end -->"


def measure_retro(kind: str, args: argparse.Namespace, cache: Path) -> dict:
    """Prepare ``retro_text`` on the shipped corpus with a fresh cache; what it recorded."""
    from plugformer import DataContext
    from plugformer_plugins.data.retro_text import RetroTextConfig, RetroTextTask

    config = RetroTextConfig(
        tokenizer="char", block_size=128, chunk_size=args.chunk_size, neighbours=args.k_retro, encoder=args.retro_encoder,
        index=kind, index_nlist=args.nlist, index_m=args.m, nprobe=args.nprobe,
    )
    task = RetroTextTask(config, DataContext(cache_dir=cache / kind))
    started = time.perf_counter()
    task.prepare()
    prepare = time.perf_counter() - started
    import json

    info = json.loads((task.index_folder() / "index.json").read_text())
    return {"kind": kind, "info": info, "retrieval": task.retrieval, "prepare_s": prepare}


def main_retro(args: argparse.Namespace) -> None:
    import tempfile

    import faiss

    faiss.omp_set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="retro-bench-") as folder:
        for kind in ("flat", "ivf", "hnsw"):
            row = measure_retro(kind, args, Path(folder))
            rows.append(row)
            info, found = row["info"], row["retrieval"]
            print(
                f"{kind:>5}: {info['entries']} chunks x {info['dimension']}, encode {info['encode_seconds']:.2f} s, build {info['build_seconds']:.3f} s, "
                f"{info['index_bytes'] / 2**20:.2f} MiB, search {found['train']['ms_per_chunk']:.3f} / {found['validation']['ms_per_chunk']:.3f} ms per chunk",
                flush=True,
            )
    load = os.getloadavg()[0]
    command = f"benchmarks/retrieval_index.py --retro --retro-encoder {args.retro_encoder} --chunk-size {args.chunk_size} --threads {args.threads}"
    lines = [
        RETRO_START,
        "## RETRO chunk index (`data=retro_text`)",
        "",
        f"The shipped corpus (characters) cut into chunks of {args.chunk_size}; the training chunks encoded by "
        f"`data.encoder={args.retro_encoder}` and indexed by faiss {faiss.__version__} (IVF: nlist={args.nlist} capped at "
        f"entries/39, nprobe={args.nprobe}; HNSW: M={args.m}, default efSearch); every chunk of both splits searched for "
        f"k={args.k_retro} neighbours in one batch, with the same-document exclusion (candidates filtered, re-searched with "
        "4x as many where fewer than k survive). Times from the data task's own records (`index.json`, `retrieval.json`).",
        "",
        f"Machine: {host.machine()}, {os.cpu_count()} cores, faiss with {args.threads} thread(s); 1-minute load average "
        f"{load:.1f} at the end (other jobs were running: the wall times are inflated by the load; sizes are not); "
        f"measured {datetime.date.today().isoformat()}. Reproduce with `.venv/bin/python {command}`.",
        "",
        "| index | chunks | dim | encode s | build s | index MiB | ms/chunk train queries | ms/chunk validation queries | missing |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        info, found = row["info"], row["retrieval"]
        lines.append(
            f"| {row['kind']} | {info['entries']:,} | {info['dimension']} | {info['encode_seconds']:.2f} | {info['build_seconds']:.3f} | "
            f"{info['index_bytes'] / 2**20:.2f} | {found['train']['ms_per_chunk']:.3f} | {found['validation']['ms_per_chunk']:.3f} | "
            f"{found['train']['missing'] + found['validation']['missing']} |"
        )
    lines += ["", RETRO_END]
    write_section(args.out, "\n".join(lines), RETRO_START, RETRO_END)
    print(f"wrote the retro-index section of {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=200, help="queries searched one at a time")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--m", type=int, default=32)
    parser.add_argument("--ef", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--retro", action="store_true", help="measure RETRO's chunk index instead (section 'RETRO chunk index')")
    parser.add_argument("--retro-encoder", default="ngrams", help="data.encoder for --retro")
    parser.add_argument("--chunk-size", type=int, default=16, help="data.chunk_size for --retro")
    parser.add_argument("--k-retro", type=int, default=2, help="data.neighbours for --retro")
    args = parser.parse_args()
    if args.retro:
        main_retro(args)
        return

    import faiss

    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = 2.0 * rng.standard_normal((256, args.dim)).astype(np.float32)
    queries = mixture(args.queries, args.dim, rng, centres)
    rows = []
    for size in args.sizes:
        keys = mixture(size, args.dim, rng, centres)
        flat = measure("flat", keys, queries, args, None)
        rows.append(flat)
        for kind in ("ivf", "hnsw"):
            rows.append(measure(kind, keys, queries, args, flat["ids"]))
        for row in rows[-3:]:
            print(
                f"{size:>8} {row['kind']:>5}: build {row['build_s']:.2f} s ({row['build_cpu_s']:.2f} CPU s), {row['bytes'] / 2**20:.1f} MiB, "
                f"{row['batched_us']:.0f} us/query batched ({row['batched_cpu_us']:.0f} CPU), {row['single_us']:.0f} us single, recall@{args.k} {row['recall']:.3f}",
                flush=True,
            )
    load = os.getloadavg()[0]
    command = " ".join(["benchmarks/retrieval_index.py", "--sizes", *map(str, args.sizes), "--dim", str(args.dim), "--threads", str(args.threads)])
    lines = [
        START,
        "## Retrieval index (kNN-LM datastores)",
        "",
        f"faiss {faiss.__version__} indexes as `plugformer index` builds them, over {args.dim}-dimensional keys from a mixture of "
        f"256 Gaussian clusters; {args.queries} queries from the same mixture, k={args.k}. IVF: nlist={args.nlist} "
        f"(capped at entries/39), nprobe={args.nprobe}; HNSW: M={args.m}, efSearch={args.ef}. *Batched*: all queries in "
        f"one search call, per query (as `plugformer eval` searches a batch of tokens), wall and CPU time of the process; "
        f"*single*: median wall time of {args.single} one-query calls (token-by-token decoding; a median of short calls "
        "mostly misses the time slices other processes take). Recall@k: share of the exact neighbours returned.",
        "",
        f"Machine: {host.machine()}, {os.cpu_count()} cores, faiss with {args.threads} thread(s); 1-minute load average "
        f"{load:.1f} at the end (other jobs were running: wall times are inflated by the load, CPU times much less, sizes and recall not at all); "
        f"measured {datetime.date.today().isoformat()}. Reproduce with `.venv/bin/python {command}`.",
        "",
        "| entries | index | build s (CPU s) | index MiB | µs/query batched (CPU) | µs/query single | recall@k |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['entries']:,} | {row['kind']} | {row['build_s']:.2f} ({row['build_cpu_s']:.2f}) | {row['bytes'] / 2**20:.1f} | "
            f"{row['batched_us']:.0f} ({row['batched_cpu_us']:.0f}) | "
            f"{row['single_us']:.0f} | {row['recall']:.3f} |"
        )
    lines += ["", NOTE, "", END]
    write_section(args.out, "\n".join(lines), START, END)
    print(f"wrote the retrieval-index section of {args.out}")


if __name__ == "__main__":
    main()
