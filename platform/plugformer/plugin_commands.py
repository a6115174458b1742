"""Subcommands that plugins add to ``plugformer`` through the ``cli_commands`` hook. Only a
command the CLI does not know itself loads plugins, so the built-in commands stay as fast
to start as before."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from plugformer.errors import ConfigError, PluginError


def plugin_commands() -> dict[str, Callable[[list[str]], int]]:
    """Every installed plugin's commands by name; a name two plugins provide is an error."""
    from plugformer.api import _session_plugins
    from plugformer.plugins import call_hook

    found: dict[str, tuple[str, Callable[[list[str]], int]]] = {}
    for plugin, commands in call_hook(_session_plugins().manager, "cli_commands", expect=dict):
        for name, function in commands.items():
            if name in found:
                raise PluginError(
                    f"Plugins {found[name][0]!r} and {plugin!r} both provide the command `plugformer {name}`.",
                    fix="disable one of them with PLUGFORMER_DISABLE_PLUGINS=<plugin>",
                )
            found[name] = (plugin, function)
    return {name: function for name, (_, function) in found.items()}


def run_plugin_command(name: str, arguments: Sequence[str], builtin: Sequence[str]) -> int:
    """Run plugin command ``name`` with ``arguments``; an unknown name is a user error listing
    the built-in and plugin commands."""
    commands = plugin_commands()
    if name not in commands:
        known = sorted(set(builtin) | set(commands))
        raise ConfigError(
            f"Unknown command {name!r}.",
            expected=f"one of {', '.join(known)}",
            fix="run plugformer --help; commands from plugins appear once the plugin is installed",
        )
    return int(commands[name](list(arguments)) or 0)
