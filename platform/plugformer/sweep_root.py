"""``run_dir=<dir>`` under ``-m``: the sweep's root, one subfolder per job (``<dir>/0``,
``<dir>/1``, … by Hydra's job number), instead of being ignored (Hydra's sweep folder comes
from ``hydra.sweep.dir``, not from ``run_dir``, so the jobs used to land under
``paths.runs_dir`` in the current folder).
"""

from __future__ import annotations

import re

from plugformer.errors import ConfigError

_MULTIRUN_FLAGS = ("-m", "--multirun")
_RUN_DIR_KEYS = ("run_dir=", "+run_dir=", "++run_dir=")
_SWEEP_DIR_KEYS = ("hydra.sweep.dir=", "+hydra.sweep.dir=", "++hydra.sweep.dir=")
# Hydra's sweep syntax: a comma outside quotes, brackets and ${...}, or a sweep function.
_SWEEP_FUNCTION = re.compile(r"^\s*(choice|range|interval|glob|tag|sort|shuffle)\s*\(")


def is_multirun(overrides: list[str]) -> bool:
    return any(o in _MULTIRUN_FLAGS or o.replace(" ", "") in ("hydra.mode=MULTIRUN", "hydra.mode=multirun") for o in overrides)


def _value(overrides: list[str], keys: tuple[str, ...]) -> str | None:
    values = [o.split("=", 1)[1] for o in overrides if o.startswith(keys)]
    return values[-1] if values else None


def _is_sweep(value: str) -> bool:
    if _SWEEP_FUNCTION.match(value):
        return True
    depth, quote = 0, ""
    for char in value:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            return True
    return False


def with_sweep_root(overrides: list[str]) -> list[str]:
    """The overrides, plus ``hydra.sweep.dir=<dir>`` when a multirun names ``run_dir=<dir>``.

    Raises :class:`ConfigError` when ``run_dir`` is itself swept (each job would need a root
    of its own) or when ``hydra.sweep.dir`` names another root. A single run is unchanged.
    """
    run_dir = _value(overrides, _RUN_DIR_KEYS)
    if run_dir is None or run_dir in ("", "null") or not is_multirun(overrides):
        return overrides
    if _is_sweep(run_dir):
        raise ConfigError(
            f"run_dir={run_dir} sweeps over run directories, but under -m run_dir= names the sweep's root folder.",
            expected="one folder: the jobs of the sweep go to <run_dir>/0, <run_dir>/1, ...",
            fix="give run_dir= one folder (or leave it out: the sweep goes to ${paths.runs_dir}/${experiment_name}/multirun_<time>)",
        )
    sweep_dir = _value(overrides, _SWEEP_DIR_KEYS)
    if sweep_dir is not None:
        if sweep_dir == run_dir:
            return overrides
        raise ConfigError(
            f"run_dir={run_dir} and hydra.sweep.dir={sweep_dir} both name the root of the sweep.",
            expected="one of them (under -m, run_dir= is the sweep's root)",
            fix="leave out hydra.sweep.dir= (or run_dir=)",
        )
    # Right after run_dir=, not at the end: Hydra's argument parser wants the overrides
    # together, and a flag such as -m may come last.
    at = max(i for i, o in enumerate(overrides) if o.startswith(_RUN_DIR_KEYS)) + 1
    return [*overrides[:at], f"hydra.sweep.dir={run_dir}", *overrides[at:]]
