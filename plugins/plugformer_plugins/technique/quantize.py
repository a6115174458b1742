"""Quantization: post-training dynamic int8 quantization of linear layers on the CPU
(``torch.ao.quantization.quantize_dynamic``; weights int8, activations quantized per batch
at run time), evaluated against the float model (loss and metric deltas, size on disk, CPU
latency per token); and quantization-aware training with fake-quantized weights
(``torch.ao.nn.qat.dynamic.Linear``; Jacob et al. 2018), converted to the same int8
modules after training."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao import quantization as tq
from torch.ao.nn.qat import dynamic as qat_dynamic

from plugformer import Component, TechniqueContext, bounds, hookimpl
from plugformer_plugins.technique import measure
from plugformer_plugins.technique.sparsity import with_masks_applied

REPORT_FILE = "quantization.json"
INT8_MODEL_FILE = "model_int8.pt"


@dataclass
class QuantizeConfig:
    """``qat``: train with fake-quantized int8 weights in the blocks' linear layers (and the
    head with ``include_head``). After training, the model's linear layers are converted to
    dynamic int8 on the CPU and evaluated against the float model on ``eval_batches``
    validation batches; latency is timed over ``latency_batches`` of them."""

    qat: bool = False
    include_head: bool = True
    eval_batches: int = field(default=8, metadata=bounds(ge=1))
    latency_batches: int = field(default=4, metadata=bounds(ge=1))
    save_model: bool = True


def target_linears(model: nn.Module, include_head: bool, *, every_path: bool = False) -> dict[str, nn.Linear]:
    """The linear layers to quantize, by their name in the model: every one in the stacks,
    and the objective's head layers with ``include_head``. A layer shared by several layers
    of the model is listed under its first name, or under each with ``every_path``."""
    names = {}
    for name, module in model.named_modules(remove_duplicate=not every_path):
        in_stacks = name.startswith("stacks.")
        in_head = name.startswith("objective.")
        if isinstance(module, nn.Linear) and (in_stacks or (include_head and in_head)):
            names[name] = module
    return names


def prepare_qat(model: nn.Module, include_head: bool) -> int:
    """Swap the target linear layers for fake-quantized ones (int8 symmetric weights); shared
    weights stay shared. Returns how many were swapped."""
    qconfig = tq.default_dynamic_qat_qconfig
    fakes: dict[int, nn.Module] = {}  # one fake-quantized module per linear layer, however many paths reach it
    for name, linear in target_linears(model, include_head, every_path=True).items():
        if type(linear) is not nn.Linear:
            continue
        if id(linear) not in fakes:
            linear.qconfig = qconfig
            fake = qat_dynamic.Linear.from_float(linear)
            for attribute in ("scale_init_by_depth",):
                if hasattr(linear, attribute):
                    setattr(fake, attribute, getattr(linear, attribute))
            fakes[id(linear)] = fake
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fakes[id(linear)])
    return len(fakes)


def retie_shared(reference: nn.Module, converted: nn.Module) -> None:
    """Where several paths of ``reference`` reach one module (cross-layer sharing), make the
    same paths of ``converted`` (a converted copy, which made one module per path) reach one
    module again: the first path's."""
    first: dict[int, str] = {}
    for name, module in reference.named_modules(remove_duplicate=False):
        if not name:
            continue
        if id(module) not in first:
            first[id(module)] = name
            continue
        parent_name, _, child = name.rpartition(".")
        try:
            parent, target = converted.get_submodule(parent_name) if parent_name else converted, converted.get_submodule(first[id(module)])
        except AttributeError:
            continue  # inside a module the conversion replaced (a fake-quantize observer)
        setattr(parent, child, target)


def quantize_model(model: nn.Module, include_head: bool = True) -> nn.Module:
    """A CPU copy of ``model`` with its target linear layers as dynamic int8 modules
    (``torch.ao.nn.quantized.dynamic.Linear``): fake-quantized (QAT) layers are converted
    with their learned weight observers, float ones with ``quantize_dynamic``. Pruning masks
    are applied first, so the zeros are in the int8 weights. Modules shared across layers stay
shared (one int8 module each)."""
    plain = with_masks_applied(model).cpu().float().eval()
    if any(isinstance(m, qat_dynamic.Linear) for m in plain.modules()):
        quantized = tq.convert(plain, mapping=tq.get_default_dynamic_quant_module_mappings(), inplace=False)
    else:
        names = set(target_linears(plain, include_head, every_path=True))
        quantized = tq.quantize_dynamic(plain, {name: tq.default_dynamic_qconfig for name in names}, dtype=torch.qint8)
    retie_shared(plain, quantized)
    return quantized


def float_copy(model: nn.Module) -> nn.Module:
    """A CPU float copy with pruning masks applied (the reference the int8 model is compared with)."""
    return with_masks_applied(model).cpu().float().eval()


class Quantize:
    """The ``quantize`` technique. Its report (``quantize/...`` in the run summary and
    :data:`REPORT_FILE`): ``fp32/<metric>``, ``int8/<metric>`` and ``delta/<metric>`` (int8 −
    fp32) for the objective's loss and metrics, ``fp32/bytes``, ``int8/bytes``,
    ``size_ratio``, ``fp32/latency_per_token_s``, ``int8/latency_per_token_s``, ``speedup``,
    ``int8_modules``, ``threads``."""

    def __init__(self, config: QuantizeConfig, ctx: TechniqueContext) -> None:
        self.config = config
        self.run_dir = Path(ctx.run_dir)
        self.model: nn.Module | None = None
        self.report: dict[str, Any] = {}

    @hookimpl(tryfirst=True)  # before other techniques wrap the linear layers (pruning masks)
    def model_built(self, model: nn.Module, cfg: Any) -> None:
        self.model = model
        if self.config.qat:
            prepare_qat(model, self.config.include_head)

    @hookimpl
    def lightning_callbacks(self, cfg: Any) -> list[Any]:
        from plugformer_plugins.technique.quantize_callback import QuantizationReport  # imports Lightning

        return [QuantizationReport(self)]

    @hookimpl
    def run_summary(self, trainer: Any, module: Any) -> dict[str, Any] | None:
        return {f"quantize/{name}": value for name, value in self.report.items()} or None

    def evaluate(self, batches: list[dict[str, Any]]) -> dict[str, Any]:
        """Quantize the trained model and compare it with the float one on ``batches``."""
        assert self.model is not None
        reference = float_copy(self.model)
        quantized = quantize_model(self.model, self.config.include_head)
        timed = batches[: self.config.latency_batches]
        fp32, int8 = measure.evaluate(reference, batches), measure.evaluate(quantized, batches)
        report: dict[str, Any] = {f"fp32/{k}": v for k, v in fp32.items()}
        report.update({f"int8/{k}": v for k, v in int8.items()})
        report.update({f"delta/{k}": int8[k] - fp32[k] for k in fp32 if k in int8})
        report["fp32/bytes"], report["int8/bytes"] = measure.saved_bytes(reference), measure.saved_bytes(quantized)
        report["size_ratio"] = report["int8/bytes"] / report["fp32/bytes"]
        report["fp32/latency_per_token_s"] = measure.cpu_latency_per_token(reference, timed)
        report["int8/latency_per_token_s"] = measure.cpu_latency_per_token(quantized, timed)
        report["speedup"] = report["fp32/latency_per_token_s"] / max(report["int8/latency_per_token_s"], 1e-12)
        report["int8_modules"] = sum(isinstance(m, torch.ao.nn.quantized.dynamic.Linear) for m in quantized.modules())
        report["threads"] = torch.get_num_threads()
        report["qat"] = self.config.qat
        self.report = report
        from lightning.pytorch.utilities import rank_zero_only  # loaded: called while training

        if rank_zero_only.rank == 0:
            (self.run_dir / REPORT_FILE).write_text(json.dumps(report, indent=2))
            if self.config.save_model:
                torch.save(quantized.state_dict(), self.run_dir / INT8_MODEL_FILE)
        return report


COMPONENT = Component(
    kind="technique",
    name="quantize",
    factory=Quantize,
    config=QuantizeConfig,
    summary="Dynamic int8 quantization of linear layers on CPU with a loss/size/latency report; optional quantization-aware training.",
    reference="Jacob et al. 2018, Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference",
)
