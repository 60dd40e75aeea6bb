"""The driver contract: what a storage driver must do, and what it may do better.

Lifecycle
---------
A driver keeps layers on disk; the store keeps everything else (the graph, names, labels,
digests, mount counts, locks). A driver never sees a ChainID or a name, only *storage ids*:
opaque strings of 1 to 128 characters of ``[0-9a-f]`` that the store picks and that stay fixed
for a layer's life. A driver checks every id it is given with :func:`check_storage_id` before
it makes a path of one, and lists only names that pass :func:`is_storage_id`.

1. The store picks a driver class from the registry and calls ``probe(home, options)``; a class
   that raises :class:`DriverUnavailable` is passed over (or, when named explicitly, reported).
2. The store builds it with ``cls(home, options)``. ``home`` is the driver's own directory; it
   may create anything below it and nothing outside it.
3. Layers are created with ``create(id, parents, writable)``, filled through a mount or
   through ``apply``, read back with ``changes``, and removed with ``remove``.
4. ``close()`` at the end; it must be safe to call twice.

Terminology
-----------
*parents*
    The storage ids of a layer's parents, immediate parent first, base last; empty for a base
    layer. The store computes it; a driver must not keep its own copy of the graph.
*writable*
    Active layers (a container's root, a layer being applied) are writable; views are not.
    Committed layers were writable once and are never written again.
*MountSpec*
    A description of one mount. Drivers *return* mounts; the store performs them (one
    executor, so every mount is counted and found again after a crash).

Importing a layer (what the store does)::

    driver.create(sid, parents, writable=True)
    driver.apply(sid, parents, tar, limits)          # or: mount, apply_tar, unmount
    # the store verifies the DiffID, then commits the layer in the graph

Importing the layers of one image side by side (:attr:`Feature.APPLY_DETACHED`, for drivers
whose layers are independent on disk). Each layer is written without looking at any other,
in parallel; then, base first, each is settled once all its parents are settled::

    driver.create(sid, parents, writable=True)       # every layer of the image, base first
    try:
        pending = driver.apply_detached(sid, tar, limits)    # any order, in parallel
    except ParentsNeeded:
        pending = None                               # this tar needs its parents' content
    ...                                              # later, base first:
    if pending is None:
        driver.remove(sid); driver.create(sid, parents, writable=True)
        driver.apply(sid, parents, tar_again, limits)
    else:
        driver.settle(sid, parents, pending)         # may raise ParentsNeeded too: same
    # verify the DiffID (of the tar read by apply_detached), commit

After ``settle`` the layer is byte for byte what ``apply(sid, parents, tar, limits)`` would
have made, and an error ``apply`` would raise for that tar, ``apply_detached`` or ``settle``
raises (or :class:`ParentsNeeded`, and ``apply`` then raises it). A layer that was applied
detached and not settled is not content yet: it must not be mounted, diffed or used as a
parent; the store removes it when the import fails.

Running a container::

    driver.create(sid, parents_of_image_top, writable=True)
    specs = driver.mounts(sid, parents, readonly=False)
    # the store mounts specs at <runroot>/mounts/<sid>; the runtime uses that path

Required methods raise :class:`NotFound` for an unknown id and :class:`LaminaeError` (with the
``OSError`` as cause) when the filesystem fails. Optional parts are declared in
:class:`Capabilities` ``features`` and checked when the class is registered: a class that
declares :attr:`Feature.APPLY` must satisfy :class:`Applier`, and so on.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar, Final, Protocol, runtime_checkable

import attrs

from laminae._exceptions import InvalidArgument, ParentsNeeded
from laminae.archive._changes import Change

__all__ = [
    "Applier",
    "Capabilities",
    "ChangeReporter",
    "Committer",
    "DetachedApplier",
    "Driver",
    "Feature",
    "MountSpec",
    "ParentsNeeded",
    "QuotaSetter",
    "Usage",
    "check_storage_id",
    "is_storage_id",
    "tree_usage",
]

# The store makes ids of 32 hex digits (secrets.token_hex(16)); 128 would leave room for a
# whole digest, and keeps a driver's "tmp-<id>" or "<id>.img.tmp" well below NAME_MAX (255).
_STORAGE_ID: Final = re.compile(r"[0-9a-f]{1,128}")


def is_storage_id(name: str) -> bool:
    """Whether ``name`` is a storage id: 1 to 128 characters of ``[0-9a-f]``.

    For a driver listing its home: an entry whose name is not one (a half-made ``tmp-<id>``,
    a file the driver keeps beside its layers) is not a layer.
    """
    return _STORAGE_ID.fullmatch(name) is not None


def check_storage_id(id: str) -> None:
    """Refuse ``id`` unless it is a storage id (:func:`is_storage_id`).

    A driver calls it on every id it is given, before making a path of it: hex digits alone
    cannot climb out of the driver's home (``..``, ``/``) nor clash with names it keeps there.

    :raises InvalidArgument: naming ``id``.
    """
    if not is_storage_id(id):
        raise InvalidArgument(
            f"invalid storage id {id!r}: storage ids are 1 to 128 characters of [0-9a-f]"
        )


class Feature(enum.Enum):
    """Optional parts a driver may provide; the core has a generic default for each but quota."""

    APPLY = "apply"
    """``apply`` writes a tar into a layer without the generic mount-and-extract."""
    CHANGES = "changes"
    """``changes`` lists a layer's changes cheaper than walking parent and layer."""
    QUOTA = "quota"
    """``set_quota`` limits the bytes a writable layer may hold."""
    COMMIT = "commit"
    """``commit`` is told when a layer becomes committed, to freeze it (btrfs: read-only)."""
    APPLY_DETACHED = "apply_detached"
    """``apply_detached`` writes a layer before its parents are complete; ``settle`` then
    makes it what ``apply`` would have made. Declared with ``independent_layers``."""


def _to_features(value: Iterable[Feature]) -> frozenset[Feature]:
    return frozenset(Feature(v) for v in value)


def _to_failures(
    value: Mapping[str, str] | Iterable[tuple[str, str]],
) -> tuple[tuple[str, str], ...]:
    items = value.items() if isinstance(value, Mapping) else value
    failures = tuple(sorted((str(k), str(v)) for k, v in items))
    for test_id, reason in failures:
        if not reason.strip():
            # A known failure hides a failing test from a strict run: whoever reads the
            # report must learn why it is acceptable.
            raise InvalidArgument(f"known_failures: {test_id!r} needs a reason, not {reason!r}")
    return failures


@attrs.frozen
class Capabilities:
    """What a driver declares about itself.

    :param features: the optional parts it implements.
    :param max_depth: the longest parent chain it can mount (overlayfs: 500 lowers).
    :param needs_root: whether it needs ``CAP_SYS_ADMIN`` (mounts, subvolumes, devices).
    :param independent_layers: whether a layer's files live apart from its parent's, so that
        layers of one image can be applied in parallel (overlay: yes; vfs, btrfs: no); the
        driver then declares :attr:`Feature.APPLY_DETACHED`.
    :param known_failures: conformance test ids this driver is known to fail, with the reason;
        they run as strict xfails, so an unexpected pass is reported.
    """

    features: frozenset[Feature] = attrs.field(default=frozenset(), converter=_to_features)
    max_depth: int = 128
    needs_root: bool = True
    independent_layers: bool = False
    known_failures: tuple[tuple[str, str], ...] = attrs.field(default=(), converter=_to_failures)


def _to_tuple(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen
class MountSpec:
    """One mount, described, not performed.

    :param type: filesystem type: ``bind``, ``overlay``, ``btrfs``, ``tmpfs`` ...
    :param source: the source path or device (``overlay`` for overlay mounts).
    :param options: mount options; ``ro`` makes it read-only (an overlay with an upper dir
        too: the kernel then writes nothing through it).
    :param lowerdirs: overlay only: lower dirs, uppermost first.
    :param upperdir: overlay only: the writable dir, or ``None`` for a read-only stack.
    :param workdir: overlay only: the work dir that goes with ``upperdir``.
    :param target: where below the layer's mount point this mount goes ("" = the root).
    """

    type: str
    source: str
    options: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)
    lowerdirs: tuple[str, ...] = attrs.field(default=(), converter=_to_tuple)
    upperdir: str | None = None
    workdir: str | None = None
    target: str = ""

    @property
    def readonly(self) -> bool:
        """Whether the mount cannot be written through."""
        if self.type == "overlay" and self.upperdir is None:
            return True
        return "ro" in self.options


@attrs.frozen
class Usage:
    """Disk used by one layer, parents excluded (an upper bound where inodes are shared)."""

    size: int
    inodes: int


def tree_usage(top: str | os.PathLike[str]) -> Usage:
    """Bytes (allocated blocks) and inodes of the tree at ``top``, each inode counted once.

    For drivers whose layers are directory trees (vfs, overlay's ``diff/``, btrfs without
    quota): hard links, and the whiteouts overlayfs makes (one shared inode, Linux 5.8+),
    count once. Symlinks are not followed.
    """
    root = os.lstat(top)
    size, inodes = root.st_blocks * 512, 1
    seen: set[tuple[int, int]] = set()
    pending = [os.fspath(top)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                size += st.st_blocks * 512
                inodes += 1
    return Usage(size=size, inodes=inodes)


class Driver(Protocol):
    """The contract every storage driver keeps: what the store calls, when, and what it needs.

    A driver keeps layers on disk and does nothing else: the store keeps the graph, names,
    digests, labels, locks and mount counts, and performs every mount. A driver is a class
    with a ``name`` (an identifier, as ``--driver`` gives it), its :class:`Capabilities`, and
    the methods below, registered by ``laminae_register_drivers`` in a module named by a
    ``laminae.drivers`` entry point. ``pytest --pyargs laminae.conformance --laminae-driver
    NAME --laminae-strict`` checks all of it.

    Lifecycle
        1. ``probe(home, options)``: can this host run the driver with these options? Raise
           :class:`DriverUnavailable` if not; auto-selection then passes it over.
        2. ``cls(home, options)``: ``home`` (``<root>/<name>``) is the driver's own directory;
           it may write anything below it and nothing outside it.
        3. ``create`` a layer on its parents; the store fills it (``apply``, or a mount and the
           generic extractor), reads it (``mounts``, ``changes``, ``usage``) and, once it is
           committed, never writes it again; ``remove`` ends it. ``layers`` lists what is on
           disk, for ``check`` and ``repair``.
        4. ``close()``, which must be safe to call twice.

    Terms
        *storage id*: the name the store gives a layer on disk, 1 to 128 characters of
        ``[0-9a-f]``, fixed for the layer's life; never a ChainID or a user's name. Check each
        one with :func:`check_storage_id` before making a path of it, and list only names that
        pass :func:`is_storage_id`. *parents*: the storage ids of a layer's parents, immediate
        parent first, base last; empty for a base layer. The store computes them on each call:
        keep no graph of your own. *writable*: active layers (a container's root, a layer being
        applied) are; views are not.

    What a layer holds
        Exactly what was written into it, whatever the path: a layer made from its parent, or
        read back through a mount or a diff, keeps every file type (regular files, directories,
        symlinks never followed, hard links as links, character and block devices, FIFOs),
        owners, modes with setuid, setgid and sticky bits, every extended attribute
        (``trusted.*``, ``security.capability``), names that are not UTF-8, holes in sparse
        files, and atime and mtime to the nanosecond, directories' included. Order matters in a
        copy: data, then ``chown`` (which clears setuid and capabilities), ``chmod``, xattrs,
        times; a directory's mode and times after its entries.

    Errors
        Raise from :mod:`laminae.driverkit`'s tree, never a bare ``OSError`` (wrap filesystem
        work in :func:`map_os_errors`, which keeps it as ``__cause__``):

        - :class:`InvalidArgument`: an option that is wrong anywhere (unknown, unparsable), from
          ``probe`` and ``__init__`` alike, naming the option; an id that is not a storage id.
        - :class:`DriverUnavailable`: from ``probe``, this host or ``home``'s filesystem cannot
          run the driver (not root, no btrfs, a missing program), in one line a user can act on.
        - :class:`NotFound`: an id (or a parent) that is not on disk.
        - :class:`AlreadyExists`: ``create`` of an id that is on disk.
        - :class:`ResourceExhausted`: a full disk or quota (``map_os_errors`` maps ``ENOSPC``
          and ``EDQUOT``); never swallow it: a layer missing a file is worse than no layer.
        - :class:`Unsupported`: a call the driver cannot do at all; :class:`LaminaeError`: any
          other failure.

    Crash safety and concurrency
        A crash, at any instant, must leave each layer complete or recognisably half made:
        build it under a name of its own (``tmp-<id>``) and rename it into place last, and
        remove by renaming it out of the listing first (``rm-<id>``). ``create`` that fails
        leaves nothing; ``remove`` sweeps what a crash left of its id and raises
        :class:`NotFound` only when nothing was there (the store calls it for half-made layers
        at its next open). Calls for different ids run at the same time, from threads and from
        processes: a name shared between them (one staging directory) is a race.

    Importing a layer (what the store does)::

        driver.create(sid, parents, writable=True)
        driver.apply(sid, parents, tar, limits)      # or: mount, apply_tar, unmount
        # the store verifies the DiffID, calls commit(sid) (Feature.COMMIT), records it

    Running a container::

        driver.create(sid, parents_of_image_top, writable=True)
        specs = driver.mounts(sid, parents, readonly=False)
        # the store mounts specs at <runroot>/mounts/<sid>; the runtime uses that path

    Optional parts are declared in ``capabilities.features`` and checked when the class is
    registered: :class:`Applier`, :class:`ChangeReporter`, :class:`Committer`,
    :class:`QuotaSetter`, :class:`DetachedApplier`.
    """

    name: ClassVar[str]
    capabilities: ClassVar[Capabilities]

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        """Raise :class:`DriverUnavailable` if this host or ``home``'s filesystem cannot run it.

        ``home`` may not exist yet; probe its nearest existing ancestor. Must not leave
        anything behind (mounts, files outside ``home``).
        """

    def __init__(self, home: Path, options: Mapping[str, str]) -> None: ...

    def create(self, id: str, parents: Sequence[str], writable: bool) -> None:
        """Create layer ``id`` holding its parent's content (or nothing, for a base layer).

        :raises AlreadyExists: ``id`` is on disk already.
        """

    def remove(self, id: str) -> None:
        """Remove layer ``id`` and everything it holds; the store has unmounted it.

        :raises NotFound: ``id`` is not on disk.
        """

    def mounts(self, id: str, parents: Sequence[str], readonly: bool) -> list[MountSpec]:
        """Describe the mounts that show layer ``id`` as a root filesystem.

        ``readonly`` asks for mounts that refuse writes (views, and committed layers mounted
        for reading); the store mounts them for real and writing must fail with ``EROFS``.
        """
        ...

    def usage(self, id: str) -> Usage:
        """Bytes and inodes layer ``id`` holds itself, parents excluded."""
        ...

    def layers(self) -> Iterable[str]:
        """The storage ids on disk, for ``check`` to find what the graph does not know."""
        ...

    def close(self) -> None:
        """Release what the driver holds. Safe to call twice."""


@runtime_checkable
class Applier(Protocol):
    """:attr:`Feature.APPLY`: write an uncompressed OCI layer tar straight into a layer."""

    def apply(self, id: str, parents: Sequence[str], tar: BinaryIO, limits: object) -> None:
        """Apply ``tar`` onto layer ``id``, whiteouts included.

        ``limits`` is the :class:`~laminae.driverkit.Limits` to pass to
        :func:`~laminae.driverkit.apply_tar`. Read
        ``tar`` to its end: the store hashes what is read to check the DiffID.
        """


@runtime_checkable
class ChangeReporter(Protocol):
    """:attr:`Feature.CHANGES`: list a layer's changes against its immediate parent."""

    def changes(self, id: str, parents: Sequence[str]) -> Iterator[Change]:
        """Yield the changes of ``id`` against ``parents[0]`` (all added for a base).

        Depth first, names sorted within a directory, a directory before its children."""
        ...


@runtime_checkable
class QuotaSetter(Protocol):
    """:attr:`Feature.QUOTA`: limit how many bytes a writable layer may hold."""

    def set_quota(self, id: str, size: int) -> None:
        """Limit layer ``id`` to ``size`` bytes; writing more fails (``EDQUOT``, ``ENOSPC``)."""


@runtime_checkable
class Committer(Protocol):
    """:attr:`Feature.COMMIT`: freeze a layer once it is committed."""

    def commit(self, id: str) -> None:
        """Layer ``id`` is about to become committed: it will never be written again.

        Called after its content is verified and flushed, before the graph records it as
        committed; an error fails the commit (the layer stays as it was).
        """


@runtime_checkable
class DetachedApplier(Protocol):
    """:attr:`Feature.APPLY_DETACHED`: apply a layer tar before its parents are complete.

    For drivers whose layers live apart on disk (``independent_layers``), so that the layers
    of one image are written in parallel. The result must be exactly what :meth:`Applier.apply`
    gives (a driver with this feature has ``apply`` too, as the fallback). See the module
    docstring for the order of calls.
    """

    def apply_detached(self, id: str, tar: BinaryIO, limits: object) -> object:
        """Write ``tar`` into layer ``id`` without reading any other layer.

        Read ``tar`` to its end, as :meth:`Applier.apply` does. ``id`` was created with its
        parents, which may still be empty or half-written.

        :returns: an opaque value describing what :meth:`settle` must fix; the store keeps
            it (in memory, bounded by the tar's entry count) and hands it back.
        :raises ParentsNeeded: the tar cannot be applied without the parents' content; what
            was written is garbage, and the store removes it.
        :raises LaminaeError: the tar is refused, as ``apply`` refuses it.
        """
        ...

    def settle(self, id: str, parents: Sequence[str], pending: object) -> None:
        """Make layer ``id`` what ``apply(id, parents, tar, limits)`` would have made.

        Called once, after every layer in ``parents`` (immediate parent first, as always) is
        complete and settled, with the value :meth:`apply_detached` returned for ``id``.

        :raises InvalidArgument: the tar is refused against these parents (a path through a
            parent's file), with the message ``apply`` gives.
        :raises ParentsNeeded: as for ``apply_detached``; the store then removes the
            layer's content and applies the tar with ``apply``.
        """


FEATURE_PROTOCOLS: Mapping[Feature, type] = {
    Feature.COMMIT: Committer,
    Feature.APPLY: Applier,
    Feature.APPLY_DETACHED: DetachedApplier,
    Feature.CHANGES: ChangeReporter,
    Feature.QUOTA: QuotaSetter,
}
