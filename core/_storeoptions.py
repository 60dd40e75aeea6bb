"""The store options every command line that opens a store takes, and opening it from them.

``--root``, ``--runroot``, ``--driver``, ``--config`` and ``--storage-opt KEY=VALUE`` mean the
same to ``laminae`` and to ``laminae-snapshotter``: one definition here, applied to both
groups with :func:`store_options`, and one way to open the store, :meth:`StoreOptions.open`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import click

if TYPE_CHECKING:
    from laminae._config import StoreConfig
    from laminae._store import Store

__all__ = ["StoreOptions", "key_values", "store_options"]

_F = TypeVar("_F", bound=Callable[..., Any])


def key_values(ctx: click.Context, param: click.Parameter, values: Sequence[str]) -> dict[str, str]:
    """A click callback: repeated ``KEY=VALUE`` arguments as a dict."""
    pairs: dict[str, str] = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {item!r}", ctx, param)
        pairs[key] = value
    return pairs


def store_options(command: _F) -> _F:
    """Add the store options (parameters ``root``, ``runroot``, ``driver``, ``config_path``,
    ``storage_opts``) to a click command or group."""
    decorators = (
        click.option("--root", type=click.Path(path_type=Path), help="Store root (graphroot)."),
        click.option("--runroot", type=click.Path(path_type=Path), help="Run directory (mounts)."),
        click.option("--driver", help="Storage driver name."),
        click.option(
            "--config",
            "config_path",
            type=click.Path(path_type=Path),
            help="storage.toml to read instead of the search path.",
        ),
        click.option(
            "--storage-opt",
            "storage_opts",
            multiple=True,
            metavar="KEY=VALUE",
            callback=key_values,
            help="Driver option; repeatable.",
        ),
    )
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


@attrs.frozen
class StoreOptions:
    """The store options as given, and how to open the store from them."""

    root: Path | None
    runroot: Path | None
    driver: str | None
    config_path: Path | None
    storage_opts: Mapping[str, str]

    def or_else(self, other: Mapping[str, Any]) -> StoreOptions:
        """These options, each one not given taken from ``other`` (an outer group's params)."""
        return StoreOptions(
            self.root or other.get("root"),
            self.runroot or other.get("runroot"),
            self.driver or other.get("driver"),
            self.config_path or other.get("config_path"),
            self.storage_opts or other.get("storage_opts") or {},
        )

    def config(self) -> StoreConfig:
        from laminae._config import load_config

        return load_config(self.config_path)

    def open(self) -> Store:
        from laminae._store import open_store

        return open_store(
            self.root,
            runroot=self.runroot,
            driver=self.driver,
            driver_options=self.storage_opts or None,
            config=self.config(),
        )
