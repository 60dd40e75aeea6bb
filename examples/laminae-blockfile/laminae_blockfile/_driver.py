"""The blockfile driver: every layer is an ext4 filesystem in an image file of its own.

Modelled on containerd's blockfile snapshotter. A layer's files live in ``<home>/<id>.img``,
a sparse file holding a whole ext4 filesystem, mounted through a loop device. What users get
from that:

* a hard size limit per layer (the ``size`` option, ``1G`` by default): a container that
  fills its layer gets ``ENOSPC`` and leaves the host's disk alone;
* a store that works on any backing filesystem that holds sparse files (tmpfs, ext4, xfs,
  NFS, even overlayfs), since the layer's own filesystem is always ext4;
* images a virtual machine can take as block devices as they are.

The price: a child starts as a copy of its parent's image (a reflink where the backing
filesystem has them, else a copy of its data that keeps the holes), and every mount takes a
loop device.

Built from :mod:`laminae.driverkit` alone, as any third-party driver can be: the storage-id
check, the size parser, file copies, loop devices and the errors come from there.

Layout::

    <home>/<id>.img        one ext4 image per layer
    <home>/<id>.img.tmp    an image being made; renamed into place only once complete

Options (``[storage.options.blockfile]`` in ``storage.toml``):

``size``
    the size of a new base layer's image, e.g. ``512M`` or ``2G`` (binary units). A child
    has its parent's size.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import struct
import subprocess
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, final

from laminae.driverkit import (
    EXT4_SUPER_MAGIC,
    AlreadyExists,
    Capabilities,
    CorruptLayer,
    DataCopier,
    DriverUnavailable,
    FailedPrecondition,
    Feature,
    InvalidArgument,
    LaminaeError,
    LimitExceeded,
    MountSpec,
    NotFound,
    Usage,
    check_storage_id,
    is_storage_id,
    loop_device_of,
    map_os_errors,
)

from ._size import MIN_SIZE, format_size, layer_size

__all__ = ["DEFAULT_SIZE", "BlockfileDriver", "BlockfileOptions", "parse_options"]

DEFAULT_SIZE = "1G"

_IMAGE_SUFFIX = ".img"
_TMP_SUFFIX = ".img.tmp"

# mkfs.ext4, chosen for speed and for images that stay sparse:
#   -O ^has_journal   committed layers are immutable and mounted read-only, and an apply that
#                     dies half way is thrown away by the store (its incomplete mark), so a
#                     journal would buy little; it would cost 32 MiB per GiB of layer, written
#                     on first use and then copied into every child's image.
#   -m 0              no blocks reserved for root: the size limit is the layer's, whole.
#   lazy_itable_init=0  with the default discard, mke2fs punches holes over the inode tables
#                     and marks them zeroed (instant on a sparse file); lazy_itable_init=1
#                     would leave the kernel's ext4lazyinit thread to write those zeros on
#                     first mount, un-sparsing 16 MiB per GiB of every layer.
#   root_owner=0:0    the layer's root belongs to root whoever runs mkfs.
_MKFS_ARGS = (
    "-q",
    "-F",
    "-m",
    "0",
    "-O",
    "^has_journal",
    "-E",
    "lazy_itable_init=0,root_owner=0:0",
)

# Extra search path for the e2fsprogs tools: a non-login root shell may lack sbin on PATH.
_SBIN = ("/usr/sbin", "/sbin")


@final
class BlockfileOptions:
    """The driver's options, parsed.

    :param size: bytes of a new base layer's image.
    """

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size

    def __repr__(self) -> str:
        return f"BlockfileOptions(size={format_size(self.size)})"


def parse_options(options: Mapping[str, str]) -> BlockfileOptions:
    """Parse the driver's options.

    :raises laminae.driverkit.InvalidArgument: an unknown key, or a value that is not a size,
        naming it.
    """
    unknown = sorted(set(options) - {"size"})
    if unknown:
        raise InvalidArgument(
            f"blockfile option {unknown[0]!r}: unknown (the blockfile driver knows: size)"
        )
    return BlockfileOptions(size=layer_size(options.get("size", DEFAULT_SIZE)))


def _find_tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
    return shutil.which(name, path=path)


def _require_tool(name: str, package: str) -> str:
    tool = _find_tool(name)
    if tool is None:
        raise DriverUnavailable(
            f"blockfile needs {name}, not found on PATH or in {', '.join(_SBIN)}: install {package}"
        )
    return tool


def _run(argv: Sequence[str], what: str) -> None:
    """Run a tool; a failure becomes a :class:`~laminae.driverkit.LaminaeError` quoting its
    stderr."""
    try:
        proc = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env={**os.environ, "LC_ALL": "C"},
            check=False,
        )
    except OSError as exc:
        raise LaminaeError(f"{what}: {argv[0]}: {exc.strerror}") from exc
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise LaminaeError(f"{what}: {Path(argv[0]).name}: {detail[0]}")


def _inodes_in_use(image: Path) -> int:
    """Inodes a layer's files take, read from the image's superblock (root counts as one).

    The superblock's counters are exact once the image is unmounted; while it is mounted
    they are as of the kernel's last superblock write.
    """
    with open(image, "rb") as f:
        f.seek(1024)
        sb = f.read(88)
    if len(sb) < 88 or struct.unpack_from("<H", sb, 56)[0] != EXT4_SUPER_MAGIC:
        raise CorruptLayer(f"blockfile image {image}: no ext4 superblock")
    total: int = struct.unpack_from("<I", sb, 0)[0]
    free: int = struct.unpack_from("<I", sb, 16)[0]
    first_ino: int = struct.unpack_from("<I", sb, 84)[0]
    # Inodes 1 .. first_ino-1 are reserved and always in use; the root directory is one of
    # them (inode 2), and it is part of every layer.
    return total - free - (first_ino - 1) + 1


def _open_private(path: str, flags: int) -> int:
    """``open``'s opener for a file only root may read: a layer's image holds its files."""
    return os.open(path, flags, 0o600)


@contextlib.contextmanager
def _removed_on_error(path: Path) -> Iterator[None]:
    try:
        yield
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise


@final
class BlockfileDriver:
    """Layers as ext4 image files, mounted through loop devices. See the module docstring.

    :param home: the driver's directory; made if missing.
    :param options: see :func:`parse_options`.
    """

    name: ClassVar[str] = "blockfile"
    capabilities: ClassVar[Capabilities] = Capabilities(
        features={Feature.QUOTA},
        # Each image holds its whole tree, so a chain's depth costs nothing at mount time;
        # the bound only keeps a runaway chain from filling the disk with copies.
        max_depth=1000,
        needs_root=True,
        independent_layers=False,
    )

    __slots__ = ("_home", "_options")

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        """Check the host: root, loop devices and e2fsprogs.

        The backing filesystem does not matter: anything that holds a sparse file will do.

        :raises laminae.driverkit.InvalidArgument: a bad option.
        :raises laminae.driverkit.DriverUnavailable: what is missing, and how to get it.
        """
        parse_options(options)
        if os.geteuid() != 0:
            raise DriverUnavailable(
                f"blockfile needs root to attach loop devices and mount ext4 "
                f"(running as uid {os.geteuid()})"
            )
        if not os.path.exists("/dev/loop-control"):
            raise DriverUnavailable(
                "blockfile needs loop devices: /dev/loop-control is missing (modprobe loop)"
            )
        _require_tool("mkfs.ext4", "e2fsprogs")
        _require_tool("debugfs", "e2fsprogs")
        _require_tool("resize2fs", "e2fsprogs")

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        self._options = parse_options(options)
        self._home = Path(home)
        try:
            self._home.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise LaminaeError(f"blockfile home {self._home}: {exc.strerror or exc}") from exc

    @property
    def size(self) -> int:
        """Bytes of a new base layer's image."""
        return self._options.size

    def image(self, id: str) -> Path:
        """The image file of layer ``id`` (which need not exist).

        :raises laminae.driverkit.InvalidArgument: ``id`` is not a storage id, which also
            keeps every path this driver makes inside its home.
        """
        check_storage_id(id)
        return self._home / (id + _IMAGE_SUFFIX)

    def _existing_image(self, id: str) -> Path:
        image = self.image(id)
        if not image.is_file():
            raise NotFound(f"blockfile layer {id}: no image {image}")
        return image

    def create(self, id: str, parents: Sequence[str], writable: bool) -> None:
        """Make ``<id>.img``: a fresh ext4 for a base, else a copy of the parent's image.

        A view (``writable`` false) shares its parent's image through a hard link: the
        parent is committed, so neither is ever written, and the view costs no space.

        :raises laminae.driverkit.AlreadyExists: ``id`` has an image already.
        :raises laminae.driverkit.NotFound: the parent has no image.
        """
        image = self.image(id)
        if image.exists():
            raise AlreadyExists(f"blockfile layer {id}: {image} exists")
        tmp = self._home / (id + _TMP_SUFFIX)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # left by a process that died making it
        with _removed_on_error(tmp):
            if not parents:
                self._format(tmp)
            else:
                parent = self._existing_image(parents[0])
                if writable:
                    self._copy(parent, tmp, id)
                else:
                    self._link(parent, tmp, id)
            # link + unlink rather than rename: publishing must not replace an image that a
            # racing create made in the meantime.
            self._link(tmp, image, id)
        tmp.unlink()

    def _copy(self, source: Path, target: Path, id: str) -> None:
        # A reflink where the backing filesystem can; otherwise only the data extents are
        # copied, so the child stays as sparse as its parent.
        with (
            map_os_errors(f"blockfile layer {id}: copy {source}"),
            open(source, "rb") as src,
            open(target, "xb", opener=_open_private) as dst,
        ):
            DataCopier().copy(src.fileno(), dst.fileno())

    def _link(self, source: Path, target: Path, id: str) -> None:
        try:
            os.link(source, target)
        except FileExistsError as exc:
            raise AlreadyExists(f"blockfile layer {id}: {target} exists") from exc
        except OSError as exc:
            raise LaminaeError(
                f"blockfile layer {id}: link {source} to {target}: {exc.strerror}"
            ) from exc

    def _format(self, image: Path) -> None:
        try:
            # 0600: a layer's files keep their own modes inside; the image itself is root's.
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, self._options.size)
            finally:
                os.close(fd)
        except OSError as exc:
            raise LaminaeError(
                f"blockfile: make a {format_size(self._options.size)} image {image}: {exc.strerror}"
            ) from exc
        mkfs = _require_tool("mkfs.ext4", "e2fsprogs")
        _run([mkfs, *_MKFS_ARGS, str(image)], f"make an ext4 filesystem in {image}")
        # mke2fs always makes lost+found; a fresh layer must be empty (an OCI layer that
        # wants lost+found ships it). debugfs removes it without a mount; it reports
        # failure only on stderr, so the superblock is the judge.
        debugfs = _require_tool("debugfs", "e2fsprogs")
        _run([debugfs, "-w", "-R", "rmdir lost+found", str(image)], f"empty {image}")
        if _inodes_in_use(image) != 1:
            raise LaminaeError(f"blockfile: could not remove lost+found from {image}")

    def remove(self, id: str) -> None:
        """Delete layer ``id``'s image (and a half-made one, if a crash left it).

        :raises laminae.driverkit.NotFound: neither exists.
        """
        found = False
        for path in (self.image(id), self._home / (id + _TMP_SUFFIX)):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise LaminaeError(f"blockfile layer {id}: remove {path}: {exc.strerror}") from exc
            found = True
        if not found:
            raise NotFound(f"blockfile layer {id}: no image in {self._home}")

    def mounts(self, id: str, parents: Sequence[str], readonly: bool) -> list[MountSpec]:
        """One ext4 mount of the layer's image through a loop device.

        :raises laminae.driverkit.NotFound: no image.
        :raises laminae.driverkit.FailedPrecondition: a writable mount of a view, whose image
            is its parent's.
        """
        image = self._existing_image(id)
        if not readonly and image.stat().st_nlink > 1:
            raise FailedPrecondition(
                f"blockfile layer {id} shares its image with its parent (a view): "
                "it mounts read-only only"
            )
        return [
            MountSpec(type="ext4", source=str(image), options=("loop", "ro" if readonly else "rw"))
        ]

    def usage(self, id: str) -> Usage:
        """The image's allocated bytes, and the inodes its filesystem uses.

        A layer's image holds its parents' files too, so this is the upper bound the
        contract allows; a reflinked child shares those blocks on disk.
        """
        image = self._existing_image(id)
        try:
            blocks = image.stat().st_blocks
        except OSError as exc:
            raise LaminaeError(f"blockfile layer {id}: {exc.strerror}") from exc
        return Usage(size=blocks * 512, inodes=_inodes_in_use(image))

    def layers(self) -> Iterable[str]:
        """Storage ids with an image, or with a half-made one (for ``check`` to clean)."""
        ids: set[str] = set()
        try:
            names = os.listdir(self._home)
        except FileNotFoundError:
            return []
        for name in names:
            for suffix in (_TMP_SUFFIX, _IMAGE_SUFFIX):
                stem = name.removesuffix(suffix)
                if stem != name and is_storage_id(stem):
                    ids.add(stem)
                    break
        return sorted(ids)

    def set_quota(self, id: str, size: int) -> None:
        """Resize layer ``id``'s filesystem, and its image, to ``size`` bytes.

        Works on an unmounted layer only (``resize2fs`` offline): set the quota after
        ``create`` and before the first mount. Shrinking fails if the files do not fit.
        The filesystem's own metadata counts against ``size``, so slightly less than
        ``size`` bytes of file data fit.

        :raises laminae.driverkit.InvalidArgument: ``size`` is below the driver's minimum of
            16 MiB.
        :raises laminae.driverkit.FailedPrecondition: the layer is mounted, or is a view.
        :raises laminae.driverkit.LimitExceeded: the files do not fit in ``size`` bytes.
        """
        image = self._existing_image(id)
        if size < MIN_SIZE:
            raise InvalidArgument(
                f"blockfile quota of layer {id}: {size} bytes is below the minimum "
                f"of {format_size(MIN_SIZE)}"
            )
        size -= size % 4096
        st = image.stat()
        if st.st_nlink > 1:
            raise FailedPrecondition(
                f"blockfile layer {id} shares its image with its parent (a view): no quota"
            )
        device = loop_device_of(image)
        if device is not None:
            raise FailedPrecondition(
                f"blockfile layer {id} is in use ({device}): set its quota before mounting it"
            )
        if size == st.st_size:
            return
        resize2fs = _require_tool("resize2fs", "e2fsprogs")
        # -f: resize2fs wants an e2fsck after the last mount, which would put lost+found
        # back; the image is unmounted (checked above) and has no journal to replay.
        argv = [resize2fs, "-f", str(image), f"{size // 1024}K"]
        what = f"blockfile quota of layer {id}: resize to {format_size(size)}"
        try:
            if size > st.st_size:
                os.truncate(image, size)
                _run(argv, what)
            else:
                try:
                    _run(argv, what)
                except LaminaeError as exc:
                    raise LimitExceeded(
                        f"{exc} (do the layer's files fit in {format_size(size)}?)"
                    ) from exc
                os.truncate(image, size)
        except OSError as exc:
            raise LaminaeError(f"{what}: {exc.strerror}") from exc

    def close(self) -> None:
        """Nothing to release: every mount and loop device belongs to the store."""
