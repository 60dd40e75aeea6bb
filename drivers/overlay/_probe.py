"""Can overlay run here? The kernel, the privileges, and the filesystem under the home.

Each check that fails raises :class:`DriverUnavailable` saying which one and why:

* overlayfs is in the kernel (``/proc/filesystems``), or a module the first mount loads,
  and knows the options the mounts set (``index``, ``redirect_dir``, ``metacopy``: Linux
  4.19; ``userxattr`` in a user namespace: Linux 5.11), so no kernel default decides where
  changes go;
* the process may mount it: root, or root of a user namespace (rootless, with ``userxattr``);
* the backing filesystem is not overlayfs itself (an upper dir cannot be on overlay) nor NFS
  (no whiteouts, no trusted xattrs, and overlayfs refuses it as an upper);
* it returns file types from ``readdir`` (``d_type``), which overlayfs needs to find
  whiteouts (XFS made with ``ftype=0`` does not);
* it takes the xattrs the layers need: ``trusted.*`` (``user.*`` in a user namespace);
* on a kernel without ``lowerdir+`` the home path is short enough for the declared depth to
  fit the one-page mount option limit;
* a home made in a user namespace (flags in ``user.overlay.*``) is used in one, and a home
  made outside (``trusted.overlay.*``) outside: the kernel reads only one of the two.

The filesystem checks run in a scratch directory made in the home (or its nearest existing
ancestor) and removed before returning.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from laminae.driverkit import (
    NFS_SUPER_MAGIC,
    OVERLAYFS_SUPER_MAGIC,
    DriverUnavailable,
    set_xattr,
    statfs_type,
)

from ._host import kernel_release

__all__ = ["XATTR_RECORD", "check_kernel_options", "probe_host", "read_namespace"]

_PARAMETERS: Final = Path("/sys/module/overlay/parameters")
# The module's parameters are the defaults of the mount options the driver sets; a kernel
# without one does not know the option either.
_OPTIONS_SET: Final = ("index", "metacopy", "redirect_dir")

XATTR_RECORD: Final = "xattrs"
"""File in the home naming the xattr namespace of its layers' flags: ``trusted`` or ``user``."""


def read_namespace(home: Path) -> str | None:
    """The namespace recorded in ``home``, or ``None`` for a home not made yet."""
    try:
        return (home / XATTR_RECORD).read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _overlay_in_kernel() -> bool:
    with contextlib.suppress(OSError), open("/proc/filesystems") as file:
        if any(line.split()[-1:] == ["overlay"] for line in file):
            return True
    release = os.uname().release
    for listing in ("modules.dep", "modules.builtin"):
        with contextlib.suppress(OSError), open(f"/lib/modules/{release}/{listing}") as file:
            if any("/overlay.ko" in line for line in file):
                return True
    return False


def _nearest_existing(path: Path) -> Path:
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


@contextlib.contextmanager
def _scratch(where: Path) -> Iterator[Path]:
    path = where / f".laminae-overlay-probe-{secrets.token_hex(6)}"
    try:
        path.mkdir(mode=0o700)
    except OSError as exc:
        raise DriverUnavailable(f"overlay: cannot write in {where}: {exc.strerror}") from exc
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _has_d_type(scratch: Path) -> bool:
    """Whether ``readdir`` gives file types here.

    ``DirEntry.is_dir`` answers from ``d_type`` when the filesystem gives one and otherwise
    calls ``stat``; with the directory gone by then, only an answer from ``d_type`` says yes.
    """
    probe = scratch / "d_type"
    probe.mkdir()
    with os.scandir(scratch) as entries:
        found = [entry for entry in entries if entry.name == "d_type"]
    probe.rmdir()
    return bool(found) and found[0].is_dir(follow_symlinks=False)


def check_kernel_options(userxattr: bool, parameters: Path = _PARAMETERS) -> None:
    """Raise :class:`DriverUnavailable` if overlayfs lacks an option the mounts set.

    :param parameters: the overlay module's parameters (absent until it is loaded; then
        the mount itself is the check).
    """
    if parameters.is_dir():
        missing = [name for name in _OPTIONS_SET if not (parameters / name).exists()]
        if missing:
            raise DriverUnavailable(
                f"overlay: this kernel's overlayfs has no {', '.join(missing)} option "
                "(Linux 4.19+), which the driver sets so that every change stays in the "
                "upper dir"
            )
    if userxattr and kernel_release() < (5, 11):
        major, minor = kernel_release()
        raise DriverUnavailable(
            f"overlay: in a user namespace overlayfs needs userxattr (Linux 5.11); "
            f"this is Linux {major}.{minor}"
        )


def probe_host(home: Path, *, userxattr: bool, max_home: int | None) -> None:
    """Raise :class:`DriverUnavailable` unless overlay can run with its home at ``home``.

    :param userxattr: the layers' flags go in ``user.overlay.*`` (a user namespace).
    :param max_home: the longest home path the declared depth allows (no ``lowerdir+``),
        or ``None`` when the path length does not matter.
    """
    if not _overlay_in_kernel():
        raise DriverUnavailable(
            "overlay: the kernel has no overlayfs (not in /proc/filesystems, no module)"
        )
    check_kernel_options(userxattr)
    if os.geteuid() != 0:
        raise DriverUnavailable(
            "overlay: mounting overlayfs needs root (CAP_SYS_ADMIN), or root of a user "
            "namespace (unshare --user --map-root-user --mount)"
        )
    namespace = "user" if userxattr else "trusted"
    recorded = read_namespace(home)
    if recorded is not None and recorded != namespace:
        made, now = (
            ("outside a user namespace", "inside one")
            if recorded == "trusted"
            else ("in a user namespace", "outside one")
        )
        raise DriverUnavailable(
            f"overlay: the layers in {home} were made {made} (opaque flags in "
            f"{recorded}.overlay.*), and overlayfs {now} reads only {namespace}.overlay.*"
        )
    where = _nearest_existing(home)
    if not where.is_dir():
        raise DriverUnavailable(f"overlay: {where} is not a directory")
    try:
        fs_type = statfs_type(str(where))
    except OSError as exc:
        raise DriverUnavailable(f"overlay: cannot statfs {where}: {exc.strerror}") from exc
    if fs_type == OVERLAYFS_SUPER_MAGIC:
        raise DriverUnavailable(
            f"overlay: {where} is on overlayfs, which cannot hold an overlay upper dir "
            "(a container's root?); give the store a root on a real filesystem"
        )
    if fs_type == NFS_SUPER_MAGIC:
        raise DriverUnavailable(f"overlay: {where} is on NFS, which overlayfs cannot use")
    if max_home is not None and len(os.fsencode(os.path.abspath(home))) > max_home:
        major, minor = kernel_release()
        raise DriverUnavailable(
            f"overlay: Linux {major}.{minor} has no lowerdir+, so every mount's options must "
            f"fit one page; the home {home} is longer than the {max_home} bytes that allows "
            "for the declared depth (Linux 6.8 lifts this)"
        )
    with _scratch(where) as scratch:
        if not _has_d_type(scratch):
            raise DriverUnavailable(
                f"overlay: the filesystem of {where} gives no file types in readdir (d_type); "
                "overlayfs needs them (XFS: mkfs.xfs -n ftype=1)"
            )
        probe = scratch / "xattr"
        probe.write_bytes(b"")
        try:
            set_xattr(str(probe), f"{namespace}.laminae-probe".encode(), b"1")
        except OSError as exc:
            why = "not supported there" if exc.errno == errno.ENOTSUP else exc.strerror
            raise DriverUnavailable(
                f"overlay: the filesystem of {where} does not take {namespace}.* "
                f"xattrs ({why}); overlayfs keeps whiteouts and opaque directories in them"
                + (" (rootless: user.* xattrs)" if userxattr else "")
            ) from exc
