"""The container commands of ``laminae``: ``container create|ls|inspect|rm|mount|unmount|diff|
commit|export``, as ``docker`` spells them.

They follow the conventions of :mod:`laminae.cli._main` (one error line and the error's exit code,
``--json`` on listings, full ids off a terminal). The top group loads this module only when
``container`` is named (see ``_LaminaeGroup.get_command``); the store and container code load
only when a command runs.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Any

import attrs
import click

from laminae._exceptions import NotFound
from laminae._storeoptions import key_values
from laminae.cli._main import (
    _change_line,
    _json_option,
    _print_json,
    _print_table,
    _short,
    _tar_output_options,
    _with_store,
    _write_tar,
)

if TYPE_CHECKING:
    from laminae._store import Store
    from laminae.store._records import Container

__all__ = ["container"]


@attrs.frozen
class _ContainerRow:
    """One container as ``container ls --json`` shows it."""

    id: str
    name: str | None
    image: str | None
    image_names: tuple[str, ...]
    layer: str
    created: datetime
    mounted: bool
    mount_point: str | None


def _row(store: Store, item: Container) -> _ContainerRow:
    names: tuple[str, ...] = ()
    if item.image is not None:
        # An image removed behind the graph's back cannot happen (remove_image refuses while
        # a container uses it); NotFound is kept for a store repaired under us.
        try:
            names = store.image(item.image).names
        except NotFound:
            names = ()
    layer = store.layer(item.layer)
    return _ContainerRow(
        item.id,
        item.name,
        item.image,
        names,
        item.layer,
        item.created,
        layer.mount_count > 0,
        None if layer.mount_point is None else str(layer.mount_point),
    )


@click.group()
def container() -> None:
    """Create, list, mount, diff, commit and export containers."""


@container.command("create")
@click.option("--image", "image_ref", metavar="IMAGE", required=True, help="Image to start from.")
@click.option("--name", help="A name for the container (unique).")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", callback=key_values)
@_with_store
def container_create(
    store: Store, image_ref: str, name: str | None, labels: dict[str, str]
) -> None:
    """Create a container (a writable layer on the image); print its id, as `docker create`."""
    click.echo(store.create_container(image_ref, name=name, labels=labels or None).id)


@container.command("ls")
@_json_option
@_with_store
def container_ls(store: Store, as_json: bool) -> None:
    """List containers: id, name, image, created, mounted."""
    rows = [_row(store, item) for item in store.containers()]
    if as_json:
        _print_json(rows, list[_ContainerRow])
        return
    _print_table(
        ("ID", "NAME", "IMAGE", "CREATED", "MOUNTED"),
        (
            (
                _short(r.id),
                r.name,
                r.image_names or _short(r.image),
                r.created,
                "yes" if r.mounted else "no",
            )
            for r in rows
        ),
    )


def _inspect_fields(store: Store, item: Container) -> dict[str, Any]:
    from laminae.containers._containers import image_config

    row = _row(store, item)
    config = None
    if item.image is not None:
        config = image_config(store.image(item.image))
    return {
        "Id": item.id,
        "Name": item.name,
        "Image": item.image,
        "ImageName": row.image_names[0] if row.image_names else None,
        "Layer": item.layer,
        "Created": item.created.isoformat(),
        "MountPoint": row.mount_point,
        "Mounted": row.mounted,
        "Config": None if config is None else config.container_config,
    }


@container.command("inspect")
@click.argument("ref", metavar="CONTAINER")
@_with_store
def container_inspect(store: Store, ref: str) -> None:
    """Print a container as JSON: ids, names, mount state and its image's run config."""
    click.echo(json.dumps(_inspect_fields(store, store.container(ref)), indent=2))


@container.command("rm")
@click.argument("refs", metavar="CONTAINER...", nargs=-1, required=True)
@click.option("-f", "--force", is_flag=True, help="Unmount a mounted container first.")
@_with_store
def container_rm(store: Store, refs: tuple[str, ...], force: bool) -> None:
    """Remove containers and their layers, in the order given; print each id removed.

    Stops at the first error. A mounted container is refused unless --force.
    """
    for ref in refs:
        container_id = store.container(ref).id
        store.remove_container(ref, force=force)
        click.echo(container_id)


@container.command("mount")
@click.argument("ref", metavar="CONTAINER")
@_with_store
def container_mount(store: Store, ref: str) -> None:
    """Mount a container's root (writable) and print the path; it stays until `unmount`."""
    click.echo(str(store.mount_container(ref)))


@container.command("unmount")
@click.argument("ref", metavar="CONTAINER")
@click.option("--force", is_flag=True, help="Unmount whatever the count says.")
@_with_store
def container_unmount(store: Store, ref: str, force: bool) -> None:
    """Release one mount of a container; the last one really unmounts."""
    store.unmount_container(ref, force=force)


@container.command("diff")
@click.argument("ref", metavar="CONTAINER")
@_json_option
@_with_store
def container_diff(store: Store, ref: str, as_json: bool) -> None:
    """List what a container changed against its image, as `docker diff` does:
    A added, C changed, D deleted, one path a line, sorted by path."""
    from laminae.archive._changes import Change

    changes = store.container_changes(ref)
    if as_json:
        _print_json(changes, list[Change])
        return
    for change in changes:
        click.echo(_change_line(change))


@container.command("commit")
@click.option("-m", "--message", help="Comment of the new history entry.")
@click.option("-a", "--author", help="Author of the new image.")
@click.argument("ref", metavar="CONTAINER")
@click.argument("name", metavar="[NEWREF]", required=False)
@_with_store
def container_commit(
    store: Store, message: str | None, author: str | None, ref: str, name: str | None
) -> None:
    """Commit a container's changes as a new image; print its id (`docker commit`).

    Works while the container is mounted; the container and its image are left as they are.
    """
    click.echo(store.commit_container(ref, name, message=message, author=author).id)


@container.command("export")
@click.argument("ref", metavar="CONTAINER")
@_tar_output_options
@_with_store
def container_export(store: Store, ref: str, output: str, compression: str) -> None:
    """Write a container's changes as an OCI layer tar (to stdout unless -o).

    With -o FILE, print the DiffID, the digest of what was written and its size.
    """
    store.container(ref)  # an unknown container fails before any file is made
    _write_tar(
        output, compression, lambda out, how: store.export_container(ref, out, compression=how)
    )
