"""The generic Transformer: a token embedding, one stack (decoder or encoder) or two
(encoder–decoder), and the objective's head. It never names a specific component; it
receives built modules."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from plugformer.attention import AttentionState
from plugformer.blocks import Block, LayerState, StepInputs
from plugformer.components import FeedForward, ModelInputs, Objective, ObjectiveOutput, PositionEncoding
from plugformer.masks import all_true
from plugformer.parameters import keeps_initialization
from plugformer.reversible import ReversibleBlock, run_reversible


@dataclass
class StackState:
    """The per-layer states of one stack, and (when decoding) each example's next position."""

    layers: list[LayerState]
    next_position: Tensor | None = None  # (batch,) long; None: positions start at 0 every call

    def states(self) -> list[AttentionState]:
        return [s for layer in self.layers for s in layer.states()]


@dataclass
class ModelState:
    """What a model carries between calls: a state per stack (``encoder``, ``decoder``) and,
    for an encoder–decoder while decoding, the encoder's output. Made by
    :meth:`Transformer.new_state`; reorder it for beam search, detach it between training
    steps, reset rows at document boundaries."""

    stacks: dict[str, StackState] = field(default_factory=dict)
    batch_size: int = 0
    context: Tensor | None = None
    context_mask: Tensor | None = None

    def states(self) -> list[AttentionState]:
        return [s for stack in self.stacks.values() for s in stack.states()]

    def reorder(self, index: Tensor) -> None:
        for state in self.states():
            state.reorder(index)
        for stack in self.stacks.values():
            if stack.next_position is not None:
                stack.next_position = stack.next_position[index]
        if self.context is not None:
            self.context = self.context[index]
            self.context_mask = self.context_mask[index] if self.context_mask is not None else None

    def detach(self) -> None:
        for state in self.states():
            state.detach()
        if self.context is not None:
            self.context = self.context.detach()

    def reset(self, rows: Tensor) -> None:
        for state in self.states():
            state.reset(rows)
        for stack in self.stacks.values():
            if stack.next_position is not None:
                stack.next_position = stack.next_position.masked_fill(rows, 0)

    @property
    def empty(self) -> bool:
        return not self.states()


class Stack(nn.Module):
    """Position embedding → blocks → final norm, over embedded tokens.

    Consecutive :class:`plugformer.ReversibleBlock` s run as one reversible sequence
    (:func:`plugformer.run_reversible`): the stream enters it duplicated and leaves it averaged,
    and its activations are recomputed in the backward pass.

    ``name`` is "encoder" or "decoder"; ``position`` is the stack's position component (its
    input embedding, if any, is added here; attentions hold per-layer views of it).
    """

    def __init__(self, name: str, position: PositionEncoding, blocks: list[Block], final_norm: nn.Module, dropout: float) -> None:
        super().__init__()
        self.name = name
        self.position = position
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None,
        positions: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        extras: dict[str, Tensor] | None = None,
        state: StackState | None = None,
    ) -> Tensor:
        if mask is not None and all_true(mask):
            mask = None  # no padding: lets attention take its fastest path
        if positions is None:
            positions = self._positions(x, mask, state)
        added = self.position.embed(positions)
        if added is not None:
            x = x + added.to(x.dtype)
        x = self.drop(x)
        inputs = StepInputs(mask=mask, positions=positions, context=context, context_mask=context_mask, extras=extras or {})
        layer_states = state.layers if state is not None else [None] * len(self.blocks)
        for blocks, states in _runs(list(self.blocks), list(layer_states)):
            if isinstance(blocks[0], ReversibleBlock):
                x = run_reversible(blocks, x, inputs, states)
            else:
                x = blocks[0](x, inputs, states[0])
        return self.final_norm(x)

    @staticmethod
    def _positions(x: Tensor, mask: Tensor | None, state: StackState | None) -> Tensor:
        """0..L-1 for every example; when decoding, each example continues from its own
        count of real tokens, so left-padded prompts get the positions they would have alone."""
        batch, length = x.shape[:2]
        if state is None or state.next_position is None:
            return torch.arange(length, device=x.device)[None, :]
        real = mask.long() if mask is not None else torch.ones(batch, length, dtype=torch.long, device=x.device)
        positions = state.next_position[:, None] + (real.cumsum(dim=1) - 1).clamp(min=0)
        state.next_position = state.next_position + real.sum(dim=1)
        return positions

    def new_state(self, batch_size: int, *, streaming: bool, device: torch.device) -> StackState:
        layers = [block.new_state(batch_size, streaming=streaming) for block in self.blocks]
        next_position = None if streaming else torch.zeros(batch_size, dtype=torch.long, device=device)
        return StackState(layers=layers, next_position=next_position)


def _runs(blocks: list[Block], states: list[LayerState | None]) -> list[tuple[list, list]]:
    """The blocks in order, grouped: each run of consecutive reversible blocks together (one
    reversible sequence, recomputed in the backward pass), every other block alone."""
    runs: list[tuple[list, list]] = []
    for block, state in zip(blocks, states):
        reversible = isinstance(block, ReversibleBlock)
        if reversible and runs and isinstance(runs[-1][0][-1], ReversibleBlock):
            runs[-1][0].append(block)
            runs[-1][1].append(state)
        else:
            runs.append(([block], [state]))
    return runs


class Transformer(nn.Module):
    """Token embedding → stacks → objective.

    ``forward(batch, state=None)`` returns the objective's :class:`ObjectiveOutput`;
    :meth:`hidden_states` runs the stacks on :class:`ModelInputs` and returns the last
    stack's output (batch, length, d_model). ``architecture`` is "decoder", "encoder" or
    "encoder_decoder". ``incremental_decoding``: every self-attention of the decoder declares
    it, so generation may feed one token at a time with the state (set by the builder).
    """

    incremental_decoding: bool = False

    def __init__(
        self,
        token_embedding: nn.Embedding,
        stacks: dict[str, Stack],
        objective: Objective,
        architecture: str,
    ) -> None:
        super().__init__()
        self.token_embedding = token_embedding
        self.stacks = nn.ModuleDict(stacks)
        self.objective = objective
        self.architecture = architecture

    @property
    def encoder(self) -> Stack | None:
        return self.stacks["encoder"] if "encoder" in self.stacks else None  # type: ignore[return-value]

    @property
    def decoder(self) -> Stack | None:
        return self.stacks["decoder"] if "decoder" in self.stacks else None  # type: ignore[return-value]

    @property
    def blocks(self) -> list[Block]:
        """Every block of every stack, encoder first."""
        return [block for stack in self.stacks.values() for block in stack.blocks]  # type: ignore[union-attr]

    def forward(self, batch: dict[str, Tensor], state: ModelState | None = None) -> ObjectiveOutput:
        hidden = self.hidden_states(self.objective.model_inputs(batch), state)
        return self.objective(hidden, batch)

    def hidden_states(self, inputs: ModelInputs, state: ModelState | None = None) -> Tensor:
        if state is not None and inputs.reset is not None and bool(inputs.reset.any()):
            state.reset(inputs.reset.bool())
        stacks = state.stacks if state is not None else {}
        if self.architecture != "encoder_decoder":
            (name, stack), = self.stacks.items()
            return stack(
                self.token_embedding(inputs.input_ids),
                mask=inputs.attention_mask,
                positions=inputs.positions,
                extras=inputs.extras,
                state=stacks.get(name),
            )
        context, context_mask = self.encode_context(inputs, state)
        if inputs.decoder_input_ids is None:
            raise ValueError("an encoder–decoder needs decoder_input_ids from the objective's model_inputs")
        return self.decoder(  # type: ignore[misc]
            self.token_embedding(inputs.decoder_input_ids),
            mask=inputs.decoder_attention_mask,
            positions=inputs.decoder_positions,
            context=context,
            context_mask=context_mask,
            extras=inputs.extras,
            state=stacks.get("decoder"),
        )

    def encode_context(self, inputs: ModelInputs, state: ModelState | None = None) -> tuple[Tensor, Tensor | None]:
        """The encoder's output for the source, computed once per decoding state."""
        if state is not None and state.context is not None:
            return state.context, state.context_mask
        mask = inputs.attention_mask
        context = self.encoder(  # type: ignore[misc]
            self.token_embedding(inputs.input_ids), mask=mask, positions=inputs.positions, extras=inputs.extras
        )
        if mask is not None and all_true(mask):
            mask = None
        if state is not None:
            state.context, state.context_mask = context, mask
        return context, mask

    def new_state(self, batch_size: int, *, streaming: bool = False) -> ModelState:
        """A fresh state: for incremental decoding (each attention's cache) or, with
        ``streaming``, for carrying memories across training batches (only attentions that
        keep one). The encoder of an encoder–decoder keeps no state while decoding."""
        device = self.token_embedding.weight.device
        names = [n for n in self.stacks if not (self.architecture == "encoder_decoder" and n == "encoder")]
        return ModelState(
            stacks={n: self.stacks[n].new_state(batch_size, streaming=streaming, device=device) for n in names},  # type: ignore[operator]
            batch_size=batch_size,
        )

    def feed_forward_layers(self) -> list[FeedForward]:
        return [block.ffn for block in self.blocks if isinstance(block.ffn, FeedForward)]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def initialize(model: nn.Module, n_layers: int) -> None:
    """GPT-2 initialization: N(0, 0.02) for linear and embedding weights, zero biases, and
    N(0, 0.02/√(2·n_layers)) for the last projection of each residual branch. Modules marked
    with :func:`plugformer.keep_initialization` (and their submodules) are left as built. A
    module with an ``init_weights()`` method is then given the last word over its own
    parameters (children after their parents). See :mod:`plugformer.parameters`."""
    kept = [name for name, module in model.named_modules() if keeps_initialization(module)]
    for name, module in model.named_modules():
        if any(k == "" or name == k or name.startswith(k + ".") for k in kept):
            continue
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * n_layers) if getattr(module, "scale_init_by_depth", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
    for module in model.modules():
        init_weights = getattr(module, "init_weights", None)
        if callable(init_weights):
            init_weights()
