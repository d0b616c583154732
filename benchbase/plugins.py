"""Plugin manager: entry-point discovery, allow/deny lists, failure isolation, lookup by name.

Bundled plugins are declared under ``[project.entry-points.benchbase]`` exactly like
third-party ones, so there is one discovery path. Discovery happens once, lazily, on
the first lookup. Nothing here imports torch: components are registered as lazy
``"module:Class"`` strings and imported only when a suite uses them.

Environment variables:
  BENCHBASE_PLUGINS          comma-separated entry-point names to load (allow-list; empty = all)
  BENCHBASE_DISABLE_PLUGINS  comma-separated entry-point names to skip (deny-list)
  BENCHBASE_PLUGIN_MODULES   comma-separated importable modules to load as extra plugins
                             (a local plugin without packaging, e.g. in a research repo)
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, Callable

import pluggy

from benchbase import hookspecs
from benchbase.errors import ConfigError, PluginError, UnknownComponentError
from benchbase.families import FAMILIES
ENTRY_POINT_GROUP = "benchbase"
ALLOW_ENV = "BENCHBASE_PLUGINS"
DENY_ENV = "BENCHBASE_DISABLE_PLUGINS"
EXTRA_ENV = "BENCHBASE_PLUGIN_MODULES"


def _env_list(var: str) -> list[str]:
    return [s.strip() for s in os.environ.get(var, "").split(",") if s.strip()]


@dataclass
class Entry:
    """One registered component: where it comes from and how to build it."""

    family: str
    name: str
    target: str | Callable[..., Any]
    plugin: str
    meta: dict = field(default_factory=dict)

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "0"))

    @property
    def description(self) -> str:
        return str(self.meta.get("description", ""))

    def load(self) -> Any:
        """Import the component class (the only place a lazy target is imported)."""
        if not isinstance(self.target, str):
            return self.target
        module_name, _, attr = self.target.partition(":")
        try:
            module = importlib.import_module(module_name)
            return getattr(module, attr) if attr else module
        except Exception as exc:  # report which plugin and component, not a bare traceback
            raise PluginError(
                f"{self.family[:-1]} {self.name!r} from plugin {self.plugin!r} failed to import "
                f"{self.target!r}: {type(exc).__name__}: {exc}"
            ) from exc


@dataclass
class PluginInfo:
    name: str
    source: str  # "entry point", "module", "registered"
    distribution: str | None = None
    version: str | None = None
    error: str | None = None


class PluginManager:
    """Finds plugins and resolves component names per family.

    ``PluginManager(entry_points=False)`` gives an empty manager for tests; call
    ``register(obj)`` with any object (module, class or instance) carrying hookimpls.
    """

    def __init__(self, entry_points: bool = True):
        self._pm = pluggy.PluginManager("benchbase")
        self._pm.add_hookspecs(hookspecs)
        self._discover = entry_points
        self._discovered = False
        self._entries: dict[str, dict[str, Entry]] | None = None
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginInfo] = []

    # -- registration -------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> None:
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        self._pm.register(plugin, name=name)
        self.plugins.setdefault(name, PluginInfo(name=name, source="registered"))
        self._entries = None

    def _discover_once(self) -> None:
        if self._discovered or not self._discover:
            self._discovered = True
            return
        self._discovered = True
        allow, deny = set(_env_list(ALLOW_ENV)), set(_env_list(DENY_ENV))
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if (allow and ep.name not in allow) or ep.name in deny:
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                source="entry point",
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
            )
            if self._pm.has_plugin(ep.name):
                continue
            try:
                self._pm.register(ep.load(), name=ep.name)
                self.plugins[ep.name] = info
            except Exception as exc:  # one broken plugin must not break the others
                info.error = f"{type(exc).__name__}: {exc}"
                self.failures.append(info)
        for module_name in _env_list(EXTRA_ENV):
            if module_name in deny or self._pm.has_plugin(module_name):
                continue
            info = PluginInfo(name=module_name, source="module")
            try:
                self._pm.register(importlib.import_module(module_name), name=module_name)
                self.plugins[module_name] = info
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {exc}"
                self.failures.append(info)

    # -- lookup -------------------------------------------------------------------------
    def entries(self, family: str) -> dict[str, Entry]:
        if family not in FAMILIES:
            raise UnknownComponentError(
                f"unknown component family {family!r}; families are: {', '.join(FAMILIES)}"
            )
        if self._entries is None:
            self._discover_once()
            self._entries = self._collect()
        return self._entries[family]

    def _collect(self) -> dict[str, dict[str, Entry]]:
        table: dict[str, dict[str, Entry]] = {f: {} for f in FAMILIES}
        failed: set[str] = set()
        for family in FAMILIES:
            caller = getattr(self._pm.hook, f"register_{family}")
            for impl in caller.get_hookimpls():
                plugin_name = impl.plugin_name
                if plugin_name in failed:
                    continue
                found: list[Entry] = []

                def register(name: str, target: Any, _found=found, _family=family, _p=plugin_name, **meta):
                    _found.append(Entry(_family, name, target, _p, meta))

                try:
                    impl.function(register=register)
                except Exception as exc:
                    failed.add(plugin_name)
                    info = self.plugins.pop(plugin_name, PluginInfo(plugin_name, "registered"))
                    info.error = f"register_{family} raised {type(exc).__name__}: {exc}"
                    self.failures.append(info)
                    for fam in table.values():  # drop what this plugin registered before failing
                        for key in [k for k, e in fam.items() if e.plugin == plugin_name]:
                            del fam[key]
                    continue
                for entry in found:
                    other = table[family].get(entry.name)
                    if other is not None:
                        raise PluginError(
                            f"{family[:-1]} name {entry.name!r} is registered twice: by plugin "
                            f"{other.plugin!r} and by plugin {entry.plugin!r}; disable one with "
                            f"{DENY_ENV}=<plugin>"
                        )
                    table[family][entry.name] = entry
        return table

    def registered_modules(self) -> list[str]:
        """Importable module names of the plugins registered in-process (``register(module)``
        or ``BENCHBASE_PLUGIN_MODULES``), so another process (a Ray worker) can load the same
        set; objects that are not modules cannot be named and are returned as ``"?<name>"``."""
        out = []
        for name, plugin in self._pm.list_name_plugin():
            info = self.plugins.get(name)
            if info is not None and info.source == "entry point":
                continue
            module = getattr(plugin, "__name__", None)
            is_module = type(plugin).__name__ == "module"
            out.append(module if is_module and module else f"?{name}")
        return out

    def get(self, family: str, name: str) -> Entry:
        entries = self.entries(family)
        if name in entries:
            return entries[name]
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        known = ", ".join(sorted(entries)) or "none"
        raise UnknownComponentError(
            f"unknown {family[:-1]} {name!r}.{hint} Known {family}: {known}."
        )

    def create(self, family: str, name: str, params: dict | None = None) -> Any:
        """Build a component by name with validated parameters."""
        entry = self.get(family, name)
        cls = entry.load()
        try:
            component = cls(**(params or {}))
        except ConfigError as exc:  # one line per problem, each naming the component
            lines = [f"{family[:-1]} {name!r}: {line}" for line in str(exc).splitlines()]
            raise ConfigError("\n".join(lines)) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{family[:-1]} {name!r}: invalid parameters: {exc}") from exc
        component.name = name
        component.version = entry.version
        return component


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager (entry points discovered on first use)."""
    global _default
    if _default is None:
        _default = PluginManager()
    return _default


def format_failure(info: PluginInfo) -> str:
    return f"{info.name}: {info.error}"


__all__ = [
    "FAMILIES",
    "Entry",
    "PluginInfo",
    "PluginManager",
    "get_plugin_manager",
    "format_failure",
]
