"""Memorizing attention on a generated long text whose repeats lie several segments back.

Each of 8 streams is a sequence of documents; a document is ``passages`` random passages of
one segment each (``segment`` tokens from a vocabulary of ``vocab``), followed by the same
passages again in shuffled order. A repeated passage was seen 1 to 2·passages − 1 segments
earlier in the same document, so only a memory of earlier segments of that document predicts
it; the first segment of every document resets the memory. Batch t holds segment t of every
stream (the data task streams, so the training module carries the attention state).

Three runs with the same model (2 layers: a short convolution, then the attention under
test; d_model 64, 2 heads, no position encoding) and the same data:

- ``memorizing``: the stream is carried, so the memory holds the document's earlier segments;
- ``memorizing_no_memory``: the same attention, the data marked as not streaming (no state,
  nothing retrieved);
- ``full``: full causal attention over the segment.

Prints val/loss of each run and writes ``memorizing_repeats.json`` beside this script.
Run from the repository root:

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/memorizing_repeats.py [--steps 400] [--top-k 32] [--runs memorizing full]

The ideal loss with memory is about (1/2)·ln(vocab)·(1 + 1/segment) (fresh passages are
unpredictable; in a repeat only the first token is); without memory it is ln(vocab).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import plugformer
from plugformer import Capabilities, Component, DataTask, hookimpl
from plugformer.plugins import load_plugins
from plugformer.training.run import train


@dataclass
class RepeatDocsConfig:
    streams: int = 8
    segment: int = 32
    passages: int = 4
    vocab: int = 64
    train_documents: int = 40
    val_documents: int = 4
    stream: bool = True
    seed: int = 0


class RepeatDocs(DataTask):
    """Ordered segments of generated documents (see the module docstring)."""

    def __init__(self, config: RepeatDocsConfig, ctx: object) -> None:
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab
        self.max_length = config.segment
        self.streams = config.stream

    def _split(self, documents: int, seed: int) -> TensorDataset:
        c = self.config
        generator = torch.Generator().manual_seed(seed)
        rows, starts = [], []
        for _ in range(c.streams):
            segments, first = [], []
            for _ in range(documents):
                passages = torch.randint(0, c.vocab, (c.passages, c.segment), generator=generator)
                order = torch.randperm(c.passages, generator=generator)
                segments += [*passages, *passages[order]]
                first += [True] + [False] * (2 * c.passages - 1)
            rows.append(torch.cat(segments))
            starts.append(torch.tensor(first))
        stream = torch.stack(rows)  # (streams, tokens)
        stream = torch.cat([stream, stream[:, :1]], dim=1)
        n = documents * 2 * c.passages
        ids = torch.stack([stream[:, t * c.segment : (t + 1) * c.segment] for t in range(n)], 1)  # (streams, n, segment)
        labels = torch.stack([stream[:, t * c.segment + 1 : (t + 1) * c.segment + 1] for t in range(n)], 1)
        reset = torch.stack(starts)  # (streams, n)
        # Batch t = segment t of every stream: order segment-major.
        return TensorDataset(ids.transpose(0, 1).flatten(0, 1), labels.transpose(0, 1).flatten(0, 1), reset.T.flatten())

    def prepare(self) -> None:
        self.train_set = self._split(self.config.train_documents, self.config.seed)
        self.val_set = self._split(self.config.val_documents, self.config.seed + 1)

    def _loader(self, dataset: TensorDataset) -> DataLoader:
        return DataLoader(
            dataset, batch_size=self.config.streams, shuffle=False,
            collate_fn=lambda rows: {
                "input_ids": torch.stack([r[0] for r in rows]),
                "labels": torch.stack([r[1] for r in rows]),
                "reset": torch.stack([r[2] for r in rows]),
            },
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set)


class RepeatDocsPlugin:
    @hookimpl
    def register_components(self, registry) -> None:  # noqa: ANN001
        registry.add(Component(
            kind="data", name="repeat_docs", factory=RepeatDocs, config=RepeatDocsConfig,
            summary="generated documents whose passages repeat several segments later",
            capabilities=Capabilities(requires={"objective": {"causal_lm"}}),
        ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--runs", nargs="+", default=["memorizing", "memorizing_no_memory", "full"])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"))
    args = parser.parse_args()
    plugins = load_plugins(extra={"repeat_docs": RepeatDocsPlugin()})
    base = [
        "experiment=plain", "data=repeat_docs", "objective=causal_lm", "model/position=none", "model.d_model=64",
        "model.n_layers=2", "model.n_heads=2", "model.dropout=0.0", "logger=none", "callbacks.progress_bar=none",
        "cpu_threads=1", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={min(args.steps, 160)}",
        "optim.lr=3e-3", "optim.warmup_steps=30",
    ]
    memorizing = [
        "model/attention=memorizing", "model.plan.attention=[short_conv,memorizing]", "model.attention.memory_size=256",
        f"model.attention.top_k={args.top_k}",
    ]
    runs = {
        "memorizing": memorizing,
        "memorizing_no_memory": [*memorizing, "data.stream=false"],
        "full": ["model.plan.attention=[short_conv,full]"],
    }
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for name, overrides in {n: runs[n] for n in args.runs}.items():
            started = time.perf_counter()
            (Path(root) / name).mkdir()
            summary = train(plugformer.compose([*base, *overrides]), plugins, Path(root) / name, run_id=name)
            results[name] = {
                "val/loss": summary["metrics"].get("val/loss"), "train/loss": summary["metrics"].get("train/loss"),
                "status": summary["status"], "seconds": round(time.perf_counter() - started, 1), "overrides": overrides,
            }
            print(name, results[name], flush=True)
    vocab, segment = RepeatDocsConfig.vocab, RepeatDocsConfig.segment
    results["reference"] = {
        "ideal_with_memory": 0.5 * math.log(vocab) * (1 + 1 / segment), "uniform": math.log(vocab), "steps": args.steps,
        "top_k": args.top_k,
    }
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
