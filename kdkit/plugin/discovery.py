"""Plugin discovery: the ``kdkit`` entry-point group, one mmengine Registry per kind.

We iterate the entry points ourselves rather than calling pluggy's
``load_setuptools_entrypoints``: that one stops at the first plugin that fails to import and
skips duplicate names silently, while kdkit warns about a broken plugin, keeps the others, and
refuses two distributions that register the same name.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import types
import warnings
from dataclasses import dataclass
from importlib.metadata import entry_points

import pluggy
from mmengine.registry import Registry

from kdkit.errors import KdkitError, PluginError, did_you_mean
from kdkit.plugin import hookspecs as hookspecs

ENTRY_POINT_GROUP = "kdkit"


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the others keep working."""


@dataclass(frozen=True)
class Origin:
    """Where a registered name came from."""

    entry_point: str
    distribution: str

    def __str__(self) -> str:
        return f"entry point {self.entry_point!r} of distribution {self.distribution!r}"


class Plugins:
    """Every registered factory, by kind and name, and the distribution each came from."""

    def __init__(self) -> None:
        self.manager = pluggy.PluginManager("kdkit")
        self.manager.add_hookspecs(hookspecs)
        self.registries = {kind: Registry(kind) for kind in hookspecs.KINDS}
        self.origins: dict[tuple[str, str], Origin] = {}

    def add(self, module: types.ModuleType, origin: Origin) -> None:
        """Register one plugin module: the names its registration hooks add (each into a registry of its
        own first, so that a name another distribution has is refused naming both) and its factories
        marked with ``api.register``."""
        self.manager.register(module, name=f"{origin.distribution}:{origin.entry_point}")
        others = [p for p in self.manager.get_plugins() if p is not module]
        for kind, registry in self.registries.items():
            call = self.manager.subset_hook_caller(hookspecs.hook_name(kind), remove_plugins=others)
            own = Registry(kind)
            try:
                call(registry=own)
                for factory in marked_factories(module, kind):
                    own.register_module(name=factory.kdkit_name, module=factory)
            except KeyError as exc:  # mmengine refuses a name registered twice
                raise PluginError(f"{origin} registers a {kind} name twice: {exc}") from None
            for name, factory in own.module_dict.items():
                if "." in name:
                    raise PluginError(f"{kind} plugin name {name!r} from {origin} contains a dot")
                if name in registry.module_dict:
                    raise PluginError(f"{kind} plugin {name!r} is registered twice: by "
                                      f"{self.origins[(kind, name)]} and by {origin}")
                registry.register_module(name=name, module=factory)
                self.origins[(kind, name)] = origin

    def load_entry_points(self, group: str = ENTRY_POINT_GROUP) -> None:
        """Load every plugin of the entry-point group; a plugin that fails to import is a warning."""
        for ep in sorted(entry_points(group=group), key=lambda e: (e.dist.name if e.dist else "", e.name)):
            distribution = ep.dist.name if ep.dist else "?"
            try:
                module = ep.load()
                self.check_hooks(module)
            except Exception as exc:  # a broken third-party plugin must not take kdkit down
                warnings.warn(
                    f"kdkit plugin entry point {ep.name!r} ({ep.value}) of distribution "
                    f"{distribution!r} failed to load and is skipped: {type(exc).__name__}: {exc}",
                    PluginWarning,
                    stacklevel=2,
                )
                continue
            self.add(module, Origin(ep.name, distribution))

    @contextlib.contextmanager
    def joined(self, callbacks: dict[str, object]):
        """The run's callback objects take part in the lifecycle hooks for the duration of the block."""
        try:
            for name, callback in callbacks.items():
                self.manager.register(callback, name=f"callback:{name}:{id(callback)}")
            yield
        finally:
            for callback in callbacks.values():
                if self.manager.is_registered(callback):
                    self.manager.unregister(callback)

    def check_hooks(self, plugin: object) -> None:
        """PluginError for a function meant as a hook that pluggy would refuse, or ignore without a word.

        Meant as a hook: marked ``@hookimpl``, or, in a plugin module, any public ``kdkit_`` function
        (pluggy matches module functions by marker only). Unmarked methods of a callback object are its
        own helpers. A hook's arguments are checked against its spec by pluggy itself, on a scratch manager.
        """
        hooks = [name for name in dir(hookspecs) if self.manager.parse_hookspec_opts(hookspecs, name)]
        for name in dir(plugin):
            marked = self.manager.parse_hookimpl_opts(plugin, name) is not None
            in_module = (isinstance(plugin, types.ModuleType) and name.startswith("kdkit_")
                         and inspect.isroutine(getattr(plugin, name)))
            if (marked or in_module) and name not in hooks:
                raise PluginError(f"{name!r} is no kdkit hook{did_you_mean(name, hooks)}")
            if in_module and not marked:
                raise PluginError(f"{name!r} is not marked @api.hookimpl, so it is never called")
        scratch = pluggy.PluginManager("kdkit")
        scratch.add_hookspecs(hookspecs)
        try:
            scratch.register(plugin)
        except pluggy.PluginValidationError as exc:  # its first line names the scratch manager's plugin id
            raise PluginError("; ".join(str(exc).splitlines()[1:])) from None

    def check_callbacks(self, callbacks: dict[str, object]) -> None:
        """Every callback's hooks (``check_hooks``), checked when a run builds them, before it writes anything."""
        for name, callback in callbacks.items():
            try:
                self.check_hooks(callback)
            except PluginError as exc:
                raise PluginError(f"callback {name!r}: {exc}") from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.registries[kind].module_dict)

    def get(self, kind: str, name: str):
        """The factory registered as ``name``; KdkitError naming the close matches otherwise."""
        factory = self.registries[kind].module_dict.get(name)
        if factory is None:
            raise KdkitError(f"no {kind} plugin named {name!r}{did_you_mean(name, self.names(kind))}")
        return factory

    def describe(self) -> list[dict]:
        """One row per registered name: kind, name, keys (from the factory signature), distribution."""
        from kdkit.recipe.schema import describe_keys

        rows = []
        for kind in hookspecs.KINDS:
            for name in self.names(kind):
                origin = self.origins[(kind, name)]
                factory = self.get(kind, name)
                rows.append({
                    "kind": kind,
                    "name": name,
                    "keys": describe_keys(factory, kind),
                    "distribution": origin.distribution,
                    "entry_point": origin.entry_point,
                    "doc": (inspect.getdoc(factory) or "").split("\n")[0],
                })
        return rows


def register(kind: str, name: str):
    """A decorator registering a factory under ``name`` as a ``kind`` plugin (``student``, ``teacher``,
    ``head``, ``loss``, ``dataset``, ``callback``) when its module is loaded through the ``kdkit``
    entry points: the short form of a ``kdkit_register_<kind>s`` hook."""
    if kind not in hookspecs.KINDS:
        raise KdkitError(f"api.register: no plugin kind {kind!r}{did_you_mean(kind, hookspecs.KINDS)}; "
                         f"the kinds: {', '.join(hookspecs.KINDS)}")

    def mark(factory):
        factory.kdkit_kind, factory.kdkit_name = kind, name
        return factory
    return mark


def marked_factories(module: types.ModuleType, kind: str) -> list:
    """The module's own factories that ``register`` marked as ``kind`` plugins."""
    return [value for value in vars(module).values()
            if getattr(value, "kdkit_kind", None) == kind and getattr(value, "__module__", None) == module.__name__]


@functools.cache
def default_plugins() -> Plugins:
    """The plugins of the current environment, loaded once per process."""
    plugins = Plugins()
    plugins.load_entry_points()
    return plugins
