"""``laminae snapshotter serve`` (and ``laminae-snapshotter serve``): containerd's snapshots
service for a laminae store, on a unix socket.

The store options are ``laminae``'s own (``--root``, ``--runroot``, ``--driver``, ``--config``,
``--storage-opt``); given before ``snapshotter`` (``laminae --root R snapshotter serve``) or
after ``serve``, they open the store the way every ``laminae`` command does. The gRPC modules
load only when the server starts: ``--help`` works without the ``laminae[containerd]`` extra.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import click

from laminae._exceptions import LaminaeError, Unsupported
from laminae._storeoptions import StoreOptions, store_options

__all__ = ["main", "snapshotter"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def snapshotter() -> None:
    """Serve a store to containerd as a proxy snapshotter (docs/containerd.md)."""


@snapshotter.command()
@click.option(
    "--socket",
    "socket_path",
    required=True,
    type=click.Path(path_type=Path),
    help="Unix socket to listen on: containerd's proxy_plugins address.",
)
@store_options
@click.pass_context
def serve(
    ctx: click.Context,
    socket_path: Path,
    root: Path | None,
    runroot: Path | None,
    driver: str | None,
    config_path: Path | None,
    storage_opts: dict[str, str],
) -> None:
    """Serve containerd.services.snapshots.v1.Snapshots on SOCKET until SIGTERM or SIGINT.

    Mounts are returned to containerd as descriptions; the server mounts nothing.
    """
    # `laminae --root R snapshotter serve`: the top group's options, where this one has none.
    options = StoreOptions(root, runroot, driver, config_path, storage_opts).or_else(
        ctx.find_root().params
    )
    try:
        from laminae.snapshotter._server import serve as serve_store
    except ImportError as exc:
        raise Unsupported(
            f"the snapshotter needs grpcio and protobuf: pip install 'laminae[containerd]' ({exc})"
        ) from exc
    with options.open() as store:
        serve_store(
            store,
            socket_path,
            ready=lambda: click.echo(f"laminae snapshotter: serving {store.root} on {socket_path}"),
        )


def main(args: Sequence[str] | None = None) -> NoReturn:
    """``laminae-snapshotter``: the ``snapshotter`` group as a command of its own."""
    try:
        snapshotter.main(args, prog_name="laminae-snapshotter", standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except LaminaeError as exc:
        click.echo(f"laminae-snapshotter: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    sys.exit(0)
