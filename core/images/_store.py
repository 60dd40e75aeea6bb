"""The store's images: their records and names, their removal, their import and export.

Part of :class:`~laminae.Store` (:mod:`laminae.store._layers` has the layers). The pipeline
that moves images in and out is :mod:`laminae.images._transfer`; it gets the store's
:class:`~laminae.store._staging.Staging`, never the store itself.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from laminae._exceptions import AlreadyExists, FailedPrecondition, InvalidArgument
from laminae.archive._compression import Compression
from laminae.images._reference import local_name
from laminae.images._transports import ImageLocation
from laminae.store._layers import LayerStore
from laminae.store._lookup import image_layers, image_record, resolve_image, resolve_layer
from laminae.store._records import Image, Layer, LayerKind, check_digest, check_key

if TYPE_CHECKING:
    from laminae.images._progress import Progress
    from laminae.images._registry import RegistryOptions

__all__ = ["ImageStore"]


class ImageStore(LayerStore):
    """A layer store with images: records, names, removal with layer collection, import and
    export."""

    def create_image(
        self,
        top_layer: str | None,
        *,
        names: Sequence[str] = (),
        config: bytes | None = None,
        manifest_digest: str | None = None,
        manifest: bytes | None = None,
    ) -> Image:
        """Record an image whose root filesystem is committed layer ``top_layer``.

        Its id is the sha256 of ``config`` (the OCI ImageID) when given, else random.
        A name already used by another image moves to this one, as ``docker tag`` does.
        """
        self._check_open()
        check_digest("manifest digest", manifest_digest)
        checked = [check_key("image name", n) for n in names]
        if config is not None and not isinstance(config, bytes):
            raise InvalidArgument("image config: must be bytes")
        image_id = (
            "sha256:" + hashlib.sha256(config).hexdigest()
            if config is not None
            else secrets.token_hex(32)
        )
        with self._lock.held():
            top = None
            if top_layer is not None:
                top_row = resolve_layer(self._graph, top_layer)
                if top_row.kind != LayerKind.COMMITTED.value:
                    raise FailedPrecondition(
                        f"layer {top_layer!r}: an image needs a committed layer"
                    )
                top = top_row.id
            if self._graph.image(image_id) is not None:
                raise AlreadyExists(f"image {image_id}: already exists")
            with self._graph.transaction():
                self._graph.insert_image(image_id, top, manifest_digest, config, manifest)
                for name in checked:
                    self._graph.add_image_name(image_id, name)
        return self.image(image_id)

    def image(self, ref: str) -> Image:
        """The image ``ref`` names: an id, a unique id prefix, or a name ("x" is "x:latest").

        :raises NotFound: none does.
        """
        self._check_open()
        return image_record(self._graph, resolve_image(self._graph, ref))

    def images(self) -> list[Image]:
        """Every image, oldest first."""
        self._check_open()
        return [image_record(self._graph, r) for r in self._graph.all_images()]

    def image_layers(self, ref: str) -> list[Layer]:
        """The layers of image ``ref``, base first."""
        self._check_open()
        return image_layers(self._graph, resolve_image(self._graph, ref))

    def tag_image(self, ref: str, name: str) -> Image:
        """Give image ``ref`` the name ``name`` (moved from another image that had it)."""
        self._check_open()
        name = check_key("image name", local_name(name))
        with self._lock.held():
            row = resolve_image(self._graph, ref)
            with self._graph.transaction():
                self._graph.add_image_name(row["id"], name)
        return self.image(row["id"])

    def remove_image(self, ref: str) -> list[str]:
        """Remove image ``ref``, or only its name ``ref`` when it has others (``docker rmi``).

        Removing the image also removes each of its layers, top down, that nothing else
        holds: no child layer, image, container, layer name or mount.

        :returns: the ids of the layers removed.
        :raises FailedPrecondition: a container uses the image.
        """
        self._check_open()
        with self._lock.held():
            row = resolve_image(self._graph, ref)
            names = self._graph.image_names(row["id"])
            given = ref if ref in names else local_name(ref) if _is_name(ref) else None
            if given in names and len(names) > 1:
                with self._graph.transaction():
                    self._graph.remove_image_name(given)
                return []
            users = self._graph.containers_using(image=row["id"])
            if users:
                raise FailedPrecondition(
                    f"cannot remove image {ref!r}: used by container {users[0]}"
                )
            # Two steps, journalled: a crash after the row goes leaves the collection of
            # its layers to the next open.
            removed: list[str] = []
            with self._staging.collecting(row["top_layer"], f"remove image {row['id']}"):
                with self._graph.transaction():
                    self._graph.delete_image(row["id"])
                removed = self._staging.collect(row["top_layer"])
            return removed

    def import_image(
        self,
        source: str | ImageLocation,
        *,
        names: Sequence[str] = (),
        platform: str | None = None,
        registry: RegistryOptions | None = None,
        progress: Progress | None = None,
        jobs: int | None = None,
    ) -> Image:
        """Import an image from an OCI layout, an archive or a registry.

        ``source`` is spelled as skopeo spells it: ``oci:DIR[:REF]``,
        ``oci-archive:FILE[:REF]``, ``docker-archive:FILE[:REF]``, ``docker://REFERENCE``.
        Every blob's digest and size and every layer's DiffID are checked before anything
        becomes visible; layers the store has (same ChainID) are not fetched again.

        :param names: the image's names; by default the source's own (its reference).
        :param platform: ``os/arch[/variant]`` to pick from a multi-platform index; this
            host's by default.
        :param jobs: layers fetched and applied at once (3).
        :raises CorruptLayer: a digest, size or DiffID does not match (names the blob).
        """
        from laminae.images._by_location import import_from

        self._check_open()
        return import_from(self._staging, source, names, platform, registry, progress, jobs)

    def export_image(
        self,
        ref: str,
        destination: str | ImageLocation,
        *,
        compression: Compression | None = None,
        registry: RegistryOptions | None = None,
        progress: Progress | None = None,
        jobs: int | None = None,
    ) -> str:
        """Write image ``ref`` to an OCI layout, an archive or a registry.

        :param destination: spelled as for :meth:`import_image`.
        :param compression: of the layers (gzip by default; a docker-archive is plain).
        :returns: the digest of the manifest written.
        """
        from laminae.images._by_location import export_to

        self._check_open()
        return export_to(self._staging, ref, destination, compression, registry, progress, jobs)

    def pull(
        self,
        reference: str,
        *,
        platform: str | None = None,
        registry: RegistryOptions | None = None,
        progress: Progress | None = None,
        jobs: int | None = None,
    ) -> Image:
        """:meth:`import_image` from a registry; ``docker://`` may be left out."""
        if not reference.startswith("docker://"):
            reference = f"docker://{reference}"
        return self.import_image(
            reference, platform=platform, registry=registry, progress=progress, jobs=jobs
        )

    def push(
        self,
        ref: str,
        destination: str | None = None,
        *,
        compression: Compression | None = None,
        registry: RegistryOptions | None = None,
        progress: Progress | None = None,
        jobs: int | None = None,
    ) -> str:
        """:meth:`export_image` to a registry: ``destination`` (``docker://`` may be left
        out) or, by default, the reference ``ref`` names."""
        destination = destination or ref
        if not destination.startswith("docker://"):
            destination = f"docker://{destination}"
        return self.export_image(
            ref,
            destination,
            compression=compression,
            registry=registry,
            progress=progress,
            jobs=jobs,
        )


def _is_name(ref: str) -> bool:
    try:
        local_name(ref)
    except InvalidArgument:
        return False
    return True
