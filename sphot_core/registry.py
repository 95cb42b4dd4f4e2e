"""The plugin registry: built-ins and entry points, name lookup, conflicts, listing.

Plugins are modules registered with a pluggy plugin manager. They are found through
the ``sphot`` entry-point group of installed distributions (the built-in
``sphot_plugins`` is registered the same way); ``SPHOT_DISABLE_PLUGIN_AUTOLOAD=1`` or
``sphot --no-plugins`` loads the built-ins only.

Names are matched case-insensitively with ``-`` and ``_`` treated alike. An unknown name
raises :class:`~sphot_core.errors.PluginError` with close matches and the available
names; two distributions claiming one name make that name unusable (the error names
both); a plugin that fails to import is reported and skipped.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata as metadata
import logging
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import attrs
import pluggy

from ._version import __version__
from .errors import ConfigError, PluginError
from .hookspecs import PROJECT, STAGES, SphotHookSpecs, StrategySpec

__all__ = [
    "Registry",
    "RegisteredStrategy",
    "canonical",
    "get_registry",
    "set_registry",
    "reset_registry",
    "build_options",
    "AUTOLOAD_ENV",
]

log = logging.getLogger(__name__)

AUTOLOAD_ENV = "SPHOT_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_MODULE = "sphot_plugins"


def canonical(name: str) -> str:
    """Normalised strategy name: lower case, ``-`` and spaces turned into ``_``."""
    return str(name).strip().lower().replace("-", "_").replace(" ", "_")


@attrs.frozen
class RegisteredStrategy:
    """A :class:`StrategySpec` with where it came from."""

    spec: StrategySpec
    stage: str
    plugin: str
    distribution: str
    version: str

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def origin(self) -> str:
        return f"{self.distribution} {self.version}".strip()

    def create(self, options: Any = None) -> Any:
        obj = self.spec.factory(options)
        if not getattr(obj, "name", None):
            try:
                obj.name = self.spec.name
            except (AttributeError, TypeError):
                pass
        return obj


def _stage_label(stage: str) -> str:
    return STAGES[stage][1]


class Registry:
    """Discovers plugins and answers name lookups for every stage kind.

    Parameters
    ----------
    autoload : bool, optional
        Load third-party plugins from entry points. Default: true unless the
        environment variable ``SPHOT_DISABLE_PLUGIN_AUTOLOAD`` is set to a true value.
    extra_plugins : list, optional
        Plugin objects (modules or instances with hook implementations) to register in
        addition, e.g. throwaway test plugins.
    """

    def __init__(self, autoload: Optional[bool] = None, extra_plugins: Optional[List[Any]] = None):
        if autoload is None:
            autoload = os.environ.get(AUTOLOAD_ENV, "").strip().lower() not in ("1", "true", "yes", "on")
        self.autoload = autoload
        self._extra = list(extra_plugins or [])
        self._loaded = False
        self._pm: Optional[pluggy.PluginManager] = None
        self._origins: Dict[int, Tuple[str, str, str]] = {}  # id(plugin) -> (plugin, dist, version)
        self._index: Dict[str, Dict[str, RegisteredStrategy]] = {}
        self._conflicts: Dict[str, Dict[str, List[RegisteredStrategy]]] = {}
        #: problems met while loading (import failures, conflicts, bad hook results)
        self.problems: List[str] = []

    # ---------------------------------------------------------------- loading
    def _register(self, plugin, name: str, dist: str, version: str) -> None:
        if self._pm.is_registered(plugin):
            return
        self._pm.register(plugin, name=name)
        self._origins[id(plugin)] = (name, dist, version)

    def load(self) -> "Registry":
        """Discover and register plugins (idempotent)."""
        if self._loaded:
            return self
        pm = pluggy.PluginManager(PROJECT)
        pm.add_hookspecs(SphotHookSpecs)
        self._pm = pm
        if self.autoload:
            self._load_entry_points()
        builtin = importlib.import_module(BUILTIN_MODULE)
        if not pm.is_registered(builtin):
            # autoload disabled, or running from a source tree without installed metadata
            self._register(builtin, f"sphot:{BUILTIN_MODULE}", "sphot", __version__)
        for i, plugin in enumerate(self._extra):
            label = getattr(plugin, "__name__", type(plugin).__name__)
            self._register(plugin, f"extra:{label}:{i}", getattr(plugin, "__distribution__", label), "")
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from None
        self._collect()
        self._loaded = True
        return self

    def _load_entry_points(self) -> None:
        seen = set()
        for ep in metadata.entry_points(group=PROJECT):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            version = dist.version if dist is not None else ""
            key = (dist_name, ep.name, ep.value)
            if key in seen:
                continue
            seen.add(key)
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken plugin must not break the others
                msg = (
                    f"plugin entry point {ep.name!r} ({ep.value}) of distribution "
                    f"{dist_name} {version} failed to import: {type(exc).__name__}: {exc}"
                )
                self.problems.append(msg)
                log.warning(msg)
                continue
            if self._pm.is_registered(plugin):
                continue
            try:
                self._register(plugin, f"{dist_name}:{ep.name}", dist_name, version)
            except ValueError as exc:
                msg = f"plugin {ep.name!r} of {dist_name} {version} could not be registered: {exc}"
                self.problems.append(msg)
                log.warning(msg)

    def _collect(self) -> None:
        for stage, (hook_name, label, _section) in STAGES.items():
            index: Dict[str, RegisteredStrategy] = {}
            conflicts: Dict[str, List[RegisteredStrategy]] = {}
            caller = getattr(self._pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                plugin_name, dist, version = self._origins.get(id(impl.plugin), (impl.plugin_name, "?", ""))
                try:
                    specs = list(impl.function() or [])
                except Exception as exc:
                    msg = f"plugin {plugin_name} ({dist} {version}) failed in {hook_name}(): {type(exc).__name__}: {exc}"
                    self.problems.append(msg)
                    log.warning(msg)
                    continue
                for spec in specs:
                    if not isinstance(spec, StrategySpec):
                        msg = f"plugin {plugin_name} ({dist}) returned {spec!r} from {hook_name}(), not a StrategySpec"
                        self.problems.append(msg)
                        log.warning(msg)
                        continue
                    reg = RegisteredStrategy(spec, stage, plugin_name, dist, version)
                    for alias in {canonical(spec.name), *map(canonical, spec.aliases)}:
                        other = index.get(alias)
                        if other is not None and other.spec is not spec:
                            conflicts.setdefault(alias, [other]).append(reg)
                        else:
                            index[alias] = reg
            for alias, regs in conflicts.items():
                index.pop(alias, None)
                who = " and ".join(f"{r.origin} (plugin {r.plugin})" for r in regs)
                self.problems.append(f"{label} name {alias!r} is claimed by {who}")
            self._index[stage] = index
            self._conflicts[stage] = conflicts

    # ---------------------------------------------------------------- lookups
    def _check_stage(self, stage: str) -> None:
        if stage not in STAGES:
            raise PluginError(f"unknown stage kind {stage!r}; stage kinds: {', '.join(STAGES)}")

    def strategies(self, stage: str) -> List[RegisteredStrategy]:
        """Registered strategies of ``stage`` (one entry per strategy, sorted by name)."""
        self.load()
        self._check_stage(stage)
        unique = {id(r.spec): r for r in self._index[stage].values()}
        return sorted(unique.values(), key=lambda r: canonical(r.name))

    def names(self, stage: str) -> List[str]:
        return [r.name for r in self.strategies(stage)]

    def get(self, stage: str, name: str, where: str = "") -> RegisteredStrategy:
        """The strategy registered as ``name`` for ``stage``.

        Raises
        ------
        PluginError
            Unknown name (with close matches and the available names), or a name
            claimed by two distributions.
        """
        self.load()
        self._check_stage(stage)
        key = canonical(name)
        label = _stage_label(stage)
        loc = f" ({where})" if where else ""
        if key in self._conflicts[stage]:
            regs = self._conflicts[stage][key]
            who = " and ".join(f"{r.origin} (plugin {r.plugin})" for r in regs)
            raise PluginError(
                f"{label} {name!r}{loc} is claimed by two distributions: {who}; uninstall one of them",
                stage=stage,
                name=name,
            )
        reg = self._index[stage].get(key)
        if reg is None:
            available = self.names(stage)
            close = difflib.get_close_matches(key, list(self._index[stage]), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(repr(self._index[stage][c].name) for c in close)}?" if close else ""
            raise PluginError(
                f"unknown {label} {name!r}{loc}.{hint} Available: {', '.join(available) or 'none'} "
                f"(a plugin providing it may not be installed; see `sphot plugins`)",
                stage=stage,
                name=name,
            )
        return reg

    def create(self, stage: str, name: str, options: Optional[Mapping[str, Any]] = None, where: str = "") -> Any:
        """Look up ``name`` and build the stage object with validated ``options``."""
        reg = self.get(stage, name, where=where)
        opts = build_options(reg.spec.options, options or {}, where or f"{_stage_label(stage)} {reg.name!r}")
        return reg.create(opts)

    def describe(self) -> Dict[str, List[Dict[str, Any]]]:
        """Everything registered, as plain data (``sphot plugins --json``)."""
        out: Dict[str, Any] = {}
        for stage in STAGES:
            rows = []
            for r in self.strategies(stage):
                rows.append(
                    {
                        "name": r.name,
                        "aliases": list(r.spec.aliases),
                        "description": r.spec.description,
                        "distribution": r.distribution,
                        "version": r.version,
                        "plugin": r.plugin,
                        "options": option_defaults(r.spec.options),
                    }
                )
            out[stage] = rows
        return out


# -------------------------------------------------------------------- options


def option_defaults(cls: Optional[type]) -> Dict[str, Any]:
    """Default values of an options class (fields without defaults are omitted)."""
    if cls is None or not attrs.has(cls):
        return {}
    out = {}
    for f in attrs.fields(cls):
        if f.default is attrs.NOTHING:
            continue
        value = f.default.factory() if isinstance(f.default, attrs.Factory) else f.default
        out[f.alias or f.name] = value
    return out


def _coerce(value: Any, default: Any, key: str, where: str) -> Any:
    """Light type checking of a TOML value against the field's default."""
    if default is None or default is attrs.NOTHING:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    if isinstance(default, (tuple, list)):
        if isinstance(value, str):  # "a,b,c" from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        return type(default)(value)
    if isinstance(default, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a table, got {value!r}")
        return dict(value)
    return value


def build_options(cls: Optional[type], values: Mapping[str, Any], where) -> Any:
    """Validate a TOML table against an attrs options class and instantiate it.

    Unknown keys are errors that suggest close matches; values are checked against the
    type of each field's default and then by the class's own validators. ``where``
    (a string, or a callable ``key -> str``) says where the table came from.
    """
    values = dict(values or {})
    locate = where if callable(where) else (lambda key: where)
    where = locate(None)
    if cls is None:
        if values:
            raise ConfigError(f"{where} takes no options, got: {', '.join(sorted(values))}")
        return None
    if not attrs.has(cls):
        return cls(**values)
    fields = {(f.alias or f.name): f for f in attrs.fields(cls) if f.init}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigError(
                f"{locate(key)}: unknown option {key!r}.{hint} Valid options: {', '.join(sorted(fields)) or 'none'}"
            )
        f = fields[key]
        default = f.default
        if isinstance(default, attrs.Factory):
            default = default.factory()
        kwargs[key] = _coerce(value, default, key, locate(key))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        culprit = next((k for k in kwargs if str(exc).startswith(k) or f"'{k}'" in str(exc)), None)
        raise ConfigError(f"{locate(culprit)}: {exc}") from None


# -------------------------------------------------------------- default registry

_REGISTRY: Optional[Registry] = None


def get_registry() -> Registry:
    """The process-wide registry (created and loaded on first use)."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = Registry()
    return _REGISTRY.load()


def set_registry(registry: Optional[Registry]) -> None:
    """Replace the process-wide registry (``None``: rebuild on next use)."""
    global _REGISTRY
    _REGISTRY = registry


def reset_registry() -> None:
    set_registry(None)
