"""Checks that the chosen components can work together, before anything is built."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from plugformer.errors import CapabilityError
from plugformer.registry import CONFIG_GROUPS, Component, Registry


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


def check_requirements(chosen: dict[str, Chosen], registry: Registry) -> None:
    """Raise :class:`CapabilityError` for the first requirement a chosen component lacks.

    The message names both components and the missing capability, and lists the components
    of either kind that would work instead.
    """
    for kind, mine in chosen.items():
        for other_kind, flags in mine.component.capabilities_for(mine.config).requires.items():
            other = chosen.get(other_kind)
            if other is None:
                continue
            missing = flags - other.provides()
            if not missing:
                continue
            instead_of_other = [c.name for c in registry.components(other_kind) if _satisfies(c, flags)]
            instead_of_mine = [c.name for c in registry.components(kind) if _accepts(c, other_kind, other)]
            raise CapabilityError(
                f"{kind} {mine.name!r} needs {', '.join(sorted(missing))} from the {other_kind}, "
                f"which {other_kind} {other.name!r} does not provide.",
                expected=f"{_article(other_kind)} {other_kind} that provides {', '.join(sorted(flags))}",
                fix=f"choose {CONFIG_GROUPS[other_kind]}= one of [{', '.join(instead_of_other) or 'none installed'}], "
                f"or keep {other_kind} {other.name!r} with {CONFIG_GROUPS[kind]}= one of "
                f"[{', '.join(instead_of_mine) or 'none installed'}]",
            )


def check_length(chosen: dict[str, Chosen], length: int) -> None:
    """Raise :class:`CapabilityError` when a component's maximum length is below ``length``."""
    for kind, mine in chosen.items():
        limit = mine.component.capabilities_for(mine.config).max_length
        if limit is not None and length > limit:
            raise CapabilityError(
                f"{kind} {mine.name!r} handles at most {limit} positions, but the data yields "
                f"sequences of {length}.",
                expected=f"sequences of at most {limit}, or a {kind} without that limit",
                fix=f"raise its limit (e.g. {CONFIG_GROUPS[kind].replace('/', '.')}.max_length={length}) "
                "or shorten the data's sequences",
            )
