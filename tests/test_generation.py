"""Decoding: cached and recomputed decoding agree for every attention that declares a
cache, beam search finds the most likely continuation, sampling is reproducible and its
filters keep what they promise, end tokens stop a sequence, masks get filled."""

from __future__ import annotations

import itertools

import pytest
import torch

import plugformer
from plugformer import ConfigError
from plugformer.model.generation import DecodingConfig, fill_masks, filter_logits, generate, greedy
from plugformer.plugins import load_plugins

TINY = ["experiment=plain", "model.d_model=32", "model.n_layers=2", "model.n_heads=4", "logger=none"]
MQAR = ["data.vocab_size=12", "data.seq_len=8", "data.num_pairs=2", "data.train_examples=32", "data.val_examples=16"]
REVERSE = ["experiment=reverse_small", "data.train_examples=64", "data.val_examples=16", "data.test_examples=0", "data.vocab_size=8", "data.max_length=6"]


def cached_attentions(flag: str = "causal") -> list[str]:
    """Every registered attention that declares incremental decoding (and ``flag``)."""
    registry = load_plugins().registry
    return sorted(
        c.name for c in registry.components("attention") if {"incremental_decoding", flag} <= c.capabilities_for().provides
    )


def model_for(*overrides: str) -> plugformer.Built:
    cfg = plugformer.compose([*TINY, *overrides])
    if cfg.model.position.name == "learned":
        cfg.model.position.max_length = 64  # decoding runs past the data's 8 tokens
    built = plugformer.build(cfg)
    torch.manual_seed(0)
    for parameter in built.model.parameters():  # weights far from initialization: a sharper test
        parameter.data.add_(torch.randn_like(parameter) * 0.3)
    built.model.eval()
    return built


def attention_options(name: str) -> list[str]:
    return [f"model/attention={name}", *(["model.attention.window=3"] if name == "local" else [])]


def cached_pairs() -> list[tuple[str, str]]:
    """(attention, position) for every cached attention with rope (relative) and learned
    (absolute: sees the padding offsets), where the attention takes that position."""
    registry = load_plugins().registry
    pairs = []
    for attention in cached_attentions():
        provides = registry.get("attention", attention).capabilities_for().provides
        for position in ("rope", "learned"):
            if registry.get("position", position).capabilities_for().requires.get("attention", frozenset()) <= provides:
                pairs.append((attention, position))
    return pairs


@pytest.mark.parametrize(("attention", "position"), cached_pairs())
def test_cached_and_recomputed_greedy_decoding_give_identical_tokens(attention: str, position: str) -> None:
    model = model_for(*MQAR, *attention_options(attention), f"model/position={position}").model
    assert model.incremental_decoding
    prompts = torch.randint(1, 12, (3, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :2] = False  # a left-padded prompt
    cached = greedy(model, prompts, 10, attention_mask=mask, use_cache=True)
    recomputed = greedy(model, prompts, 10, attention_mask=mask, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert len(set(cached.flatten().tolist())) > 1  # not a degenerate constant output


@pytest.mark.parametrize("attention", cached_attentions("cross_attention"))
def test_encoder_decoder_decoding_with_and_without_cache_agrees(attention: str) -> None:
    built = model_for(*REVERSE, f"model/attention={attention}", f"model/cross_attention={attention}")
    source = torch.randint(3, 8, (2, 5), generator=torch.Generator().manual_seed(2))
    facts = built.data.facts
    options = dict(start_id=facts["start_id"], eos_id=None)
    for strategy in ("greedy", "beam"):
        cached = generate(built.model, source, DecodingConfig(strategy=strategy, max_new_tokens=6, num_beams=3, use_cache=True), **options)
        recomputed = generate(built.model, source, DecodingConfig(strategy=strategy, max_new_tokens=6, num_beams=3, use_cache=False), **options)
        assert torch.equal(cached, recomputed), strategy


def sequence_log_prob(model, prompt: torch.Tensor, continuations: torch.Tensor) -> torch.Tensor:
    """log p(continuation | prompt) for each row of ``continuations``, by full forward passes."""
    tokens = torch.cat([prompt.expand(len(continuations), -1), continuations], dim=1)
    with torch.no_grad():
        logits = model.objective.logits(model.hidden_states(plugformer.ModelInputs(input_ids=tokens)))
    log_probs = logits[:, prompt.shape[1] - 1 : -1].log_softmax(-1)
    return log_probs.gather(-1, continuations[..., None])[..., 0].sum(dim=1)


def test_wide_beam_search_finds_the_most_likely_continuation() -> None:
    """With as many beams as there are two-token prefixes, beam search is exhaustive over
    three tokens: its answer must be the best of all 12³ continuations."""
    model = model_for(*MQAR).model
    prompt = torch.tensor([[3, 7, 1, 9]])
    every = torch.tensor(list(itertools.product(range(12), repeat=3)))
    scores = sequence_log_prob(model, prompt, every)
    best = every[scores.argmax()]
    found = generate(model, prompt, DecodingConfig(strategy="beam", num_beams=144, max_new_tokens=3, length_penalty=0.0))
    assert torch.equal(found[0], best)
    narrow = generate(model, prompt, DecodingConfig(strategy="beam", num_beams=2, max_new_tokens=3, length_penalty=0.0))
    assert sequence_log_prob(model, prompt, found) >= sequence_log_prob(model, prompt, narrow) - 1e-5


def test_one_beam_is_greedy_and_beam_search_stops_at_the_end_token() -> None:
    model = model_for(*MQAR).model
    prompts = torch.randint(1, 12, (2, 5), generator=torch.Generator().manual_seed(3))
    plain = greedy(model, prompts, 8)
    assert torch.equal(generate(model, prompts, DecodingConfig(strategy="beam", num_beams=1, max_new_tokens=8)), plain)
    eos = int(plain[0, 2])
    stopped = generate(model, prompts, DecodingConfig(strategy="beam", num_beams=3, max_new_tokens=8), eos_id=eos)
    for row in stopped.tolist():
        if eos in row:
            assert set(row[row.index(eos):]) == {eos}


def test_greedy_stops_at_the_end_token_and_repeats_it() -> None:
    model = model_for(*MQAR).model
    prompts = torch.randint(1, 12, (2, 5), generator=torch.Generator().manual_seed(4))
    plain = greedy(model, prompts, 8)
    eos = int(plain[0, 3])
    stopped = greedy(model, prompts, 8, eos_id=eos)
    first = plain[0].tolist().index(eos)
    assert stopped[0, : first + 1].tolist() == plain[0, : first + 1].tolist()
    assert set(stopped[0, first:].tolist()) == {eos}
    assert stopped.shape == (2, 8)


def test_sampling_is_reproducible_with_a_seed_and_top_k_one_is_greedy() -> None:
    model = model_for(*MQAR).model
    prompts = torch.randint(1, 12, (4, 5), generator=torch.Generator().manual_seed(5))
    config = DecodingConfig(strategy="sample", max_new_tokens=12, temperature=1.5, seed=7)
    first, again = generate(model, prompts, config), generate(model, prompts, config)
    assert torch.equal(first, again)
    other = generate(model, prompts, DecodingConfig(strategy="sample", max_new_tokens=12, temperature=1.5, seed=8))
    assert not torch.equal(first, other)
    top1 = generate(model, prompts, DecodingConfig(strategy="sample", max_new_tokens=12, top_k=1, seed=9))
    assert torch.equal(top1, greedy(model, prompts, 12))


def test_sampling_filters_keep_what_they_promise() -> None:
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.07, 0.03]])
    logits = probs.log()
    kept = lambda **options: torch.isfinite(filter_logits(logits, DecodingConfig(strategy="sample", **options)))[0].tolist()
    assert kept(top_k=2) == [True, True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False, False]  # 0.5 + 0.25 covers 0.7
    assert kept(top_p=0.75) == [True, True, False, False, False]
    assert kept(top_p=0.76) == [True, True, True, False, False]
    assert kept(top_p=0.01) == [True, False, False, False, False]  # the top token always stays
    assert kept(min_p=0.2) == [True, True, True, False, False]  # floor 0.1
    low = filter_logits(logits, DecodingConfig(strategy="sample", temperature=0.5)).softmax(-1)
    assert low[0, 0] > probs[0, 0]  # a low temperature sharpens


def test_a_model_without_a_cache_decodes_by_recomputing_and_refuses_a_forced_cache() -> None:
    model = model_for(*MQAR).model
    prompts = torch.randint(1, 12, (2, 5), generator=torch.Generator().manual_seed(6))
    expected = greedy(model, prompts, 6)
    model.incremental_decoding = False  # as for an attention that does not declare it
    assert torch.equal(greedy(model, prompts, 6), expected)
    with pytest.raises(ConfigError, match="cannot decode incrementally"):
        greedy(model, prompts, 6, use_cache=True)


def test_bad_decoding_options_are_refused() -> None:
    for options in ({"top_p": 0.0}, {"num_beams": 0}, {"temperature": -1.0}, {"strategy": "nucleus"}):
        with pytest.raises((ConfigError, ValueError)):
            DecodingConfig(**options)


def test_fill_masks_replaces_only_the_masked_positions() -> None:
    built = model_for(*MQAR)
    masked = torch.tensor([[3, 11, 5, 11, 7]])
    filled = fill_masks(built.model, masked, mask_id=11)
    with torch.no_grad():
        logits = built.model.objective.logits(built.model.hidden_states(plugformer.ModelInputs(input_ids=masked)))
    assert filled[0, [0, 2, 4]].tolist() == [3, 5, 7]
    assert filled[0, [1, 3]].tolist() == logits[0, [1, 3]].argmax(-1).tolist()
