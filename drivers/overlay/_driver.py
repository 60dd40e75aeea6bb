"""The overlay driver: every layer is an overlayfs layer dir; mounts stack them.

On disk, below ``home`` (0700: layers hold setuid files other users must not reach,
CVE-2021-41091)::

    layers/<id>/diff/    the layer's own content: its upper dir while writable, a lower after
    layers/<id>/work/    overlayfs's work dir (writable layers only: active ones, and those
                         committed from them)
    layers/<id>/link     the layer's short name, for l/
    l/<short>            symlink to ../layers/<id>/diff: short lower paths for kernels
                         without lowerdir+, where all lowers share one page of options
    tmp-<id>/            a layer being created; renamed to layers/<id> only when complete
    rm-<id>/             a layer being removed; renamed out of layers/ first
    xattrs               "trusted" or "user": where the layers keep their overlay flags

Mounts (as containerd's overlay snapshotter makes them): a layer with no parent is a bind of its
``diff/`` (read-only unless it is a writable layer mounted for writing: overlayfs cannot mount
one lower alone). A writable layer over parents is an overlay with its ``diff/`` as upper and
the parents' as lowers, immediate parent first. A read-only mount of a layer over parents is
an overlay of lowers only: its own ``diff/`` on top (a view's own dir is empty and left out),
or, where that would make one lower too many for the kernel (a committed layer with 500
parents), its ``diff/`` as the upper of a mount made read-only.

Every overlay mount carries ``index=off,redirect_dir=nofollow,metacopy=off``: changes then
stay in the upper dir as plain whiteouts and opaque flags, which is what the native changes
(:mod:`._changes`) and the direct apply read and write. ``redirect_dir=nofollow`` rather than
``off``: ``off`` follows redirects when the module's ``redirect_always_follow`` is set (the
default), and the kernel refuses it next to ``userxattr``. In a user namespace the mounts add
``userxattr`` and the flags are ``user.overlay.*``.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO, ClassVar, Final, final

from laminae.driverkit import (
    AlreadyExists,
    Capabilities,
    Change,
    FailedPrecondition,
    Feature,
    InvalidArgument,
    Limits,
    MountSpec,
    NotFound,
    Unsettled,
    Usage,
    WhiteoutMode,
    apply_tar,
    apply_tar_detached,
    check_storage_id,
    is_storage_id,
    map_os_errors,
    rename_noreplace,
    settle_detached,
    tree_usage,
)

from ._changes import native_changes
from ._host import (
    KERNEL_MAX_LOWERS,
    PAGE_SIZE,
    in_user_namespace,
    lowerdir_append_supported,
)
from ._known_failures import known_failures, mapped_ids
from ._options import OverlayOptions, parse_options
from ._probe import XATTR_RECORD, probe_host, read_namespace

__all__ = ["LOWERDIR_APPEND", "USERXATTR", "OverlayDriver"]

_LINK_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
_LINK_LENGTH: Final = 10

# Without lowerdir+, the lowers go into one mount(2) option string, at most a page with its
# NUL. The depth declared then is what fits for a home of up to _FALLBACK_HOME_MAX bytes:
# every lower is "<home>/l/<short>:", the upper and work dirs are full paths, and 512 bytes
# stay free for the fixed options and mountopt, as Moby keeps them for an SELinux label.
_FALLBACK_HOME_MAX: Final = 48
_FIXED_OPTIONS: Final = 80  # "lowerdir=", "upperdir=", "workdir=", index, redirect_dir...
_LOWER_COST: Final = _FALLBACK_HOME_MAX + len("/l/") + _LINK_LENGTH + 1
_UPPER_COST: Final = _FALLBACK_HOME_MAX + len("/layers/") + 128 + len("/diff,")
_FALLBACK_DEPTH: Final = (PAGE_SIZE - 1 - 512 - _FIXED_OPTIONS - 2 * _UPPER_COST) // _LOWER_COST - 1

USERXATTR: Final = in_user_namespace()
"""Whether the mounts need ``userxattr``: this process is in a user namespace."""
LOWERDIR_APPEND: Final = lowerdir_append_supported()
"""Whether the kernel takes ``lowerdir+`` (Linux 6.8+), so the depth is the kernel's own."""


@final
class OverlayDriver:
    """Layers as overlayfs layer dirs. See the module docstring for the layout and mounts."""

    name: ClassVar[str] = "overlay"
    # Decided when the class is defined, from this process's kernel and user namespace
    # (_host): capabilities are a class attribute, and neither fact changes while a process
    # runs. A home records its namespace, so a store made rootless is refused outside one.
    capabilities: ClassVar[Capabilities] = Capabilities(
        features=frozenset({Feature.APPLY, Feature.CHANGES, Feature.APPLY_DETACHED}),
        max_depth=KERNEL_MAX_LOWERS if LOWERDIR_APPEND else _FALLBACK_DEPTH,
        needs_root=True,
        # A layer's files live apart from its parents'. Applying a tar reads the parents
        # (whiteouts go only where they show a name, new parent dirs take their attributes,
        # hard links to their files copy them up, as containerd's overlay apply does), so
        # the layers of an image are applied detached side by side and settled base first.
        independent_layers=True,
        known_failures=known_failures(
            user_namespace=USERXATTR, ids=mapped_ids() if USERXATTR else 1 << 32
        ),
    )
    short_links: ClassVar[bool] = not LOWERDIR_APPEND
    """Lowers go in by their ``l/`` short names (no ``lowerdir+``: one page for all)."""
    userxattr: ClassVar[bool] = USERXATTR
    """Mount with ``userxattr``; flags in ``user.overlay.*`` (in a user namespace)."""

    __slots__ = ("_home", "_layers", "_links", "_options")

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        """Raise :class:`DriverUnavailable` unless overlay can keep layers in ``home``.

        Checks the kernel, the privileges and the backing filesystem (see
        :mod:`._probe`); nothing is mounted, and a scratch directory made for the checks is
        removed.

        :raises InvalidArgument: a bad option.
        """
        parse_options(options)
        probe_host(
            home,
            userxattr=cls.userxattr,
            max_home=_FALLBACK_HOME_MAX if cls.short_links else None,
        )

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        self._options: OverlayOptions = parse_options(options)
        self._home = Path(home)
        self._layers = self._home / "layers"
        self._links = self._home / "l"
        namespace = "user" if self.userxattr else "trusted"
        with map_os_errors(f"overlay: prepare {self._home}"):
            # 0700: layer dirs hold setuid binaries that other users must not reach
            # (CVE-2021-41091 was this hole in Moby's overlay2 home).
            self._home.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(self._home, 0o700)
            self._layers.mkdir(mode=0o700, exist_ok=True)
            self._links.mkdir(mode=0o700, exist_ok=True)
            recorded = read_namespace(self._home)
            if recorded is None:
                (self._home / XATTR_RECORD).write_text(namespace + "\n")
        if recorded is not None and recorded != namespace:
            raise FailedPrecondition(
                f"overlay: the layers in {self._home} keep their flags in {recorded}.overlay.*; "
                f"this process reads {namespace}.overlay.* (open the store "
                + ("inside a user namespace)" if recorded == "user" else "as real root)")
            )

    # --- layers ---------------------------------------------------------------------------

    def create(self, id: str, parents: Sequence[str], writable: bool) -> None:
        """Create layer ``id``: an empty ``diff/`` (0755), and a ``work/`` if ``writable``.

        :raises AlreadyExists: ``id`` is on disk already.
        :raises NotFound: a parent is not on disk.
        """
        check_storage_id(id)
        final_path = self._layers / id
        if os.path.lexists(final_path):
            raise AlreadyExists(f"overlay: layer {id} exists")
        for parent in parents:
            self._layer(parent, what="parent layer")
        staging = self._home / f"tmp-{id}"
        with map_os_errors(f"overlay: create layer {id}"):
            if os.path.lexists(staging):  # left by a crash during an earlier create
                self._sweep(staging)
            try:
                os.mkdir(staging, 0o700)
                diff = staging / "diff"
                os.mkdir(diff, 0o755)
                os.chmod(diff, 0o755)  # whatever the umask
                if writable:
                    os.mkdir(staging / "work", 0o700)
                link = self._new_link()
                (staging / "link").write_text(link + "\n")
                rename_noreplace(str(staging), str(final_path))
            except BaseException:
                # The original failure is the one to report, not a cleanup hiccup.
                with contextlib.suppress(OSError):
                    self._sweep(staging)
                raise
            os.symlink(f"../layers/{id}/diff", self._links / link)

    def _new_link(self) -> str:
        while True:
            link = "".join(secrets.choice(_LINK_ALPHABET) for _ in range(_LINK_LENGTH))
            if not os.path.lexists(self._links / link):
                return link

    def remove(self, id: str) -> None:
        """Remove layer ``id`` and everything in it; the store has unmounted it.

        Also sweeps what a crash left of ``id`` (a half creation, a half removal).

        :raises NotFound: nothing of ``id`` is on disk.
        """
        check_storage_id(id)
        path = self._layers / id
        doomed = self._home / f"rm-{id}"
        leftovers = [p for p in (self._home / f"tmp-{id}", doomed) if os.path.lexists(p)]
        with map_os_errors(f"overlay: remove layer {id}"):
            for leftover in leftovers:
                self._sweep(leftover)
            if not os.path.lexists(path):
                if leftovers:
                    return
                raise NotFound(f"overlay: layer {id} is not on disk")
            # Out of layers/ in one step, so a crash mid-removal leaves no half layer listed.
            os.rename(path, doomed)
            self._sweep(doomed)

    def _sweep(self, path: Path) -> None:
        """Remove a layer dir outside ``layers/``, and its short link."""
        with contextlib.suppress(FileNotFoundError):
            link = (path / "link").read_text().strip()
            if link and re.fullmatch(f"[{_LINK_ALPHABET}]+", link):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._links / link)
        shutil.rmtree(path)

    def layers(self) -> list[str]:
        """The storage ids under ``layers/``, sorted; layers being created or removed are not."""
        with map_os_errors(f"overlay: list {self._layers}"), os.scandir(self._layers) as entries:
            return sorted(
                entry.name
                for entry in entries
                if entry.is_dir(follow_symlinks=False) and is_storage_id(entry.name)
            )

    def usage(self, id: str) -> Usage:
        """Bytes (allocated blocks) and inodes in the layer's own ``diff/``, each inode once.

        :raises NotFound: ``id`` is not on disk.
        """
        diff = self._layer(id) / "diff"
        with map_os_errors(f"overlay: usage of layer {id}"):
            return tree_usage(diff)

    def close(self) -> None:
        """Nothing to release: the driver holds no fds, mounts or locks between calls."""

    def _layer(self, id: str, what: str = "layer") -> Path:
        check_storage_id(id)
        path = self._layers / id
        if not (path / "diff").is_dir():
            raise NotFound(f"overlay: {what} {id} is not on disk")
        return path

    # --- mounts ---------------------------------------------------------------------------

    def mounts(self, id: str, parents: Sequence[str], readonly: bool) -> list[MountSpec]:
        """Describe the mount of layer ``id`` over ``parents`` (see the module docstring).

        :raises NotFound: ``id`` or a parent is not on disk.
        :raises FailedPrecondition: the stack is deeper than this kernel mounts.
        """
        layer = self._layer(id)
        diff = str(layer / "diff")
        work = layer / "work"
        has_work = work.is_dir()
        if not parents:
            writing = has_work and not readonly
            return [MountSpec(type="bind", source=diff, options=("rw" if writing else "ro",))]
        lowers = [self._lower_dir(parent) for parent in parents]
        options = self._mount_options()
        if has_work and not readonly:
            self._clear_volatile(work)
            if self._options.volatile:
                options.append("volatile")
            return [self._overlay(id, lowers, options, upperdir=diff, workdir=str(work))]
        if not has_work:
            # A view: its own dir was never written, the parents are its content.
            if len(lowers) == 1:
                return [MountSpec(type="bind", source=lowers[0], options=("ro",))]
            return [self._overlay(id, lowers, options)]
        if len(lowers) + 1 <= self._max_lowers():
            return [self._overlay(id, [self._lower_dir(id), *lowers], options)]
        # One lower too many (a committed layer with 500 parents): its own dir goes on as the
        # upper of a read-only mount, which writes nothing (the kernel only checks work/).
        self._clear_volatile(work)
        options.append("ro")
        return [self._overlay(id, lowers, options, upperdir=diff, workdir=str(work))]

    def _mount_options(self) -> list[str]:
        options = ["index=off", "redirect_dir=nofollow", "metacopy=off"]
        if self.userxattr:
            options.append("userxattr")
        options.extend(self._options.mountopt)
        return options

    def _max_lowers(self) -> int:
        return KERNEL_MAX_LOWERS if not self.short_links else self.capabilities.max_depth + 1

    def _overlay(
        self,
        id: str,
        lowers: list[str],
        options: list[str],
        *,
        upperdir: str | None = None,
        workdir: str | None = None,
    ) -> MountSpec:
        if len(lowers) > self._max_lowers():
            raise FailedPrecondition(
                f"overlay: layer {id} stacks {len(lowers)} lower layers; this kernel mounts at "
                f"most {self._max_lowers()} (driver max_depth {self.capabilities.max_depth})"
            )
        if self.short_links:
            # mount(2) takes it all in one page: "lowerdir=a:b,upperdir=..,workdir=..,opts".
            data = ",".join(
                [
                    "lowerdir=" + ":".join(lowers),
                    *([] if upperdir is None else [f"upperdir={upperdir}"]),
                    *([] if workdir is None else [f"workdir={workdir}"]),
                    *options,
                ]
            )
            if len(os.fsencode(data)) >= PAGE_SIZE:
                raise FailedPrecondition(
                    f"overlay: the mount options of layer {id} take {len(data)} bytes; "
                    f"without lowerdir+ (Linux 6.8) they must fit in {PAGE_SIZE - 1}"
                )
        return MountSpec(
            type="overlay",
            source="overlay",
            options=tuple(options),
            lowerdirs=tuple(lowers),
            upperdir=upperdir,
            workdir=workdir,
        )

    def _lower_dir(self, id: str) -> str:
        """The path a mount takes for layer ``id``'s ``diff/`` as a lower."""
        layer = self._layer(id, what="parent layer")
        if not self.short_links:
            return str(layer / "diff")
        link = (layer / "link").read_text().strip()
        path = self._links / link
        if not os.path.lexists(path):
            # A crash between create's rename and its symlink; containers-storage repairs
            # the same way (recreateSymlinks).
            with map_os_errors(f"overlay: restore short link of layer {id}"):
                os.symlink(f"../layers/{id}/diff", path)
        return str(path)

    @staticmethod
    def _clear_volatile(work: Path) -> None:
        """Remove what a ``volatile`` mount left: the kernel refuses the work dir with it.

        overlayfs makes ``work/work/incompat/volatile`` for a volatile mount and keeps it
        after the unmount, to stop a later mount from trusting an upper that was never
        synced (Documentation/filesystems/overlayfs.rst, "Volatile mount"). The store syncs
        a layer before committing it, so the flag says nothing the store does not know.
        """
        flag = work / "work" / "incompat" / "volatile"
        with map_os_errors(f"overlay: clear {flag}"), contextlib.suppress(FileNotFoundError):
            shutil.rmtree(flag)

    # --- apply and changes ----------------------------------------------------------------

    def apply(self, id: str, parents: Sequence[str], tar: BinaryIO, limits: object) -> None:
        """Write ``tar`` straight into the layer's ``diff/``, without mounting anything.

        Whiteouts become overlayfs whiteouts, opaque markers opaque flags, read against the
        parents' dirs (see :func:`laminae.driverkit.apply_tar`, OVERLAY mode).
        """
        diff = self._layer(id) / "diff"
        lowers = [self._layer(parent, what="parent layer") / "diff" for parent in parents]
        if not isinstance(limits, Limits):
            raise InvalidArgument(f"overlay: apply limits {limits!r} are not laminae.Limits")
        apply_tar(
            diff,
            tar,
            limits=limits,
            whiteouts=WhiteoutMode.OVERLAY,
            parent_roots=lowers,
            userxattr=self.userxattr,
        )

    def apply_detached(self, id: str, tar: BinaryIO, limits: object) -> Unsettled:
        """Write ``tar`` into the layer's ``diff/`` without reading any parent.

        Whiteouts and opaque flags are all written, and recorded for :meth:`settle`, which
        keeps those the parents need (see :func:`laminae.driverkit.apply_tar_detached`).

        :raises ParentsNeeded: the tar needs the parents' content (a root opaque marker, a
            hard link to a parent's file...): remove the layer, then :meth:`apply` it.
        """
        diff = self._layer(id) / "diff"
        if not isinstance(limits, Limits):
            raise InvalidArgument(f"overlay: apply limits {limits!r} are not laminae.Limits")
        return apply_tar_detached(diff, tar, limits=limits, userxattr=self.userxattr)

    def settle(self, id: str, parents: Sequence[str], pending: object) -> None:
        """Make the layer what :meth:`apply` on ``parents`` would have made of its tar.

        :raises InvalidArgument: the tar is refused on these parents, or ``pending`` is not
            what :meth:`apply_detached` returned.
        :raises ParentsNeeded: as for :meth:`apply_detached`.
        """
        diff = self._layer(id) / "diff"
        lowers = [self._layer(parent, what="parent layer") / "diff" for parent in parents]
        if not isinstance(pending, Unsettled):
            raise InvalidArgument(f"overlay: {pending!r} is not what apply_detached returned")
        settle_detached(diff, pending, lowers, userxattr=self.userxattr)

    def changes(self, id: str, parents: Sequence[str]) -> Iterator[Change]:
        """The changes of ``id`` against ``parents[0]``, from its ``diff/`` alone.

        See :mod:`._changes`; the stream is the one ``naive_changes`` gives over mounts.
        """
        diff = str(self._layer(id) / "diff")
        lowers = [str(self._layer(parent, what="parent layer") / "diff") for parent in parents]
        return native_changes(diff, lowers, userxattr=self.userxattr)
