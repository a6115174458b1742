"""Retrieval over a real vector index (faiss): kNN-LM's datastore and evaluation
(Khandelwal et al. 2020). The hooks here only name functions; the module that imports torch
and faiss is loaded when a command or an evaluation needs it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from plugformer import hookimpl


def _index_command(arguments: list[str]) -> int:
    from plugformer_plugins.retrieval.knn_lm import index_command

    return index_command(arguments)


@hookimpl
def cli_commands() -> dict[str, Callable[[list[str]], int]]:
    return {"index": _index_command}


@hookimpl
def evaluation_metrics(namespace: str, options: dict[str, Any], run: Any, loader: Iterable[Any], split: str) -> dict[str, float] | None:
    if namespace != "knn_lm":
        return None
    from plugformer_plugins.retrieval.knn_lm import evaluate_knn_lm

    return evaluate_knn_lm(run, options, loader)
