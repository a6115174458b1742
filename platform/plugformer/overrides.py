"""Checks of command-line overrides that Hydra would accept silently or report at length.

``experiment`` and ``debug`` are optional groups: before this check, a misspelled
``experiment=mqar_smal`` trained the default config for minutes. Every ``group=option``
override (sweeps included) is checked here against the options the group really has, so a
typo ends with one message that lists the choices.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, OverrideParseException

from plugformer.errors import ConfigError
from plugformer.registry import CONFIG_GROUPS

CONFIG_MODULE = "plugformer.conf"
COMPONENT_GROUPS = set(CONFIG_GROUPS.values())
FULL_ERROR = "HYDRA_FULL_ERROR"


def _option_names(override: Override) -> list[str]:
    """The option names an override selects: one, or each value of a choice sweep."""
    if override.is_delete():
        return []
    if override.is_sweep_override():
        if not override.is_choice_sweep():
            return []  # range() and glob() sweeps: Hydra expands and checks them
        return [str(name) for name in override.sweep_string_iterator()]
    value = override.value()
    return [value] if isinstance(value, str) else []


def check_group_choices(overrides: Iterable[str]) -> None:
    """Raise :class:`ConfigError` when an override picks an option that its config group
    does not have (``experiment=nope``, ``debug=fsat``, ``trainer=gpus``,
    ``model/attention=locl``). Needs the plugins loaded, so their groups are known.
    Overrides that are not group choices (``model.d_model=64``) are left to Hydra."""
    # Hydra's flags (-m, --cfg job, ...) and its own settings are not group choices.
    candidates = [o for o in overrides if "=" in o and not o.startswith(("-", "hydra"))]
    try:
        parsed = OverridesParser.create().parse_overrides(candidates)
    except OverrideParseException:
        return  # Hydra reports the syntax error itself
    if not parsed:
        return
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for override in parsed:
            group = override.key_or_group
            if override.package is not None or "." in group:
                continue
            choices = loader.get_group_options(group)
            if not choices:
                continue  # a plain key such as seed=1, not a group
            for name in _option_names(override):
                if name not in choices and name != "null":
                    close = difflib.get_close_matches(name, choices, n=1)
                    raise ConfigError(
                        f"{group}={name}: there is no {name!r} in the config group {group!r}"
                        + (f" (did you mean {close[0]!r}?)." if close else "."),
                        expected=f"one of: {', '.join(choices)}",
                        fix=f"correct the name, e.g. {group}={(close or choices)[0]}"
                        + ("; `plugformer plugins` lists every component" if group in COMPONENT_GROUPS else ""),
                    )


def _first_line(error: BaseException | None) -> str:
    text = str(error or "").strip()
    return text.splitlines()[0].strip() if text else ""


def check_composes(overrides: Iterable[str]) -> None:
    """Compose the config once, as Hydra is about to, and turn Hydra's own refusals (a value
    of the wrong type, a key that does not exist, an override that does not parse) into one
    :class:`ConfigError` (exit status 2). Sweeps and Hydra's flags are left to Hydra."""
    overrides = list(overrides)
    if any(o.startswith("-") for o in overrides):
        return  # -m, --cfg, --help, ...: Hydra's own modes
    candidates = [o for o in overrides if not o.startswith(("hydra.", "hydra/", "+hydra", "~hydra"))]
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            compose(config_name="train", overrides=candidates)
    except (OverrideParseException, ConfigCompositionException) as error:
        raise composition_error(error) from None


def composition_error(error: OverrideParseException | ConfigCompositionException) -> ConfigError:
    """Hydra's refusal to compose, as one :class:`ConfigError`."""
    if isinstance(error, OverrideParseException):
        return ConfigError(
            f"{_first_line(error)}: {' '.join(str(error).split(chr(10))[1:2]).strip()}",
            expected="overrides of the form key=value, group=option, +key=value or ~key",
            fix="quote values with spaces or brackets, e.g. 'tags=[a,b]'",
        )
    detail = _first_line(error.__cause__)
    message = _first_line(error).rstrip(".")
    unknown_key = message.startswith("Could not override")
    return ConfigError(
        f"{message}{': ' + detail if detail else ''}",
        expected="an existing key" if unknown_key else "a value of the option's type",
        fix="check the spelling (`plugformer train --cfg job` prints the composed config; `plugformer plugins` "
        "lists the components), or add a new key with +key=value"
        if unknown_key
        else "correct the value; `plugformer train --cfg job` prints every option with its current value",
    )


@contextmanager
def composition_errors_raised(overrides: Iterable[str]) -> Iterator[Callable[[], None]]:
    """Around ``hydra.main``: the config is composed once, by Hydra, and a refusal to compose
    it ends as one :class:`ConfigError`, as :func:`check_composes` reports it, without a
    composition beforehand. Yields ``composed``, which the task calls first: from then on
    Hydra reports errors its own way again.

    Hydra prints an exception and exits unless ``HYDRA_FULL_ERROR=1``, so that variable is set
    until ``composed()``. Only for a single run without Hydra's flags (-m, --cfg, ...), whose
    errors Hydra keeps reporting; and when the user asked for full tracebacks (the variable
    already set), Hydra's exception passes unchanged."""
    flags = any(o.startswith("-") for o in overrides)
    user_asked = os.environ.get(FULL_ERROR) == "1"
    active = not flags and not user_asked

    def composed() -> None:
        if active:
            os.environ.pop(FULL_ERROR, None)

    if active:
        os.environ[FULL_ERROR] = "1"
    try:
        yield composed
    except (OverrideParseException, ConfigCompositionException) as error:
        if not active:
            raise
        raise composition_error(error) from None
    finally:
        composed()
