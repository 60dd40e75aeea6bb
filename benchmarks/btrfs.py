"""laminae's btrfs driver (issue 4), on a fresh loop-mounted btrfs made by the benchmark.

Two cases (see README.md):

- ``create``: ``store.create_layer`` of an active layer on a parent of 1,000 files and on a
  parent of 100,000 files. A btrfs layer is a snapshot of its parent, so the time should not
  depend on the parent's size. Targets: the two the same within noise, and both under 20 ms.
- ``import``: the same eight-layer OCI image imported by laminae's btrfs driver, by ``skopeo
  copy`` into containers-storage's btrfs driver and by ``ctr images import`` into containerd's
  btrfs snapshotter, all on that btrfs. Target: laminae faster than skopeo (ctr is shown too).

Every measurement runs in a fresh process, with the page cache dropped before it, and after the
btrfs cleaner has finished with what the previous run deleted (``btrfs subvolume sync``).

Run as root: ``.venv/bin/python benchmarks/btrfs.py [--cases create,import] [--repeat 3]
[--create-repeat 10] [--scale 1.0] [--driver btrfs] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from image_import import image_json, import_tables, run_import_case
from layer_tars import write_small_files_tar
from measure import rss_floor_kib, run_json
from peers import ensure_installed, private_host_paths, versions
from report import (
    Run,
    Spread,
    driver_unavailable,
    finish,
    first_line,
    fmt,
    machine,
    mib,
    ratio,
    run_rounds,
    verdict,
)
from report import console as make_console
from rich.console import Console
from rich.table import Table
from scratch_fs import (
    GIB,
    btrfs_sync,
    drop_caches,
    enter_private_mount_namespace,
    remove_tree,
    require_root,
    scratch_filesystem,
    unmount_under,
)

HERE = Path(__file__).resolve().parent
LAMINAE_ONCE = HERE / "laminae_once.py"
PEERS = ("podman", "skopeo", "containerd", "ctr")
CASES = ("create", "import")
INSTALLED_MARK = "LAMINAE_BENCH_INSTALLED"

CREATE_TARGET_S = 0.020
"""Creating a layer on either parent: under this."""
NOISE = 0.20
"""Two medians within this fraction of each other count as the same time."""


def _small_parent_dirs() -> int:
    return 10


def _large_parent_dirs(scale: float) -> int:
    return max(10, round(1000 * scale))


MODES = ("cold", "warm")
"""cold: the page cache dropped before the run (the target's numbers); warm: not dropped, so
the parent's metadata is cached from the run before (what is left is the snapshot itself)."""


def _tool(files: int, mode: str) -> str:
    return f"parent of {files:,} files, {mode}"


def create_case(
    console: Console, mnt: Path, scale: float, repeat: int, driver: str, unavailable: str | None
) -> tuple[list[Run], dict[str, Any]]:
    parents = {
        "small": _small_parent_dirs() * 100,
        "large": _large_parent_dirs(scale) * 100,
    }
    tools = [_tool(files, mode) for mode in MODES for files in parents.values()]
    info: dict[str, Any] = {"parents": parents, "driver": driver}
    if unavailable is not None:
        return [Run(t, 0, None, error=unavailable) for t in tools], info
    import laminae  # only here: the parent sets the store up, the measured children time it

    root, runroot = mnt / "create-store", mnt / "create-run"
    console.print(f"[bold]create[/]: applying parents of {', '.join(map(str, parents.values()))}")
    start = time.perf_counter()
    layer_ids: dict[int, str] = {}
    with laminae.open_store(root, runroot=runroot, driver=driver) as store:
        for name, files in parents.items():
            tar_path = mnt / f"parent-{name}.tar"
            tar = write_small_files_tar(tar_path, dirs=files // 100, seed=10 + len(layer_ids))
            layer_ids[files] = store.apply_layer(tar_path, diff_id=tar.diff_id).id
            tar_path.unlink()
    console.print(f"  set up in {time.perf_counter() - start:.1f} s")
    by_tool = {_tool(files, mode): (files, mode) for mode in MODES for files in parents.values()}

    def run(tool: str, i: int) -> Run:
        files, mode = by_tool[tool]
        btrfs_sync(mnt)
        if mode == "cold":
            drop_caches()
        argv = [sys.executable, str(LAMINAE_ONCE), "create", str(root), str(runroot), driver]
        measured, report, error = run_json([*argv, layer_ids[files], f"bench-{i}"])
        return Run(
            tool,
            i,
            None if error or report is None else report["seconds"],
            maxrss_kib=measured.maxrss_kib,
            error=error,
            detail={
                "process_seconds": measured.seconds,
                "remove_seconds": None if report is None else report["remove_seconds"],
            },
        )

    # Cold rounds first, then warm ones (a cold run right after a warm one would be the same).
    runs = []
    for mode in MODES:
        runs += run_rounds(console, [t for t in tools if by_tool[t][1] == mode], repeat, run)
    unmount_under(runroot)
    remove_tree(root)
    remove_tree(runroot)
    return runs, info


def create_tables(runs: Sequence[Run], info: dict[str, Any]) -> tuple[Table, Table, Any]:
    files = list(info["parents"].values())
    times = Table(
        title=f"create_layer on btrfs ({info['driver']}): {_rounds(runs)} run(s) each",
        caption="in-process clock around store.create_layer (graph transaction + snapshot); "
        "fresh process per run, after the btrfs cleaner; cold: caches dropped first; "
        "remove_layer afterwards, outside the clock",
    )
    for column in ("parent", "median ms", "min ms", "max ms", "remove median ms", "peak RSS MiB"):
        times.add_column(column, justify="left" if column == "parent" else "right")
    times.add_column("failed", justify="right")
    spreads = {}
    for mode in MODES:
        for n in files:
            tool = _tool(n, mode)
            spread = spreads[tool] = Run.spread(runs, tool)
            removes = Spread.of(
                [r.detail["remove_seconds"] for r in runs if r.tool == tool and not r.error]
            )
            rss = [r.maxrss_kib for r in runs if r.tool == tool and r.maxrss_kib]
            times.add_row(
                tool,
                _ms(spread.median if spread else None),
                _ms(spread.low if spread else None),
                _ms(spread.high if spread else None),
                _ms(removes.median if removes else None),
                fmt(mib(max(rss)) if rss else None, ".1f"),
                str(len(Run.failures(runs, tool))),
                end_section=n == files[-1],
            )
    targets = Table(title="create_layer: targets (judged cold; warm shown for the cause)")
    for column in (
        "caches",
        "large / small",
        "ranges overlap",
        f"same within noise (medians ±{NOISE:.0%})",
        "slower median ms",
        f"< {CREATE_TARGET_S * 1000:.0f} ms",
    ):
        targets.add_column(column, justify="right")
    summary: dict[str, Any] = {
        "spreads": {t: None if s is None else attrs.asdict(s) for t, s in spreads.items()},
        "noise": NOISE,
        "target_seconds": CREATE_TARGET_S,
        **info,
    }
    for mode in MODES:
        small, large = spreads[_tool(files[0], mode)], spreads[_tool(files[-1], mode)]
        r = ratio(large, small)
        overlap = under = None
        slower = None
        if small and large:
            overlap = small.low <= large.high and large.low <= small.high
            slower = max(small.median, large.median)
            under = slower < CREATE_TARGET_S
        same = None if r is None else abs(r - 1) <= NOISE
        targets.add_row(
            mode,
            fmt(r, ".2f", "x"),
            "-" if overlap is None else ("yes" if overlap else "no"),
            verdict(same),
            _ms(slower),
            verdict(under),
        )
        summary[mode] = {
            "ratio_large_small": r,
            "ranges_overlap": overlap,
            "same_within_noise": same,
            "under_target": under,
        }
    return times, targets, summary


def _ms(value: float | None) -> str:
    return fmt(None if value is None else value * 1000, ".1f")


def _rounds(runs: Sequence[Run]) -> int:
    return len({r.round for r in runs})


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="from: %(default)s")
    parser.add_argument("--repeat", type=int, default=3, help="import runs per tool (>= 1)")
    parser.add_argument("--create-repeat", type=int, default=10, help="create runs per parent")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the sizes")
    parser.add_argument("--driver", default="btrfs", help="laminae's driver (vfs to try it out)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the raw numbers here")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--image-gib", type=int, default=16, help="scratch filesystem size")
    args = parser.parse_args(argv)
    args.case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.case_names or set(args.case_names) - set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    if args.repeat < 1 or args.create_repeat < 1:
        parser.error("--repeat and --create-repeat must be at least 1")
    if not 0 < args.scale <= 4:
        parser.error("--scale must be in (0, 4]")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root(("mkfs.btrfs", "btrfs"))
    # Installed before entering the namespace, once; the re-executed process is told what.
    os.environ.setdefault(INSTALLED_MARK, ",".join(ensure_installed(PEERS)))
    enter_private_mount_namespace(Path(__file__).resolve(), argv)
    installed = [p for p in os.environ[INSTALLED_MARK].split(",") if p]
    console = make_console()
    peers = versions(PEERS)
    info = machine({**peers, "btrfs_progs": first_line("btrfs", "--version") or "?"})
    console.print(
        f"[bold]laminae btrfs benchmark[/]  nproc {info['nproc']}, {info['cpu']}, "
        f"{info['memory_gib']} GiB, kernel {info['kernel']}, laminae {info['laminae']}, "
        f"{info['btrfs_progs']}"
    )
    console.print("peers: " + "; ".join(f"{k} {v}" for k, v in peers.items()))
    if installed:
        console.print(f"installed with apt-get: {', '.join(installed)}")
    document: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": info,
        "settings": {
            "repeat": args.repeat,
            "create_repeat": args.create_repeat,
            "scale": args.scale,
            "driver": args.driver,
            "filesystem": f"btrfs (mkfs.btrfs defaults) on a {args.image_gib} GiB loop image",
            "caches": "btrfs subvolume sync; sync; echo 3 > /proc/sys/vm/drop_caches before "
            "every run",
            "rss_floor_kib": rss_floor_kib(),
        },
        "cases": {},
    }
    load_before = os.getloadavg()
    tables: list[Table] = []
    failed = False
    with (
        scratch_filesystem(args.workdir, args.image_gib * GIB, "btrfs") as mnt,
        private_host_paths(mnt / "host-paths"),
    ):
        unavailable = driver_unavailable(args.driver, mnt)
        if unavailable:
            console.print(f"[yellow]laminae driver {args.driver!r} unavailable[/]: {unavailable}")
        if "create" in args.case_names:
            runs, create_info = create_case(
                console, mnt, args.scale, args.create_repeat, args.driver, unavailable
            )
            times, targets, summary = create_tables(runs, create_info)
            tables += [times, targets]
            document["cases"]["create"] = {
                "runs": [attrs.asdict(r) for r in runs],
                "summary": summary,
            }
            failed |= any(r.error for r in runs) and unavailable is None
        if "import" in args.case_names:
            image, tools, runs = run_import_case(
                console, mnt, args.scale, args.repeat, args.driver, unavailable,
                snapshotter="btrfs", storage_driver="btrfs",
            )  # fmt: skip
            times, targets, summary = import_tables("import (btrfs)", image, tools, runs)
            tables += [times, targets]
            document["cases"]["import"] = {
                "image": image_json(image),
                "runs": [attrs.asdict(r) for r in runs],
                "summary": summary,
            }
            failed |= any(r.error for r in runs if r.tool != tools[0].name or not unavailable)
    finish(console, tables, document, load_before, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
