"""Which distribution (and version) provided each component of a run, and a clear refusal
when a run is read back (resume, eval, generate, ``load_run``) without one of them.

The record is a nested dict, kind → component name → provider::

    providers:
      attention:
        full: {distribution: plugformer, version: 0.1.0, plugin: plugformer.attention}
        toy_cosine: {distribution: plugformer-toy-attention, version: 0.3.1, plugin: toy_attention}

It covers every component a run uses: the group choices, every component a layer plan adds,
and the enabled techniques. A run writes it to ``config.yaml`` (key ``providers``, so the W&B
config has it too) and to ``summary.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from plugformer.errors import UnknownComponentError
from plugformer.registry import CONFIG_GROUPS, Component, Provider, Registry

#: The config key (top level) and summary.json key of the record.
PROVIDERS_KEY = "providers"


def provider_record(provider: Provider) -> dict[str, str]:
    return {"distribution": provider.distribution, "version": provider.version, "plugin": provider.plugin}


def component_providers(components: Iterable[Component]) -> dict[str, dict[str, dict[str, str]]]:
    """kind → name → {distribution, version, plugin} for ``components`` (duplicates once),
    kinds and names sorted."""
    record: dict[str, dict[str, dict[str, str]]] = {}
    for component in components:
        record.setdefault(component.kind, {})[component.name] = provider_record(component.provider)
    return {kind: dict(sorted(names.items())) for kind, names in sorted(record.items())}


def recorded_providers(cfg: DictConfig | Mapping[str, Any]) -> dict[str, dict[str, dict[str, str]]]:
    """The record a saved config holds (empty for runs made before it existed)."""
    record = cfg.get(PROVIDERS_KEY) if cfg is not None else None
    if record is None:
        return {}
    if OmegaConf.is_config(record):
        record = OmegaConf.to_container(record, resolve=True)
    return record if isinstance(record, dict) else {}


def check_providers_installed(cfg: DictConfig | Mapping[str, Any], registry: Registry) -> None:
    """Raise :class:`UnknownComponentError` naming the distribution and version that provided
    a component the saved run uses and that this session does not have (uninstalled, or
    left out by ``PLUGFORMER_PLUGINS``/``PLUGFORMER_DISABLE_PLUGINS``). Does nothing for a
    config without a record."""
    missing = [
        (kind, name, entry)
        for kind, names in recorded_providers(cfg).items()
        for name, entry in (names or {}).items()
        if kind in CONFIG_GROUPS and (kind, name) not in registry
    ]
    if not missing:
        return
    described = "; ".join(
        f"{kind} {name!r} from {entry.get('distribution', '?')} {entry.get('version', '')}".rstrip() for kind, name, entry in missing
    )
    installs = sorted({_install_hint(entry) for _, _, entry in missing})
    plugins = sorted({str(entry.get("plugin")) for _, _, entry in missing if entry.get("plugin")})
    raise UnknownComponentError(
        f"This run was made with components that are not installed now: {described}.",
        expected="every distribution that provided the run's components (config.yaml, key providers)",
        fix=f"{' and '.join(installs)}; if it is installed, check that PLUGFORMER_PLUGINS/PLUGFORMER_DISABLE_PLUGINS "
        f"do not leave out plugin {', '.join(plugins)} (`plugformer plugins` lists what is loaded)",
    )


def _install_hint(entry: Mapping[str, Any]) -> str:
    distribution, version = entry.get("distribution", "?"), entry.get("version", "")
    if distribution.startswith("<"):  # registered in-process, not from a distribution
        return f"register it again in-process (it came from {distribution})"
    return f"pip install '{distribution}=={version}'" if version else f"pip install {distribution}"
