"""Containers (issue 6): laminae's create + mount + unmount and commit against buildah's.

Two cases on each of two images, in one run, on one fresh loop-mounted ext4:

- ``cycle``: a container created on the image, mounted and unmounted: laminae's
  ``store.create_container`` + ``store.mount_container`` + ``store.unmount_container``
  against ``buildah from --pull-never`` + ``buildah mount`` + ``buildah umount`` (Podman's
  containers-storage, overlay driver);
- ``commit``: one file written into a mounted container, then ``store.commit_container(c,
  "bench:commit")`` against ``buildah commit CTR bench:commit``.

The images: the shipped example image (``examples/images/hello-image.oci.tar``, ref
``hello``) and the benchmark image of ``oci_image.py`` at the scale that makes it about
100,000 files (``--large-scale``, default 2.7: 100,155 files). Each is taken into both stores
once, outside the clock (``Store.import_image``; ``buildah pull``).

laminae is measured three ways: the API calls timed inside a fresh Python process (the
issue's target), the same process timed whole (interpreter start-up, ``import laminae`` and
``open_store`` included), and the CLI (``laminae container create``/``mount``/``unmount``,
``container commit``), one process per command as buildah is.

Every measurement starts after ``sync`` and ``drop_caches`` (cold) and is then repeated at
once without dropping them (warm); the tools' order rotates from round to round; the tool's
``sync -f`` of the filesystem is timed after it and added. Containers and committed images are
removed between runs, outside the clock.

Run as root: ``.venv/bin/python benchmarks/containers.py [--images hello,files100k]
[--cases cycle,commit] [--repeat 5] [--large-scale 2.7] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from measure import Measured, run_measured
from oci_image import write_benchmark_image
from peers import ensure_installed, private_host_paths
from report import REPO, Run, Spread, finish, first_line, fmt, machine, mib, ratio, verdict
from report import console as make_console
from rich.console import Console
from rich.table import Table
from scratch_fs import (
    GIB,
    drop_caches,
    enter_private_mount_namespace,
    require_root,
    scratch_filesystem,
)

import laminae

CASES = ("cycle", "commit")
IMAGES = ("hello", "files100k")
TOOLS = ("laminae", "laminae-cli", "buildah")
EXAMPLE_IMAGE = REPO / "examples" / "images" / "hello-image.oci.tar"
COMMIT_NAME = "bench:commit"
CHANGED_FILE = "bench-commit.txt"
CHANGED_CONTENT = b"one file changed in the container\n" * 128
"""The one-file change committed: 4,352 bytes."""
DRIVER = "overlay"

_ONCE = """
import json, os, sys, time
start = time.perf_counter()
import laminae
imported = time.perf_counter()
case, root, runroot, driver, ref, *rest = sys.argv[1:]
with laminae.open_store(root, runroot=runroot, driver=driver) as store:
    opened = time.perf_counter()
    if case == "cycle":
        t0 = time.perf_counter()
        container = store.create_container(ref)
        t1 = time.perf_counter()
        path = store.mount_container(container.id)
        t2 = time.perf_counter()
        entries = len(os.listdir(path))
        t3 = time.perf_counter()
        store.unmount_container(container.id)
        t4 = time.perf_counter()
        report = {
            "seconds": (t2 - t0) + (t4 - t3),
            "create_seconds": t1 - t0,
            "mount_seconds": t2 - t1,
            "unmount_seconds": t4 - t3,
            "container": container.id,
            "entries": entries,
        }
    else:
        t0 = time.perf_counter()
        image = store.commit_container(ref, rest[0])
        report = {"seconds": time.perf_counter() - t0, "image": image.id}
    closing = time.perf_counter()
report["import_seconds"] = imported - start
report["open_seconds"] = opened - imported
report["close_seconds"] = time.perf_counter() - closing
print(json.dumps(report))
"""
"""The measured laminae process: what a user's script does, and nothing else (no benchmark
module, no rich), so that its whole-process time is laminae's. ``cycle ROOT RUNROOT DRIVER
IMAGE`` or ``commit ROOT RUNROOT DRIVER CONTAINER NAME``; JSON on stdout. Listing the mounted
root (to check that it shows the image) is outside the clock."""


def _sync(path: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["sync", "-f", str(path)], check=True)
    return time.perf_counter() - start


class Failed(Exception):
    """A measured command failed or gave a wrong result: the run counts as failed."""


# -- laminae ---------------------------------------------------------------------------------


@attrs.frozen
class LaminaeSide:
    """A laminae store on the scratch filesystem, driven through the API and the CLI."""

    root: Path
    runroot: Path
    config: Path
    """A ``storage.toml`` naming the same store, so that no host configuration applies."""

    @classmethod
    def create(cls, base: Path) -> LaminaeSide:
        base.mkdir(parents=True)
        side = cls(base / "root", base / "run", base / "storage.toml")
        side.config.write_text(
            f'[storage]\ndriver = "{DRIVER}"\n'
            f'graphroot = "{side.root}"\nrunroot = "{side.runroot}"\n'
        )
        return side

    @contextlib.contextmanager
    def store(self) -> Iterator[laminae.Store]:
        with laminae.open_store(self.root, runroot=self.runroot, driver=DRIVER) as store:
            yield store

    def import_image(self, source: str) -> tuple[str, int, int]:
        """Import ``source`` (outside the clock); the image's id, its number of layers and of
        entries in its root."""
        with self.store() as store:
            image = store.import_image(source)
            layers = len(store.image_layers(image.id))
            assert image.top_layer is not None
            entries = len(os.listdir(store.mount(image.top_layer, readonly=True)))
            store.unmount(image.top_layer)
        return image.id, layers, entries

    def once(self, case: str, ref: str, *rest: str) -> tuple[Measured, dict[str, Any]]:
        argv = [sys.executable, "-c", _ONCE, case, str(self.root), str(self.runroot), DRIVER]
        measured = run_measured([*argv, ref, *rest])
        if measured.returncode != 0:
            raise Failed(measured.failure(f"laminae {case}"))
        report: dict[str, Any] = json.loads(measured.stdout)
        return measured, report

    def cli(self, *args: str) -> Measured:
        """One ``laminae`` CLI command on this store, measured. :raises Failed: it failed."""
        command = shutil.which("laminae", path=str(Path(sys.executable).parent)) or "laminae"
        argv = [command, "--root", str(self.root), "--runroot", str(self.runroot)]
        env = dict(os.environ, LAMINAE_CONFIG=str(self.config))
        measured = run_measured([*argv, "--driver", DRIVER, *args], env=env)
        if measured.returncode != 0:
            raise Failed(measured.failure(f"laminae {' '.join(args[:2])}"))
        return measured

    def prepare_commit(self, image: str) -> str:
        """A container on ``image``, mounted, with the one file written; its id."""
        with self.store() as store:
            container = store.create_container(image)
            (store.mount_container(container.id) / CHANGED_FILE).write_bytes(CHANGED_CONTENT)
        return container.id

    def remove(self, container: str, image: str | None = None) -> int | None:
        """Remove ``container`` (unmounted first) and the committed ``image``; the committed
        image's number of layers, read before removing it."""
        with self.store() as store:
            store.remove_container(container, force=True)
            if image is None:
                return None
            try:
                layers = len(store.image_layers(image))
            except laminae.NotFound:
                return None  # a failed commit made no image: the run fails on the count
            store.remove_image(image)
        return layers


# -- buildah ---------------------------------------------------------------------------------


@attrs.frozen
class BuildahSide:
    """buildah on a containers-storage of the benchmark's own (overlay driver).

    Every path is given on the command line (``--root``, ``--runroot``, ``--storage-driver``)
    and in a ``storage.conf`` of ours (``CONTAINERS_STORAGE_CONF``: else c/storage logs an
    error that no driver is configured); ``containers.conf`` and ``registries.conf`` are empty
    files of ours, the signature policy accepts anything, ``TMPDIR`` is on the scratch
    filesystem. The host paths it writes whatever the flags say are covered by
    :func:`peers.private_host_paths`.
    """

    root: Path
    runroot: Path
    scratch: Path

    @classmethod
    def create(cls, base: Path) -> BuildahSide:
        scratch = base / "etc"
        scratch.mkdir(parents=True)
        (scratch / "tmp").mkdir()
        side = cls(base / "root", base / "run", scratch)
        (scratch / "storage.conf").write_text(
            f'[storage]\ndriver = "{DRIVER}"\n'
            f'graphroot = "{side.root}"\nrunroot = "{side.runroot}"\n'
        )
        for empty in ("containers.conf", "registries.conf"):
            (scratch / empty).write_text("")
        (scratch / "policy.json").write_text(
            json.dumps({"default": [{"type": "insecureAcceptAnything"}]})
        )
        return side

    @property
    def policy(self) -> str:
        return str(self.scratch / "policy.json")

    def _env(self) -> dict[str, str]:
        return dict(
            os.environ,
            CONTAINERS_STORAGE_CONF=str(self.scratch / "storage.conf"),
            CONTAINERS_CONF=str(self.scratch / "containers.conf"),
            CONTAINERS_REGISTRIES_CONF=str(self.scratch / "registries.conf"),
            TMPDIR=str(self.scratch / "tmp"),
        )

    def argv(self, *args: str) -> list[str]:
        return [
            "buildah",
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--storage-driver",
            DRIVER,
            *args,
        ]

    def run(self, *args: str) -> str:
        """A buildah command outside the clock; its stdout. :raises Failed: it failed."""
        done = subprocess.run(
            self.argv(*args), env=self._env(), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise Failed(f"buildah {' '.join(args[:2])}: {done.stderr.strip()[-300:]}")
        return done.stdout.strip()

    def measured(self, *args: str) -> Measured:
        """A buildah command, measured. :raises Failed: it failed."""
        measured = run_measured(self.argv(*args), env=self._env())
        if measured.returncode != 0:
            raise Failed(measured.failure(f"buildah {args[0]}"))
        return measured

    def pull(self, source: str) -> tuple[str, int]:
        """``buildah pull`` (outside the clock); the image's id and number of layers."""
        image = self.run("pull", "--quiet", "--signature-policy", self.policy, source)
        image = image.splitlines()[-1]
        return image, self.layers(image)

    def layers(self, image: str) -> int:
        fields = "{{len .OCIv1.RootFS.DiffIDs}}"
        return int(self.run("inspect", "--type", "image", "--format", fields, image))

    def prepare_commit(self, image: str) -> str:
        container = self.run("from", "--pull-never", "--quiet", image)
        (Path(self.run("mount", container)) / CHANGED_FILE).write_bytes(CHANGED_CONTENT)
        return container

    def remove(self, container: str, image: str | None = None) -> int | None:
        self.run("rm", container)  # unmounts a mounted container first
        if image is None:
            return None
        layers = self.layers(image)
        self.run("rmi", image)
        return layers


# -- the runs --------------------------------------------------------------------------------


@attrs.frozen
class CaseImage:
    """One image as both stores hold it."""

    name: str
    description: str
    laminae_id: str
    buildah_id: str
    layers: int
    root_entries: int
    """Entries in the image's root directory: what every mount must show."""


@attrs.frozen
class Bench:
    """Everything a run needs: both stores, the filesystem to sync."""

    mnt: Path
    laminae: LaminaeSide
    buildah: BuildahSide


def _prepare_cache(cold: bool) -> None:
    if cold:
        drop_caches()


def _check_entries(tool: str, entries: int, image: CaseImage) -> None:
    if entries != image.root_entries:
        raise Failed(
            f"{tool}: the mount shows {entries} entries, the image has {image.root_entries}"
        )


def _check_layers(tool: str, layers: int | None, image: CaseImage) -> None:
    if layers != image.layers + 1:
        raise Failed(f"{tool}: the committed image has {layers} layers, not {image.layers + 1}")


def cycle_laminae(bench: Bench, image: CaseImage, cold: bool) -> list[Run]:
    _prepare_cache(cold)
    measured, report = bench.laminae.once("cycle", image.laminae_id)
    sync = _sync(bench.mnt)
    bench.laminae.remove(report["container"])
    _check_entries("laminae", report["entries"], image)
    detail = {k: v for k, v in report.items() if k.endswith("seconds")}
    detail["process_seconds"] = measured.seconds
    return [
        Run("laminae", 0, report["seconds"], sync, None, detail=detail),
        Run("laminae-process", 0, measured.seconds, sync, measured.maxrss_kib, detail=detail),
    ]


def cycle_laminae_cli(bench: Bench, image: CaseImage, cold: bool) -> list[Run]:
    _prepare_cache(cold)
    create = bench.laminae.cli("container", "create", "--image", image.laminae_id)
    container = create.stdout.strip()
    mount = bench.laminae.cli("container", "mount", container)
    entries = len(os.listdir(mount.stdout.strip()))
    unmount = bench.laminae.cli("container", "unmount", container)
    sync = _sync(bench.mnt)
    bench.laminae.remove(container)
    _check_entries("laminae CLI", entries, image)
    return [_three("laminae-cli", create, mount, unmount, sync)]


def cycle_buildah(bench: Bench, image: CaseImage, cold: bool) -> list[Run]:
    _prepare_cache(cold)
    create = bench.buildah.measured("from", "--pull-never", "--quiet", image.buildah_id)
    container = create.stdout.strip()
    mount = bench.buildah.measured("mount", container)
    entries = len(os.listdir(mount.stdout.strip()))
    unmount = bench.buildah.measured("umount", container)
    sync = _sync(bench.mnt)
    bench.buildah.remove(container)
    _check_entries("buildah", entries, image)
    return [_three("buildah", create, mount, unmount, sync)]


def _three(tool: str, create: Measured, mount: Measured, unmount: Measured, sync: float) -> Run:
    """A run of three commands: create, mount, unmount."""
    steps = (create, mount, unmount)
    return Run(
        tool,
        0,
        sum(m.seconds for m in steps),
        sync,
        max(m.maxrss_kib for m in steps),
        detail={
            "create_seconds": create.seconds,
            "mount_seconds": mount.seconds,
            "unmount_seconds": unmount.seconds,
        },
    )


def commit_laminae(bench: Bench, image: CaseImage, cold: bool) -> list[Run]:
    container = bench.laminae.prepare_commit(image.laminae_id)
    try:
        _prepare_cache(cold)
        measured, report = bench.laminae.once("commit", container, COMMIT_NAME)
        sync = _sync(bench.mnt)
    finally:
        layers = bench.laminae.remove(container, COMMIT_NAME)
    _check_layers("laminae", layers, image)
    detail = {k: v for k, v in report.items() if k.endswith("seconds")}
    detail["process_seconds"] = measured.seconds
    return [
        Run("laminae", 0, report["seconds"], sync, None, detail=detail),
        Run("laminae-process", 0, measured.seconds, sync, measured.maxrss_kib, detail=detail),
    ]


def commit_laminae_cli(bench: Bench, image: CaseImage, cold: bool) -> list[Run]:
    container = bench.laminae.prepare_commit(image.laminae_id)
    try:
        _prepare_cache(cold)
        measured = bench.laminae.cli("container", "commit", container, COMMIT_NAME)
        sync = _sync(bench.mnt)
    finally:
        layers = bench.laminae.remove(container, COMMIT_NAME)
    _check_layers("laminae CLI", layers, image)
    return [Run("laminae-cli", 0, measured.seconds, sync, measured.maxrss_kib)]


def commit_buildah(bench: Bench, image: CaseImage, cold: bool) -> list[Run]:
    container = bench.buildah.prepare_commit(image.buildah_id)
    committed = f"localhost/{COMMIT_NAME}"
    try:
        _prepare_cache(cold)
        # The default format (oci) and layers uncompressed (--disable-compression defaults to
        # true in buildah 1.28), as laminae's commit stores them; no --squash.
        args = ("commit", "--quiet", "--signature-policy", bench.buildah.policy)
        measured = bench.buildah.measured(*args, container, committed)
        sync = _sync(bench.mnt)
    finally:
        try:
            layers = bench.buildah.remove(container, committed)
        except Failed:
            bench.buildah.run("rm", "--all")
            raise
    _check_layers("buildah", layers, image)
    return [Run("buildah", 0, measured.seconds, sync, measured.maxrss_kib)]


RUNNERS: dict[tuple[str, str], Callable[[Bench, CaseImage, bool], list[Run]]] = {
    ("cycle", "laminae"): cycle_laminae,
    ("cycle", "laminae-cli"): cycle_laminae_cli,
    ("cycle", "buildah"): cycle_buildah,
    ("commit", "laminae"): commit_laminae,
    ("commit", "laminae-cli"): commit_laminae_cli,
    ("commit", "buildah"): commit_buildah,
}


def _describe(run: Run) -> str:
    if run.error is not None or run.seconds is None:
        return f"{run.tool}: [red]FAILED[/] {run.error}"
    return f"{run.tool} {run.seconds * 1000:.1f} ms + sync {(run.sync_seconds or 0) * 1000:.1f} ms"


def run_case(
    console: Console, bench: Bench, case: str, image: CaseImage, repeat: int
) -> dict[str, list[Run]]:
    """``repeat`` rounds, each tool cold then warm, the first tool rotating; the runs by cache
    state (``cold``, ``warm``)."""
    runs: dict[str, list[Run]] = {"cold": [], "warm": []}
    for i in range(repeat):
        shift = i % len(TOOLS)
        for tool in [*TOOLS[shift:], *TOOLS[:shift]]:
            for state in ("cold", "warm"):
                try:
                    made = RUNNERS[case, tool](bench, image, state == "cold")
                except Failed as exc:
                    made = [Run(tool, i, None, error=str(exc))]
                made = [attrs.evolve(r, round=i) for r in made]
                runs[state] += made
                line = "; ".join(_describe(r) for r in made)
                console.print(f"  round {i + 1}/{repeat} {state}: {line}")
    return runs


# -- tables ----------------------------------------------------------------------------------

ROWS = {
    "laminae": "laminae API, in-process: {what}",
    "laminae-process": "laminae API, the whole process (start-up, import, open_store)",
    "laminae-cli": "laminae CLI: {cli}",
    "buildah": "buildah: {buildah}",
}
WHAT = {
    "cycle": {
        "what": "create_container + mount_container + unmount_container",
        "cli": "container create / mount / unmount (3 processes)",
        "buildah": "from --pull-never / mount / umount (3 processes)",
    },
    "commit": {
        "what": "commit_container",
        "cli": "container commit",
        "buildah": "commit (oci, uncompressed)",
    },
}


def _ms(spread: Spread | None, field: str) -> str:
    return "-" if spread is None else f"{getattr(spread, field) * 1000:,.1f}"


def case_tables(
    case: str, image: CaseImage, runs: dict[str, list[Run]]
) -> tuple[Table, dict[str, Any]]:
    """The times of every row, cold and warm, and the targets (laminae against buildah)."""
    table = Table(title=f"{case}, {image.name} image ({image.description}); ms, with sync -f")
    for column in ("how", "cache", "median", "min", "max", "of which sync", "peak RSS MiB"):
        table.add_column(column, justify="left" if column in ("how", "cache") else "right")
    summary: dict[str, Any] = {}
    for tool, label in ROWS.items():
        for state, state_runs in runs.items():
            spread = Run.spread(state_runs, tool)
            syncs = Spread.of(
                [r.sync_seconds for r in state_runs if r.tool == tool and r.sync_seconds]
            )
            rss = [r.maxrss_kib for r in state_runs if r.tool == tool and r.maxrss_kib]
            failures = Run.failures(state_runs, tool)
            table.add_row(
                label.format(**WHAT[case]),
                state,
                _ms(spread, "median"),
                _ms(spread, "low"),
                _ms(spread, "high"),
                _ms(syncs, "median"),
                fmt(mib(max(rss)) if rss else None, ".1f")
                + (f" [red]{len(failures)} failed[/]" if failures else ""),
            )
            summary[f"{tool}/{state}"] = None if spread is None else attrs.asdict(spread)
    for state, state_runs in runs.items():
        buildah = Run.spread(state_runs, "buildah")
        for tool in ("laminae", "laminae-process", "laminae-cli"):
            value = ratio(Run.spread(state_runs, tool), buildah)
            summary[f"ratio {tool}/buildah {state}"] = value
    return table, summary


def targets_table(results: Sequence[dict[str, Any]]) -> Table:
    table = Table(title="target: laminae faster than buildah (median laminae / median buildah)")
    for column in (
        "case",
        "image",
        "cache",
        "API / buildah",
        "target",
        "whole process / buildah",
        "CLI / buildah",
    ):
        table.add_column(
            column, justify="left" if column in ("case", "image", "cache") else "right"
        )
    for result in results:
        summary = result["summary"]
        for state in ("cold", "warm"):
            api = summary[f"ratio laminae/buildah {state}"]
            table.add_row(
                result["case"],
                result["image"],
                state,
                fmt(api, ".2f", "x"),
                verdict(None if api is None else api < 1),
                fmt(summary[f"ratio laminae-process/buildah {state}"], ".2f", "x"),
                fmt(summary[f"ratio laminae-cli/buildah {state}"], ".2f", "x"),
            )
    return table


# -- setting up ------------------------------------------------------------------------------


def take_images(console: Console, bench: Bench, args: argparse.Namespace) -> list[CaseImage]:
    """Write the 100,000-file image if asked, and take every image into both stores."""
    images: list[CaseImage] = []
    for name in args.image_names:
        if name == "hello":
            description = "the example image"
            laminae_source = buildah_source = f"oci-archive:{EXAMPLE_IMAGE}:hello"
        else:
            start = time.perf_counter()
            written = write_benchmark_image(
                bench.mnt / "images" / name, scale=args.large_scale, tag=name
            )
            description = written.describe()
            console.print(
                f"  {name}: {description}; written in {time.perf_counter() - start:.1f} s"
            )
            laminae_source = buildah_source = f"oci:{written.layout}:{name}"
        start = time.perf_counter()
        laminae_id, layers, entries = bench.laminae.import_image(laminae_source)
        middle = time.perf_counter()
        buildah_id, buildah_layers = bench.buildah.pull(buildah_source)
        console.print(
            f"  {name}: imported by laminae in {middle - start:.1f} s, pulled by buildah in "
            f"{time.perf_counter() - middle:.1f} s; {layers} layers, {entries} root entries"
        )
        if buildah_layers != layers:
            raise SystemExit(f"{name}: buildah holds {buildah_layers} layers, laminae {layers}")
        images.append(CaseImage(name, description, laminae_id, buildah_id, layers, entries))
    return images


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="from: %(default)s")
    parser.add_argument("--images", default=",".join(IMAGES), help="from: %(default)s")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (>= 1)")
    parser.add_argument("--large-scale", type=float, default=2.7, help="files100k's scale")
    parser.add_argument("--json", type=Path, metavar="FILE", help="default: results/containers-*")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--image-gib", type=int, default=16, help="scratch filesystem size")
    args = parser.parse_args(argv)
    args.case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.case_names or set(args.case_names) - set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    args.image_names = [c.strip() for c in args.images.split(",") if c.strip()]
    if not args.image_names or set(args.image_names) - set(IMAGES):
        parser.error(f"--images: choose from {', '.join(IMAGES)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 0 < args.large_scale <= 8:
        parser.error("--large-scale must be in (0, 8]")
    if args.json is None:
        commit = first_line("git", "rev-parse", "--short", "HEAD") or "unknown"
        args.json = REPO / "benchmarks" / "results" / f"containers-{commit}.json"
    return args


def _buildah_version() -> str:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", "buildah"],
        capture_output=True,
        text=True,
        check=False,
    )
    return f"{first_line('buildah', '--version')} (deb {done.stdout.strip() or '?'})"


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root()
    ensure_installed(["buildah"])  # apt-get, once, as for the other benchmarks' peers
    enter_private_mount_namespace(Path(__file__).resolve(), argv)
    console = make_console()
    info = machine({"buildah": _buildah_version()})
    console.print(
        f"[bold]laminae containers benchmark[/]  nproc {info['nproc']}, {info['cpu']}, "
        f"{info['memory_gib']} GiB, kernel {info['kernel']}, laminae {info['laminae']}, "
        f"{info['buildah']}"
    )
    document: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": info,
        "settings": {
            "repeat": args.repeat,
            "large_scale": args.large_scale,
            "driver": DRIVER,
            "filesystem": f"ext4 on a {args.image_gib} GiB loop image, direct I/O",
            "caches": "cold: sync; echo 3 > /proc/sys/vm/drop_caches before the run; "
            "warm: the same run again at once",
            "changed_file_bytes": len(CHANGED_CONTENT),
        },
        "cases": [],
    }
    load_before = os.getloadavg()
    tables: list[Table] = []
    failed = False
    with (
        scratch_filesystem(args.workdir, args.image_gib * GIB, "ext4") as mnt,
        private_host_paths(mnt / "host-paths"),
    ):
        bench = Bench(mnt, LaminaeSide.create(mnt / "laminae"), BuildahSide.create(mnt / "buildah"))
        console.print("[bold]images[/]")
        images = take_images(console, bench, args)
        for image in images:
            for case in args.case_names:
                console.print(f"[bold]{case}[/], {image.name} image")
                runs = run_case(console, bench, case, image, args.repeat)
                table, summary = case_tables(case, image, runs)
                tables.append(table)
                failed |= any(r.error for state in runs.values() for r in state)
                document["cases"].append(
                    {
                        "case": case,
                        "image": image.name,
                        "image_detail": attrs.asdict(image),
                        "runs": {s: [attrs.asdict(r) for r in rs] for s, rs in runs.items()},
                        "summary": summary,
                    }
                )
    tables.append(targets_table(document["cases"]))
    finish(console, tables, document, load_before, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
