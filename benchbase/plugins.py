"""Plugin manager: entry-point discovery, allow/deny lists, failure isolation, lookup by name
(components by family, auxiliary models by role), plugin commands.

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
from dataclasses import dataclass, field, replace
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable

import pluggy

from benchbase import hookspecs
from benchbase.errors import ConfigError, PluginError, UnknownComponentError
from benchbase.families import FAMILIES
from benchbase.roles import ROLES, ModelEntry

if TYPE_CHECKING:
    from benchbase.components import Context

ENTRY_POINT_GROUP = "benchbase"
ALLOW_ENV = "BENCHBASE_PLUGINS"
DENY_ENV = "BENCHBASE_DISABLE_PLUGINS"
EXTRA_ENV = "BENCHBASE_PLUGIN_MODULES"


def _env_list(var: str) -> list[str]:
    return [s.strip() for s in os.environ.get(var, "").split(",") if s.strip()]


def import_target(target: Any, what: str) -> Any:
    """``"module:attr"`` (or ``"module"``) imported, or ``target`` itself when it is not a string;
    an import failure is one ``PluginError`` naming ``what`` (which plugin, which component or
    model), not a bare traceback. Registries import their lazy targets only through this."""
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, attr) if attr else module
    except Exception as exc:
        raise PluginError(f"{what} failed to import {target!r}: {type(exc).__name__}: {exc}") from exc


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
        return import_target(self.target, f"{self.family[:-1]} {self.name!r} from plugin {self.plugin!r}")


@dataclass
class PluginInfo:
    name: str
    source: str  # "entry point", "module", "registered"
    distribution: str | None = None
    version: str | None = None
    error: str | None = None


def unknown_hooks(plugin: Any) -> list[str]:
    """One sentence per hook implementation of ``plugin`` that names no hook of benchbase (a
    misspelled ``register_attack`` would otherwise be ignored without a word), with the
    closest hook name."""
    known = {n for n in dir(hookspecs) if n.startswith("register_")}
    problems = []
    for attr in dir(plugin):
        marker = getattr(getattr(plugin, attr, None), "benchbase_impl", None)
        if not isinstance(marker, dict) or marker.get("optionalhook"):
            continue
        name = marker.get("specname") or attr
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; hooks are {', '.join(sorted(known))}"
            problems.append(f"unknown hook {name!r}{hint}")
    return problems


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
        self._models: dict[str, dict[str, ModelEntry]] | None = None
        self.plugins: dict[str, PluginInfo] = {}
        self.failures: list[PluginInfo] = []

    # -- registration -------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> None:
        name = name or getattr(plugin, "__name__", None) or type(plugin).__name__
        problems = unknown_hooks(plugin)
        if problems:
            raise PluginError(f"plugin {name!r}: {'; '.join(problems)}")
        self._pm.register(plugin, name=name)
        self.plugins.setdefault(name, PluginInfo(name=name, source="registered"))
        self._entries = self._models = None

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
                plugin = ep.load()
                problems = unknown_hooks(plugin)
                if problems:  # reported like a plugin that fails to import; the others load
                    raise PluginError("; ".join(problems))
                self._pm.register(plugin, name=ep.name)
                self.plugins[ep.name] = info
            except Exception as exc:  # one broken plugin must not break the others
                info.error = f"{type(exc).__name__}: {exc}"
                self.failures.append(info)
        for module_name in _env_list(EXTRA_ENV):
            if module_name in deny or self._pm.has_plugin(module_name):
                continue
            info = PluginInfo(name=module_name, source="module")
            try:
                plugin = importlib.import_module(module_name)
                problems = unknown_hooks(plugin)
                if problems:
                    raise PluginError("; ".join(problems))
                self._pm.register(plugin, name=module_name)
                self.plugins[module_name] = info
            except Exception as exc:
                info.error = f"{type(exc).__name__}: {exc}"
                self.failures.append(info)

        self._pm.check_pending()  # pluggy's own check: nothing registered may name an unknown hook

    # -- lookup -------------------------------------------------------------------------
    def entries(self, family: str) -> dict[str, Entry]:
        if family not in FAMILIES:
            raise UnknownComponentError(
                f"unknown component family {family!r}; families are: {', '.join(FAMILIES)}"
            )
        self._collect_once()
        return self._entries[family]

    def _collect_once(self) -> None:
        if self._entries is None or self._models is None:
            self._discover_once()
            self._entries, self._models = self._collect()

    def _collect(self) -> tuple[dict[str, dict[str, Entry]], dict[str, dict[str, ModelEntry]]]:
        table: dict[str, dict[str, Entry]] = {f: {} for f in FAMILIES}
        models: dict[str, dict[str, ModelEntry]] = {role: {} for role in ROLES}
        failed: set[str] = set()
        for family in (*FAMILIES, "models"):
            caller = getattr(self._pm.hook, f"register_{family}")
            for impl in caller.get_hookimpls():
                plugin_name = impl.plugin_name
                if plugin_name in failed:
                    continue
                found: list[Any] = []

                def register(name: str, target: Any, _found=found, _family=family, _p=plugin_name, **meta):
                    _found.append(Entry(_family, name, target, _p, meta))

                def register_model(role: str, name: str, target: Any, _found=found, _p=plugin_name, **meta):
                    _found.append(ModelEntry(role, name, target, _p, meta))

                try:
                    impl.function(register=register_model if family == "models" else register)
                except Exception as exc:
                    failed.add(plugin_name)
                    info = self.plugins.pop(plugin_name, PluginInfo(plugin_name, "registered"))
                    info.error = f"register_{family} raised {type(exc).__name__}: {exc}"
                    self.failures.append(info)
                    for fam in (*table.values(), *models.values()):  # drop what it registered before failing
                        for key in [k for k, e in fam.items() if e.plugin == plugin_name]:
                            del fam[key]
                    continue
                if family == "models":
                    for entry in found:
                        _add_model(models.setdefault(entry.role, {}), entry)
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
        return table, models

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
        """Build a component by name with validated parameters (model names included: a
        parameter listed in the class's ``model_roles`` must name a model of that role)."""
        entry = self.get(family, name)
        cls = entry.load()
        try:
            component = cls(**(params or {}))
        except ConfigError as exc:  # one line per problem, each naming the component
            lines = [f"{family[:-1]} {name!r}: {line}" for line in str(exc).splitlines()]
            raise ConfigError("\n".join(lines)) from None
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{family[:-1]} {name!r}: invalid parameters: {exc}") from exc
        for param, role in getattr(cls, "model_roles", {}).items():
            value = getattr(component.params, param, None)
            if isinstance(value, str) and value != "auto":
                try:
                    self.find_model(role, value)
                except UnknownComponentError as exc:
                    raise ConfigError(f"{family[:-1]} {name!r}: {param}: {exc}") from None
        component.name = name
        component.version = entry.version
        return component

    # -- models by role -----------------------------------------------------------------
    def models(self, role: str | None = None) -> dict:
        """``{role: {name: ModelEntry}}``, or ``{name: ModelEntry}`` of one role."""
        self._collect_once()
        if role is None:
            return self._models
        if role not in self._models:
            close = difflib.get_close_matches(role, list(self._models), n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise UnknownComponentError(f"unknown model role {role!r}.{hint} Roles: {', '.join(sorted(self._models))}.")
        return self._models[role]

    def find_model(self, role: str, name: str = "auto", backend: Any = None) -> ModelEntry:
        """The model of ``role`` called ``name``. ``"auto"``: the backend's default for the role
        (``Backend.default_models``), else the role's ``default`` registration. A name nobody
        registered goes to the role's ``any_name`` registration (a folder, a hub id...), with
        the name; without one it is an error that suggests close names."""
        entries = self.models(role)
        if name == "auto":
            chosen = (getattr(backend, "default_models", None) or {}).get(role)
            if chosen is None:
                default = next((e for e in entries.values() if e.default), None)
                if default is None:
                    raise ConfigError(f"no default {role} model: name one ({', '.join(sorted(entries)) or 'none registered'})")
                return default
            name = chosen
        if name in entries:
            return entries[name]
        fallback = next((e for e in entries.values() if e.any_name), None)
        if fallback is not None:
            return replace(fallback, name=name)
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownComponentError(f"unknown {role} model {name!r}.{hint} "
                                    f"Known {role} models: {', '.join(sorted(entries)) or 'none'}.")

    # -- commands -----------------------------------------------------------------------
    def register_commands(self, cli: Any) -> None:
        """Let plugins add subcommands to the click group ``cli`` (hook ``register_commands``).
        A plugin that raises, or that would replace a command already there, is reported in
        ``failures`` and leaves the group as it was."""
        self._discover_once()
        for impl in self._pm.hook.register_commands.get_hookimpls():
            before = dict(cli.commands)
            try:
                impl.function(cli=cli)
                replaced = [n for n, c in before.items() if cli.commands.get(n) is not c]
                if replaced:
                    raise PluginError(f"would replace the command(s) {', '.join(replaced)}")
            except Exception as exc:
                cli.commands.clear()
                cli.commands.update(before)
                info = self.plugins.get(impl.plugin_name) or PluginInfo(impl.plugin_name, "registered")
                info.error = f"register_commands raised {type(exc).__name__}: {exc}"
                self.failures.append(info)


def _add_model(entries: dict[str, ModelEntry], entry: ModelEntry) -> None:
    other = entries.get(entry.name)
    if other is not None:
        raise PluginError(f"{entry.role} model {entry.name!r} is registered twice: by plugin {other.plugin!r} "
                          f"and by plugin {entry.plugin!r}; disable one with {DENY_ENV}=<plugin>")
    for flag in ("default", "any_name"):
        if getattr(entry, flag):
            other = next((e for e in entries.values() if getattr(e, flag)), None)
            if other is not None:
                raise PluginError(f"two {entry.role} models are registered with {flag}=True: {other.name!r} "
                                  f"(plugin {other.plugin!r}) and {entry.name!r} (plugin {entry.plugin!r})")
    entries[entry.name] = entry


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide manager (entry points discovered on first use)."""
    global _default
    if _default is None:
        _default = PluginManager()
    return _default


def find_model(role: str, name: str = "auto", ctx: "Context | None" = None) -> ModelEntry:
    """``PluginManager.find_model`` with the context's plugin manager and backend (the process-wide
    manager and no backend when ``ctx`` is None)."""
    pm = getattr(ctx, "plugins", None) or get_plugin_manager()
    return pm.find_model(role, name, getattr(ctx, "backend", None))


def format_failure(info: PluginInfo) -> str:
    return f"{info.name}: {info.error}"


__all__ = [
    "FAMILIES",
    "Entry",
    "PluginInfo",
    "PluginManager",
    "get_plugin_manager",
    "find_model",
    "format_failure",
]
