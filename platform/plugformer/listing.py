"""``plugformer plugins``: what is installed, as a table or JSON."""

from __future__ import annotations

import json
from typing import Any

from plugformer.plugins import load_plugins
from plugformer.registry import Component, LazyComponent


def component_record(component: Component | LazyComponent) -> dict[str, Any]:
    return {
        "kind": component.kind,
        "name": component.name,
        "group": component.group,
        "distribution": component.provider.distribution,
        "version": component.provider.version,
        "plugin": component.provider.plugin,
        "summary": component.summary,
        "reference": component.reference,
        "capabilities": component.capabilities_for().as_dict(),
    }


def print_plugins(*, as_json: bool = False) -> None:
    # A listing needs no config groups (nor Hydra), and leaves lazy components unloaded (no torch).
    plugins = load_plugins(store_configs=False)
    records = [component_record(c) for c in plugins.registry.entries()]
    if as_json:
        print(json.dumps(records, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="plugformer components", show_lines=False)
    for column in ("kind", "name", "provider", "summary", "capabilities"):
        table.add_column(column, overflow="fold")
    for component in plugins.registry.entries():
        table.add_row(
            component.kind,
            component.name,
            str(component.provider),
            component.summary,
            component.capabilities_for().describe(),
        )
    Console(width=200).print(table)
