"""Greedy decoding with the model's state: the prompt once, then one token per step, each
attention reusing its cache (or recurrent state). Decoders continue ``input_ids``;
encoder–decoders encode ``input_ids`` once and decode from ``start_id``."""

from __future__ import annotations

import torch
from torch import Tensor

from plugformer.components import ModelInputs
from plugformer.model.transformer import Transformer


@torch.no_grad()
def greedy(
    model: Transformer,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    start_id: int = 0,
    eos_id: int | None = None,
) -> Tensor:
    """The ``max_new_tokens`` tokens (batch, max_new_tokens) that greedy decoding appends.

    Prompts in a batch may be left-padded (``attention_mask`` False on the padding): each
    example then gets the positions it would have alone. After ``eos_id`` an example keeps
    emitting ``eos_id``.
    """
    batch = input_ids.shape[0]
    state = model.new_state(batch)
    if model.architecture == "encoder_decoder":
        source = ModelInputs(input_ids=input_ids, attention_mask=attention_mask)
        model.encode_context(source, state)
        step = torch.full((batch, 1), start_id, dtype=torch.long, device=input_ids.device)
        inputs = ModelInputs(input_ids=input_ids, decoder_input_ids=step)
    else:
        inputs = ModelInputs(input_ids=input_ids, attention_mask=attention_mask)
    generated = []
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        hidden = model.hidden_states(inputs, state)
        token = model.objective.logits(hidden[:, -1:]).argmax(dim=-1)  # (batch, 1)
        if eos_id is not None:
            token = token.masked_fill(done[:, None], eos_id)
            done |= token[:, 0] == eos_id
        generated.append(token)
        if model.architecture == "encoder_decoder":
            inputs = ModelInputs(input_ids=input_ids, decoder_input_ids=token)
        else:
            inputs = ModelInputs(input_ids=token)
    return torch.cat(generated, dim=1)
