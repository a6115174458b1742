"""Checks that the chosen components can work together, before anything is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugformer.errors import CapabilityError
from plugformer.registry import CONFIG_GROUPS, CROSS_ATTENTION_GROUP, Component, Registry


@dataclass(frozen=True)
class Chosen:
    """A component chosen for a run, with its config (an instance of its config dataclass)."""

    component: Component
    config: Any

    @property
    def name(self) -> str:
        return self.component.name

    def provides(self) -> frozenset[str]:
        return self.component.capabilities_for(self.config).provides


def _satisfies(candidate: Component, flags: frozenset[str]) -> bool:
    return flags <= candidate.capabilities_for().provides


def _accepts(candidate: Component, other_kind: str, other: Chosen) -> bool:
    needed = candidate.capabilities_for().requires.get(other_kind, frozenset())
    return needed <= other.provides()


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


#: Slots of a layer that hold a component of another kind, with their config group.
SLOTS = {"cross_attention": ("attention", CROSS_ATTENTION_GROUP)}


def kind_and_group(slot: str) -> tuple[str, str]:
    """The registry kind and config group of a slot ("cross_attention" holds an attention)."""
    return SLOTS[slot] if slot in SLOTS else (slot, CONFIG_GROUPS[slot])


def check_requirements(chosen: dict[str, Chosen], registry: Registry, *, where: str = "") -> None:
    """Raise :class:`CapabilityError` for the first requirement a chosen component lacks.

    ``chosen`` maps slots (kinds, or "cross_attention") to components; ``where`` names the
    layer in messages ("in layer 2 of the decoder"). The message names both components and
    the missing capability, and lists the components of either kind that would work instead.
    """
    for slot, mine in chosen.items():
        for other_slot, flags in mine.component.capabilities_for(mine.config).requires.items():
            other = chosen.get(other_slot)
            if other is None:
                continue
            _require(registry, flags, other_slot, other, f"{kind_and_group(slot)[0]} {mine.name!r}", where, (slot, mine))


def check_provides(
    chosen: dict[str, Chosen], registry: Registry, required: dict[str, frozenset[str]], *, who: str, where: str = ""
) -> None:
    """Raise :class:`CapabilityError` unless the component in each slot of ``required``
    provides those flags; ``who`` names what needs them ("the decoder of objective 'seq2seq'")."""
    for slot, flags in required.items():
        other = chosen.get(slot)
        if other is not None:
            _require(registry, frozenset(flags), slot, other, who, where, None)


def _require(
    registry: Registry,
    flags: frozenset[str],
    other_slot: str,
    other: Chosen,
    who: str,
    where: str,
    mine: tuple[str, Chosen] | None,
) -> None:
    missing = flags - other.provides()
    if not missing:
        return
    other_kind, other_group = kind_and_group(other_slot)
    label = other_slot.replace("_", "-")
    instead_of_other = [c.name for c in registry.components(other_kind) if _satisfies(c, flags)]
    fix = f"choose {other_group}= one of [{', '.join(instead_of_other) or 'none installed'}]"
    if mine is not None:
        slot, chosen = mine
        kind, group = kind_and_group(slot)
        instead_of_mine = [c.name for c in registry.components(kind) if _accepts(c, other_slot, other)]
        fix += f", or keep {label} {other.name!r} with {group}= one of [{', '.join(instead_of_mine) or 'none installed'}]"
    raise CapabilityError(
        f"{who} needs {', '.join(sorted(missing))} from the {label}, which {label} {other.name!r} "
        f"does not provide{' (' + where + ')' if where else ''}.",
        expected=f"{_article(label)} {label} that provides {', '.join(sorted(flags))}",
        fix=fix,
    )


def check_length(chosen: dict[str, Chosen], length: int) -> None:
    """Raise :class:`CapabilityError` when a component's maximum length is below ``length``."""
    for slot, mine in chosen.items():
        kind = kind_and_group(slot)[0]
        limit = mine.component.capabilities_for(mine.config).max_length
        if limit is not None and length > limit:
            raise CapabilityError(
                f"{kind} {mine.name!r} handles at most {limit} positions, but the data yields "
                f"sequences of {length}.",
                expected=f"sequences of at most {limit}, or a {kind} without that limit",
                fix=f"raise its limit (e.g. {CONFIG_GROUPS[kind].replace('/', '.')}.max_length={length}) "
                "or shorten the data's sequences",
            )
