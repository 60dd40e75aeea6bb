"""OCI runtime bundles: a container's mounted root and a ``config.json`` a runtime runs.

A bundle (runtime-spec ``bundle.md``) is a directory holding ``config.json``; its
``root.path`` here is the container's writable root, mounted by the store (counted, like any
mount), so what the process writes lands in the container's layer and ``container diff``
shows it. The config starts from the runtime's own ``crun spec`` / ``runc spec`` output (the
namespaces, mounts, capabilities and masked paths it expects), and the image's config is
applied on top, as ``docker run`` would:

- ``process.args``: the arguments given, else ``Entrypoint`` + ``Cmd``;
- ``process.env``: the runtime's defaults, each variable the image sets replacing the default
  of that name (so the image's ``PATH`` wins), new ones appended in the image's order;
- ``process.cwd``: ``WorkingDir``, else ``/``;
- ``process.user``: ``User`` as ``uid``, ``uid:gid``, ``name`` or ``name:group`` (or mixed);
  names are looked up in the container's own ``/etc/passwd`` and ``/etc/group``, and without
  an explicit group the user's supplementary groups (``/etc/group`` membership) become
  ``additionalGids``, as runc's ``GetExecUser`` does;
- ``hostname``: the container's name, else the first 12 digits of its id;
- extra bind mounts (:class:`BindMount`), ``rbind`` and ``ro`` or ``rw``.

The container's files are untrusted: ``/etc/passwd`` and ``/etc/group`` are opened inside the
mount with ``openat2(RESOLVE_IN_ROOT)``, so a symlink there resolves within the container's
root and never to the host's files (without ``openat2``, before Linux 5.6, the directory walk
of :mod:`laminae.archive._tree` and an ``O_NOFOLLOW`` loop here do the same). They
are read line by line, at most :data:`MAX_ACCOUNT_FILE` bytes, and must be regular files.

Beside ``config.json`` the bundle holds a marker, :data:`MARKER_NAME`, naming the store (root,
run directory, driver) and the container, so that :func:`remove_bundle` -- and ``laminae
unbundle DIR`` from another process -- unmounts the right container with no other input.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Final, final

import attrs

from laminae._exceptions import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    map_os_errors,
)
from laminae.archive._tree import Tree, clean_name
from laminae.kernel import _paths, _syscalls

if TYPE_CHECKING:
    from laminae.containers._store import ContainerStore
    from laminae.images._image import ImageConfig

__all__ = [
    "MARKER_NAME",
    "BindMount",
    "Bundle",
    "BundleMarker",
    "make_bundle",
    "read_marker",
    "remove_bundle",
]

CONFIG_NAME: Final = "config.json"
MARKER_NAME: Final = ".laminae-bundle.json"
"""The file beside ``config.json`` that says which store and container the bundle mounts."""

MAX_ACCOUNT_FILE: Final = 8 << 20
"""The most of ``/etc/passwd`` or ``/etc/group`` read: a hostile image cannot fill memory."""

SPEC_TIMEOUT: Final = 60.0
"""Seconds ``<runtime> spec`` may take (it only writes a file)."""

_MAX_LINKS: Final = 40  # the kernel's MAXSYMLINKS: as many as openat2 follows
_MAX_ID: Final = 0xFFFFFFFE  # (uid_t)-1 means "no change" to the kernel, so it is no user
_OPEN_ACCOUNT: Final = os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
_RESOLVE: Final = _paths.RESOLVE_IN_ROOT | _paths.RESOLVE_NO_MAGICLINKS


def _check_destination(_: object, __: object, value: str) -> None:
    path = PurePosixPath(value)
    if not path.is_absolute() or "\x00" in value or ".." in path.parts or value == "/":
        raise InvalidArgument(
            f"bind mount destination {value!r}: must be an absolute path below / without '..'"
        )


@final
@attrs.frozen
class BindMount:
    """A host path bound into the container: ``source`` on ``destination`` (absolute there).

    :raises InvalidArgument: ``destination`` is not absolute, or holds a NUL or a ``..``.
    """

    source: Path = attrs.field(converter=Path)
    destination: str = attrs.field(validator=_check_destination)
    readonly: bool = True

    @classmethod
    def parse(cls, text: str) -> BindMount:
        """Read ``SRC:DST[:ro|rw]`` (read-only unless ``rw``), as ``docker run -v`` spells it.

        :raises InvalidArgument: ``text`` has another shape.
        """
        parts = text.split(":")
        mode = "ro"
        if len(parts) == 3:
            mode = parts.pop()
        if len(parts) != 2 or not parts[0] or mode not in ("ro", "rw"):
            raise InvalidArgument(f"bind mount {text!r}: expected SRC:DST[:ro|rw]")
        return cls(Path(parts[0]), parts[1], readonly=mode == "ro")

    def to_oci(self) -> dict[str, Any]:
        """The runtime-spec ``mounts`` entry."""
        return {
            "destination": str(PurePosixPath(self.destination)),
            "type": "bind",
            "source": str(self.source.absolute()),
            "options": ["rbind", "ro" if self.readonly else "rw"],
        }


@final
@attrs.frozen
class Bundle:
    """A bundle :func:`make_bundle` wrote: run it with ``<runtime> run --bundle DIRECTORY ID``."""

    directory: Path
    container: str
    rootfs: Path
    runtime: str

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_NAME


@final
@attrs.frozen
class BundleMarker:
    """What :data:`MARKER_NAME` records: the store that mounted the bundle's root, and whose.

    ``created_directory`` says whether :func:`make_bundle` made the directory (then
    :func:`remove_bundle` removes it when empty).
    """

    store_root: Path
    runroot: Path
    driver: str
    container: str
    created_directory: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "store": str(self.store_root),
            "runroot": str(self.runroot),
            "driver": self.driver,
            "container": self.container,
            "created_directory": self.created_directory,
        }

    @classmethod
    def from_json(cls, data: object, *, what: str) -> BundleMarker:
        """:raises InvalidArgument: ``data`` is not a marker (``what`` names the file)."""
        if not isinstance(data, dict):
            raise InvalidArgument(f"{what}: not a JSON object")
        fields = [data.get(key) for key in ("store", "runroot", "driver", "container")]
        if not all(isinstance(f, str) and f for f in fields):
            raise InvalidArgument(f"{what}: needs store, runroot, driver and container")
        store, runroot, driver, container = (str(f) for f in fields)
        return cls(
            Path(store), Path(runroot), driver, container, data.get("created_directory") is True
        )


# -- the bundle -------------------------------------------------------------------------------


def make_bundle(
    store: ContainerStore,
    container: str,
    directory: Path | str,
    *,
    runtime: str = "crun",
    args: Sequence[str] | None = None,
    mounts: Sequence[BindMount] = (),
    terminal: bool = False,
) -> Bundle:
    """Mount ``container`` and write an OCI runtime bundle for it in ``directory``.

    The mount is counted: :func:`remove_bundle` (or ``laminae unbundle``) drops it. A
    directory that already holds a bundle of this store is first unbundled, then rewritten.

    :param container: the container's id or name.
    :param directory: the bundle directory; made (with parents) if missing.
    :param runtime: the runtime whose ``spec`` output the config starts from (``crun``,
        ``runc``, or another that has ``spec``).
    :param args: the command to run; empty or ``None``: the image's Entrypoint + Cmd.
    :param mounts: host paths to bind into the container.
    :param terminal: give the process a terminal (``process.terminal``).
    :raises NotFound: no such container.
    :raises AlreadyExists: ``directory`` holds a ``config.json`` laminae did not write.
    :raises FailedPrecondition: ``directory`` holds a bundle of another store, or the runtime's
        ``spec`` failed.
    :raises InvalidArgument: no command (none given, none in the image), a ``User`` that does
        not resolve (named in the message), a malformed image config, a runtime not installed.
    """
    where = Path(directory).absolute()
    found = store.container(container)
    config = store.container_config(found.id)
    process = _image_process(config, found.id)
    command = list(args) if args else process.command
    if not command:
        raise InvalidArgument(
            f"container {container!r}: its image has neither Entrypoint nor Cmd; "
            "give the command to run"
        )
    for mount in mounts:
        if not mount.source.exists():
            raise NotFound(f"bind mount source {mount.source}: does not exist")
    spec = runtime_spec(runtime)
    # Everything that can be checked without touching the directory was: now make it.
    with map_os_errors(f"bundle directory {where}"):
        created = not where.exists()
        where.mkdir(parents=True, exist_ok=True)
    created = _take_over(store, where) or created
    marker = BundleMarker(store.root, store.runroot, store.driver_name, found.id, created)
    # The marker goes first: from here on, `laminae unbundle` can clean up whatever happens.
    _write_json(where / MARKER_NAME, marker.to_json())
    try:
        rootfs = store.mount_container(found.id)
    except BaseException:
        _remove_files(where, marker)
        raise
    try:
        spec["root"] = {"path": str(rootfs), "readonly": False}
        spec["hostname"] = found.name or found.id[:12]
        spec_process = spec.setdefault("process", {})
        spec_process["terminal"] = terminal
        spec_process["args"] = command
        spec_process["env"] = merge_env(_string_list(spec_process.get("env")), process.env)
        spec_process["cwd"] = process.cwd
        spec_process["user"] = resolve_user(rootfs, process.user)
        spec["mounts"] = [*spec.get("mounts", []), *(m.to_oci() for m in mounts)]
        _write_json(where / CONFIG_NAME, spec)
    except BaseException:
        store.unmount_container(found.id)
        _remove_files(where, marker)
        raise
    return Bundle(where, found.id, rootfs, runtime)


def remove_bundle(store: ContainerStore, directory: Path | str) -> None:
    """Unmount the container of the bundle in ``directory`` and remove what :func:`make_bundle`
    wrote (``config.json``, the marker, and the directory itself if it made it and it is empty).

    A container removed since, or no longer mounted, is no error: the files still go.

    :raises NotFound: ``directory`` holds no laminae bundle.
    :raises FailedPrecondition: the bundle belongs to another store.
    """
    _unbundle(store, Path(directory).absolute(), keep_directory=False)


def _unbundle(store: ContainerStore, where: Path, *, keep_directory: bool) -> BundleMarker:
    """:func:`remove_bundle`; ``keep_directory`` keeps it even if made for the bundle."""
    marker = read_marker(where)
    if marker.store_root != store.root:
        raise FailedPrecondition(
            f"bundle {where}: mounts a container of store {marker.store_root}, not {store.root}"
        )
    try:
        container = store.container(marker.container)
    except NotFound:
        container = None
    if container is not None and store.layer(container.layer).mount_count:
        store.unmount_container(container.id)
    _remove_files(
        where, marker if not keep_directory else attrs.evolve(marker, created_directory=False)
    )
    return marker


def read_marker(directory: Path | str) -> BundleMarker:
    """The marker of the bundle in ``directory``: which store and container it mounts.

    :raises NotFound: there is none (not a laminae bundle, or removed already).
    :raises InvalidArgument: it is malformed.
    """
    path = Path(directory).absolute() / MARKER_NAME
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 16)
    except FileNotFoundError as exc:
        raise NotFound(f"bundle {path.parent}: no {MARKER_NAME}, not a laminae bundle") from exc
    except OSError as exc:
        with map_os_errors(f"read {path}"):
            raise exc
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"{path}: not JSON ({exc})") from exc
    return BundleMarker.from_json(data, what=str(path))


def _take_over(store: ContainerStore, where: Path) -> bool:
    """Make ``where`` ready for a new bundle: unbundle one of ours, refuse anyone else's.

    :returns: whether the bundle unbundled here had made the directory.
    """
    if (where / MARKER_NAME).exists():
        return _unbundle(store, where, keep_directory=True).created_directory
    if (where / CONFIG_NAME).exists() or (where / CONFIG_NAME).is_symlink():
        raise AlreadyExists(
            f"bundle directory {where}: holds a {CONFIG_NAME} that laminae did not write"
        )
    return False


def _remove_files(where: Path, marker: BundleMarker) -> None:
    with map_os_errors(f"remove bundle files in {where}"):
        for name in (CONFIG_NAME, MARKER_NAME):
            with contextlib.suppress(FileNotFoundError):
                (where / name).unlink()
        if marker.created_directory:
            with contextlib.suppress(OSError):
                where.rmdir()  # only when empty: the caller may have put files there


def _write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` to ``path`` whole or not at all (a temporary file, then a rename)."""
    with map_os_errors(f"write {path}"):
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(document, out, indent=2)
                out.write("\n")
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise


# -- the runtime's defaults -------------------------------------------------------------------


def runtime_spec(runtime: str) -> dict[str, Any]:
    """The config the runtime writes with ``<runtime> spec`` (``--rootless`` unless root).

    :raises InvalidArgument: ``runtime`` is not an installed program.
    :raises FailedPrecondition: ``spec`` failed or wrote something else than a JSON object.
    """
    program = shutil.which(runtime)
    if program is None:
        raise InvalidArgument(f"runtime {runtime!r}: no such program on PATH")
    command = [program, "spec"]
    if os.geteuid() != 0:
        command.append("--rootless")
    # Both crun and runc write ./config.json (and refuse to overwrite one): a fresh directory.
    with tempfile.TemporaryDirectory(prefix="laminae-spec-") as scratch:
        try:
            result = subprocess.run(
                command,
                cwd=scratch,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=SPEC_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise FailedPrecondition(f"`{runtime} spec`: no answer in {SPEC_TIMEOUT:g}s") from exc
        except OSError as exc:
            with map_os_errors(f"run `{runtime} spec`"):
                raise exc
        if result.returncode != 0:
            detail = result.stderr.decode(errors="replace").strip()
            raise FailedPrecondition(
                f"`{runtime} spec` failed (exit {result.returncode}): {detail}"
            )
        try:
            document = json.loads((Path(scratch) / CONFIG_NAME).read_bytes())
        except (OSError, ValueError) as exc:
            raise FailedPrecondition(f"`{runtime} spec` wrote no readable {CONFIG_NAME}") from exc
    if not isinstance(document, dict):
        raise FailedPrecondition(f"`{runtime} spec` wrote no JSON object")
    return document


# -- the image's process ----------------------------------------------------------------------


@attrs.frozen
class _ImageProcess:
    """How the image says to run: the command, variables, directory and user."""

    command: list[str]
    env: list[str]
    cwd: str
    user: str


def _image_process(config: ImageConfig | None, container: str) -> _ImageProcess:
    """Read Entrypoint, Cmd, Env, WorkingDir and User from ``config`` (all optional)."""
    run = config.container_config if config is not None else {}
    what = f"image config of container {container}"

    def strings(key: str) -> list[str]:
        value = run.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"{what}: {key} must be a list of strings")
        return list(value)

    env = strings("Env")
    for entry in env:
        if "=" not in entry or entry.startswith("="):
            raise InvalidArgument(f"{what}: Env entry {entry!r} is not NAME=VALUE")
    cwd = run.get("WorkingDir") or "/"
    user = run.get("User") or ""
    if not isinstance(cwd, str) or not isinstance(user, str):
        raise InvalidArgument(f"{what}: WorkingDir and User must be strings")
    # Docker resolves a relative WorkingDir against /; the runtime-spec wants it absolute.
    return _ImageProcess(
        strings("Entrypoint") + strings("Cmd"), env, str(PurePosixPath("/", cwd)), user
    )


def _string_list(value: object) -> list[str]:
    if not isinstance(value, list):
        return []
    return [v for v in value if isinstance(v, str)]


def merge_env(defaults: Sequence[str], image: Sequence[str]) -> list[str]:
    """``defaults`` with each variable ``image`` sets replaced in place, new ones appended.

    >>> merge_env(["PATH=/bin", "TERM=xterm"], ["A=1", "PATH=/usr/bin"])
    ['PATH=/usr/bin', 'TERM=xterm', 'A=1']
    """
    merged: dict[str, str] = {}
    for entry in [*defaults, *image]:
        name, _, _ = entry.partition("=")
        merged[name] = entry
    return list(merged.values())


# -- users and groups -------------------------------------------------------------------------


def resolve_user(rootfs: Path, user: str) -> dict[str, Any]:
    """The runtime-spec ``process.user`` for image ``User`` value ``user``.

    ``""`` is root. A numeric uid without a group takes the primary group of its
    ``/etc/passwd`` entry (``0`` without one); a name must be in ``/etc/passwd``, a group name
    in ``/etc/group``. Without an explicit group, ``additionalGids`` lists the groups whose
    member list names the user.

    :param rootfs: the container's mounted root; its account files are read inside it only.
    :raises InvalidArgument: a name that is not there, or an id out of range (both named).
    """
    user_part, has_group, group_part = (user or "0").partition(":")
    if has_group and not group_part:
        raise InvalidArgument(f"image User {user!r}: empty group")
    uid = _numeric(user_part, user)
    gid = _numeric(group_part, user) if has_group else None
    # The passwd entry gives a name's uid, a uid's primary group and the name whose
    # supplementary groups count; "uid:gid" needs none of that.
    entry = _find_passwd(rootfs, user_part, uid) if uid is None or not has_group else None
    if uid is None:
        if entry is None:
            raise InvalidArgument(
                f"image User {user!r}: no user {user_part!r} in the container's /etc/passwd"
            )
        uid = entry[1]
    if has_group:
        if gid is None:
            gid = _find_group_id(rootfs, group_part)
        if gid is None:
            raise InvalidArgument(
                f"image User {user!r}: no group {group_part!r} in the container's /etc/group"
            )
        return {"uid": uid, "gid": gid}
    result: dict[str, Any] = {"uid": uid, "gid": 0 if entry is None else entry[2]}
    extra = [] if entry is None else _member_groups(rootfs, entry[0])
    if extra:
        result["additionalGids"] = extra
    return result


def _numeric(text: str, user: str) -> int | None:
    """``text`` as an id if it is all digits, else ``None`` (a name)."""
    if not text.isascii() or not text.isdigit():
        if not text or ":" in text or "\x00" in text:
            raise InvalidArgument(f"image User {user!r}: empty or malformed")
        return None
    value = int(text)
    if value > _MAX_ID:
        raise InvalidArgument(f"image User {user!r}: id {value} out of range")
    return value


def _find_passwd(rootfs: Path, name: str, uid: int | None) -> tuple[str, int, int] | None:
    """The ``(name, uid, gid)`` of the first passwd entry with ``uid`` (if given) or ``name``."""
    for fields in _account_lines(rootfs, "etc/passwd"):
        if len(fields) < 4:
            continue
        entry_uid, entry_gid = _field_id(fields[2]), _field_id(fields[3])
        if entry_uid is None or entry_gid is None:
            continue
        if (uid is not None and entry_uid == uid) or (uid is None and fields[0] == name):
            return fields[0], entry_uid, entry_gid
    return None


def _find_group_id(rootfs: Path, name: str) -> int | None:
    for fields in _account_lines(rootfs, "etc/group"):
        if len(fields) >= 3 and fields[0] == name:
            gid = _field_id(fields[2])
            if gid is not None:
                return gid
    return None


def _member_groups(rootfs: Path, user: str) -> list[int]:
    gids: list[int] = []
    for fields in _account_lines(rootfs, "etc/group"):
        if len(fields) >= 4 and user in fields[3].split(","):
            gid = _field_id(fields[2])
            if gid is not None and gid not in gids:
                gids.append(gid)
    return gids


def _field_id(text: str) -> int | None:
    if not text.isascii() or not text.isdigit() or int(text) > _MAX_ID:
        return None
    return int(text)


def _account_lines(rootfs: Path, path: str) -> Iterator[list[str]]:
    """The ``:``-separated fields of each entry of account file ``path`` inside ``rootfs``.

    A file that is missing, or is no regular file, has no entries. Comments and blank lines
    are skipped.

    :raises LimitExceeded: the file is larger than :data:`MAX_ACCOUNT_FILE`.
    """
    fd = _open_in_root(rootfs, path)
    if fd is None:
        return
    with open(fd, "rb", closefd=True) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return
        total = 0
        while line := f.readline(MAX_ACCOUNT_FILE - total + 1):
            total += len(line)
            if total > MAX_ACCOUNT_FILE:
                raise LimitExceeded(
                    f"the container's /{path}: larger than {MAX_ACCOUNT_FILE} bytes"
                )
            text = line.decode("utf-8", errors="replace").strip()
            if text and not text.startswith("#"):
                yield text.split(":")


def _open_in_root(rootfs: Path, path: str) -> int | None:
    """Open ``path`` for reading inside ``rootfs``, symlinks resolved within it; ``None`` if
    it does not exist there.

    ``O_NONBLOCK``: a FIFO planted at ``/etc/passwd`` must not hang the open.
    """
    what = f"the container's /{path}"
    with map_os_errors(f"open {what}"):
        if _paths.openat2_available():
            with _syscalls.closing_fd(os.open(rootfs, os.O_PATH | os.O_DIRECTORY)) as root_fd:
                try:
                    return _paths.openat2(root_fd, path, _OPEN_ACCOUNT, resolve=_RESOLVE)
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                        return None
                    raise
        # Before openat2 (Linux 5.6): the extractor's walk, which resolves directories the
        # same way, and the last component's symlinks resolved here, both within the root.
        tree = Tree(rootfs)
        wanted = clean_name(os.fsencode(path))
        try:
            for _ in range(_MAX_LINKS):
                parent, _, name = wanted.rpartition(b"/")
                found = tree.lookup(parent)
                if found is None or not name:
                    return None
                try:
                    return os.open(name, _OPEN_ACCOUNT | os.O_NOFOLLOW, dir_fd=found[0])
                except OSError as exc:
                    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                        return None
                    if exc.errno != errno.ELOOP:
                        raise
                target = os.readlink(name, dir_fd=found[0])
                wanted = clean_name(target if target.startswith(b"/") else parent + b"/" + target)
            return None
        except InvalidArgument:
            return None  # a symlink loop on the way
        finally:
            tree.close()
