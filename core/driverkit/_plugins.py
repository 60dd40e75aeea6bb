"""Drivers as plugins: pluggy hooks that register, a registry, and the probe.

Hooks register; they do not dispatch (the tox and llm pattern): a driver package's hookimpl
hands its driver class to :class:`DriverRegistry`, and from then on the store calls the class.
Built-in drivers are found through the ``laminae.drivers`` entry points like anybody else's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, final

import attrs
import pluggy

from laminae._exceptions import DriverUnavailable, InvalidArgument, LaminaeError
from laminae.driverkit._contract import FEATURE_PROTOCOLS, Capabilities, Driver

__all__ = [
    "DriverEntry",
    "DriverRegistry",
    "available_drivers",
    "collect_transports",
    "hookimpl",
    "hookspec",
    "plugin_manager",
]

PROJECT = "laminae"
ENTRY_POINT_GROUP = "laminae.drivers"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class DriverClass(Protocol):
    """What is registered: a class satisfying :class:`Driver`."""

    name: str
    capabilities: Capabilities

    def __call__(self, home: Path, options: Mapping[str, str]) -> Driver: ...

    def probe(self, home: Path, options: Mapping[str, str]) -> None: ...


@final
@attrs.frozen
class DriverEntry:
    """One installed driver.

    :param name: what ``--driver`` and ``storage.toml`` call it.
    :param cls: the driver class.
    :param priority: auto-selection tries higher priorities first.
    :param origin: the distribution that registered it, ``"name version"``.
    """

    name: str
    cls: Any = attrs.field(repr=False)
    priority: int
    origin: str

    @property
    def capabilities(self) -> Capabilities:
        """The capabilities the class declares."""
        caps: Capabilities = self.cls.capabilities
        return caps

    def probe(self, home: Path, options: Mapping[str, str]) -> str | None:
        """Return ``None`` if the driver can run at ``home``, else the reason it cannot."""
        try:
            self.cls.probe(home, options)
        except DriverUnavailable as exc:
            return exc.reason
        return None


@final
class DriverRegistry:
    """Handed to ``laminae_register_drivers``; call it with a driver class."""

    __slots__ = ("_current_origin", "entries")

    def __init__(self) -> None:
        self.entries: dict[str, DriverEntry] = {}
        self._current_origin = "unknown"

    def __call__(self, cls: Any, *, priority: int = 0) -> None:
        """Register ``cls`` as driver ``cls.name``.

        :raises InvalidArgument: the class does not satisfy the contract, declares a
            feature it does not implement, or its name is taken.
        """
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidArgument(f"driver class {cls!r}: 'name' must be an identifier string")
        caps = getattr(cls, "capabilities", None)
        if not isinstance(caps, Capabilities):
            raise InvalidArgument(f"driver {name!r}: 'capabilities' must be a laminae.Capabilities")
        for method in ("probe", "create", "remove", "mounts", "usage", "layers", "close"):
            if not callable(getattr(cls, method, None)):
                raise InvalidArgument(f"driver {name!r}: missing required method {method!r}")
        for feature in caps.features:
            protocol = FEATURE_PROTOCOLS[feature]
            if not all(callable(getattr(cls, m, None)) for m in _protocol_methods(protocol)):
                raise InvalidArgument(
                    f"driver {name!r} declares {feature.value!r} but does not implement "
                    f"{protocol.__name__}"
                )
        if name in self.entries:
            raise InvalidArgument(
                f"driver {name!r} registered twice: by {self.entries[name].origin} "
                f"and by {self._current_origin}"
            )
        self.entries[name] = DriverEntry(name, cls, priority, self._current_origin)


def _protocol_methods(protocol: type) -> list[str]:
    return [n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_")]


class _Hooks:
    """The hook specifications; a driver package implements some of them."""

    @hookspec
    def laminae_register_drivers(self, register: DriverRegistry) -> None:
        """Register driver classes: ``register(MyDriver, priority=10)``."""

    @hookspec
    def laminae_register_transports(self, register: Callable[[Any], None]) -> None:
        """Register image transports: ``register(Transport(...))``.

        ``Transport`` is the row of the transport table (``laminae.images._transports``, whose
        docstring says how to write one). A name already taken, by a built-in transport or
        another plugin's, is refused.
        """

    @hookspec(firstresult=True)
    def laminae_conformance_home(
        self, driver_name: str, base: Path
    ) -> contextlib.AbstractContextManager[Path] | None:
        """Provide a home for ``driver_name`` in a conformance test, or ``None``.

        A driver that needs a special filesystem (btrfs: a loop image) returns a context
        manager that makes it under ``base``, yields the home, and removes every trace.
        """


def _origin(dist: Any) -> str:
    """``"name version"`` of a pluggy ``DistFacade`` (it wraps importlib's Distribution)."""
    return f"{dist.metadata['Name']} {dist.version}"


@functools.cache
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every installed driver package loaded.

    A misspelt hook in a plugin fails here (``check_pending``), not silently later.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(_Hooks)
    pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    pm.check_pending()
    return pm


def available_drivers(pm: pluggy.PluginManager | None = None) -> dict[str, DriverEntry]:
    """Every installed driver by name, from every plugin's ``laminae_register_drivers``.

    Loaded anew on each call so that a test may register a plugin on the manager first.
    """
    pm = pm or plugin_manager()
    registry = DriverRegistry()
    origins = {id(plugin): _origin(dist) for plugin, dist in pm.list_plugin_distinfo()}
    for impl in reversed(pm.hook.laminae_register_drivers.get_hookimpls()):
        registry._current_origin = origins.get(id(impl.plugin), f"plugin {impl.plugin_name}")
        try:
            impl.function(register=registry)
        except LaminaeError:
            raise
        except Exception as exc:  # a broken third-party plugin must name itself
            raise LaminaeError(
                f"driver plugin {impl.plugin_name!r} failed to register: {exc}"
            ) from exc
    return registry.entries


def collect_transports(
    register_for: Callable[[str], Callable[[Any], None]], pm: pluggy.PluginManager | None = None
) -> None:
    """Call every plugin's ``laminae_register_transports``, in the order they were registered.

    :param register_for: the ``register`` callable to hand the plugins of ``origin`` (the
        distribution, ``"name version"``), so that a refusal can name who registered what.
    :raises LaminaeError: a plugin's hook failed, naming the plugin; a :class:`LaminaeError`
        from ``register`` (a refused transport) passes unchanged.
    """
    pm = pm or plugin_manager()
    origins = {id(plugin): _origin(dist) for plugin, dist in pm.list_plugin_distinfo()}
    # Registration order (pluggy calls the last registered first): the first plugin to take a
    # name keeps it, and the refusal names the later one.
    for impl in pm.hook.laminae_register_transports.get_hookimpls():
        origin = origins.get(id(impl.plugin), f"plugin {impl.plugin_name}")
        try:
            impl.function(register=register_for(origin))
        except LaminaeError:
            raise
        except Exception as exc:  # a broken third-party plugin must name itself
            raise LaminaeError(
                f"transport plugin {impl.plugin_name!r} failed to register: {exc}"
            ) from exc


def conformance_home(
    driver_name: str, base: Path
) -> contextlib.AbstractContextManager[Path] | None:
    """Ask the plugins for a conformance home for ``driver_name`` (see the hookspec)."""
    result: contextlib.AbstractContextManager[Path] | None = (
        plugin_manager().hook.laminae_conformance_home(driver_name=driver_name, base=base)
    )
    return result
