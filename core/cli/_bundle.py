"""The bundle commands of ``laminae``: ``bundle CONTAINER DIR`` and ``unbundle DIR``.

``bundle`` mounts a container and writes an OCI runtime bundle for it (see
:mod:`laminae.containers._bundle`); a runtime then runs it::

    laminae bundle box /tmp/box --mount /tmp/tools:/opt/host -- /opt/host/busybox sh -c 'echo hi'
    crun run --bundle /tmp/box box
    laminae unbundle /tmp/box

``unbundle`` needs only the directory: the bundle's marker names the store (root, run
directory, driver) and the container, so the global ``--root``, ``--runroot`` and ``--driver``
are not needed (and, given, not used). They follow the conventions of :mod:`laminae.cli._main`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from laminae._exceptions import InvalidArgument
from laminae._storeoptions import StoreOptions
from laminae.cli._main import _json_option, _print_json, _with_store

if TYPE_CHECKING:
    from laminae._store import Store
    from laminae.containers._bundle import BindMount

__all__ = ["bundle", "unbundle"]


def _bind_mounts(
    ctx: click.Context, param: click.Parameter, values: Sequence[str]
) -> list[BindMount]:
    from laminae.containers._bundle import BindMount

    try:
        return [BindMount.parse(value) for value in values]
    except InvalidArgument as exc:
        raise click.BadParameter(str(exc), ctx, param) from exc


@click.command()
@click.argument("container")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.argument("args", nargs=-1, metavar="[-- ARGS...]", type=click.UNPROCESSED)
@click.option(
    "--runtime",
    default="crun",
    show_default=True,
    help="The runtime whose `spec` the config starts from (crun, runc).",
)
@click.option(
    "--mount",
    "mounts",
    multiple=True,
    metavar="SRC:DST[:ro|rw]",
    callback=_bind_mounts,
    help="Bind a host path into the container (read-only unless :rw); repeatable.",
)
@click.option("-t", "--tty", "terminal", is_flag=True, help="Give the process a terminal.")
@_json_option
@_with_store
def bundle(
    store: Store,
    container: str,
    directory: Path,
    args: tuple[str, ...],
    runtime: str,
    mounts: list[BindMount],
    terminal: bool,
    as_json: bool,
) -> None:
    """Mount CONTAINER and write an OCI runtime bundle for it in DIR.

    The command is ARGS (after `--`), else the image's Entrypoint and Cmd. Run the bundle
    with `crun run --bundle DIR ID` or `runc run --bundle DIR ID`; `laminae unbundle DIR`
    unmounts the container and removes the files.
    """
    from laminae.containers._bundle import make_bundle

    made = make_bundle(
        store,
        container,
        directory,
        runtime=runtime,
        args=args or None,
        mounts=mounts,
        terminal=terminal,
    )
    if as_json:
        _print_json(made)
    else:
        click.echo(made.directory)


@click.command()
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.pass_context
def unbundle(ctx: click.Context, directory: Path) -> None:
    """Unmount the container of the bundle in DIR and remove what `laminae bundle` wrote."""
    from laminae._store import open_store
    from laminae.containers._bundle import read_marker, remove_bundle

    marker = read_marker(directory)
    settings = ctx.find_object(StoreOptions)
    assert settings is not None, "the top group sets it"
    store = open_store(
        marker.store_root,
        runroot=marker.runroot,
        driver=marker.driver,
        config=settings.config(),
    )
    with store:
        remove_bundle(store, directory)
