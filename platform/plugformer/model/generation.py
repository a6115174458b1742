"""Decoding from a model: greedy, sampling (temperature, top-k, top-p, min-p) and beam
search (width, length penalty), for decoders and encoder–decoders; mask filling for masked
language models.

Each strategy runs through a :class:`Stepper`, which feeds the decoder either one token at
a time with the model's state (every attention's KV cache or recurrent state: the prompt
once, then one token per step) or, for models whose attention cannot decode incrementally,
the whole sequence again at every step. Both give the same logits; the test suite checks
that cached and uncached greedy decoding give identical tokens for every attention that
declares ``incremental_decoding``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from plugformer.components import ModelInputs
from plugformer.errors import ConfigError
from plugformer.model.transformer import ModelState, Transformer


class Strategy(str, Enum):
    greedy = "greedy"
    sample = "sample"
    beam = "beam"


@dataclass
class DecodingConfig:
    """How to decode. ``temperature``/``top_k``/``top_p``/``min_p`` shape sampling (0 or 1
    turn a filter off); ``num_beams``/``length_penalty`` shape beam search, whose
    hypotheses are ranked by ``sum log p / length ** length_penalty``. ``use_cache`` None
    means: with the model's state whenever its decoder can decode incrementally."""

    strategy: Strategy = Strategy.greedy
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    num_beams: int = 4
    length_penalty: float = 1.0
    seed: int | None = None
    use_cache: bool | None = None

    def __post_init__(self) -> None:
        self.strategy = Strategy(self.strategy)
        for name, lower, upper in (("max_new_tokens", 1, None), ("top_k", 0, None), ("num_beams", 1, None)):
            value = getattr(self, name)
            if value < lower:
                raise ConfigError(f"{name}={value} is below {lower}.", expected=f"{name} >= {lower}", fix=f"set {name}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p={self.top_p} is outside (0, 1].", expected="a nucleus mass such as 0.9", fix="set top_p")
        if not 0.0 <= self.min_p < 1.0:
            raise ConfigError(f"min_p={self.min_p} is outside [0, 1).", expected="a fraction such as 0.05", fix="set min_p")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} is negative.", expected="temperature >= 0 (0: greedy)", fix="set temperature")


class Stepper:
    """Feeds a decoder: :meth:`start` with the prompt (decoders) or the start token
    (encoder–decoders, whose source is encoded once), then :meth:`feed` with each new token;
    both return the logits of the last position (rows, vocab). :meth:`reorder` follows beam
    search. With ``use_cache`` the model's state carries the past; without, the whole
    sequence is recomputed with the positions the cached path would give."""

    def __init__(self, model: Transformer, input_ids: Tensor, attention_mask: Tensor | None, *, start_id: int | None, use_cache: bool) -> None:
        self.model = model
        self.use_cache = use_cache
        self.encoder_decoder = model.architecture == "encoder_decoder"
        rows = input_ids.shape[0]
        self.state: ModelState | None = model.new_state(rows) if use_cache else None
        if self.encoder_decoder:
            if start_id is None:
                raise ConfigError(
                    "Decoding an encoder–decoder needs the token its decoder starts from.",
                    expected="the data task's start_id fact",
                    fix="pass start_id=",
                )
            self.source = ModelInputs(input_ids=input_ids, attention_mask=attention_mask)
            if self.state is None:  # no cache: still encode the source only once
                self.state = ModelState(batch_size=rows)
            model.encode_context(self.source, self.state)
            self.tokens = torch.full((rows, 1), start_id, dtype=torch.long, device=input_ids.device)
            self.mask = torch.ones_like(self.tokens, dtype=torch.bool)
        else:
            self.tokens = input_ids
            self.mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)

    def start(self) -> Tensor:
        return self._logits(self.tokens, self.mask)

    def feed(self, token: Tensor) -> Tensor:
        """Append ``token`` (rows, 1) and return the next logits."""
        self.tokens = torch.cat([self.tokens, token], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(token, dtype=torch.bool)], dim=1)
        return self._logits(token, None)

    def reorder(self, index: Tensor) -> None:
        self.tokens, self.mask = self.tokens[index], self.mask[index]
        if self.state is not None:
            self.state.reorder(index)
        if self.encoder_decoder:
            mask = self.source.attention_mask
            self.source = ModelInputs(input_ids=self.source.input_ids[index], attention_mask=mask[index] if mask is not None else None)

    def _logits(self, new_tokens: Tensor, new_mask: Tensor | None) -> Tensor:
        if self.use_cache:  # only the new tokens; the state holds the rest
            ids, mask, positions = new_tokens, new_mask, None
        else:  # the whole sequence, each example's positions counting its real tokens only
            ids, mask = self.tokens, self.mask
            positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        if self.encoder_decoder:
            inputs = ModelInputs(
                input_ids=self.source.input_ids, attention_mask=self.source.attention_mask,
                decoder_input_ids=ids, decoder_attention_mask=mask, decoder_positions=positions,
            )
        else:
            inputs = ModelInputs(input_ids=ids, attention_mask=mask, positions=positions)
        hidden = self.model.hidden_states(inputs, self.state)
        return self.model.objective.logits(hidden[:, -1:])[:, 0]


def resolve_cache(model: Transformer, use_cache: bool | None) -> bool:
    """Whether to decode with the model's state: as asked, or (None) whenever every decoder
    attention declares ``incremental_decoding``. Asking for a cache the model lacks is refused."""
    supported = bool(getattr(model, "incremental_decoding", False))
    if use_cache is None:
        return supported
    if use_cache and not supported:
        raise ConfigError(
            "This model's decoder cannot decode incrementally: an attention in it does not declare incremental_decoding.",
            expected="use_cache=False (recompute the sequence at every step) for this model",
            fix="drop --cache / use_cache=True",
        )
    return use_cache


def check_positions(model: Transformer, prompt_length: int, max_new_tokens: int) -> None:
    """Refuse a generation that needs positions beyond the model's limit (``max_positions``:
    a learned position table sized to the training data, an attention with a maximum length)
    before decoding starts, instead of an index error part-way."""
    limit = getattr(model, "max_positions", None)
    if limit is None:
        return
    if model.architecture == "encoder_decoder":  # the source in the encoder; start + new tokens in the decoder
        needed, room = max(prompt_length, max_new_tokens), limit if prompt_length <= limit else 0
    else:  # the prompt, then every new token but the last is fed back
        needed, room = prompt_length + max_new_tokens - 1, limit - prompt_length + 1
    if needed <= limit:
        return
    raise ConfigError(
        f"Generating {max_new_tokens} tokens from a prompt of {prompt_length} needs {needed} positions, but this "
        f"model handles at most {limit} (a learned position table is sized to the training data's length, "
        "unless model.position.max_length was set when training).",
        expected=f"prompt and new tokens within {limit} positions",
        fix=(f"--max-new-tokens {room}" if room >= 1 else "a shorter prompt")
        + "; to generate longer, train with model.position.max_length=<length> or a position encoding without "
        "a maximum (rope, alibi, sinusoidal)",
    )


def filter_logits(logits: Tensor, config: DecodingConfig) -> Tensor:
    """Logits (rows, vocab) with temperature applied and tokens outside top-k, the top-p
    nucleus or the min-p floor set to -inf (at least the most likely token always stays)."""
    logits = logits.float() / max(config.temperature, 1e-8)
    if config.top_k and config.top_k < logits.shape[-1]:
        kth = logits.topk(config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if config.min_p > 0:
        floor = config.min_p * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > config.top_p  # mass before this token already covers p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), float("-inf"))
    return logits


def _choose(logits: Tensor, config: DecodingConfig, generator: torch.Generator | None) -> Tensor:
    if config.strategy is Strategy.greedy or config.temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, config).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _generator(config: DecodingConfig, device: torch.device) -> torch.Generator | None:
    if config.seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    return generator


@torch.no_grad()
def generate(
    model: Transformer,
    input_ids: Tensor,
    config: DecodingConfig | None = None,
    *,
    attention_mask: Tensor | None = None,
    start_id: int | None = None,
    eos_id: int | None = None,
) -> Tensor:
    """The tokens (batch, max_new_tokens) that decoding appends to ``input_ids`` (a
    decoder's prompt, left-padded in a batch with ``attention_mask`` False on the padding)
    or produces from it (an encoder–decoder's source, starting from ``start_id``). After
    ``eos_id`` an example repeats ``eos_id``. ``config.seed`` makes sampling reproducible."""
    config = config or DecodingConfig()
    if model.architecture == "encoder":
        raise ConfigError(
            "An encoder-only model does not generate continuations.",
            expected="a decoder or encoder–decoder run; for masked LM use fill_masks",
            fix="use `plugformer generate` with a <mask> in the prompt for a masked-LM run",
        )
    check_positions(model, input_ids.shape[1], config.max_new_tokens)
    use_cache = resolve_cache(model, config.use_cache)
    if config.strategy is Strategy.beam:
        return beam_search(model, input_ids, config, attention_mask=attention_mask, start_id=start_id, eos_id=eos_id, use_cache=use_cache)
    generator = _generator(config, input_ids.device)
    stepper = Stepper(model, input_ids, attention_mask, start_id=start_id, use_cache=use_cache)
    logits = stepper.start()
    rows = input_ids.shape[0]
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    generated: list[Tensor] = []
    for step in range(config.max_new_tokens):
        token = _choose(logits, config, generator)
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        generated.append(token)
        if step + 1 == config.max_new_tokens or (eos_id is not None and bool(done.all())):
            break
        logits = stepper.feed(token[:, None])
    out = torch.stack(generated, dim=1)
    return _pad_to(out, config.max_new_tokens, eos_id)


def _pad_to(tokens: Tensor, length: int, fill: int | None) -> Tensor:
    if tokens.shape[1] >= length or fill is None:
        return tokens
    return torch.cat([tokens, tokens.new_full((tokens.shape[0], length - tokens.shape[1]), fill)], dim=1)


def greedy(
    model: Transformer,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    start_id: int = 0,
    eos_id: int | None = None,
    use_cache: bool | None = None,
) -> Tensor:
    """Greedy decoding: :func:`generate` with the greedy strategy."""
    config = DecodingConfig(strategy=Strategy.greedy, max_new_tokens=max_new_tokens, use_cache=use_cache)
    return generate(model, input_ids, config, attention_mask=attention_mask, start_id=start_id, eos_id=eos_id)


@torch.no_grad()
def beam_search(
    model: Transformer,
    input_ids: Tensor,
    config: DecodingConfig,
    *,
    attention_mask: Tensor | None = None,
    start_id: int | None = None,
    eos_id: int | None = None,
    use_cache: bool = True,
) -> Tensor:
    """The best of ``config.num_beams`` hypotheses per example (batch, max_new_tokens),
    ranked by ``sum log p / length ** length_penalty`` (length counts generated tokens, end
    token included), padded with ``eos_id``. A hypothesis ends at ``eos_id``; an example is
    done once it holds ``num_beams`` ended hypotheses none of its open beams can beat."""
    batch, beams = input_ids.shape[0], config.num_beams
    rows = torch.arange(batch, device=input_ids.device).repeat_interleave(beams)
    mask = attention_mask[rows] if attention_mask is not None else None
    stepper = Stepper(model, input_ids[rows], mask, start_id=start_id, use_cache=use_cache)
    scores = torch.zeros(batch, beams, device=input_ids.device)
    scores[:, 1:] = float("-inf")  # every beam starts as the same prompt: count it once
    sequences = input_ids.new_zeros(batch * beams, 0)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch)]
    done = [False] * batch
    penalty = config.length_penalty
    logits = stepper.start()
    for step in range(config.max_new_tokens):
        log_probs = logits.float().log_softmax(dim=-1)
        vocab = log_probs.shape[-1]
        candidates = (scores.reshape(-1, 1) + log_probs).reshape(batch, beams * vocab)
        top_scores, top_index = candidates.topk(min(2 * beams, beams * vocab), dim=1)
        next_scores = torch.full((batch, beams), float("-inf"), device=scores.device)
        next_source = torch.zeros(batch, beams, dtype=torch.long, device=scores.device)
        next_token = torch.full((batch, beams), eos_id if eos_id is not None else 0, dtype=torch.long, device=scores.device)
        length = step + 1
        for b in range(batch):
            if done[b]:
                continue
            slot = 0
            for rank, (score, index) in enumerate(zip(top_scores[b].tolist(), top_index[b].tolist())):
                source, token = divmod(index, vocab)
                if eos_id is not None and token == eos_id:
                    if rank < beams and score > float("-inf"):
                        hypothesis = sequences[b * beams + source].tolist() + [eos_id]
                        finished[b].append((score / length**penalty, hypothesis))
                    continue
                next_scores[b, slot], next_source[b, slot], next_token[b, slot] = score, source, token
                slot += 1
                if slot == beams:
                    break
            if len(finished[b]) >= beams:
                finished[b] = sorted(finished[b], key=lambda h: h[0], reverse=True)[:beams]
                best_open = float(next_scores[b, 0]) / length**penalty
                done[b] = best_open <= finished[b][-1][0]
        if all(done):
            break
        index = (torch.arange(batch, device=scores.device)[:, None] * beams + next_source).reshape(-1)
        sequences = torch.cat([sequences[index], next_token.reshape(-1, 1)], dim=1)
        scores = next_scores
        if step + 1 == config.max_new_tokens:
            break
        stepper.reorder(index)
        logits = stepper.feed(next_token.reshape(-1, 1))
    best: list[list[int]] = []
    for b in range(batch):
        hypotheses = list(finished[b])
        if not done[b]:  # open beams count as they stand
            length = sequences.shape[1]
            hypotheses += [(float(scores[b, k]) / length**penalty, sequences[b * beams + k].tolist()) for k in range(beams) if scores[b, k] > float("-inf")]
        best.append(max(hypotheses, key=lambda h: h[0])[1])
    fill = eos_id if eos_id is not None else 0
    out = input_ids.new_full((batch, config.max_new_tokens), fill)
    for b, tokens in enumerate(best):
        out[b, : len(tokens)] = torch.tensor(tokens[: config.max_new_tokens], dtype=torch.long)
    return out


@torch.no_grad()
def fill_masks(
    model: Transformer,
    input_ids: Tensor,
    mask_id: int,
    config: DecodingConfig | None = None,
    *,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """``input_ids`` with every ``mask_id`` replaced by the encoder's prediction (most likely
    token, or sampled with the config's sampling filters), all positions at once."""
    config = config or DecodingConfig()
    hidden = model.hidden_states(ModelInputs(input_ids=input_ids, attention_mask=attention_mask))
    masked = input_ids == mask_id
    logits = model.objective.logits(hidden)[masked]
    if logits.numel() == 0:
        return input_ids
    predicted = _choose(logits, config, _generator(config, input_ids.device))
    filled = input_ids.clone()
    filled[masked] = predicted
    return filled
