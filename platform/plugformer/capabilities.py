"""What a component supports and what it needs from the others.

A component *provides* capability flags and *requires* flags from the component chosen for
another kind. The builder checks every requirement before anything is built, so an unusable
combination fails with one message instead of a shape error inside a forward pass.

Flags in use by the built-ins (plugins may add their own):

- attention provides ``causal`` (a decoder mask), ``bidirectional`` (no mask),
  ``key_padding_mask``, ``score_bias`` (adds a position's bias to explicit scores),
  ``qk_transform`` (applies a position's query/key transform), ``relative_terms`` (applies a
  position's content-dependent relative scores and values), ``incremental_decoding``
  (decoding with its state equals a full forward; the kit checks it), ``cross_attention``.
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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

COST_CLASSES = ("quadratic", "linear", "n·w", "n·log n")


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
