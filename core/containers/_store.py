"""The store's containers: an image's top layer with a writable layer on it, and its changes.

Part of :class:`~laminae.Store` (``_layerstore.py`` has the layers); commit and export
are in ``_containers.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from laminae._exceptions import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from laminae.archive._changes import Change
from laminae.archive._compression import Compression
from laminae.images._image import ImageConfig
from laminae.images._store import ImageStore
from laminae.store._records import Container, DiffResult, Image, check_key, parse_time

__all__ = ["ContainerStore"]


class ContainerStore(ImageStore):
    """An image store with containers: create, look up, mount, diff, commit, export, remove."""

    # -- containers ------------------------------------------------------------------------

    def _to_container(self, row: Any) -> Container:
        return Container(
            id=row["id"],
            name=row["name"],
            image=row["image"],
            layer=row["layer"],
            created=parse_time(row["created"]),
        )

    def _resolve_container(self, ref: str) -> Any:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument(f"container reference {ref!r}: empty or not a string")
        row = self._graph.container(ref)
        if row is None:
            named = self._graph.container_for_name(ref)
            row = None if named is None else self._graph.container(named)
        if row is None:
            raise NotFound(f"container {ref!r}: no such container")
        return row

    def create_container(
        self,
        image: str | None,
        *,
        name: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Container:
        """Create a container: an active layer on ``image``'s top layer (empty if none)."""
        self._check_open()
        if name is not None:
            check_key("container name", name)
            if self._graph.container_for_name(name) is not None:
                raise AlreadyExists(f"container name {name!r}: already in use")
        image_row = None if image is None else self._resolve_image(image)
        container_id = secrets.token_hex(32)
        top = None if image_row is None else image_row["top_layer"]
        layer = self.create_layer(container_id, top, labels=labels)
        try:
            with self._lock.held(), self._graph.transaction():
                if name is not None and self._graph.container_for_name(name) is not None:
                    raise AlreadyExists(f"container name {name!r}: already in use")
                self._graph.insert_container(
                    container_id, name, None if image_row is None else image_row["id"], layer.id
                )
        except BaseException:
            self.remove_layer(layer.id)
            raise
        return self.container(container_id)

    def container(self, ref: str) -> Container:
        """The container ``ref`` names (id or name). :raises NotFound: none does."""
        self._check_open()
        return self._to_container(self._resolve_container(ref))

    def containers(self) -> list[Container]:
        """Every container, oldest first."""
        self._check_open()
        return [self._to_container(r) for r in self._graph.all_containers()]

    def remove_container(self, ref: str, *, force: bool = False) -> None:
        """Remove a container and its layer.

        :param force: unmount the container's layer first, however often it is mounted.
        :raises FailedPrecondition: its layer is mounted (and not ``force``).
        """
        self._check_open()
        with self._lock.held():
            row = self._resolve_container(ref)
            layer = self._resolve(row["layer"])
            self._reconcile_row(layer)
            if self._resolve(row["layer"]).mount_count:
                if not force:
                    raise FailedPrecondition(
                        f"cannot remove container {ref!r}: its layer is mounted"
                    )
                self.unmount(layer.id, force=True)
            with self._graph.transaction():
                self._graph.delete_container(row["id"])
            self.remove_layer(layer.id)

    def mount_container(self, ref: str) -> Path:
        """Mount container ``ref``'s writable root and return where (counted, as
        :meth:`mount`: each mount needs an :meth:`unmount_container`).

        :raises NotFound: no container ``ref``.
        """
        self._check_open()
        return self.mount(self._resolve_container(ref)["layer"])

    def unmount_container(self, ref: str, *, force: bool = False) -> None:
        """Drop one mount of container ``ref``; the last one unmounts. ``force`` drops all.

        :raises FailedPrecondition: it is not mounted (and not ``force``).
        """
        self._check_open()
        with self._lock.held():
            layer = self._resolve(self._resolve_container(ref)["layer"])
            self._reconcile_row(layer)
            if force and not self._resolve(layer.id).mount_count:
                return  # nothing to drop (and no mount point to remove)
            self.unmount(layer.id, force=force)

    def container_changes(self, ref: str) -> list[Change]:
        """What container ``ref`` changed against its image, sorted by path (mounted or not).

        As ``docker diff`` lists them: every directory above a change is listed as modified
        too, whichever driver found the changes
        (:func:`laminae.containers._containers.with_parent_dirs`).
        """
        from laminae.containers._containers import with_parent_dirs

        self._check_open()
        return with_parent_dirs(self.changes(self._resolve_container(ref)["layer"]))

    def export_container(
        self, ref: str, out: BinaryIO, *, compression: Compression = Compression.NONE
    ) -> DiffResult:
        """Write container ``ref``'s changes to ``out`` as an OCI layer tar, compressed as
        asked (``docker export`` writes the whole tree; this writes the layer, as
        :meth:`diff` does)."""
        self._check_open()
        return self.diff(self._resolve_container(ref)["layer"], out, compression=compression)

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
        (``comment`` is ``message``); see :mod:`laminae.containers._containers`.

        :param name: the new image's name (``x`` is ``x:latest``), moved from another image
            that had it.
        :raises NotFound: no container ``ref``.
        :raises InvalidArgument: ``name`` is no valid image name.
        """
        from laminae.containers._containers import commit_container

        self._check_open()
        return commit_container(self, ref, name, message=message, author=author)

    def container_config(self, ref: str) -> ImageConfig | None:
        """The config of container ``ref``'s image (Env, Cmd, WorkingDir... for a bundle);
        ``None`` when it has no image or the image no config.

        :raises NotFound: no container ``ref``.
        """
        from laminae.containers._containers import image_config

        self._check_open()
        image = self._resolve_container(ref)["image"]
        return None if image is None else image_config(self.image(image))
