"""What the compression techniques read from a model's layers: per-stack blocks, the output of
each block (hidden states) and the inputs of each self-attention, captured with forward hooks
during the model's own forward pass (never a second forward)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def stack_blocks(model: nn.Module) -> dict[str, list[nn.Module]]:
    """The blocks of each stack of a :class:`plugformer.model.transformer.Transformer`, by
    stack name ("encoder", "decoder")."""
    return {name: list(stack.blocks) for name, stack in model.stacks.items()}


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's uniform mapping: student layer i (0-based) ↔ teacher layer
    (i + 1)·N/M − 1, so the last student layer learns from the last teacher layer."""
    return [(i + 1) * teacher_layers // student_layers - 1 for i in range(student_layers)]


class LayerRecorder:
    """Records, on every forward pass of the model it is attached to, the output of each
    block (``hidden[stack][i]``) and, with ``attention_inputs``, the input ``x`` and keyword
    arguments of each block's self-attention (``attention[stack][i]``). Only the last forward
    pass is kept."""

    def __init__(self, model: nn.Module, *, hidden: bool, attention_inputs: bool) -> None:
        self.hidden: dict[str, dict[int, Tensor]] = {}
        self.attention: dict[str, dict[int, tuple[Tensor, dict[str, Any]]]] = {}
        self._handles: list[RemovableHandle] = []
        for stack, blocks in stack_blocks(model).items():
            for index, block in enumerate(blocks):
                if hidden:
                    self._handles.append(block.register_forward_hook(self._hidden_hook(stack, index)))
                if attention_inputs:
                    self._handles.append(
                        block.attention.register_forward_pre_hook(self._attention_hook(stack, index), with_kwargs=True)
                    )

    def _hidden_hook(self, stack: str, index: int) -> Any:
        def hook(module: nn.Module, args: Any, output: Tensor) -> None:
            self.hidden.setdefault(stack, {})[index] = output

        return hook

    def _attention_hook(self, stack: str, index: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.attention.setdefault(stack, {})[index] = (args[0], dict(kwargs))

        return hook

    def clear(self) -> None:
        self.hidden.clear()
        self.attention.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
