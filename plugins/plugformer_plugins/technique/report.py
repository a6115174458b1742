"""The per-run compression report, added to every run's summary (summary.json's ``extra``
and the W&B summary) by this package's ``run_summary`` hook: the model's parameters (total,
and non-zero in the weights it computes with, so pruning shows), the bytes of its weights on
disk, and its CPU latency per token on a few validation batches. ``plugformer compare``
shows them as columns."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from plugformer_plugins.technique import measure

#: The report's names, in the order ``plugformer compare`` shows them.
REPORT_KEYS = ("report/params", "report/nonzero_params", "report/model_bytes", "report/cpu_latency_per_token_s")
DEFAULT_LATENCY_BATCHES = 2


def effective_parameters(model: nn.Module) -> list[Tensor]:
    """Each parameter once (shared ones once), a pruned ``<name>_orig`` multiplied by its mask."""
    seen: set[int] = set()
    tensors = []
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if id(parameter) in seen:
                continue
            seen.add(id(parameter))
            mask = getattr(module, name.removesuffix("_orig") + "_mask", None) if name.endswith("_orig") else None
            tensors.append(parameter.detach() * mask if isinstance(mask, Tensor) else parameter.detach())
    return tensors


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(total, non-zero) parameters of ``model`` as it computes now."""
    tensors = effective_parameters(model)
    return sum(t.numel() for t in tensors), sum(int(torch.count_nonzero(t)) for t in tensors)


def latency_batches(trainer: Any, model: nn.Module, count: int) -> list[dict[str, Tensor]]:
    """The first ``count`` validation batches, prepared by the objective in eval mode, on the CPU."""
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or count <= 0:
        return []
    was_training = model.training
    model.eval()
    batches = []
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            for batch in datamodule.val_dataloader():
                moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
                batches.append(measure.to_cpu(model.objective.prepare_batch(moved)))
                if len(batches) >= count:
                    break
    finally:
        model.train(was_training)
    return batches


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as a plain state_dict file holds them (shared weights
    once, pruning masks left out as they are applied, other buffers included): the size of
    the saved weights less the file's framing, computed without writing or copying anything."""
    total = 0
    seen: set[tuple[int, int]] = set()  # torch.save writes a shared storage once (tied weights)
    for name, tensor in model.state_dict().items():
        if name.endswith("weight_mask") or name.endswith("bias_mask"):
            continue  # applied, a plain model has none
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


def run_report(trainer: Any, model: nn.Module, latency_batches_count: int = DEFAULT_LATENCY_BATCHES) -> dict[str, Any]:
    """The report for a trained model; latency only when training finished and there are
    validation batches (None otherwise). A model on an accelerator is timed on the CPU
    (moved there and back, never copied)."""
    total, nonzero = parameter_counts(model)
    report: dict[str, Any] = {
        "report/params": total,
        "report/nonzero_params": nonzero,
        "report/model_bytes": weight_bytes(model),
        "report/cpu_latency_per_token_s": None,
    }
    finished = getattr(getattr(trainer, "state", None), "finished", False)
    batches = latency_batches(trainer, model, latency_batches_count) if finished else []
    if batches:
        device = next(model.parameters()).device
        was_training = model.training
        model.cpu().eval()
        try:
            report["report/cpu_latency_per_token_s"] = measure.cpu_latency_per_token(model, batches)
        finally:
            model.to(device).train(was_training)
        report["report/latency_threads"] = torch.get_num_threads()
    return report
