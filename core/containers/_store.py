"""The store's containers: an image's top layer with a writable layer on it, and its changes.

Part of :class:`~laminae.Store` (:mod:`laminae.store._layers` has the layers,
:mod:`laminae.images._store` the images). What a commit makes of a container's changes (the
new image's config) and how its changes are listed are in :mod:`laminae.containers._containers`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from laminae._exceptions import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    map_os_errors,
)
from laminae.archive._changes import Change
from laminae.archive._compression import Compression
from laminae.containers._containers import commit_config, image_config, with_parent_dirs
from laminae.images._image import ImageConfig
from laminae.images._reference import local_name
from laminae.images._store import ImageStore
from laminae.store._lookup import (
    container_record,
    resolve_container,
    resolve_image,
    resolve_layer,
)
from laminae.store._records import (
    Container,
    DiffResult,
    Image,
    chain_id,
    check_key,
    check_labels,
)

__all__ = ["ContainerStore"]


class ContainerStore(ImageStore):
    """An image store with containers: create, look up, mount, diff, commit, export, remove."""

    def create_container(
        self,
        image: str | None,
        *,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Container:
        """Create a container: an active layer on ``image``'s top layer (empty if none).

        The layer stays incomplete until the container's row is written, in the same
        transaction; an image removed meanwhile is a :class:`NotFound`, and its layers, which
        the removal had to leave to this layer's parent, are collected (journalled: a crash
        leaves that to the next open).

        :raises NotFound: no image ``image``, or it was removed while the container was made.
        :raises AlreadyExists: ``name`` is taken.
        """
        self._check_open()
        if name is not None:
            check_key("container name", name)
            if self._graph.container_for_name(name) is not None:
                raise AlreadyExists(f"container name {name!r}: already in use")
        checked = check_labels(labels)
        image_row = None if image is None else resolve_image(self._graph, image)
        image_id = None if image_row is None else str(image_row["id"])
        top = None if image_row is None else image_row["top_layer"]
        container_id = secrets.token_hex(32)
        with self._staging.collecting(top, f"create container {container_id}"):
            parent = None if top is None else self._staging.committed_parent(top)
            with (
                self._staging.stage(parent, key=container_id),
                self._lock.held(),
                self._graph.transaction(),
            ):
                if image_id is not None and self._graph.image(image_id) is None:
                    raise NotFound(f"image {image!r}: removed while the container was made")
                if name is not None and self._graph.container_for_name(name) is not None:
                    raise AlreadyExists(f"container name {name!r}: already in use")
                self._graph.set_labels(container_id, checked)
                self._graph.update_layer(container_id, incomplete=False)
                self._graph.insert_container(container_id, name, image_id, container_id)
        return self.container(container_id)

    def container(self, ref: str) -> Container:
        """The container ``ref`` names (id or name). :raises NotFound: none does."""
        self._check_open()
        return container_record(resolve_container(self._graph, ref))

    def containers(self) -> list[Container]:
        """Every container, oldest first."""
        self._check_open()
        return [container_record(r) for r in self._graph.all_containers()]

    def remove_container(self, ref: str, *, force: bool = False) -> None:
        """Remove a container and its layer.

        :param force: unmount the container's layer first, however often it is mounted.
        :raises FailedPrecondition: its layer is mounted (and not ``force``).
        """
        self._check_open()
        with self._lock.held():
            row = resolve_container(self._graph, ref)
            layer = resolve_layer(self._graph, row["layer"])
            self._mounts.reconcile_row(layer)
            if resolve_layer(self._graph, row["layer"]).mount_count:
                if not force:
                    raise FailedPrecondition(
                        f"cannot remove container {ref!r}: its layer is mounted"
                    )
                self.unmount(layer.id, force=True)
            # Two steps, journalled: a crash after the row goes leaves the layer to the next
            # open, which collects it.
            with (
                self._staging.collecting(layer.id, f"remove container {row['id']}"),
                self._graph.transaction(),
            ):
                self._graph.delete_container(row["id"])

    def mount_container(self, ref: str) -> Path:
        """Mount container ``ref``'s writable root and return where (counted, as
        :meth:`mount`: each mount needs an :meth:`unmount_container`).

        :raises NotFound: no container ``ref``.
        """
        self._check_open()
        return self.mount(resolve_container(self._graph, ref)["layer"])

    def unmount_container(self, ref: str, *, force: bool = False) -> None:
        """Drop one mount of container ``ref``; the last one unmounts. ``force`` drops all.

        :raises FailedPrecondition: it is not mounted (and not ``force``).
        """
        self._check_open()
        with self._lock.held():
            layer = resolve_layer(self._graph, resolve_container(self._graph, ref)["layer"])
            self._mounts.reconcile_row(layer)
            if force and not resolve_layer(self._graph, layer.id).mount_count:
                return  # nothing to drop (and no mount point to remove)
            self.unmount(layer.id, force=force)

    def container_changes(self, ref: str) -> list[Change]:
        """What container ``ref`` changed against its image, sorted by path (mounted or not).

        As ``docker diff`` lists them: every directory above a change is listed as modified
        too, whichever driver found the changes
        (:func:`laminae.containers._containers.with_parent_dirs`).
        """
        self._check_open()
        return with_parent_dirs(self.changes(resolve_container(self._graph, ref)["layer"]))

    def export_container(
        self, ref: str, out: BinaryIO, *, compression: Compression = Compression.NONE
    ) -> DiffResult:
        """Write container ``ref``'s changes to ``out`` as an OCI layer tar, compressed as
        asked (``docker export`` writes the whole tree; this writes the layer, as
        :meth:`diff` does)."""
        self._check_open()
        return self.diff(resolve_container(self._graph, ref)["layer"], out, compression=compression)

    def commit_container(
        self,
        ref: str,
        name: str | None = None,
        *,
        message: str | None = None,
        author: str | None = None,
    ) -> Image:
        """Commit container ``ref``'s changes as a new layer and a new image (``docker commit``).

        The container keeps its layer and may stay mounted; the parent image is untouched.
        The new image's config is the parent's with one more DiffID and history entry
        (``comment`` is ``message``); see :mod:`laminae.containers._containers` for the rules.

        The changes are spooled through a file in the store's scratch directory, then applied
        as a layer on the image's top layer: a layer is never held in memory, the read of the
        container's tree ends before the write begins, and the new layer has a tar-split
        record, so it exports to the very tar whose DiffID the config names.

        :param name: the new image's name (``x`` is ``x:latest``), moved from another image
            that had it.
        :raises NotFound: no container ``ref``.
        :raises InvalidArgument: ``name`` is no valid image name.
        """
        self._check_open()
        names = [] if name is None else [check_key("image name", local_name(name))]
        for what, value in (("commit message", message), ("commit author", author)):
            if value is not None and not isinstance(value, str):
                raise InvalidArgument(f"{what} {value!r}: must be a string")
        container = self.container(ref)
        parent_image = None if container.image is None else self.image(container.image)
        parent_config = None if parent_image is None else image_config(parent_image)
        base = (
            ()
            if parent_image is None
            else tuple(str(layer.diff_id) for layer in self.image_layers(parent_image.id))
        )
        top = self.layer(container.layer).parent
        with self._staging.scratch() as scratch:
            with map_os_errors(f"spool the changes of container {ref!r}"):
                out = open(scratch / "changes.tar", "w+b")  # noqa: SIM115 (closed below)
            with out:
                written = self.diff(container.layer, out)
                out.seek(0)
                new_id = written.diff_id if top is None else chain_id([top, written.diff_id])
                # Two steps, journalled: the layer, then the image that holds it. A crash
                # between them leaves the layer to the next open, which collects it; a
                # layer that was there before (an equal commit made it) is not journalled.
                journalled = None if self._staging.has_committed(new_id) else new_id
                with self._staging.collecting(journalled, f"commit container {container.id}"):
                    layer = self.apply_layer(out, top, diff_id=written.diff_id)
                    config = commit_config(
                        parent_config,
                        base,
                        written.diff_id,
                        created=datetime.now(UTC),
                        message=message,
                        author=author,
                    )
                    return self.create_image(layer.id, names=names, config=config)
        raise AssertionError("unreachable")  # pragma: no cover

    def container_config(self, ref: str) -> ImageConfig | None:
        """The config of container ``ref``'s image (Env, Cmd, WorkingDir... for a bundle);
        ``None`` when it has no image or the image no config.

        :raises NotFound: no container ``ref``.
        """
        self._check_open()
        image = resolve_container(self._graph, ref)["image"]
        return None if image is None else image_config(self.image(image))
