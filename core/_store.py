"""The store: layers, images and containers in one root, stored by one driver.

:class:`Store` is built in three layers, one class each: the layers
(:class:`laminae.store._layers.LayerStore`: the graph, the driver, applying, committing,
mounting, checking), the images (:class:`laminae.images._store.ImageStore`) and the containers
(:class:`laminae.containers._store.ContainerStore`). The pipelines that move images and
commits in get the store's :class:`~laminae.store._staging.Staging`, not the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import final

from laminae._config import StoreConfig, load_config, runroot_for
from laminae._exceptions import InvalidArgument, map_os_errors
from laminae.archive._limits import Limits
from laminae.containers._store import ContainerStore

__all__ = ["Store", "open_store"]


def open_store(
    root: str | Path | None = None,
    *,
    runroot: str | Path | None = None,
    driver: str | None = None,
    driver_options: Mapping[str, str] | None = None,
    config: StoreConfig | None = None,
    limits: Limits | None = None,
) -> Store:
    """Open (or create) the store at ``root``.

    Arguments override ``config``; with no ``config``, :func:`laminae.load_config` finds one
    (``$LAMINAE_CONFIG``, ``~/.config/laminae/storage.toml``, ``/etc/laminae/storage.toml``).
    A ``root`` other than the default one, with no run directory given or configured, gets a
    run directory of its own beside the default one (``/run/laminae-<hash of the root>``).
    Each store marks its run directory and refuses one that another store uses.

    :raises InvalidArgument: a bad root, driver name or option.
    :raises DriverUnavailable: no driver (or not the named one) can run here.
    :raises FailedPrecondition: the store was made by another driver than the one named; the
        run directory is another store's.
    """
    config = config or load_config()
    root_path = Path(root) if root is not None else config.graphroot
    # With no run directory given, the default one serves only the default root; another
    # root gets its own, so that stores never meet each other's mounts (runroot_for).
    run_path = Path(runroot) if runroot is not None else runroot_for(config, root_path)
    for what, path in (("root", root_path), ("runroot", run_path)):
        if not str(path) or "\x00" in str(path):
            raise InvalidArgument(f"store {what} {str(path)!r}: not a usable path")
        if path.exists() and not path.is_dir():
            raise InvalidArgument(f"store {what} {path}: exists and is not a directory")
    root_path = root_path.absolute()
    run_path = run_path.absolute()
    options = {name: dict(opts) for name, opts in config.driver_options.items()}
    name = driver if driver is not None else config.driver
    if driver_options is not None:
        if name is None:
            raise InvalidArgument("driver options given without naming a driver")
        options[name] = {**options.get(name, {}), **driver_options}
    if driver is None and name is not None:
        _check_configured_driver(config, name)
    elif name is None and config.driver_priority:
        _check_priority(config)
    with map_os_errors(f"create store root {root_path}"):
        root_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    with map_os_errors(f"create run directory {run_path}"):
        run_path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return Store(
        root_path, run_path, name, options, config.driver_priority, limits or config.limits
    )


def _check_configured_driver(config: StoreConfig, name: str) -> None:
    """Refuse a driver named by the configuration that is not installed, saying where it was
    named (the file and key, or the environment), before anything is created."""
    from laminae.driverkit._plugins import find_drivers

    installed = find_drivers(name)
    if name not in installed:
        where = f"{config.driver_setting}: " if config.driver_setting else ""
        raise InvalidArgument(
            f"{where}driver {name!r} is not installed (installed: {', '.join(sorted(installed))})"
        )


def _check_priority(config: StoreConfig) -> None:
    """Refuse a ``driver_priority`` that names a driver not installed, naming the file."""
    from laminae.driverkit._plugins import available_drivers

    installed = available_drivers()
    for name in config.driver_priority:
        if name not in installed:
            where = f"{config.source}: " if config.source is not None else ""
            raise InvalidArgument(
                f"{where}storage.driver_priority: driver {name!r} is not installed "
                f"(installed: {', '.join(sorted(installed))})"
            )


@final
class Store(ContainerStore):
    """Layers, images and containers in one root, stored by one driver.

    Use :func:`open_store` to get one; close it (or use it as a context manager) when done.
    """
