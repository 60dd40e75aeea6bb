"""The measured laminae processes: one operation on a store (or one kernel mount), timed
inside a fresh process started by a benchmark, the result printed as JSON on stdout.

A fresh process per measurement keeps laminae's in-memory state from one run out of the next
and lets the parent read this process's own peak RSS with ``wait4``. Every subcommand prints
``seconds``: the operation alone, interpreter start-up, imports and ``open_store`` excluded
(the parent has the whole process's time too).

Subcommands::

    import  ROOT RUNROOT DRIVER LAYOUT TAG [JOBS]  store.import_image("oci:LAYOUT:TAG")
    pull    ROOT RUNROOT DRIVER REFERENCE [JOBS]   store.pull(REFERENCE), its registry insecure
    mount   ROOT RUNROOT DRIVER KEY WARM        store.mount(KEY) cold, then WARM more cycles
    changes ROOT RUNROOT DRIVER KEY MODE OUT    changes + export of KEY: MODE native or naive
    create  ROOT RUNROOT DRIVER PARENT KEY      store.create_layer(KEY, parent=PARENT)
    kernel  TECHNIQUE HOME DEPTH TARGET WARM    an overlay mount of a stack, cold, then WARM more

``import`` and ``pull`` are the product's own calls (``Store.import_image`` and
``Store.pull``: resolve, verify, fetch, apply layers in parallel, commit), with ``jobs`` at
its default unless JOBS is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import laminae
from laminae import driverkit
from laminae.kernel import _mounts

PAGE = 4096


# -- import and pull ------------------------------------------------------------------------


def _jobs(rest: tuple[str, ...]) -> int | None:
    return int(rest[0]) if rest and rest[0] else None


def _image_report(image: laminae.Image, seconds: float, opened: float) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "open_seconds": opened,
        "image": image.id,
        "names": list(image.names),
        "top_layer": image.top_layer,
    }


def run_import(
    root: str, runroot: str, driver: str, layout: str, tag: str, *rest: str
) -> dict[str, Any]:
    """``store.import_image("oci:LAYOUT:TAG")``, the product's own import."""
    start = time.perf_counter()
    with laminae.open_store(root, runroot=runroot, driver=driver) as store:
        opened = time.perf_counter()
        image = store.import_image(f"oci:{layout}:{tag}", jobs=_jobs(rest))
        seconds = time.perf_counter() - opened
    return _image_report(image, seconds, opened - start)


def run_pull(root: str, runroot: str, driver: str, reference: str, *rest: str) -> dict[str, Any]:
    """``store.pull(REFERENCE)`` over plain HTTP: the reference's registry is made insecure
    (the benchmark's registry on 127.0.0.1 has no TLS)."""
    host = reference.removeprefix("docker://").partition("/")[0]
    options = laminae.RegistryOptions(insecure_hosts=frozenset({host}))
    start = time.perf_counter()
    with laminae.open_store(root, runroot=runroot, driver=driver) as store:
        opened = time.perf_counter()
        image = store.pull(reference, registry=options, jobs=_jobs(rest))
        seconds = time.perf_counter() - opened
    return _image_report(image, seconds, opened - start)


# -- mount -----------------------------------------------------------------------------------


def _entries(path: Path) -> int:
    return sum(len(dirs) + len(files) for _, dirs, files in os.walk(path))


def run_mount(root: str, runroot: str, driver: str, key: str, warm: str) -> dict[str, Any]:
    with laminae.open_store(root, runroot=runroot, driver=driver) as store:
        start = time.perf_counter()
        path = store.mount(key)
        seconds = time.perf_counter() - start
        entries = _entries(path)
        start = time.perf_counter()
        store.unmount(key)
        unmount_seconds = time.perf_counter() - start
        warm_seconds = []
        for _ in range(int(warm)):
            start = time.perf_counter()
            store.mount(key)
            warm_seconds.append(time.perf_counter() - start)
            store.unmount(key)
    return {
        "seconds": seconds,
        "unmount_seconds": unmount_seconds,
        "warm_seconds": warm_seconds,
        "entries": entries,
    }


# -- changes + export ------------------------------------------------------------------------


def run_changes(
    root: str, runroot: str, driver: str, key: str, mode: str, out: str
) -> dict[str, Any]:
    """``native``: ``store.changes`` then ``store.diff``, what a user calls (with a driver that
    declares CHANGES, both walk the upper dir only). ``naive``: the parent and the layer
    materialized through read-only mounts, one ``naive_changes`` walk of both trees, and
    ``write_changes_tar`` of its result: the generic path, walking once where the store would
    walk twice (once for ``changes``, once for ``diff``), so the baseline is if anything fast.
    """
    with laminae.open_store(root, runroot=runroot, driver=driver) as store:
        native = laminae.Feature.CHANGES in store.capabilities.features
        parent = store.layer(key).parent
        start = time.perf_counter()
        with open(out, "wb") as sink:
            if mode == "native":
                changes = store.changes(key)
                store.diff(key, sink)
            elif mode == "naive":
                if parent is None:
                    raise laminae.InvalidArgument(f"layer {key!r} has no parent")
                parent_root = store.mount(parent, readonly=True)
                try:
                    layer_root = store.mount(key, readonly=True)
                    try:
                        changes = list(driverkit.naive_changes(parent_root, layer_root))
                        driverkit.write_changes_tar(layer_root, changes, sink)
                    finally:
                        store.unmount(key)
                finally:
                    store.unmount(parent)
            else:
                raise laminae.InvalidArgument(f"mode {mode!r}: native or naive")
        seconds = time.perf_counter() - start
    data = Path(out).read_bytes()
    return {
        "seconds": seconds,
        "driver_declares_changes": native,
        "changes": [f"{c.kind.value} {c.path}" for c in changes],
        "tar_bytes": len(data),
        "tar_sha256": hashlib.sha256(data).hexdigest(),
    }


# -- create ----------------------------------------------------------------------------------


def run_create(root: str, runroot: str, driver: str, parent: str, key: str) -> dict[str, Any]:
    with laminae.open_store(root, runroot=runroot, driver=driver) as store:
        start = time.perf_counter()
        store.create_layer(key, parent=parent)
        seconds = time.perf_counter() - start
        start = time.perf_counter()
        store.remove_layer(key)
        remove_seconds = time.perf_counter() - start
    return {"seconds": seconds, "remove_seconds": remove_seconds}


# -- kernel techniques -----------------------------------------------------------------------


def _stack(home: Path, depth: int) -> tuple[list[str], list[str]]:
    """The prepared stack's lower dirs (``N/fs``, uppermost first) and their ``l/`` links."""
    links: list[str] = json.loads((home / "links.json").read_text())
    numbers = range(depth, 0, -1)
    return [f"{n}/fs" for n in numbers], [links[n - 1] for n in numbers]


class DoesNotFit(Exception):
    """The mount data is longer than mount(2) takes: what the peers check before calling it
    (Moby: "mount label too large", containerd: "mount options is too long")."""

    def __init__(self, data_bytes: int) -> None:
        super().__init__(f"mount data longer than a page ({PAGE:,} B)")
        self.data_bytes = data_bytes


def _classic(target: str, data: str) -> None:
    if len(data) >= PAGE:  # the page holds the terminating NUL too
        raise DoesNotFit(len(data))
    _mounts.mount("overlay", target, "overlay", 0, data)


def _kernel_lowerdir_plus(home: Path, depth: int, target: str) -> int:
    lowers, _ = _stack(home, depth)
    _mounts.mount_overlay(
        target,
        [str(home / lower) for lower in lowers],
        str(home / "upper/fs"),
        str(home / "upper/work"),
    )
    return 0


def _kernel_absolute(home: Path, depth: int, target: str) -> int:
    lowers, _ = _stack(home, depth)
    data = "lowerdir={},upperdir={},workdir={}".format(
        ":".join(str(home / lower) for lower in lowers), home / "upper/fs", home / "upper/work"
    )
    _classic(target, data)
    return len(data)


def _kernel_short_links(home: Path, depth: int, target: str) -> int:
    _, links = _stack(home, depth)
    os.chdir(home)
    data = "lowerdir={},upperdir=upper/fs,workdir=upper/work".format(":".join(links))
    _classic(target, data)
    return len(data)


def _kernel_relative(home: Path, depth: int, target: str) -> int:
    lowers, _ = _stack(home, depth)
    os.chdir(home)
    data = "lowerdir={},upperdir=upper/fs,workdir=upper/work".format(":".join(lowers))
    _classic(target, data)
    return len(data)


def _kernel_fds(home: Path, depth: int, target: str) -> int:
    lowers, _ = _stack(home, depth)
    fds = [os.open(home / lower, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) for lower in lowers]
    try:
        os.chdir("/proc/self/fd")
        data = "lowerdir={},upperdir={},workdir={}".format(
            ":".join(map(str, fds)), home / "upper/fs", home / "upper/work"
        )
        _classic(target, data)
    finally:
        for fd in fds:
            os.close(fd)
    return len(data)


KERNEL_TECHNIQUES: dict[str, Callable[[Path, int, str], int]] = {
    "lowerdir+": _kernel_lowerdir_plus,
    "absolute": _kernel_absolute,
    "short-links": _kernel_short_links,
    "relative": _kernel_relative,
    "proc-fds": _kernel_fds,
}


def run_kernel(technique: str, home: str, depth: str, target: str, warm: str) -> dict[str, Any]:
    """One mount with ``technique`` (cold), then ``warm`` more mount + unmount cycles; a mount
    that cannot be made is reported, not raised."""
    mount = KERNEL_TECHNIQUES[technique]
    here = os.getcwd()
    times = []
    for _ in range(1 + int(warm)):
        start = time.perf_counter()
        try:
            data_bytes = mount(Path(home), int(depth), target)
        except DoesNotFit as exc:
            return {"seconds": None, "error": str(exc), "data_bytes": exc.data_bytes}
        except OSError as exc:
            return {"seconds": None, "error": f"mount: {exc}", "data_bytes": None}
        times.append(time.perf_counter() - start)
        os.chdir(here)
        try:
            entries = len(os.listdir(Path(target) / "stack"))
        finally:
            _mounts.umount(target)
    return {
        "seconds": times[0],
        "warm_seconds": times[1:],
        "data_bytes": data_bytes,
        "entries": entries,
    }


COMMANDS: dict[str, Callable[..., dict[str, Any]]] = {
    "import": run_import,
    "pull": run_pull,
    "mount": run_mount,
    "changes": run_changes,
    "create": run_create,
    "kernel": run_kernel,
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        return 2
    json.dump(COMMANDS[argv[0]](*argv[1:]), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
