"""``trainer=fsdp``: Lightning's FSDP strategy as the platform builds it.

Lightning's ``strategy="fsdp"`` string wraps the whole model in one FSDP unit (nothing is
sharded per layer), refuses CPUs, and cannot clip gradients by norm. Here the platform
builds the strategy object itself from ``trainer.fsdp`` (:class:`plugformer.config.FSDPConfig`):

- every block class the layer plan built (plugin blocks included) is an FSDP unit, and with
  ``activation_checkpointing`` a checkpointed module (reversible blocks excepted: they run
  their layers outside ``forward`` and recompute on their own; they stay in the root unit);
- mixed precision follows ``trainer.precision`` (16-bit parameters and compute, gradients
  reduced in float32 unless ``reduce_in_fp32=false``);
- ``trainer.gradient_clip_val`` clips the global norm through FSDP's own ``clip_grad_norm_``;
- on CPUs it runs with gloo (torch's FSDP needs ``device_id=cpu`` there, which Lightning
  does not pass; 32-bit only, since Lightning's FSDP autocast is CUDA's);
- ``state_dict_type: sharded`` checkpoints are directories written by every rank into a
  temporary directory and swapped into place (see
  :func:`plugformer.training.checkpointing.replace_directory_atomically`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from omegaconf import OmegaConf
from torch import nn

from plugformer.config import FSDPConfig, ShardingStrategy, StateDictType
from plugformer.errors import ConfigError
from plugformer.parameters import decays, set_weight_decay
from plugformer.training.checkpointing import replace_directory_atomically, temporary_sibling

FSDP_NAMES = ("fsdp",)
# Deprecation notices from inside torch's FSDP state-dict and checkpoint code, at every
# checkpoint, that nothing in a run can act on.
_TORCH_NOTICES = (
    ".*deprecating ShardedTensor.*",
    ".*`_get_pg_default_device` will be deprecated.*",
    ".*Multiple backends are registered with this ProcessGroup.*",
    ".*`load_state_dict` is deprecated and will be removed.*",
)
_MIXED = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "bf16-true": torch.bfloat16, "16-true": torch.float16}


def is_fsdp(trainer_options: dict[str, Any]) -> bool:
    """Whether the trainer options choose FSDP (``strategy: fsdp``)."""
    strategy = trainer_options.get("strategy")
    return isinstance(strategy, str) and strategy.lower() in FSDP_NAMES


def fsdp_config(node: Any) -> FSDPConfig:
    """``trainer.fsdp`` as a typed object (also for a config read back from YAML, which is
    untyped); a bad value raises :class:`ConfigError` naming the option and its choices."""
    schema = OmegaConf.structured(FSDPConfig)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, node or {}))  # type: ignore[return-value]
    except Exception as error:  # noqa: BLE001 - OmegaConf's validation errors have many types
        key = getattr(error, "full_key", None) or getattr(error, "key", None) or "?"
        raise ConfigError(
            f"trainer.fsdp.{key} is not valid: {str(error).splitlines()[0]}",
            expected=(
                f"trainer.fsdp.sharding_strategy one of {[s.value for s in ShardingStrategy]}, "
                f"state_dict_type one of {[s.value for s in StateDictType]}, "
                "activation_checkpointing, reduce_in_fp32 and cpu_offload true or false"
            ),
            fix="correct the override, e.g. trainer.fsdp.sharding_strategy=SHARD_GRAD_OP",
        ) from None


def block_classes(model: nn.Module) -> set[type[nn.Module]]:
    """The classes to wrap as FSDP units, and to checkpoint when asked: every
    :class:`plugformer.Block` subclass in ``model`` (plugin blocks included) except
    reversible blocks, which run their sublayers outside ``forward`` (where FSDP gathers a
    unit's parameters) and recompute their activations themselves."""
    from plugformer.blocks import Block
    from plugformer.reversible import ReversibleBlock

    found = {type(module) for module in model.modules() if isinstance(module, Block)}
    return {cls for cls in found if not issubclass(cls, ReversibleBlock)}


def _accelerator_is_cpu(options: dict[str, Any]) -> bool:
    accelerator = str(options.get("accelerator") or "auto").lower()
    return accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())


def check_fsdp_options(trainer: Any) -> None:
    """Refuse, before data or model are built, ``trainer.*`` options that FSDP cannot
    honour (``trainer`` is ``cfg.trainer``); nothing happens for other strategies."""
    options = OmegaConf.to_container(trainer, resolve=True) if OmegaConf.is_config(trainer) else dict(trainer or {})
    if is_fsdp(options):  # type: ignore[arg-type]
        _check(fsdp_config(options.get("fsdp")), options)  # type: ignore[union-attr, arg-type]


def _check(config: FSDPConfig, options: dict[str, Any]) -> None:
    precision = str(options.get("precision") or "32-true")
    if _accelerator_is_cpu(options):
        if precision not in ("32-true", "32"):
            raise ConfigError(
                f"trainer=fsdp on CPUs runs in 32-bit only; trainer.precision is {precision}.",
                expected="trainer.precision=32-true with trainer.accelerator=cpu (Lightning's FSDP autocast is CUDA's)",
                fix="add trainer.precision=32-true, or train on GPUs",
            )
        if config.sharding_strategy is ShardingStrategy.HYBRID_SHARD:
            raise ConfigError(
                "trainer.fsdp.sharding_strategy=HYBRID_SHARD needs GPUs (its groups are one node's devices).",
                expected="FULL_SHARD or SHARD_GRAD_OP on CPUs",
                fix="use trainer.fsdp.sharding_strategy=FULL_SHARD, or train on GPUs",
            )
    elif precision not in (*_MIXED, "32-true", "32"):
        raise ConfigError(
            f"trainer=fsdp does not support trainer.precision={precision}.",
            expected=f"one of {[*_MIXED, '32-true']}",
            fix="use trainer.precision=bf16-mixed (GPUs) or 32-true",
        )


def _mixed_precision(config: FSDPConfig, precision: str) -> Any:
    """FSDP's MixedPrecision for a 16-bit ``precision``, with float32 gradient reduction
    when ``reduce_in_fp32``; None for 32-bit (Lightning then passes its own)."""
    from torch.distributed.fsdp import MixedPrecision

    dtype = _MIXED.get(precision)
    if dtype is None:
        return None
    return MixedPrecision(param_dtype=dtype, reduce_dtype=torch.float32 if config.reduce_in_fp32 else dtype, buffer_dtype=dtype)


def fsdp_trainer_arguments(options: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The Lightning Trainer arguments for ``options`` (``cfg.trainer`` as a dict) with
    ``strategy: fsdp``: ``strategy`` becomes a :class:`FSDPStrategy` for ``model``'s blocks,
    ``precision`` a :class:`ClippingFSDPPrecision` (returned under ``plugins``), and the
    ``fsdp`` node is consumed. Raises :class:`ConfigError` for options FSDP cannot honour."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    options = dict(options)
    config = fsdp_config(options.pop("fsdp", None))
    _check(config, options)
    precision = str(options.pop("precision", None) or "32-true")
    precision = "32-true" if precision == "32" else precision  # FSDPPrecision takes the full name only
    units = block_classes(model)
    if not units:
        raise ConfigError(
            "trainer=fsdp found no block to shard: the model has no plugformer.Block besides reversible ones.",
            expected="a model built of plugformer.Block subclasses (model/block=standard, parallel, ...)",
            fix="use a non-reversible model/block, or trainer=ddp",
        )
    strategy = FSDPStrategy(
        auto_wrap_policy=ModuleWrapPolicy(units),
        activation_checkpointing_policy=ModuleWrapPolicy(units) if config.activation_checkpointing else None,
        sharding_strategy=config.sharding_strategy.value,
        state_dict_type=config.state_dict_type.value,
        mixed_precision=_mixed_precision(config, precision),
        cpu_offload=config.cpu_offload,
        use_orig_params=True,  # the optimizer keeps its parameter groups (decay or not)
    )
    strategy.plugformer_options = config
    return {**options, "strategy": strategy, "plugins": [ClippingFSDPPrecision(precision)]}  # type: ignore[arg-type]


class ClippingFSDPPrecision(FSDPPrecision):
    """Lightning's FSDP precision, with gradient clipping by norm through the root FSDP
    module's ``clip_grad_norm_`` (the norm over every rank's shards; Lightning refuses it)."""

    root: Any = None  # the wrapped root module, set by FSDPStrategy when it wraps the model

    def clip_grad_by_norm(self, optimizer: Any, clip_val: int | float) -> None:
        if self.root is None:
            raise RuntimeError("ClippingFSDPPrecision.root is unset: the FSDP strategy did not wrap the model")
        self.root.clip_grad_norm_(clip_val)


class FSDPStrategy(LightningFSDPStrategy):
    """Lightning's FSDPStrategy with CPU (gloo) support, gradient clipping, parameter
    groups that survive sharding, atomic sharded checkpoints, and a report of what it
    sharded (:meth:`sharding_report`, in summary.json under ``sharding``)."""

    plugformer_options: FSDPConfig | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._report: dict[str, Any] = {}
        for message in _TORCH_NOTICES:
            warnings.filterwarnings("ignore", message=message)

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel
        from lightning.fabric.strategies.fsdp import _move_torchmetrics_to_device, _setup_activation_checkpointing

        # Decide weight decay by shape now: sharded parameters are flat views, all 1-D.
        for parameter in model.parameters():
            set_weight_decay(parameter, decays(parameter))
        total = sum(p.numel() for p in model.parameters())
        wrapped = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device,  # Lightning passes root_device.index: None on CPU, which FSDP refuses
            **self.kwargs,
        )
        _move_torchmetrics_to_device(wrapped, self.root_device)
        _setup_activation_checkpointing(wrapped, self._activation_checkpointing_kwargs)
        if isinstance(self.precision_plugin, ClippingFSDPPrecision):
            self.precision_plugin.root = wrapped
        self._report = self._describe(wrapped, total)
        return wrapped

    def _describe(self, wrapped: nn.Module, total: int) -> dict[str, Any]:
        from torch.distributed.fsdp import FullyShardedDataParallel

        local = sum(p.numel() for p in wrapped.parameters())
        per_rank = [local]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            per_rank = [None] * torch.distributed.get_world_size()  # type: ignore[list-item]
            torch.distributed.all_gather_object(per_rank, local)
        policy = self.kwargs.get("auto_wrap_policy")
        options = self.plugformer_options
        return {
            "strategy": "fsdp",
            "sharding_strategy": self.sharding_strategy.name,
            "units": sum(isinstance(m, FullyShardedDataParallel) for m in wrapped.modules()),
            "wrapped_classes": sorted(c.__name__ for c in getattr(policy, "_module_classes", ())),
            "activation_checkpointing": bool(self._activation_checkpointing_kwargs),
            "state_dict_type": self._state_dict_type,
            "mixed_precision": str(self.mixed_precision_config.param_dtype).removeprefix("torch.") if self.mixed_precision_config else None,
            "reduce_in_fp32": options.reduce_in_fp32 if options is not None else None,
            "parameters": total,
            "parameters_per_rank": per_rank,
        }

    def sharding_report(self) -> dict[str, Any]:
        """What was sharded: units, wrapped block classes, options, and the parameters each
        rank holds (about ``parameters / world size`` each with FULL_SHARD)."""
        return dict(self._report)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        if self._state_dict_type != "sharded":
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        final = Path(self.broadcast(str(filepath)))
        temporary = Path(self.broadcast(str(temporary_sibling(final)) if self.is_global_zero else None))
        super().save_checkpoint(checkpoint, temporary, storage_options)  # every rank writes its shard
        self.barrier("plugformer.fsdp.save_checkpoint")
        if self.is_global_zero:
            replace_directory_atomically(temporary, final)
        self.barrier("plugformer.fsdp.checkpoint_in_place")


def sharding_report(trainer: Any) -> dict[str, Any] | None:
    """The FSDP strategy's report of a trainer, or None for other strategies."""
    strategy = getattr(trainer, "strategy", None)
    return strategy.sharding_report() if isinstance(strategy, FSDPStrategy) else None
