"""Images in and out of a store: import (and pull), export (and push).

Import reads top to bottom::

    resolve   the location's manifest; an index picks the platform's; digests checked
    config    fetched, checked against the manifest, parsed: one DiffID per layer
    plan      ChainIDs; a layer the store has already is neither fetched nor applied
    stage     one incomplete layer per missing blob, in order, each claimed by this process
    apply     fetch, check digest and size, decompress, apply, check the DiffID against the
              config: bounded parallelism, see below
    commit    every staged layer and the image record, under the store lock

A failure at any step removes every staged layer: the store then holds nothing new, and the
error names the blob. A process killed mid-import leaves incomplete layers that the next
open of the store removes.

Parallelism (``jobs`` workers): a registry's blobs are fetched ahead into spool files while
earlier layers apply. Every layer is decompressed and hashed in a thread of its own that
feeds the applier through a bounded queue, so one layer keeps two cores busy. Where the driver
applies a layer without its parents (:class:`~laminae.driverkit.DetachedApplier`, overlay), the
layers of one image are applied at once, and each is settled onto its parents in order
afterwards; other drivers (vfs, btrfs) need the parent's files first and apply in order.

Export regenerates each layer's exact tar (its tar-split record, else its diff), checks it
against the layer's DiffID, compresses it as the sink wants, and hands the sink blobs, then the
manifest.

Both see the store only through its :class:`~laminae.store._staging.Staging`: staging,
recording, applying and committing layers, reading them back, and its scratch directory.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import queue
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

import attrs

from laminae._exceptions import (
    CorruptLayer,
    FailedPrecondition,
    InvalidArgument,
    LaminaeError,
    ParentsNeeded,
    map_os_errors,
)
from laminae.archive._compression import (
    Compression,
    DigestReader,
    DigestWriter,
    open_compressor,
    open_decompressed,
)
from laminae.driverkit._contract import Feature
from laminae.images._image import (
    MEDIA_DOCKER_CONFIG,
    MEDIA_OCI_CONFIG,
    Descriptor,
    ImageConfig,
    ImageSink,
    ImageSource,
    Index,
    Manifest,
    Platform,
    build_manifest,
    layer_media_type,
    new_hash,
    parse_config,
    parse_manifest,
    select_manifest,
)
from laminae.images._progress import NullProgress, Progress
from laminae.store._graph import LayerRow
from laminae.store._records import Image, chain_id
from laminae.store._staging import StagedLayer, Staging, VerifiedLayer

__all__ = ["export_image", "import_image"]

_DOCUMENT_MAX: Final = 16 << 20
"""The largest manifest, index or config read into memory (containers/image allows 4 MiB)."""
_CHUNK: Final = 1 << 20
_QUEUE_DEPTH: Final = 8
"""Decompressed chunks in flight between a layer's decompressor and its applier (8 MiB)."""
DEFAULT_JOBS: Final = 3
"""Concurrent layer fetches and applies by default (containerd's and skopeo's default)."""


class _BlobReader(io.RawIOBase):
    """Reads a blob from a source, counting and hashing; :meth:`verify` at the end.

    More bytes than the descriptor's size fail at once, so a hostile source cannot make the
    reader hash forever.
    """

    def __init__(self, stream: BinaryIO, desc: Descriptor, advance: Callable[[int], None]):
        super().__init__()
        # read1: what is there now, so a slow source (a pipe, a socket) is hashed, reported
        # and applied as it arrives instead of in whole megabytes.
        self._read = stream.read1 if isinstance(stream, io.BufferedIOBase) else stream.read
        self._desc = desc
        self._hash = new_hash(desc.digest)
        self._advance = advance
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._read(min(len(buffer), _CHUNK))
        if data:
            self.size += len(data)
            if self.size > self._desc.size:
                raise CorruptLayer(
                    f"blob {self._desc.digest}: more than the {self._desc.size} bytes its "
                    "descriptor gives"
                )
            self._hash.update(data)
            self._advance(len(data))
            buffer[: len(data)] = data
        return len(data)

    def verify(self) -> None:
        """:raises CorruptLayer: the bytes read are not the blob the descriptor names."""
        if self.size != self._desc.size:
            raise CorruptLayer(
                f"blob {self._desc.digest}: {self.size} bytes, its descriptor gives "
                f"{self._desc.size}"
            )
        algorithm = self._desc.digest.partition(":")[0]
        actual = f"{algorithm}:{self._hash.hexdigest()}"
        if actual != self._desc.digest:
            raise CorruptLayer(f"blob {self._desc.digest}: content has digest {actual}")


def _read_document(source: ImageSource, desc: Descriptor, what: str) -> bytes:
    """A small blob (config) read whole and verified."""
    if desc.size > _DOCUMENT_MAX:
        raise InvalidArgument(f"{what} {desc.digest}: {desc.size} bytes is too large")
    with source.open_blob(desc) as stream:
        reader = _BlobReader(stream, desc, lambda _: None)
        data = reader.read(desc.size + 1) or b""
        while len(data) <= desc.size:
            more = reader.read(desc.size + 1 - len(data))
            if not more:
                break
            data += more
    reader.verify()
    return data


def _check_document(raw: bytes, desc: Descriptor, what: str) -> None:
    reader = _BlobReader(io.BytesIO(raw), desc, lambda _: None)
    while reader.read(_CHUNK):
        pass
    reader.verify()


@attrs.frozen
class ResolvedImage:
    """A manifest and config, both verified, of the image a source names."""

    manifest: Manifest
    config: ImageConfig
    index: Index | None


def resolve_image(source: ImageSource, platform: Platform | None) -> ResolvedImage:
    """Read and verify the manifest (picking from an index) and the config of ``source``."""
    where = source.describe()
    raw, media_type = source.resolve()
    if len(raw) > _DOCUMENT_MAX:
        raise InvalidArgument(f"{where}: manifest of {len(raw)} bytes is too large")
    document = parse_manifest(raw, media_type=media_type, what=f"{where} manifest")
    index = None
    seen = 0
    while isinstance(document, Index):
        seen += 1
        if seen > 4:
            raise InvalidArgument(f"{where}: indexes nested more than 4 deep")
        index = document
        entry = select_manifest(document, platform, what=where)
        raw = source.fetch_manifest(entry)
        _check_document(raw, entry, "manifest")
        document = parse_manifest(raw, media_type=entry.media_type, what=f"manifest {entry.digest}")
    config_raw = _read_document(source, document.config, "config")
    config = parse_config(config_raw, what=f"config {document.config.digest}")
    if len(config.diff_ids) != len(document.layers):
        raise InvalidArgument(
            f"{where}: manifest {document.digest} has {len(document.layers)} layers, its config "
            f"{len(config.diff_ids)} DiffIDs"
        )
    return ResolvedImage(document, config, index)


class _Queued(io.RawIOBase):
    """The bytes of ``stream`` read in a thread of their own, handed over through a queue.

    The producer thread does the reading (fetch, digest checks, decompression, hashing); the
    consumer (the tar applier) only takes chunks. Both run at once, on two cores: zlib,
    zstandard and hashlib drop the GIL on large buffers.
    """

    def __init__(self, stream: BinaryIO, name: str) -> None:
        super().__init__()
        self._stream = stream
        self._queue: queue.Queue[bytes | BaseException | None] = queue.Queue(_QUEUE_DEPTH)
        self._stop = threading.Event()
        self._buffer = memoryview(b"")
        self._done = False
        self._thread = threading.Thread(target=self._produce, name=name, daemon=True)
        self._thread.start()

    def _put(self, item: bytes | BaseException | None) -> bool:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._queue.put(item, timeout=0.1)
                return True
        return False

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._stream.read(_CHUNK)
                if not chunk:
                    break
                if not self._put(chunk):
                    return
            self._put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._buffer:
            if self._done:
                return 0
            item = self._queue.get()
            if item is None:
                self._done = True
                return 0
            if isinstance(item, BaseException):
                self._done = True
                raise item
            self._buffer = memoryview(item)
        n = min(len(buffer), len(self._buffer))
        buffer[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        super().close()


@attrs.define
class _Staged:
    """One layer of the import: its plan, and once staged, its incomplete layer."""

    index: int
    desc: Descriptor
    diff_id: str
    chain_id: str
    layer: StagedLayer | None = None
    size: int = 0
    pending: object = None


class _Importer:
    """One import into a store (its ``staging``); see the module docstring for the steps."""

    def __init__(
        self,
        staging: Staging,
        source: ImageSource,
        progress: Progress,
        jobs: int,
        prefetch: bool,
    ) -> None:
        self.staging = staging
        self.source = source
        self.progress = progress
        self.jobs = jobs
        self.prefetch = prefetch
        self.spool = Path()  # set by run(): the store's scratch directory for this import

    def run(self, resolved: ResolvedImage, names: Sequence[str]) -> Image:
        manifest, config = resolved.manifest, resolved.config
        chain: list[str] = []
        for diff_id in config.diff_ids:
            chain.append(diff_id if not chain else chain_id([chain[-1], diff_id]))
        plan = [
            _Staged(i, desc, diff_id, cid)
            for i, (desc, diff_id, cid) in enumerate(
                zip(manifest.layers, config.diff_ids, chain, strict=True)
            )
        ]
        first = len(plan)
        for i, cid in enumerate(chain):
            if not self.staging.has_committed(cid):
                first = i
                break
        for staged in plan[:first]:
            key = self._key(staged)
            self.progress.start(key, self._label(staged), staged.desc.size)
            self.progress.finish(key, "exists")
        todo = plan[first:]
        base = chain[first - 1] if first else None
        with contextlib.ExitStack() as stack:
            self.spool = stack.enter_context(self.staging.scratch())
            parent = None if base is None else self.staging.committed_parent(base)
            if todo:
                self._apply(todo, parent, stack)
            return self.staging.commit_image(
                [VerifiedLayer(s.layer, s.diff_id, s.size, s.desc.digest) for s in todo if s.layer],
                base,
                image_id=config.digest,
                manifest_digest=manifest.digest,
                config=config.raw,
                manifest=manifest.raw,
                names=names,
            )
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _key(staged: _Staged) -> str:
        return staged.desc.digest

    def _label(self, staged: _Staged) -> str:
        return f"layer {staged.index + 1} {staged.desc.digest.partition(':')[2][:12]}"

    # -- fetching --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _blob(
        self, staged: _Staged, spooled: Path | None
    ) -> Iterator[tuple[BinaryIO, _BlobReader]]:
        """The blob of ``staged``, read and verified as it goes (from its spool file if any)."""
        key = self._key(staged)
        with contextlib.ExitStack() as stack:
            if spooled is not None:
                stream: BinaryIO = stack.enter_context(open(spooled, "rb"))
                advance: Callable[[int], None] = lambda _: None  # noqa: E731
            else:
                stream = stack.enter_context(self.source.open_blob(staged.desc))
                advance = lambda n: self.progress.advance(key, n)  # noqa: E731
            reader = _BlobReader(stream, staged.desc, advance)
            yield io.BufferedReader(reader, _CHUNK), reader

    def _fetch(self, staged: _Staged) -> Path:
        """Download ``staged``'s blob into a spool file, verified."""
        path = self.spool / f"blob-{staged.index}"
        try:
            with self._blob(staged, None) as (stream, reader), open(path, "wb") as out:
                while chunk := stream.read(_CHUNK):
                    out.write(chunk)
            reader.verify()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    # -- applying ----------------------------------------------------------------------------

    def _stage(
        self, staged: _Staged, parent: LayerRow | None, stack: contextlib.ExitStack
    ) -> LayerRow:
        """Stage ``staged`` on ``parent``, for as long as ``stack`` lasts; its row."""
        staged.layer = stack.enter_context(self.staging.stage(parent))
        return staged.layer.row

    def _apply(
        self, todo: list[_Staged], base: LayerRow | None, stack: contextlib.ExitStack
    ) -> None:
        """Stage and apply every layer of ``todo`` on ``base``; staged layers live in ``stack``.

        A driver that copies or snapshots the parent when a layer is created (vfs, btrfs)
        gets each layer created only once its parent is applied.
        """
        for staged in todo:
            self.progress.start(self._key(staged), self._label(staged), staged.desc.size)
        spools: dict[int, concurrent.futures.Future[Path]] = {}
        applies: list[concurrent.futures.Future[None]] = []
        done: set[int] = set()
        # The pools are shut down (their running tasks finished, the rest cancelled) before
        # this returns or raises, so the staged layers in ``stack`` are never removed under a
        # thread still writing them.
        with contextlib.ExitStack() as workers:
            workers.callback(self._drop_spools, spools)
            pool = workers.enter_context(concurrent.futures.ThreadPoolExecutor(self.jobs))
            # Fetches get their own workers, so that applying the base layer never waits for
            # the fetches queued behind it to be picked up.
            fetches = workers.enter_context(concurrent.futures.ThreadPoolExecutor(self.jobs))
            if self.prefetch:
                for staged in todo:
                    spools[staged.index] = fetches.submit(self._fetch, staged)
            try:
                parent = base
                if Feature.APPLY_DETACHED in self.staging.capabilities.features:
                    for staged in todo:
                        parent = self._stage(staged, parent, stack)
                    applies.extend(pool.submit(self._apply_one, s, spools, True) for s in todo)
                    for staged, future in zip(todo, applies, strict=True):
                        future.result()
                        self._settle(staged, spools)
                        self._drop_spool(staged, spools)
                        self.progress.finish(self._key(staged), "applied")
                        done.add(staged.index)
                else:
                    for staged in todo:
                        parent = self._stage(staged, parent, stack)
                        self._apply_one(staged, spools, False)
                        self._drop_spool(staged, spools)
                        self.progress.finish(self._key(staged), "applied")
                        done.add(staged.index)
            except BaseException:
                for fetch in spools.values():
                    fetch.cancel()
                for apply in applies:
                    apply.cancel()
                for staged in todo:
                    if staged.index not in done:
                        self.progress.finish(self._key(staged), "failed")
                raise

    @staticmethod
    def _drop_spool(staged: _Staged, spools: dict[int, concurrent.futures.Future[Path]]) -> None:
        """Delete ``staged``'s spool file once it is applied: the commit's ``syncfs`` should
        not write out what is about to be deleted."""
        if staged.index in spools:
            spools[staged.index].result().unlink(missing_ok=True)

    @staticmethod
    def _drop_spools(spools: dict[int, concurrent.futures.Future[Path]]) -> None:
        for future in spools.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().unlink(missing_ok=True)

    def _apply_one(
        self, staged: _Staged, spools: dict[int, concurrent.futures.Future[Path]], detached: bool
    ) -> None:
        spooled = spools[staged.index].result() if staged.index in spools else None
        layer = staged.layer
        assert layer is not None
        what = f"blob {staged.desc.digest}"
        with self._blob(staged, spooled) as (stream, reader):
            try:
                limits = self.staging.limits
                plain = DigestReader(
                    open_decompressed(
                        stream,
                        max_bytes=limits.max_bytes,
                        max_ratio=limits.max_compression_ratio,
                        ratio_floor=limits.compression_ratio_floor_bytes,
                    ),
                    what=what,
                )
                # Decompression, both digests and the tar-split record run in the producer
                # thread; the applier in this one only writes files.
                with self.staging.recording(layer, plain) as recorded:
                    tar = cast(BinaryIO, _Queued(recorded, f"decompress {staged.desc.digest[:19]}"))
                    try:
                        if detached:
                            try:
                                staged.pending = self.staging.apply_detached(layer, tar)
                            except ParentsNeeded:
                                staged.pending = ParentsNeeded
                        else:
                            self.staging.apply(layer, tar)
                        while tar.read(_CHUNK):
                            pass
                    finally:
                        tar.close()
            except LaminaeError as exc:
                if isinstance(exc, CorruptLayer) and staged.desc.digest in str(exc):
                    raise
                # A blob that is not what its digest says is the cause to report, whatever
                # the decompressor or the tar reader made of its bytes.
                while stream.read(_CHUNK):
                    pass
                reader.verify()
                raise type(exc)(f"{what}: {exc}") from exc
            reader.verify()
        if plain.digest != staged.diff_id:
            raise CorruptLayer(
                f"{what}: uncompressed content has DiffID {plain.digest}, the config gives "
                f"{staged.diff_id}"
            )
        staged.size = plain.size

    def _settle(self, staged: _Staged, spools: dict[int, concurrent.futures.Future[Path]]) -> None:
        assert staged.layer is not None
        if staged.pending is not ParentsNeeded:
            try:
                self.staging.settle(staged.layer, staged.pending)
                return
            except ParentsNeeded:
                pass
        # The tar needs its parents' files (a root opaque marker, a hard link to a lower
        # file, a directory that inherits from the lowers): start the layer over, now that
        # they are there.
        self.staging.reset(staged.layer)
        self._apply_one(staged, spools, False)


def import_image(
    staging: Staging,
    source: ImageSource,
    *,
    names: Sequence[str],
    platform: Platform | None,
    progress: Progress | None,
    jobs: int | None,
    prefetch: bool,
) -> Image:
    """Import the image ``source`` names into the store of ``staging``; see the module
    docstring."""
    if jobs is not None and jobs < 1:
        raise InvalidArgument(f"jobs {jobs!r}: must be at least 1")
    progress = progress or NullProgress()
    resolved = resolve_image(source, platform)
    importer = _Importer(staging, source, progress, jobs or DEFAULT_JOBS, prefetch)
    return importer.run(resolved, names)


# -- export --------------------------------------------------------------------------------


def _layer_blob(
    staging: Staging, layer_id: str, compression: Compression, path: Path, progress: Progress
) -> tuple[str, int]:
    """Write ``layer_id``'s tar, compressed, to ``path``; its digest and size."""
    with open(path, "wb") as out:
        blob = DigestWriter(out)
        with open_compressor(blob, compression) as compressor:
            staging.write_layer_tar(layer_id, compressor)
        progress.advance(layer_id, blob.size)
        out.flush()
        os.fsync(out.fileno())
    return blob.digest, blob.size


def export_image(
    staging: Staging,
    ref: str,
    sink: ImageSink,
    *,
    compression: Compression | None,
    progress: Progress | None,
    jobs: int | None,
) -> str:
    """Write image ``ref`` of the store of ``staging`` to ``sink``; the digest of the manifest
    written."""
    progress = progress or NullProgress()
    image = staging.image(ref)
    if image.config is None:
        raise FailedPrecondition(f"image {ref!r}: has no config, so it cannot be exported")
    config = parse_config(image.config, what=f"config of image {ref!r}")
    layers = staging.image_layers(ref)
    if [layer.diff_id for layer in layers] != list(config.diff_ids):
        raise CorruptLayer(f"image {ref!r}: its layers do not match its config's DiffIDs")
    if sink.layer_compression is not None:
        compression = sink.layer_compression
    elif compression is None:
        compression = Compression.GZIP
    media_type = layer_media_type(compression, docker=sink.docker_media_types)

    def one(layer_id: str, spool: Path) -> Descriptor:
        path = spool / f"layer-{secrets.token_hex(8)}"
        progress.start(layer_id, f"layer {layer_id.partition(':')[2][:12]}", None)
        digest, size = _layer_blob(staging, layer_id, compression, path, progress)
        desc = Descriptor(media_type, digest, size)
        if sink.has_blob(desc):
            progress.finish(layer_id, "exists")
        else:
            sink.put_blob(desc, path)
            progress.finish(layer_id, "written")
        path.unlink()
        return desc

    # Spool files live in a scratch directory of the store: gone at the end, and swept by
    # the next open if this process is killed.
    with staging.scratch() as spool, map_os_errors(f"export image {ref!r} to {sink.describe()}"):
        with concurrent.futures.ThreadPoolExecutor(jobs or DEFAULT_JOBS) as pool:
            descriptors = list(pool.map(one, [layer.id for layer in layers], repeat(spool)))
        config_type = MEDIA_DOCKER_CONFIG if sink.docker_media_types else MEDIA_OCI_CONFIG
        config_desc = Descriptor(config_type, config.digest, len(config.raw))
        if not sink.has_blob(config_desc):
            (spool / "config").write_bytes(config.raw)
            sink.put_blob(config_desc, spool / "config")
        manifest = build_manifest(config_desc, descriptors, docker=sink.docker_media_types)
        sink.put_manifest(manifest, config)
        sink.commit()
    return manifest.digest
