"""``plugformer new plugin <name> --kind <kind>``: a ready plugin package from templates.

The templates ship inside plugformer as package data (``plugformer/templates/plugin/``) and
are read with :mod:`importlib.resources`, so a wheel install scaffolds exactly as a checkout
does. A template is plain text with ``{{placeholder}}`` fields; nothing else is
interpreted, so the generated Python reads as written.

What is generated for ``new plugin talking_heads --kind attention``::

    plugformer-talking-heads/
        pyproject.toml                  entry point ``talking_heads = "plugformer_talking_heads"``
        README.md
        plugformer_talking_heads/__init__.py   config dataclass, module, COMPONENT, register_components
        tests/test_talking_heads.py     the conformance kit on COMPONENT; its registration

The component works as generated (the simplest correct one of its kind) and passes its tests.
Only this module and the standard library are imported here, so the command starts fast.
"""

from __future__ import annotations

import keyword
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from plugformer.errors import PlugformerError

#: Kinds the scaffold can generate (blocks are left out: they are rarely a first plugin).
SCAFFOLD_KINDS = ("attention", "position", "norm", "ffn", "objective", "data", "technique")

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")

#: Per kind: a default one-line summary, and how a user chooses the component on the command line.
_SUMMARIES = {
    "attention": "Softmax attention, written out as a starting point.",
    "position": "Fixed sinusoidal position embeddings added to the token embeddings.",
    "norm": "RMSNorm: scale by the root mean square of the features, with a learned gain.",
    "ffn": "Two-layer MLP with a GELU.",
    "objective": "Next-token cross-entropy with label smoothing on a decoder.",
    "data": "Copy task: random tokens, a separator, then the same tokens again.",
    "technique": "Records the model's parameter counts in the run summary.",
}
_USAGE = {
    "attention": "plugformer train experiment=plain model/attention={name}",
    "position": "plugformer train experiment=plain model/position={name}",
    "norm": "plugformer train experiment=plain model/norm={name}",
    "ffn": "plugformer train experiment=plain model/ffn={name}",
    "objective": "plugformer train experiment=plain objective={name} data=mqar",
    "data": "plugformer train experiment=plain data={name} objective=causal_lm",
    "technique": "plugformer train experiment=plain +technique={name}",
}
_OPTION_PREFIX = {
    "attention": "model.attention", "position": "model.position", "norm": "model.norm", "ffn": "model.ffn",
    "objective": "objective", "data": "data", "technique": "techniques.{name}",
}
#: Objective and data tasks also get the behavioural kits of their kind in their tests.
_EXTRA_KIT = {
    "objective": (
        ", check_objective_training",
        '\n\ndef test_loss_falls_and_padding_is_ignored() -> None:\n'
        '    """Trained on batches of a registered data task it serves (mqar)."""\n'
        '    check_objective_training(COMPONENT, data="mqar")\n',
    ),
    "data": (
        ", check_data_task",
        "\n\ndef test_batches_match_the_contract() -> None:\n"
        "    check_data_task(COMPONENT)\n",
    ),
}


class ScaffoldError(PlugformerError):
    """A plugin that cannot be generated: a bad name, an unknown kind or a folder in the way."""


@dataclass(frozen=True)
class PluginNames:
    """The names one plugin name gives rise to."""

    name: str  # the component's name and the entry point's: talking_heads
    kind: str
    distribution: str  # plugformer-talking-heads
    package: str  # plugformer_talking_heads
    class_name: str  # TalkingHeadsAttention
    config_class: str  # TalkingHeadsAttentionConfig

    @classmethod
    def for_name(cls, name: str, kind: str) -> PluginNames:
        check_name(name, kind)
        camel = "".join(part.capitalize() for part in name.split("_") if part)
        suffix = {"attention": "Attention", "position": "Position", "norm": "Norm", "ffn": "FeedForward",
                  "objective": "Objective", "data": "Task", "technique": "Technique"}[kind]
        class_name = camel if camel.endswith(suffix) else camel + suffix
        return cls(
            name=name, kind=kind, distribution="plugformer-" + name.replace("_", "-"), package="plugformer_" + name,
            class_name=class_name, config_class=class_name + "Config",
        )


def check_name(name: str, kind: str) -> None:
    """Raise :class:`ScaffoldError` unless ``kind`` is a scaffold kind and ``name`` a
    lowercase identifier (it becomes the component's name, the entry point's and part of the
    package's)."""
    if kind not in SCAFFOLD_KINDS:
        raise ScaffoldError(
            f"Unknown plugin kind {kind!r}.", expected=f"one of {', '.join(SCAFFOLD_KINDS)}",
            fix="pass --kind with one of them, e.g. --kind attention",
        )
    if not NAME_PATTERN.match(name) or keyword.iskeyword(name):
        suggestion = re.sub(r"[^a-z0-9_]", "_", name.lower()).strip("_") or "my_attention"
        if not suggestion[0].isalpha():
            suggestion = "p_" + suggestion
        if keyword.iskeyword(suggestion):
            suggestion += "_" + kind
        raise ScaffoldError(
            f"{name!r} cannot name a plugin.",
            expected="a lowercase Python identifier: a letter, then letters, digits or underscores "
            "(it names the component, the entry point and the package plugformer_<name>)",
            fix=f"plugformer new plugin {suggestion} --kind {kind}",
        )


def render(template: str, values: dict[str, str]) -> str:
    """Replace every ``{{key}}``; a placeholder without a value is a bug in the template."""

    def value(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in values:
            raise KeyError(f"template placeholder {{{{{key}}}}} has no value")
        return values[key]

    return PLACEHOLDER.sub(value, template)


def _template(*parts: str) -> str:
    return resources.files("plugformer").joinpath("templates", "plugin", *parts).read_text(encoding="utf-8")


def plugin_files(names: PluginNames, summary: str | None = None) -> dict[str, str]:
    """Relative path → content of every file of the package."""
    summary = summary or _SUMMARIES[names.kind]
    extra_import, extra_tests = _EXTRA_KIT.get(names.kind, ("", ""))
    values = {
        "name": names.name, "kind": names.kind, "distribution": names.distribution, "package": names.package,
        "class_name": names.class_name, "config_class": names.config_class, "summary": summary.replace('"', "'"),
        "usage": _USAGE[names.kind].format(name=names.name),
        "option_prefix": _OPTION_PREFIX[names.kind].format(name=names.name),
        "extra_kit_import": extra_import, "extra_tests": extra_tests,
    }
    return {
        "pyproject.toml": render(_template("pyproject.toml.tmpl"), values),
        "README.md": render(_template("README.md.tmpl"), values),
        f"{names.package}/__init__.py": render(_template("kinds", f"{names.kind}.py.tmpl"), values),
        f"tests/test_{names.name}.py": render(_template("tests", "test_component.py.tmpl"), values),
    }


def check_not_registered(name: str, kind: str) -> None:
    """Raise :class:`ScaffoldError` when an installed plugin already registers ``kind``
    ``name`` (the new plugin would stop every run with a name clash). Loads the installed
    plugins; if one of them fails to load, the check is skipped (that failure is reported
    by every other command)."""
    from plugformer.errors import PluginError
    from plugformer.plugins import load_plugins

    try:
        registry = load_plugins().registry
    except PluginError:
        return
    taken = {c.name: c for c in registry.components(kind)}
    if name in taken:
        provider = taken[name].provider
        raise ScaffoldError(
            f"The {kind} {name!r} is already registered by {provider.distribution} {provider.version}; "
            "a second one would stop every run with a name clash.",
            expected=f"a {kind} name no installed plugin uses (plugformer plugins lists them)",
            fix=f"plugformer new plugin my_{name} --kind {kind}",
        )


def create_plugin(
    name: str, kind: str, directory: str | Path = ".", *, summary: str | None = None, check_installed: bool = True
) -> Path:
    """Write the package for plugin ``name`` of ``kind`` into ``<directory>/<distribution>``
    and return that folder. Refuses (:class:`ScaffoldError`) a bad name or kind, a name an
    installed plugin already registers for that kind (``check_installed``), and a folder that
    already exists; writes nothing then."""
    names = PluginNames.for_name(name, kind)
    target = Path(directory) / names.distribution
    if target.exists():
        raise ScaffoldError(
            f"{target} already exists; plugformer new plugin never overwrites files.",
            expected="a folder that does not exist yet",
            fix=f"choose another name, pass --dir with another folder, or remove {target}",
        )
    if check_installed:
        check_not_registered(name, kind)
    files = plugin_files(names, summary)
    for relative, content in files.items():
        path = target / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content, encoding="utf-8")
    return target


def new_plugin_command(name: str, kind: str, directory: str | None) -> int:
    """The CLI subcommand: create the package and say what to do next."""
    target = create_plugin(name, kind, directory or ".")
    names = PluginNames.for_name(name, kind)
    print(f"Created {target}/ ({kind} {name!r}, distribution {names.distribution}, package {names.package}).")
    print("Next:")
    print(f"  cd {target}")
    print("  pip install -e .          # registers the entry point")
    print(f"  plugformer plugins        # lists {kind}:{name}")
    print("  pytest                    # the conformance kit on your component")
    print(f"  {_USAGE[kind].format(name=name)}")
    return 0
