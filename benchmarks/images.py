"""laminae's image import and pull (issue 5) against skopeo and ctr, in one run, on ext4.

Two cases per image, each with its tables and targets (see README.md):

- ``import``: the multi-layer OCI image layout imported by ``Store.import_image("oci:...")``
  (overlay driver), by ``skopeo copy oci:... containers-storage:[overlay@...]`` and by
  ``ctr images import`` (overlayfs snapshotter), plus ctr's ``--no-unpack`` as a reference.
- ``pull``: the same image pushed once into a local docker-registry, pulled by
  ``Store.pull`` (overlay), by ``skopeo copy docker://... containers-storage:[overlay@...]``
  and by ``ctr images pull --plain-http`` (overlayfs), plus ``ctr content fetch`` as a
  reference.

Targets: laminae's median faster than each peer's in each case; laminae's peak RSS under
200 MiB whatever the image size, shown on the benchmark image and on a larger one
(``--large-scale``, by default three times every count and size).

Every run is a fresh process on a fresh store, on the same fresh loop-mounted ext4, with the
page cache dropped before it; the order of the tools rotates from round to round. The peers
(Debian's podman, skopeo, containerd) are installed with apt-get when missing; the registry is
Debian's docker-registry.

Run as root: ``.venv/bin/python benchmarks/images.py [--cases import,pull]
[--sizes normal,large] [--repeat 3] [--scale 1.0] [--large-scale 3.0] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from image_import import (
    ImportTool,
    image_json,
    import_tables,
    import_tools,
    run_tools,
    write_case_image,
)
from image_pull import run_pull_case
from layer_tars import MIB
from measure import rss_floor_kib
from oci_image import OciImage
from peers import ensure_installed, private_host_paths, versions
from registry_server import RegistryServer
from report import REPO, Run, driver_unavailable, finish, first_line, fmt, machine, mib, verdict
from report import console as make_console
from rich.console import Console
from rich.table import Table
from scratch_fs import GIB, enter_private_mount_namespace, require_root, scratch_filesystem

PEERS = ("podman", "skopeo", "containerd", "ctr")
CASES = ("import", "pull")
SIZES = ("normal", "large")
INSTALLED_MARK = "LAMINAE_BENCH_INSTALLED"
MEMORY_TARGET_MIB = 200.0
"""laminae's peak RSS stays under this, whatever the image size."""
SNAPSHOTTER = "overlayfs"
STORAGE_DRIVER = "overlay"


@attrs.frozen
class CaseResult:
    """One case (import or pull) on one image: its tools and runs."""

    size: str
    case: str
    image: OciImage
    tools: list[ImportTool]
    runs: list[Run]
    reference: str | None = None


def memory_table(results: Sequence[CaseResult]) -> tuple[Table, list[dict[str, Any]]]:
    """laminae's peak RSS per image and case against the target, with the image's size."""
    table = Table(
        title=f"target: laminae's peak RSS under {MEMORY_TARGET_MIB:.0f} MiB whatever the image "
        "size (the whole process's ru_maxrss, maximum over the runs)"
    )
    for column in ("image", "case", "tars MiB", "gzip MiB", "laminae peak RSS MiB", "under"):
        table.add_column(column, justify="left" if column in ("image", "case") else "right")
    rows: list[dict[str, Any]] = []
    for result in results:
        laminae = next(t for t in result.tools if t.role == "laminae")
        values = [
            r.maxrss_kib
            for r in result.runs
            if r.tool == laminae.name and r.maxrss_kib is not None and not r.error
        ]
        peak = mib(max(values)) if values else None
        met = None if peak is None else peak < MEMORY_TARGET_MIB
        table.add_row(
            result.size,
            result.case,
            f"{result.image.tar_bytes / MIB:,.1f}",
            f"{result.image.compressed_bytes / MIB:,.1f}",
            fmt(peak, ".1f"),
            verdict(met),
        )
        rows.append({"image": result.size, "case": result.case, "peak_rss_mib": peak, "met": met})
    return table, rows


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="from: %(default)s")
    parser.add_argument("--sizes", default=",".join(SIZES), help="from: %(default)s")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (>= 1)")
    parser.add_argument("--scale", type=float, default=1.0, help="the normal image's scale")
    parser.add_argument("--large-scale", type=float, default=3.0, help="the large image's")
    parser.add_argument("--driver", default="overlay", help="laminae's driver")
    parser.add_argument("--json", type=Path, metavar="FILE", help="default: results/images-*")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--image-gib", type=int, default=24, help="scratch filesystem size")
    args = parser.parse_args(argv)
    args.case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.case_names or set(args.case_names) - set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    args.size_names = [c.strip() for c in args.sizes.split(",") if c.strip()]
    if not args.size_names or set(args.size_names) - set(SIZES):
        parser.error(f"--sizes: choose from {', '.join(SIZES)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    for scale in (args.scale, args.large_scale):
        if not 0 < scale <= 8:
            parser.error("scales must be in (0, 8]")
    if args.json is None:
        commit = first_line("git", "rev-parse", "--short", "HEAD") or "unknown"
        args.json = REPO / "benchmarks" / "results" / f"images-{commit}.json"
    return args


def run_cases(
    console: Console, mnt: Path, args: argparse.Namespace, unavailable: str | None
) -> list[CaseResult]:
    results: list[CaseResult] = []
    registry: RegistryServer | None = None
    try:
        if "pull" in args.case_names:
            registry = RegistryServer(mnt / "registry").__enter__()
            console.print(f"registry: docker-registry on {registry.host} (PID {registry.pid})")
        for size in args.size_names:
            scale = args.scale if size == "normal" else args.large_scale
            tag = "bench" if size == "normal" else "bench-large"
            console.print(f"[bold]{size} image[/] (scale {scale}): writing it")
            image, archive = write_case_image(console, mnt / "images", scale, tag=tag)
            if "import" in args.case_names:
                console.print(f"[bold]import[/], {size} image")
                tools = import_tools(args.driver, unavailable, SNAPSHOTTER, STORAGE_DRIVER, archive)
                runs = run_tools(console, mnt, image, tools, args.repeat)
                results.append(CaseResult(size, "import", image, tools, runs))
            if registry is not None:
                console.print(f"[bold]pull[/], {size} image")
                reference, tools, runs = run_pull_case(
                    console, mnt, registry, image, args.repeat, args.driver, unavailable,
                    SNAPSHOTTER, STORAGE_DRIVER,
                )  # fmt: skip
                results.append(CaseResult(size, "pull", image, tools, runs, reference))
    finally:
        if registry is not None:
            registry.stop()
    return results


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root(("docker-registry",) if "pull" in args.case_names else ())
    # Installed before entering the namespace, once; the re-executed process is told what.
    os.environ.setdefault(INSTALLED_MARK, ",".join(ensure_installed(PEERS)))
    enter_private_mount_namespace(Path(__file__).resolve(), argv)
    installed = [p for p in os.environ[INSTALLED_MARK].split(",") if p]
    console = make_console()
    peers = versions(PEERS)
    peers["docker-registry"] = first_line("docker-registry", "--version")
    info = machine(peers)
    console.print(
        f"[bold]laminae images benchmark[/]  nproc {info['nproc']}, {info['cpu']}, "
        f"{info['memory_gib']} GiB, kernel {info['kernel']}, laminae {info['laminae']}"
    )
    console.print("peers: " + "; ".join(f"{k} {v}" for k, v in peers.items()))
    if installed:
        console.print(f"installed with apt-get: {', '.join(installed)}")
    document: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": info,
        "settings": {
            "repeat": args.repeat,
            "scale": args.scale,
            "large_scale": args.large_scale,
            "driver": args.driver,
            "snapshotter": SNAPSHOTTER,
            "storage_driver": STORAGE_DRIVER,
            "filesystem": f"ext4 on a {args.image_gib} GiB loop image, direct I/O",
            "caches": "sync; echo 3 > /proc/sys/vm/drop_caches before every run",
            "rss_floor_kib": rss_floor_kib(),
        },
        "cases": [],
    }
    load_before = os.getloadavg()
    tables: list[Table] = []
    with (
        scratch_filesystem(args.workdir, args.image_gib * GIB, "ext4") as mnt,
        private_host_paths(mnt / "host-paths"),
    ):
        unavailable = driver_unavailable(args.driver, mnt)
        if unavailable:
            console.print(f"[yellow]laminae driver {args.driver!r} unavailable[/]: {unavailable}")
        results = run_cases(console, mnt, args, unavailable)
    failed = False
    for result in results:
        title = f"{result.case}, {result.size} image"
        times, targets, summary = import_tables(title, result.image, result.tools, result.runs)
        tables += [times, targets]
        document["cases"].append(
            {
                "image_size": result.size,
                "case": result.case,
                "reference": result.reference,
                "image": image_json(result.image),
                "runs": [attrs.asdict(r) for r in result.runs],
                "summary": summary,
            }
        )
        failed |= any(r.error for r in result.runs)
    memory, rows = memory_table(results)
    tables.append(memory)
    document["memory"] = rows
    finish(console, tables, document, load_before, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
