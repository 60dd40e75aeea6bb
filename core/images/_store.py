"""The store's images: their records, and the staged layers the image pipeline commits.

Part of :class:`~laminae.Store` (``_layerstore.py`` has the layers); the pipeline that
moves images in and out is ``_transfer.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO

from laminae._exceptions import (
    AlreadyExists,
    CorruptLayer,
    FailedPrecondition,
    InvalidArgument,
    LaminaeError,
    NotFound,
    map_os_errors,
)
from laminae.archive._compression import Compression, DigestWriter
from laminae.driverkit._contract import Committer, Feature
from laminae.images._image import ImageConfig, Manifest
from laminae.images._reference import local_name
from laminae.images._transports import ImageLocation
from laminae.store._graph import LayerRow
from laminae.store._layers import LayerStore
from laminae.store._records import (
    ID_PREFIX,
    Image,
    Layer,
    LayerKind,
    chain_id,
    check_digest,
    check_key,
    parse_time,
)

if TYPE_CHECKING:
    from laminae.images._progress import Progress
    from laminae.images._registry import RegistryOptions

__all__ = ["ImageStore"]


class ImageStore(LayerStore):
    """A layer store with images: records, names, removal with layer collection, import and
    export."""

    # -- staged layers: the image pipeline's internals (see _transfer.py) -----------------

    def _has_committed(self, layer_id: str) -> bool:
        row = self._graph.layer(layer_id)
        return row is not None and not row.incomplete and row.kind == LayerKind.COMMITTED.value

    def _committed_row(self, layer_id: str) -> LayerRow:
        row = self._committed_parent(layer_id)
        assert row is not None
        return row

    @contextlib.contextmanager
    def _stage_layer(self, parent: LayerRow | None) -> Iterator[tuple[LayerRow, list[str]]]:
        """An incomplete layer on ``parent`` (committed, or staged itself), claimed by us.

        On an error in the block the layer and its storage go; after a normal exit the
        caller has committed it (or it is left incomplete for the next open to remove).
        """
        if parent is not None and parent.depth + 1 > self.capabilities.max_depth:
            raise FailedPrecondition(
                f"layer {parent.id!r}: a child would have {parent.depth + 1} parents; driver "
                f"{self.driver_name!r} supports at most {self.capabilities.max_depth}"
            )
        key = f"incomplete-{secrets.token_hex(16)}"
        with self._new_storage(key, parent, LayerKind.ACTIVE) as staged:
            yield staged

    def _apply_detached(self, row: LayerRow, tar: BinaryIO) -> object:
        """Apply ``tar`` (passing through :meth:`_recording`) onto ``row`` without its parents
        (:class:`DetachedApplier`)."""
        from laminae.driverkit._contract import DetachedApplier

        assert isinstance(self.driver, DetachedApplier)
        with map_os_errors(f"apply layer tar onto {row.id!r}"):
            return self.driver.apply_detached(row.storage_id, tar, self.limits)

    def _settle_detached(self, row: LayerRow, parents: list[str], pending: object) -> None:
        from laminae.driverkit._contract import DetachedApplier

        assert isinstance(self.driver, DetachedApplier)
        with map_os_errors(f"settle layer {row.id!r} on its parents"):
            self.driver.settle(row.storage_id, parents, pending)

    def _reset_staged(self, row: LayerRow, parents: list[str]) -> None:
        """Empty staged layer ``row`` again, for a second apply."""
        with map_os_errors(f"reset staged layer {row.id!r}"):
            self.driver.remove(row.storage_id)
            self.driver.create(row.storage_id, parents, True)
        self._tar_split_path(row.storage_id).unlink(missing_ok=True)

    def _commit_import(
        self,
        staged: Sequence[tuple[LayerRow | None, str, int, str]],
        base: str | None,
        manifest: Manifest,
        config: ImageConfig,
        names: Sequence[str],
    ) -> Image:
        """Commit every staged layer (base first) and record the image, in one transaction.

        A layer that another process committed meanwhile is kept, and the staged copy
        dropped; ChainIDs are equal, so its content is too.
        """
        self._sync()
        duplicates: list[str] = []
        image_id = config.digest
        with self._lock.held():
            parent = base
            for row, diff_id, _, _ in staged:
                assert row is not None
                new_id = diff_id if parent is None else chain_id([parent, diff_id])
                if not self._has_committed(new_id) and Feature.COMMIT in self.capabilities.features:
                    assert isinstance(self.driver, Committer)
                    with map_os_errors(f"commit layer {new_id} in driver {self.driver_name}"):
                        self.driver.commit(row.storage_id)
                parent = new_id
            with self._graph.transaction():
                parent = base
                for row, diff_id, size, digest in staged:
                    assert row is not None
                    new_id = diff_id if parent is None else chain_id([parent, diff_id])
                    if self._has_committed(new_id):
                        for child in self._graph.children(row.id):
                            self._graph.update_layer(child, parent=new_id)
                        self._graph.delete_layer(row.id)
                        duplicates.append(row.storage_id)
                    else:
                        self._mark_committed(row, new_id, diff_id, size, digest)
                    parent = new_id
                if self._graph.image(image_id) is None:
                    self._graph.insert_image(
                        image_id, parent, manifest.digest, config.raw, manifest.raw
                    )
                for name in names:
                    self._graph.add_image_name(image_id, name)
        for storage_id in duplicates:
            with contextlib.suppress(LaminaeError, OSError):
                self.driver.remove(storage_id)
            self._tar_split_path(storage_id).unlink(missing_ok=True)
        return self.image(image_id)

    def _write_layer_tar(self, layer_id: str, out: BinaryIO) -> None:
        """Write committed layer ``layer_id``'s tar: the very bytes applied, when recorded.

        :raises CorruptLayer: the tar written does not have the layer's DiffID (its files
            changed on disk, or a layer without a record diffs differently).
        """
        from laminae.archive._tarsplit import replay_tar

        row = self._resolve(layer_id)
        if row.kind != LayerKind.COMMITTED.value:
            raise FailedPrecondition(f"layer {layer_id!r}: is {row.kind}, not committed")
        sink = DigestWriter(out)
        record = self._tar_split_path(row.storage_id)
        if record.exists():
            with (
                open(record, "rb") as recorded,
                self._materialized(row, self._parents(row), readonly=True) as root,
            ):
                replay_tar(recorded, root, sink)
        else:
            self._write_diff(row, sink)
        if sink.digest != row.diff_id:
            raise CorruptLayer(
                f"layer {row.id}: its files give a tar with DiffID {sink.digest}, not its "
                f"DiffID {row.diff_id}"
            )

    # -- images ----------------------------------------------------------------------------

    def _to_image(self, row: Any) -> Image:
        return Image(
            id=row["id"],
            top_layer=row["top_layer"],
            names=self._graph.image_names(row["id"]),
            manifest_digest=row["manifest_digest"],
            config=row["config"],
            manifest=row["manifest"],
            created=parse_time(row["created"]),
        )

    def _resolve_image(self, ref: str) -> Any:
        if not isinstance(ref, str) or not ref:
            raise InvalidArgument(f"image reference {ref!r}: empty or not a string")
        row = self._graph.image(ref) or self._graph.image(f"sha256:{ref}")
        if row is None:
            named = self._graph.image_for_name(ref)
            if named is None and ":" not in ref.rpartition("/")[2] and "@" not in ref:
                named = self._graph.image_for_name(f"{ref}:latest")
            if named is None and ID_PREFIX.fullmatch(ref):
                matches = self._graph.match_image_prefix(ref.removeprefix("sha256:"))
                if len(matches) > 1:
                    raise InvalidArgument(f"image reference {ref!r}: ambiguous, give more digits")
                named = matches[0] if matches else None
            row = None if named is None else self._graph.image(named)
        if row is None:
            raise NotFound(f"image {ref!r}: no such image")
        return row

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
                top_row = self._resolve(top_layer)
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
        return self._to_image(self._resolve_image(ref))

    def images(self) -> list[Image]:
        """Every image, oldest first."""
        self._check_open()
        return [self._to_image(r) for r in self._graph.all_images()]

    def image_layers(self, ref: str) -> list[Layer]:
        """The layers of image ``ref``, base first."""
        self._check_open()
        row = self._resolve_image(ref)
        if row["top_layer"] is None:
            return []
        return [self._to_layer(r) for r in reversed(self._graph.chain(row["top_layer"]))]

    def tag_image(self, ref: str, name: str) -> Image:
        """Give image ``ref`` the name ``name`` (moved from another image that had it)."""
        self._check_open()
        name = check_key("image name", local_name(name))
        with self._lock.held():
            row = self._resolve_image(ref)
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
            row = self._resolve_image(ref)
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
            with self._graph.transaction():
                self._graph.delete_image(row["id"])
            return self._collect(row["top_layer"])

    def _collect(self, layer_id: str | None) -> list[str]:
        """Remove ``layer_id`` and its parents, top down, while nothing else holds them."""
        removed: list[str] = []
        self._reconcile_mounts()
        while layer_id is not None:
            row = self._graph.layer(layer_id)
            if (
                row is None
                or row.mount_count
                or self._graph.children(layer_id)
                or self._graph.names(layer_id)
                or self._graph.images_using_layer(layer_id)
                or self._graph.containers_using(layer=layer_id)
            ):
                break
            self._remove_row(row)
            removed.append(layer_id)
            layer_id = row.parent
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
        return import_from(self, source, names, platform, registry, progress, jobs)

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
        return export_to(self, ref, destination, compression, registry, progress, jobs)

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
