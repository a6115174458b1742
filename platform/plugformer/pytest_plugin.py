"""plugformer's conformance kit as a pytest plugin (entry point ``pytest11``: loaded by any
pytest run in an environment where plugformer is installed; ``-p no:plugformer`` turns it off).

- ``pytest --plugformer-conformance`` adds one test per component that the distribution
  under test registers, running the kit for its kind (:func:`run_kit`): the distribution is
  the project whose ``pyproject.toml`` is in pytest's rootdir, or the one named with
  ``--plugformer-conformance=<distribution>``.
- The ``plugformer_components`` fixture is that list of :class:`plugformer.Component`, for
  tests of one's own::

      def test_every_component_has_a_reference(plugformer_components):
          assert all(c.reference for c in plugformer_components)

This module imports nothing heavy at start-up: torch and the kit load when a conformance
test or the fixture runs, so pytest runs that use neither stay as fast as before.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from plugformer.registry import Component

OPTION = "--plugformer-conformance"
AUTO = ":rootdir:"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("plugformer", "plugformer conformance kit")
    group.addoption(
        OPTION, nargs="?", const=AUTO, default=None, metavar="DISTRIBUTION",
        help="run plugformer's conformance kit over every component the distribution registers "
        "(default: the project in pytest's rootdir)",
    )


def canonical(distribution: str) -> str:
    """PEP 503 normalization: ``Plugformer_Talking.Heads`` → ``plugformer-talking-heads``."""
    return re.sub(r"[-_.]+", "-", distribution).lower()


def project_name(root: Path) -> str | None:
    """``[project].name`` of ``root/pyproject.toml``, or None without one."""
    path = root / "pyproject.toml"
    if not path.is_file():
        return None
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        match = re.search(r'^\[project\][^\[]*?^name\s*=\s*"([^"]+)"', path.read_text(), re.M | re.S)
        return match.group(1) if match else None
    return tomllib.loads(path.read_text()).get("project", {}).get("name")


def distribution_under_test(config: pytest.Config) -> str:
    """The option's distribution, or the rootdir project's name; a usage error otherwise."""
    value = config.getoption(OPTION)
    if value not in (None, AUTO):
        return value
    name = project_name(Path(config.rootpath))
    if name is None:
        raise pytest.UsageError(
            f"{OPTION}: no pyproject.toml with a [project] name in {config.rootpath}; "
            f"run pytest from the plugin's folder or name it: {OPTION}=<distribution>"
        )
    return name


def components_of(distribution: str) -> list[Component]:
    """Every installed component whose provider is ``distribution`` (any spelling)."""
    from plugformer.plugins import load_plugins

    wanted = canonical(distribution)
    return [c for c in load_plugins().registry.components() if canonical(c.provider.distribution) == wanted]


def run_kit(component: Component) -> None:
    """The kit for the component's kind: :func:`plugformer.testing.check_component` for every
    kind, plus :func:`~plugformer.testing.check_data_task` for a data task and
    :func:`~plugformer.testing.check_objective_training` for an objective (on the first
    registered data task it serves)."""
    from plugformer.testing import check_component, check_data_task, check_objective_training

    check_component(component)
    if component.kind == "data":
        check_data_task(component)
    elif component.kind == "objective":
        check_objective_training(component)


@pytest.fixture(scope="session")
def plugformer_components(pytestconfig: pytest.Config) -> list[Component]:
    """The components registered by the distribution under test (see the module docstring)."""
    return components_of(distribution_under_test(pytestconfig))


class ConformanceItem(pytest.Item):
    """One component through the kit; a failure reports the kit's message, not a traceback."""

    def __init__(self, *, component: Component, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.component = component

    def runtest(self) -> None:
        run_kit(self.component)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, AssertionError):
            return f"conformance kit: {excinfo.value}"
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return Path(self.config.rootpath), None, f"plugformer conformance: {self.component.qualified_name}"


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption(OPTION) is None:
        return
    distribution = distribution_under_test(config)
    components = components_of(distribution)
    if not components:
        raise pytest.UsageError(
            f"{OPTION}: no installed component is provided by {distribution!r}; "
            "install the plugin (pip install -e .) or check the distribution's name (plugformer plugins)"
        )
    for component in components:
        items.append(ConformanceItem.from_parent(session, name=f"plugformer_conformance[{component.qualified_name}]", component=component))
