"""``plugformer generate``: prompts in, text out, for a finished run of any objective.

What a prompt becomes depends on the run's architecture: a decoder continues it; an
encoder–decoder reads it as the source and writes the target; a masked-LM encoder fills
its ``<mask>`` tokens; a classifier names the class. Prompts are text when the run's data
task has a tokenizer (the one saved with the run), and whitespace-separated token ids
otherwise (synthetic tasks).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from plugformer.components import Objective
from plugformer.errors import ConfigError
from plugformer.model.generation import DecodingConfig, fill_masks, generate


@dataclass
class Completion:
    """One prompt's result: the prompt, the generated part (text, or ids joined by spaces)
    and the generated token ids (for a classifier: the class and its probability)."""

    prompt: str
    output: str
    ids: list[int]
    probability: float | None = None


def encode_prompt(run: Any, prompt: str) -> list[int]:
    tokenizer = run.tokenizer
    if tokenizer is not None:
        ids = list(tokenizer.encode(prompt))
    else:
        try:
            ids = [int(token) for token in prompt.split()]
        except ValueError:
            raise ConfigError(
                f"This run's data task has no tokenizer, so prompts are token ids; got {prompt!r}.",
                expected="whitespace-separated integers, e.g. --prompt '5 9 3 7'",
                fix="write the prompt as token ids",
            ) from None
        bad = [i for i in ids if not 0 <= i < run.data.vocab_size]
        if bad:
            raise ConfigError(
                f"Prompt token ids {bad} are outside the vocabulary of {run.data.vocab_size}.",
                expected=f"ids in 0..{run.data.vocab_size - 1}",
                fix="correct the prompt",
            )
    if not ids:
        raise ConfigError("An empty prompt.", expected="at least one token", fix="give a non-empty --prompt")
    return ids


def decode_ids(run: Any, ids: Sequence[int], eos_id: int | None) -> tuple[str, list[int]]:
    """The text (or ids) of ``ids`` up to and without the end token."""
    ids = list(ids)
    if eos_id is not None and eos_id in ids:
        ids = ids[: ids.index(eos_id)]
    tokenizer = run.tokenizer
    return (tokenizer.decode(ids) if tokenizer is not None else " ".join(map(str, ids))), ids


def _batch(rows: list[list[int]], pad_id: int, *, left: bool) -> tuple[Tensor, Tensor]:
    """Padded ids (batch, longest) and the mask of real tokens; decoder prompts are padded
    on the left so that every prompt ends at the last column."""
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = True
    return ids, mask


def complete(run: Any, prompts: Sequence[str], config: DecodingConfig | None = None) -> list[Completion]:
    """The completion of each prompt by the loaded run (see the module docstring)."""
    config = config or DecodingConfig()
    model, facts = run.model, dict(run.data.facts)
    pad_id = int(facts.get("pad_id", getattr(run.data, "pad_id", 0)))
    eos_id = facts.get("eos_id")
    rows = [encode_prompt(run, p) for p in prompts]
    architecture = model.architecture
    if architecture == "encoder":
        return _encoder_completions(run, prompts, rows, pad_id, config)
    ids, mask = _batch(rows, pad_id, left=architecture == "decoder")
    out = generate(model, ids, config, attention_mask=mask, start_id=facts.get("start_id"), eos_id=eos_id)
    results = []
    for prompt, generated in zip(prompts, out.tolist()):
        text, kept = decode_ids(run, generated, eos_id)
        results.append(Completion(prompt=prompt, output=text, ids=kept))
    return results


def _encoder_completions(run: Any, prompts: Sequence[str], rows: list[list[int]], pad_id: int, config: DecodingConfig) -> list[Completion]:
    model, facts = run.model, dict(run.data.facts)
    ids, mask = _batch(rows, pad_id, left=False)
    if type(model.objective).logits is not Objective.logits:  # a token head: masked LM
        mask_id = facts.get("mask_id")
        if mask_id is None or not bool((ids == mask_id).any()):
            raise ConfigError(
                "This is a masked-LM run: generation fills the prompt's mask tokens, and the prompts have none.",
                expected="prompts with <mask> where tokens should be predicted, e.g. --prompt 'The <mask>at sat.'",
                fix="put <mask> in each prompt",
            )
        filled = fill_masks(model, ids, int(mask_id), config, attention_mask=mask)
        results = []
        for prompt, row, length in zip(prompts, filled.tolist(), mask.sum(1).tolist()):
            text, kept = decode_ids(run, row[:length], None)
            results.append(Completion(prompt=prompt, output=text, ids=kept))
        return results
    with torch.no_grad():  # a classifier: the objective's logits are class scores
        outputs = model({"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(len(rows), dtype=torch.long)})
    probs = outputs.logits.float().softmax(-1)
    best = probs.argmax(-1)
    return [
        Completion(prompt=p, output=f"class {int(c)}", ids=[int(c)], probability=float(probs[i, c]))
        for i, (p, c) in enumerate(zip(prompts, best))
    ]


def read_prompts(prompts: Sequence[str], prompts_file: str | None) -> list[str]:
    collected = list(prompts)
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise ConfigError(f"The prompts file {path} does not exist.", expected="a text file, one prompt per line", fix="check --prompts-file")
        collected += [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not collected:
        raise ConfigError("No prompt given.", expected="--prompt TEXT (repeatable) or --prompts-file FILE", fix="add a prompt")
    return collected


def generate_command(run_dir: str, prompts: Sequence[str], prompts_file: str | None, config: DecodingConfig, *, checkpoint: str, as_json: bool) -> int:
    """``plugformer generate``: print each prompt's completion (JSON lines with ``--json``)."""
    import json

    from plugformer.api import load_run

    texts = read_prompts(prompts, prompts_file)
    run = load_run(run_dir, checkpoint=checkpoint)
    for completion in complete(run, texts, config):
        if as_json:
            print(json.dumps(completion.__dict__), flush=True)
        elif completion.probability is not None:
            print(f"{completion.prompt!r} → {completion.output} (p={completion.probability:.3f})", flush=True)
        elif run.model.architecture == "decoder":
            print(completion.prompt + completion.output, flush=True)
        else:
            print(f"{completion.prompt} → {completion.output}", flush=True)
    return 0
