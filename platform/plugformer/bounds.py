"""Declared bounds of config fields, and one uniform check of them.

A config dataclass (the core's own or a plugin's) declares the range of a numeric field
where the field is declared::

    from dataclasses import dataclass, field
    from plugformer import bounds

    @dataclass
    class LocalAttentionConfig:
        window: int = field(default=64, metadata=bounds(ge=1))
        dropout: float = field(default=0.0, metadata=bounds(ge=0.0, lt=1.0))

The core calls :func:`check_bounds` on every component's config object (and on its own
model and optimizer settings) before any data or model is built, and reports every value
out of range in one :class:`plugformer.ConfigError`:
``model.attention.window=0: expected an integer ≥ 1``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from plugformer.errors import ConfigError

#: The key under which :func:`bounds` stores its :class:`Bounds` in a field's metadata.
METADATA_KEY = "plugformer.bounds"


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a number: ``ge``/``gt`` below, ``le``/``lt`` above (any subset).
    A bounded number must also be finite (no NaN or infinity). ``None`` values pass, so
    optional fields (``int | None = None``) can be bounded too. In a list, every element
    is checked."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def accepts(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def describe(self) -> str:
        """The range in words: "≥ 1", "in [0, 1)", "> 0"."""
        low = f"[{_number(self.ge)}" if self.ge is not None else f"({_number(self.gt)}" if self.gt is not None else None
        high = f"{_number(self.le)}]" if self.le is not None else f"{_number(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if self.ge is not None:
            return f"≥ {_number(self.ge)}"
        if self.gt is not None:
            return f"> {_number(self.gt)}"
        if self.le is not None:
            return f"≤ {_number(self.le)}"
        if self.lt is not None:
            return f"< {_number(self.lt)}"
        return "finite"


def bounds(*, ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None) -> dict[str, Bounds]:
    """Field metadata declaring a numeric range: ``field(default=64, metadata=bounds(ge=1))``.

    ``ge``: at least, ``gt``: more than, ``le``: at most, ``lt``: less than. Merge it with
    other metadata as ``{**bounds(ge=1), "help": ...}``.
    """
    return {METADATA_KEY: Bounds(ge=ge, gt=gt, le=le, lt=lt)}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _kind(field_type: Any, value: Any) -> str:
    text = field_type if isinstance(field_type, str) else getattr(field_type, "__name__", str(field_type))
    if "float" in text:
        return "a number"
    if "int" in text or isinstance(value, int):
        return "an integer"
    return "a number"


def _default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return None


def _violations(config: Any, path: str) -> list[tuple[str, str, Any]]:
    """(name, message, default) of every value out of range."""
    found: list[tuple[str, str, Any]] = []
    for spec in dataclasses.fields(config):
        value = getattr(config, spec.name, None)
        where = f"{path}.{spec.name}" if path else spec.name
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            found.extend(_violations(value, where))
            continue
        limits = spec.metadata.get(METADATA_KEY)
        if limits is None or value is None:
            continue
        values = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, item in values:
            name = where if index is None else f"{where}[{index}]"
            number = not isinstance(item, bool) and isinstance(item, (int, float))
            if not number or not limits.accepts(float(item)):
                message = f"{name}={item!r}: expected {_kind(spec.type, item)} {limits.describe()}"
                found.append((name, message, _default(spec) if index is None else None))
    return found


def check_bounds(config: Any, path: str) -> None:
    """Raise one :class:`ConfigError` listing every field of the dataclass instance
    ``config`` (nested dataclasses included) whose value lies outside its declared
    :func:`bounds`. ``path`` is where the config sits in the run's config (``"model.attention"``,
    ``"data"``), so messages name the override to change. Objects that are not dataclass
    instances, and fields without bounds, are not checked."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        return
    found = _violations(config, path)
    if not found:
        return
    fixes = [f"{name}={default!r} (the default)" if default is not None else f"{name}=<value in range>" for name, _, default in found]
    raise ConfigError(
        "; ".join(message for _, message, _ in found) + ".",
        fix="override " + " ".join(fixes) + ", or another value in the range",
    )
