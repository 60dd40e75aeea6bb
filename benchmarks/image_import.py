"""Importing one multi-layer OCI image into an empty store: laminae against the peers.

Shared by ``overlay.py`` and ``btrfs.py``. Every run starts from nothing on the benchmark's
filesystem (the previous run's store is deleted) with the page cache dropped, and imports the
same image layout, which sits on that filesystem too:

- **laminae**: ``laminae_once.py import`` in a fresh process: ``open_store`` on an empty root
  with the driver under test, then ``store.import_image("oci:LAYOUT:TAG")``, the product's
  own import (manifest, config and every blob verified, layers fetched, decompressed and
  applied in parallel, every DiffID checked, the image committed with its layers). Timed as
  a whole process, start-up and imports included, as the peers' processes are; laminae makes
  every layer durable (``syncfs``) before it commits it.
- **skopeo**: ``skopeo copy oci:LAYOUT:TAG containers-storage:[DRIVER@ROOT+RUNROOT]NAME``,
  which stages the blobs, then applies every layer into the driver's storage (containers-
  storage does not sync).
- **ctr**: ``ctr images import --snapshotter NAME`` of an OCI archive (a tar of the same
  layout), which unpacks by default: containerd copies the blobs into its content store, then
  applies every layer into a snapshot of the snapshotter. Its daemon, fresh for the run, is
  started before the clock.

After every tool, the writing it left to the filesystem is timed and added to its total
(``sync -f``). On btrfs the check then waits for the cleaner (``btrfs subvolume sync``) to free
the subvolumes the tool deleted (containerd's btrfs snapshotter deletes every active snapshot
it commits); that wait is kept in the JSON, not counted: the cleaner starts on btrfs's commit
timer. It is waited for because, on this kernel, reading containerd's fresh snapshot while the
cleaner worked returned ENOENT for names ``readdir`` had just listed; once it was done, the
tree was exact.

The same tools pull from a registry (``image_pull.py``): :func:`laminae_tool`,
:func:`skopeo_tool` and :func:`ctr_tool` take the command line that differs.

After each run, outside the clock, the imported image is mounted the tool's own way (laminae:
``store.mount`` of the top layer; skopeo: ``podman image mount``; ctr: a view of the top
snapshot, mounted as containerd describes it) and every file of it is compared with what the
image must hold. A run whose tree is wrong counts as failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from layer_tars import MIB, TreeSummary, summarize_tree
from measure import run_measured
from oci_image import OciImage, write_benchmark_image, write_oci_archive
from peers import Containerd, Podman, mount_described, skopeo_copy
from report import Run, Spread, fmt, mib, ratio, run_rounds, verdict
from rich.console import Console
from rich.table import Table
from scratch_fs import drop_caches, remove_tree, unmount_under

__all__ = [
    "ImportTool",
    "ctr_import",
    "ctr_tool",
    "image_json",
    "import_tables",
    "import_tools",
    "laminae_import",
    "laminae_tool",
    "run_import_case",
    "run_tools",
    "skopeo_import",
    "skopeo_tool",
    "write_case_image",
]

HERE = Path(__file__).resolve().parent
LAMINAE_ONCE = HERE / "laminae_once.py"


@attrs.frozen
class ImportTool:
    """A tool that imports an image, and how to run it once on a filesystem."""

    name: str
    role: str
    """``laminae``, ``peer`` (a target compares laminae with it) or ``reference`` (shown for
    what it tells, no target)."""
    run: Callable[[Path, OciImage, int], Run]

    @property
    def peer(self) -> bool:
        return self.role == "peer"


def _settle(mnt: Path) -> tuple[float, float | None, str | None]:
    """What a tool left for the filesystem: ``sync -f`` (timed: it counts), then on btrfs
    ``btrfs subvolume sync`` (timed, not counted: the cleaner starts on btrfs's commit timer,
    up to 30 s later, so the wait says more about the timer than about the tool). Returns
    both times and an error, if any."""
    done = run_measured(["sync", "-f", str(mnt)])
    if done.returncode != 0:
        return done.seconds, None, done.failure("sync -f")
    fstype = subprocess.run(
        ["stat", "-f", "-c", "%T", str(mnt)], capture_output=True, text=True, check=True
    ).stdout.strip()
    if fstype != "btrfs":
        return done.seconds, None, None
    cleaner = run_measured(["btrfs", "subvolume", "sync", str(mnt)])
    error = cleaner.failure("btrfs subvolume sync") if cleaner.returncode else None
    return done.seconds, cleaner.seconds, error


def _check(expected: TreeSummary, read: Callable[[], TreeSummary]) -> str | None:
    try:
        found = read()
    except Exception as exc:  # a broken check must not hide the other runs' numbers
        where = getattr(exc, "filename", None)
        return f"checking the imported image failed: {exc!r}" + (f" ({where})" if where else "")
    if found == expected:
        return None
    return f"imported tree differs: expected {expected}, found {found}"


def _laminae_tree(root: Path, runroot: Path, driver: str, top: str) -> TreeSummary:
    import laminae  # only here: the parent needs laminae to check results, not to time them

    with laminae.open_store(root, runroot=runroot, driver=driver) as store:
        path = store.mount(top, readonly=True)
        try:
            return summarize_tree(path)
        finally:
            store.unmount(top)


def laminae_tool(
    name: str,
    driver: str,
    command: Callable[[OciImage], list[str]],
    *,
    unavailable: str | None = None,
) -> ImportTool:
    """laminae in a fresh process: ``laminae_once.py SUBCOMMAND ROOT RUNROOT DRIVER ARGS...``
    where ``command(image)`` gives ``[SUBCOMMAND, *ARGS]``; ``unavailable`` (why the driver
    cannot run) makes every run a failure with that reason, without starting anything."""

    def run(mnt: Path, image: OciImage, round_: int) -> Run:
        if unavailable is not None:
            return Run(name, round_, None, error=unavailable)
        root, runroot = mnt / "laminae-store", mnt / "laminae-run"
        subcommand, *args = command(image)
        argv = [sys.executable, str(LAMINAE_ONCE), subcommand, str(root), str(runroot), driver]
        try:
            drop_caches()
            measured = run_measured([*argv, *args])
            if measured.returncode != 0:
                failure = measured.failure(f"laminae_once.py {subcommand}")
                return Run(name, round_, None, maxrss_kib=measured.maxrss_kib, error=failure)
            settle, cleaner, settle_error = _settle(mnt)
            report = json.loads(measured.stdout)
            error = settle_error or _check(
                image.tree, lambda: _laminae_tree(root, runroot, driver, report["top_layer"])
            )
            detail = {
                k: report[k] for k in ("seconds", "open_seconds", "image", "names", "top_layer")
            }
            return Run(
                name,
                round_,
                measured.seconds,
                sync_seconds=settle,
                maxrss_kib=measured.maxrss_kib,
                error=error,
                detail={"in_process": detail, "cleaner_seconds": cleaner},
            )
        finally:
            unmount_under(runroot)
            unmount_under(root)
            remove_tree(root)
            remove_tree(runroot)

    return ImportTool(name, "laminae", run)


def laminae_import(driver: str, *, unavailable: str | None = None) -> ImportTool:
    """laminae's ``store.import_image("oci:LAYOUT:TAG")`` with ``driver``."""
    return laminae_tool(
        f"laminae {driver}",
        driver,
        lambda image: ["import", str(image.layout), image.tag],
        unavailable=unavailable,
    )


def skopeo_tool(
    name: str, driver: str, source: Callable[[OciImage], str], flags: Sequence[str] = ()
) -> ImportTool:
    """``skopeo copy FLAGS SOURCE containers-storage:[DRIVER@ROOT+RUNROOT]NAME`` where
    ``source(image)`` gives SOURCE."""

    def run(mnt: Path, image: OciImage, round_: int) -> Run:
        base = mnt / "containers-storage"
        root, runroot, scratch = base / "root", base / "run", base / "scratch"
        target = f"localhost/{image.tag}:latest"
        try:
            scratch.mkdir(parents=True)
            drop_caches()
            measured = skopeo_copy(source(image), driver, root, runroot, target, scratch, flags)
            settle, cleaner, error = _settle(mnt)
            if measured.returncode != 0 or error:
                error = measured.failure("skopeo copy") if measured.returncode else error
                return Run(name, round_, None, maxrss_kib=measured.maxrss_kib, error=error)
            podman = Podman(driver, root, runroot, scratch)

            def read() -> TreeSummary:
                with podman.image_mounted(target) as path:
                    return summarize_tree(path)

            return Run(
                name,
                round_,
                measured.seconds,
                sync_seconds=settle,
                maxrss_kib=measured.maxrss_kib,
                error=_check(image.tree, read),
                detail={"cleaner_seconds": cleaner},
            )
        finally:
            unmount_under(base)
            remove_tree(base)

    return ImportTool(name, "peer", run)


def skopeo_import(driver: str) -> ImportTool:
    """``skopeo copy oci:LAYOUT:TAG`` into containers-storage with ``driver``."""
    return skopeo_tool(f"skopeo -> c/storage {driver}", driver, lambda image: image.reference)


def ctr_tool(
    name: str,
    snapshotter: str,
    args: Callable[[OciImage], list[str]],
    listed_as: Callable[[OciImage], str],
    *,
    unpack: bool = True,
) -> ImportTool:
    """``ctr ARGS...`` against a fresh private containerd, where ``args(image)`` gives ARGS
    and ``listed_as(image)`` the name the image gets in ``ctr images ls``.

    :param unpack: whether the command unpacks into ``snapshotter``: then the top snapshot is
        checked file by file; else that the image is listed and no snapshot exists (a
        reference row: how containerd's time splits between content and unpacking).
    """

    def run(mnt: Path, image: OciImage, round_: int) -> Run:
        view = mnt / "containerd-view"
        with Containerd(mnt / "containerd") as daemon:
            drop_caches()
            measured = daemon.ctr_measured(*args(image))
            settle, cleaner, error = _settle(mnt)
            detail: dict[str, Any] = {
                "cleaner_seconds": cleaner,
                "daemon_peak_rss_kib": daemon.peak_rss_kib(),
                "ctr_output": measured.stdout.strip()[-300:],
            }
            if measured.returncode != 0 or error:
                error = measured.failure(f"ctr {args(image)[0]}") if measured.returncode else error
                return Run(name, round_, None, maxrss_kib=measured.maxrss_kib, error=error)

            if not unpack:
                listed = daemon.ctr("images", "ls", "--quiet").split()
                snapshots = daemon.ctr("snapshots", "--snapshotter", snapshotter, "ls")
                if listed_as(image) not in listed or len(snapshots.splitlines()) > 1:
                    error = f"expected the image and no snapshots: {listed}, {snapshots[:200]}"
                return Run(
                    name,
                    round_,
                    None if error else measured.seconds,
                    sync_seconds=settle,
                    maxrss_kib=measured.maxrss_kib,
                    error=error,
                    detail=detail,
                )

            def read() -> TreeSummary:
                top = _chain_id([layer.diff_id for layer in image.layers])
                mounts = daemon.view_mounts(snapshotter, f"check-{round_}", top)
                view.mkdir(exist_ok=True)
                mount_described(mounts, view)
                try:
                    return summarize_tree(view)
                finally:
                    unmount_under(view)
                    view.rmdir()

            return Run(
                name,
                round_,
                measured.seconds,
                sync_seconds=settle,
                maxrss_kib=measured.maxrss_kib,
                error=_check(image.tree, read),
                detail=detail,
            )

    return ImportTool(name, "peer" if unpack else "reference", run)


def ctr_import(snapshotter: str, archive: Path, *, unpack: bool = True) -> ImportTool:
    """``ctr images import --snapshotter SNAPSHOTTER ARCHIVE`` (which unpacks).

    :param archive: the image as an OCI archive (:func:`oci_image.write_oci_archive`).
    :param unpack: ``False`` adds ``--no-unpack``: the blobs go into the content store and
        nothing into the snapshotter; a reference for how containerd's time splits.
    """
    name = f"ctr import -> containerd {snapshotter}"
    if not unpack:
        name = "ctr import --no-unpack (content store only)"

    def args(image: OciImage) -> list[str]:
        return [
            "images", "import", "--snapshotter", snapshotter,
            "--base-name", f"localhost/{image.tag}",
            *([] if unpack else ["--no-unpack"]), str(archive),
        ]  # fmt: skip

    return ctr_tool(
        name, snapshotter, args, lambda image: f"localhost/{image.tag}:{image.tag}", unpack=unpack
    )


def _chain_id(diff_ids: Sequence[str]) -> str:
    import hashlib

    current = diff_ids[0]
    for diff_id in diff_ids[1:]:
        current = "sha256:" + hashlib.sha256(f"{current} {diff_id}".encode()).hexdigest()
    return current


def write_case_image(
    console: Console, directory: Path, scale: float, *, tag: str = "bench"
) -> tuple[OciImage, Path]:
    """Write the benchmark image (``write_benchmark_image``) at ``directory/TAG`` and its OCI
    archive next to it, and say what they hold; the image and the archive."""
    start = time.perf_counter()
    image = write_benchmark_image(directory / tag, scale=scale, tag=tag)
    archive = write_oci_archive(image, directory / f"{tag}.oci.tar")
    console.print(f"  {image.describe()}; written in {time.perf_counter() - start:.1f} s")
    for layer in image.layers:
        console.print(
            f"    {layer.tar_size / MIB:8.1f} MiB tar, {layer.size / MIB:7.1f} MiB gzip, "
            f"{layer.entries:7,} entries: {layer.description}"
        )
    return image, archive


def import_tools(
    driver: str, unavailable: str | None, snapshotter: str, storage_driver: str, archive: Path
) -> list[ImportTool]:
    """laminae, skopeo and ctr importing the image (and ctr's ``--no-unpack`` reference)."""
    return [
        laminae_import(driver, unavailable=unavailable),
        skopeo_import(storage_driver),
        ctr_import(snapshotter, archive),
        ctr_import(snapshotter, archive, unpack=False),
    ]


def run_tools(
    console: Console, mnt: Path, image: OciImage, tools: Sequence[ImportTool], repeat: int
) -> list[Run]:
    """Every tool ``repeat`` times on ``image``, the order rotating from round to round."""
    by_name = {t.name: t for t in tools}
    return run_rounds(
        console, list(by_name), repeat, lambda name, i: by_name[name].run(mnt, image, i)
    )


def run_import_case(
    console: Console,
    mnt: Path,
    scale: float,
    repeat: int,
    driver: str,
    unavailable: str | None,
    snapshotter: str,
    storage_driver: str,
) -> tuple[OciImage, list[ImportTool], list[Run]]:
    """Write the image, then run every tool ``repeat`` times; the image, the tools, the runs."""
    console.print("[bold]import[/]: writing the image")
    image, archive = write_case_image(console, mnt / "images", scale)
    tools = import_tools(driver, unavailable, snapshotter, storage_driver, archive)
    return image, tools, run_tools(console, mnt, image, tools, repeat)


def image_json(image: OciImage) -> dict[str, Any]:
    return {
        "description": image.describe(),
        "manifest_digest": image.manifest_digest,
        "layers": [attrs.asdict(layer) for layer in image.layers],
        "tree": attrs.asdict(image.tree),
        "tar_bytes": image.tar_bytes,
        "compressed_bytes": image.compressed_bytes,
    }


def _rss(runs: Sequence[Run], tool: str) -> str:
    values = [r.maxrss_kib for r in runs if r.tool == tool and r.maxrss_kib is not None]
    text = fmt(mib(max(values)) if values else None, ".1f")
    daemon = [
        r.detail["daemon_peak_rss_kib"]
        for r in runs
        if r.tool == tool and r.detail.get("daemon_peak_rss_kib")
    ]
    if daemon:
        text = f"ctr {text}, daemon {mib(max(daemon)):.1f}"
    return text


def import_tables(
    title: str, image: OciImage, tools: Sequence[ImportTool], runs: Sequence[Run]
) -> tuple[Table, Table, dict[str, Any]]:
    """The times table, the targets table (laminae faster than each peer) and their JSON."""
    times = Table(
        title=f"{title}: {image.describe()}; wall time over {_rounds(runs)} run(s), caches cold",
        caption="laminae: the whole process (start-up, imports, open_store, import, syncfs per "
        "layer); peers: their command; for all, the sync -f after it is included",
    )
    for column in ("tool", "median s", "min s", "max s", "of which sync s", "peak RSS MiB"):
        times.add_column(column, justify="left" if column == "tool" else "right")
    times.add_column("failed runs", justify="right")
    summary: dict[str, Any] = {}
    for tool in tools:
        spread = Run.spread(runs, tool.name)
        sync = Spread.of(
            [
                r.sync_seconds
                for r in runs
                if r.tool == tool.name and r.sync_seconds is not None and not r.error
            ]
        )
        failures = Run.failures(runs, tool.name)
        times.add_row(
            tool.name,
            fmt(spread.median if spread else None, ".2f"),
            fmt(spread.low if spread else None, ".2f"),
            fmt(spread.high if spread else None, ".2f"),
            fmt(sync.median if sync else None, ".2f"),
            _rss(runs, tool.name),
            str(len(failures)) + (f": {failures[0][:70]}" if failures else ""),
        )
        summary[tool.name] = {
            "spread": None if spread is None else attrs.asdict(spread),
            "sync_median": None if sync is None else sync.median,
            "failures": failures,
        }
        if tool.role == "laminae":
            inner = Spread.of(
                [
                    r.detail["in_process"]["seconds"]
                    for r in runs
                    if r.tool == tool.name and not r.error
                ]
            )
            times.add_row(
                "  of which the store call (in process)",
                fmt(inner.median if inner else None, ".2f"),
                fmt(inner.low if inner else None, ".2f"),
                fmt(inner.high if inner else None, ".2f"),
                "",
                "",
                "",
            )
            summary[tool.name]["import_calls"] = None if inner is None else attrs.asdict(inner)
    targets = Table(title=f"{title}: target: laminae faster than each peer (median / median)")
    for column in (
        "laminae",
        "peer",
        "laminae / peer",
        "faster",
        "fastest / fastest",
        "vs peer without sync",
    ):
        targets.add_column(column, justify="left" if column in ("laminae", "peer") else "right")
    mine = [t for t in tools if t.role == "laminae"]
    summary["targets"] = []
    for lam in mine:
        ours = Run.spread(runs, lam.name)
        for peer in (t for t in tools if t.peer):
            theirs = Run.spread(runs, peer.name)
            r = ratio(ours, theirs)
            met = None if r is None else r < 1.0
            no_sync = ratio(ours, Run.spread(runs, peer.name, total=False))
            targets.add_row(
                lam.name,
                peer.name,
                fmt(r, ".2f", "x"),
                verdict(met),
                fmt(ratio(ours, theirs, best=True), ".2f", "x"),
                fmt(no_sync, ".2f", "x"),
            )
            summary["targets"].append(
                {"laminae": lam.name, "peer": peer.name, "ratio": r, "met": met}
            )
    return times, targets, summary


def _rounds(runs: Sequence[Run]) -> int:
    return len({r.round for r in runs})
