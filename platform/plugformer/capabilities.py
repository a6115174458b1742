"""What a component supports and what it needs from the others.

A component *provides* capability flags and *requires* flags from the component chosen for
another kind. The builder checks every requirement before anything is built, so an unusable
combination fails with one message instead of a shape error inside a forward pass.

Flags in use by the built-ins (plugins may add their own):

- attention provides ``causal`` (a decoder mask), ``bidirectional`` (no mask),
  ``key_padding_mask``, ``score_bias`` (adds a position's bias to explicit scores),
  ``qk_transform`` (applies a position's query/key transform), ``relative_terms`` (applies a
  position's content-dependent relative scores and values), ``incremental_decoding``
  (decoding with its state equals a full forward; the kit checks it), ``cross_attention``,
  ``ignores_positions`` (a sequence mixer that orders tokens by itself: the position's
  requirements on the attention and its per-layer terms skip that layer of a plan).
- position provides ``input_embedding``, ``qk_transform``, ``score_bias`` or
  ``relative_terms`` and requires the matching flag from the attention; it provides
  ``length_extrapolation`` when it has no per-position parameters, so positions beyond the
  training length are defined (``plugformer eval`` refuses longer data otherwise).
- block provides ``cross_attention`` when it can hold one (decoders of encoder–decoders).
- objective provides its architecture (``decoder``, ``encoder``, ``encoder_decoder``) and
  the name of the batch format it consumes (``causal_lm``, ``classification``, ``seq2seq``,
  ``token_blocks``: packed blocks of text tokens, which causal LM, masked LM and span
  corruption all read);
  each layer's self-attention must then provide ``causal`` (decoder) or ``bidirectional``
  (encoder).
- data requires that batch format from the objective, and provides the special tokens it
  declares (``mask_token``, ``sentinel_tokens``, ``eos_token``), which objectives require.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

COST_CLASSES = ("quadratic", "n·√n", "n·log n", "n·w", "linear")

#: The flags the built-ins provide or require (the list above). A plugin may add its own; a
#: new flag that is *close* to one of these (difflib ratio ≥ :data:`MISSPELLING_CUTOFF`) is
#: most likely a misspelling and draws a :class:`CapabilityFlagWarning`, because a flag that
#: nobody checks passes silently (``casual`` would leave an attention unchecked for causality).
KNOWN_FLAGS = frozenset({
    # attention
    "causal", "bidirectional", "key_padding_mask", "score_bias", "qk_transform", "relative_terms",
    "incremental_decoding", "cross_attention", "ignores_positions",
    # position
    "input_embedding", "length_extrapolation",
    # objective: architecture and batch format
    "decoder", "encoder", "encoder_decoder", "causal_lm", "classification", "seq2seq", "token_blocks",
    "masked_lm", "span_corruption",
    # data: special tokens
    "mask_token", "eos_token", "sentinel_tokens",
})

#: How close (difflib's ratio, 0..1) an unknown flag must be to a known one to be reported.
MISSPELLING_CUTOFF = 0.8

#: Kinds a ``requires`` key may name (kept here so this module imports nothing of plugformer).
_REQUIRABLE_KINDS = ("attention", "position", "norm", "ffn", "block", "objective", "data", "technique")


class CapabilityFlagWarning(UserWarning):
    """A capability flag (or a ``requires`` kind) is unknown but close to a known one."""


def likely_misspellings(flags: Iterable[str], known: Iterable[str] = KNOWN_FLAGS) -> dict[str, str]:
    """Unknown flag → the known flag it is closest to, for every flag of ``flags`` that is
    not in ``known`` but within :data:`MISSPELLING_CUTOFF` of one of them."""
    known = frozenset(known)
    found: dict[str, str] = {}
    for flag in sorted(set(flags) - known):
        close = difflib.get_close_matches(flag, sorted(known), n=1, cutoff=MISSPELLING_CUTOFF)
        if close:
            found[flag] = close[0]
    return found


def _warn_misspellings(capabilities: Capabilities) -> None:
    flags = set(capabilities.provides).union(*capabilities.requires.values())
    suspects = [(flag, known, "flag") for flag, known in likely_misspellings(flags).items()]
    suspects += [(kind, known, "kind") for kind, known in likely_misspellings(capabilities.requires, _REQUIRABLE_KINDS).items()]
    for unknown, known, what in suspects:
        warnings.warn(
            f"Capabilities: the capability {what} {unknown!r} is not one plugformer knows; did you mean {known!r}? "
            f"(nothing checks an unknown {what}, so a misspelling passes silently; a deliberately new flag "
            "should not look like a known one)",
            CapabilityFlagWarning,
            stacklevel=4,
        )


def _frozen(flags: Iterable[str]) -> frozenset[str]:
    if isinstance(flags, str):
        return frozenset({flags})
    return frozenset(flags)


@dataclass(frozen=True)
class Capabilities:
    """Capability flags of one component.

    ``provides``: flags this component supports. ``requires``: kind → flags the component
    chosen for that kind must provide. ``max_length``: the longest sequence it handles (None:
    unbounded). ``cost``: for attention, its time/memory class in sequence length n.
    """

    provides: frozenset[str] = field(default_factory=frozenset)
    requires: Mapping[str, frozenset[str]] = field(default_factory=dict)
    max_length: int | None = None
    cost: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "provides", _frozen(self.provides))
        object.__setattr__(
            self, "requires", {kind: _frozen(flags) for kind, flags in dict(self.requires).items()}
        )
        if self.cost is not None and self.cost not in COST_CLASSES:
            raise ValueError(f"cost must be one of {COST_CLASSES}, got {self.cost!r}")
        _warn_misspellings(self)

    def as_dict(self) -> dict[str, Any]:
        return {
            "provides": sorted(self.provides),
            "requires": {kind: sorted(flags) for kind, flags in sorted(self.requires.items())},
            "max_length": self.max_length,
            "cost": self.cost,
        }

    def describe(self) -> str:
        parts = sorted(self.provides)
        parts += [f"needs {kind}:{flag}" for kind, flags in sorted(self.requires.items()) for flag in sorted(flags)]
        if self.max_length is not None:
            parts.append(f"max_length={self.max_length}")
        if self.cost:
            parts.append(f"cost={self.cost}")
        return ", ".join(parts)
