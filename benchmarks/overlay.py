"""laminae's overlay driver against the peers (issue 3), on a fresh ext4 filesystem.

Three cases, each with its tables and targets (see README.md):

- ``mount``: mounting a container on 128- and 500-layer stacks: laminae's ``store.mount`` of
  an active layer on a chain of N committed one-file layers; the same kernel mount made with
  each peer's technique (laminae's ``lowerdir+`` through the new mount API, and ``mount(2)``
  with absolute paths, with containerd's relative paths, with Moby's and containers-storage's
  ``l/`` short links, with containers-storage's ``/proc/self/fd`` numbers); and podman
  mounting a container and an image of N layers (whole processes).
- ``changes``: changes plus export of a container in which one file changed, on an image of
  100,000 files: native (``store.changes`` + ``store.diff`` with a driver that declares
  CHANGES) against naive (``naive_changes`` over the materialized parent and layer, and
  ``write_changes_tar``). Targets: native at least 50x faster, and under 100 ms.
- ``import``: the same eight-layer OCI image imported by laminae, by ``skopeo copy`` into
  containers-storage's overlay driver and by ``ctr images import`` into containerd's overlayfs
  snapshotter. Target: laminae faster than both.

Every measurement runs in a fresh process with the page cache dropped before it. The peers
(Debian's podman, skopeo, containerd) are installed with apt-get when missing.

Run as root: ``.venv/bin/python benchmarks/overlay.py [--cases mount,changes,import]
[--repeat 3] [--scale 1.0] [--depths 128,500] [--driver overlay] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from image_import import image_json, import_tables, run_import_case
from layer_tars import write_small_files_tar
from measure import Measured, rss_floor_kib, run_json
from oci_image import OciImage, write_stack_image
from peers import Podman, ensure_installed, private_host_paths, skopeo_copy, versions
from report import (
    Run,
    Spread,
    driver_unavailable,
    finish,
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
CASES = ("mount", "changes", "import")
INSTALLED_MARK = "LAMINAE_BENCH_INSTALLED"

SPEEDUP_TARGET = 50.0
"""Native changes + export at least this many times faster than naive."""
NATIVE_TARGET_S = 0.100
"""Native changes + export under this."""

KERNEL_TECHNIQUES = {
    "lowerdir+": "fsconfig lowerdir+ per layer (laminae)",
    "absolute": "mount(2), absolute paths",
    "relative": "mount(2), N/fs from common dir (containerd)",
    "short-links": "mount(2), l/ links (Moby, c/storage 1.43)",
    "proc-fds": "mount(2), /proc/self/fd (c/storage >= 1.44)",
}


def _laminae(*args: str) -> tuple[Measured, dict[str, Any] | None, str | None]:
    """Run ``laminae_once.py ARGS`` measured: the measurement, its JSON or why it failed."""
    return run_json([sys.executable, str(LAMINAE_ONCE), *args])


def _setup_store(root: Path, runroot: Path, driver: str) -> Any:
    import laminae  # only here: the parent sets stores up, the measured children time them

    return laminae.open_store(root, runroot=runroot, driver=driver)


# -- mount ---------------------------------------------------------------------------------


def _prepare_kernel_stack(home: Path, depth: int) -> None:
    """``N/fs/stack/fN`` for N in 1..depth, ``l/<26 chars>`` links to them, an upper and a
    work dir, and ``links.json``: one stack for every technique."""
    links = []
    (home / "l").mkdir(parents=True)
    for n in range(1, depth + 1):
        lower = home / str(n) / "fs" / "stack"
        lower.mkdir(parents=True)
        (lower / f"f{n}").write_bytes(f"layer {n}\n".encode())
        # Moby and c/storage: 26 random upper-case letters and digits.
        link = "l/" + "".join(secrets.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(26))
        (home / link).symlink_to(f"../{n}/fs")
        links.append(link)
    (home / "upper" / "fs").mkdir(parents=True)
    (home / "upper" / "work").mkdir()
    (home / "links.json").write_text(json.dumps(links))


@attrs.frozen
class MountRow:
    depth: int
    tool: str
    runs: list[Run]
    note: str = ""


def mount_case(
    console: Console,
    mnt: Path,
    depths: Sequence[int],
    repeat: int,
    driver: str,
    unavailable: str | None,
    warm: int,
) -> list[MountRow]:
    rows: list[MountRow] = []
    podman = Podman(
        "overlay",
        mnt / "stacks-cs" / "root",
        mnt / "stacks-cs" / "run",
        mnt / "stacks-cs" / "scratch",
    )
    for depth in depths:
        console.print(f"[bold]mount[/], {depth} layers: preparing the stacks")
        image = write_stack_image(mnt / "images" / f"stack{depth}", depth)
        rows.append(
            _laminae_mount_row(console, mnt, image, depth, repeat, driver, unavailable, warm)
        )
        home = mnt / "kernel-stack" / str(depth)
        _prepare_kernel_stack(home, depth)
        target = mnt / "kernel-target"
        target.mkdir(exist_ok=True)
        for technique, description in KERNEL_TECHNIQUES.items():
            tool = f"kernel {technique}"
            runs = [_kernel_run(tool, i, home, depth, target, warm) for i in range(repeat)]
            rows.append(MountRow(depth, tool, runs, description))
            console.print(f"  {_row_line(rows[-1])}")
        remove_tree(home)
        rows.extend(_podman_rows(console, mnt, podman, image, depth, repeat))
    unmount_under(mnt / "stacks-cs")
    remove_tree(mnt / "stacks-cs")
    return rows


def _kernel_run(tool: str, i: int, home: Path, depth: int, target: Path, warm: int) -> Run:
    technique = tool.removeprefix("kernel ")
    drop_caches()
    measured, report, error = _laminae(
        "kernel", technique, str(home), str(depth), str(target), str(warm)
    )
    unmount_under(target)
    if report is None:
        return Run(tool, i, None, maxrss_kib=measured.maxrss_kib, error=error)
    if report.get("error"):
        error = report["error"]
    elif report["entries"] != depth:
        error = f"merged view has {report['entries']} entries, not {depth}"
    return Run(
        tool,
        i,
        None if error else report["seconds"],
        maxrss_kib=measured.maxrss_kib,
        error=error,
        detail={
            "data_bytes": report["data_bytes"],
            "warm_seconds": report.get("warm_seconds", []),
        },
    )


def _laminae_mount_row(
    console: Console,
    mnt: Path,
    image: OciImage,
    depth: int,
    repeat: int,
    driver: str,
    unavailable: str | None,
    warm: int,
) -> MountRow:
    tool = f"laminae {driver} store.mount"
    note = f"active layer on {depth} committed ones"
    if unavailable is not None:
        return MountRow(depth, tool, [Run(tool, 0, None, error=unavailable)], note)
    root, runroot = mnt / "stacks-laminae" / str(depth), mnt / "stacks-laminae" / f"{depth}-run"
    start = time.perf_counter()
    _, report, error = _laminae(
        "import", str(root), str(runroot), driver, str(image.layout), image.tag
    )
    if report is None:
        return MountRow(depth, tool, [Run(tool, 0, None, error=error)], note)
    try:
        with _setup_store(root, runroot, driver) as store:
            store.create_layer("container", parent=report["top_layer"])
    except Exception as exc:
        return MountRow(depth, tool, [Run(tool, 0, None, error=repr(exc))], note)
    console.print(f"  laminae: {depth} layers imported in {time.perf_counter() - start:.1f} s")
    runs = []
    for i in range(repeat):
        drop_caches()
        measured, result, error = _laminae(
            "mount", str(root), str(runroot), driver, "container", str(warm)
        )
        if result is not None and result["entries"] != depth + 1:
            error = f"mounted tree has {result['entries']} entries, not {depth + 1}"
        runs.append(
            Run(
                tool,
                i,
                None if error or result is None else result["seconds"],
                maxrss_kib=measured.maxrss_kib,
                error=error,
                detail={
                    "process_seconds": measured.seconds,
                    "warm_seconds": [] if result is None else result["warm_seconds"],
                    "unmount_seconds": None if result is None else result["unmount_seconds"],
                },
            )
        )
    unmount_under(runroot)
    remove_tree(root)
    remove_tree(runroot)
    row = MountRow(depth, tool, runs, note)
    console.print(f"  {_row_line(row)}")
    return row


def _podman_rows(
    console: Console, mnt: Path, podman: Podman, image: OciImage, depth: int, repeat: int
) -> list[MountRow]:
    name = f"localhost/stack{depth}:latest"
    container = f"stack{depth}"
    start = time.perf_counter()
    copied = skopeo_copy(
        image.reference, "overlay", podman.root, podman.runroot, name, podman.scratch
    )
    if copied.returncode != 0:
        failure = copied.failure("skopeo copy")
        return [MountRow(depth, "podman", [Run("podman", 0, None, error=failure)])]
    console.print(f"  skopeo copy of {depth} layers: {time.perf_counter() - start:.1f} s")
    create_error = None
    try:
        podman.run("create", "--pull", "never", "--network", "none", "--name", container, name)
    except RuntimeError as exc:
        create_error = str(exc)
    commands = {
        "podman mount (container)": (["mount", container], ["umount", container]),
        "podman image mount": (["image", "mount", name], ["image", "unmount", name]),
        "podman container exists": (["container", "exists", container], None),
    }
    notes = {
        "podman mount (container)": "N lowers + upper; whole process",
        "podman image mount": "N lowers, read-only; whole process",
        "podman container exists": "podman start-up only, for scale",
    }
    rows = []
    for tool, (command, undo) in commands.items():
        runs = []
        for i in range(repeat):
            if create_error is not None and "container" in tool:
                runs.append(Run(tool, i, None, error=f"podman create: {create_error}"))
                continue
            drop_caches()
            measured = podman.measured(*command)
            error: str | None = None
            if measured.returncode != 0:
                error = measured.failure("podman")
            if error is None and undo is not None:
                try:
                    entries = len(os.listdir(Path(measured.stdout.strip()) / "stack"))
                    if entries != depth:
                        error = f"merged view has {entries} entries, not {depth}"
                finally:
                    podman.run(*undo)
            seconds = None if error else measured.seconds
            runs.append(Run(tool, i, seconds, maxrss_kib=measured.maxrss_kib, error=error))
        rows.append(MountRow(depth, tool, runs, notes[tool]))
        console.print(f"  {_row_line(rows[-1])}")
    return rows


def _ms(value: float | None) -> str:
    return fmt(None if value is None else value * 1000, ".1f")


def _row_line(row: MountRow) -> str:
    spread = Run.spread(row.runs, row.tool)
    failures = Run.failures(row.runs, row.tool)
    if spread is None:
        return f"{row.tool}: [red]failed[/] {failures[0] if failures else ''}"
    return f"{row.tool}: median {_ms(spread.median)} ms ({len(failures)} failed)"


def _short(error: str) -> str:
    """The end of an error message, where the peers say what went wrong."""
    error = error.rpartition("Error: ")[2]
    return error if len(error) <= 40 else "..." + error[-37:]


def mount_table(rows: Sequence[MountRow], repeat: int) -> Table:
    table = Table(
        title=f"mount: a container on a stack of N layers; {repeat} run(s), caches cold",
        caption="cold: the first mount in a fresh process after drop_caches (in-process clock; "
        "podman: the whole process); warm: the next mounts in the same process",
    )
    for column in ("N", "tool", "cold median ms", "min ms", "max ms", "warm median ms"):
        table.add_column(column, justify="left" if column == "tool" else "right")
    for column in ("mount data B", "result", "how"):
        table.add_column(column, justify="right" if column == "mount data B" else "left")
    for i, row in enumerate(rows):
        spread = Run.spread(row.runs, row.tool)
        warm = Spread.of([s for r in row.runs for s in r.detail.get("warm_seconds", [])])
        data = sorted({d for r in row.runs if (d := r.detail.get("data_bytes"))})
        failures = Run.failures(row.runs, row.tool)
        result = "[green]ok[/]" if not failures else f"[red]{_short(failures[0])}[/]"
        if failures and spread is not None:
            result = f"[yellow]{len(failures)} failed[/]: {_short(failures[0])}"
        table.add_row(
            str(row.depth),
            row.tool,
            _ms(spread.median if spread else None),
            _ms(spread.low if spread else None),
            _ms(spread.high if spread else None),
            _ms(warm.median if warm else None),
            ", ".join(f"{d:,}" for d in data),
            result,
            row.note,
            end_section=i + 1 < len(rows) and rows[i + 1].depth != row.depth,
        )
    return table


# -- changes ---------------------------------------------------------------------------------


CHANGED_FILE = "d00/d0/d0/f000"


def _declares_changes(store: Any) -> bool:
    import laminae

    return laminae.Feature.CHANGES in store.capabilities.features


def changes_case(
    console: Console, mnt: Path, scale: float, repeat: int, driver: str, unavailable: str | None
) -> tuple[list[Run], dict[str, Any]]:
    dirs = max(1, round(1000 * scale))
    info: dict[str, Any] = {"files": dirs * 100}
    tools = ["native", "naive"]
    if unavailable is not None:
        return [Run(t, 0, None, error=unavailable) for t in tools], info
    console.print(f"[bold]changes[/]: an image of {dirs * 100:,} files, one file changed")
    root, runroot = mnt / "changes-store", mnt / "changes-run"
    tar_path = mnt / "changes-base.tar"
    start = time.perf_counter()
    tar = write_small_files_tar(tar_path, dirs=dirs)
    with _setup_store(root, runroot, driver) as store:
        base = store.apply_layer(tar_path, diff_id=tar.diff_id)
        store.create_layer("container", parent=base.id)
        path = store.mount("container")
        try:
            (path / CHANGED_FILE).write_bytes(b"changed in the container\n")
        finally:
            store.unmount("container")
        info["driver_declares_changes"] = _declares_changes(store)
    tar_path.unlink()
    console.print(f"  set up in {time.perf_counter() - start:.1f} s")
    out = mnt / "changes-out.tar"

    def run(mode: str, i: int) -> Run:
        drop_caches()
        measured, report, error = _laminae(
            "changes", str(root), str(runroot), driver, "container", mode, str(out)
        )
        out.unlink(missing_ok=True)
        if report is not None and report["changes"] != [f"modified /{CHANGED_FILE}"]:
            error = f"changes were {report['changes'][:5]}, expected one modified file"
        return Run(
            mode,
            i,
            None if error or report is None else report["seconds"],
            maxrss_kib=measured.maxrss_kib,
            error=error,
            detail={} if report is None else {k: v for k, v in report.items() if k != "seconds"},
        )

    runs = run_rounds(console, tools, repeat, run)
    digests = {r.detail.get("tar_sha256") for r in runs if r.error is None}
    info["tars_identical"] = len(digests) == 1
    if len(digests) > 1:
        console.print(f"  [red]native and naive tars differ[/]: {sorted(d for d in digests if d)}")
    unmount_under(runroot)
    remove_tree(root)
    remove_tree(runroot)
    return runs, info


def changes_tables(runs: Sequence[Run], info: dict[str, Any]) -> tuple[Table, Table, Any]:
    native_label = (
        "native: store.changes + store.diff"
        if info.get("driver_declares_changes")
        else "store.changes + store.diff (the driver declares no native changes)"
    )
    times = Table(
        title=f"changes + export: one file changed on {info['files']:,} files; caches cold",
        caption="in-process clock, fresh process per run; naive walks both trees once "
        "(the store would walk them twice: once for changes, once for diff)",
    )
    for column in ("path", "median ms", "min ms", "max ms", "peak RSS MiB", "failed"):
        times.add_column(column, justify="left" if column == "path" else "right")
    for tool, label in (("native", native_label), ("naive", "naive_changes + write_changes_tar")):
        spread = Run.spread(runs, tool)
        rss = [r.maxrss_kib for r in runs if r.tool == tool and r.maxrss_kib]
        times.add_row(
            label,
            _ms(spread.median if spread else None),
            _ms(spread.low if spread else None),
            _ms(spread.high if spread else None),
            fmt(mib(max(rss)) if rss else None, ".1f"),
            str(len(Run.failures(runs, tool))),
        )
    native, naive = Run.spread(runs, "native"), Run.spread(runs, "naive")
    speedup = ratio(naive, native)
    targets = Table(title="changes + export: targets")
    for column in (
        "naive / native",
        f">= {SPEEDUP_TARGET:.0f}x",
        "native median ms",
        f"< {NATIVE_TARGET_S * 1000:.0f} ms",
        "tars identical",
    ):
        targets.add_column(column, justify="right")
    speed_met = None if speedup is None else speedup >= SPEEDUP_TARGET
    time_met = None if native is None else native.median < NATIVE_TARGET_S
    targets.add_row(
        fmt(speedup, ",.0f", "x"),
        verdict(speed_met),
        _ms(native.median if native else None),
        verdict(time_met),
        "yes" if info.get("tars_identical") else "[red]no[/]",
    )
    summary = {
        "native": None if native is None else attrs.asdict(native),
        "naive": None if naive is None else attrs.asdict(naive),
        "speedup": speedup,
        "speedup_target": SPEEDUP_TARGET,
        "speedup_met": speed_met,
        "native_target_seconds": NATIVE_TARGET_S,
        "native_met": time_met,
        **info,
    }
    return times, targets, summary


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help="from: %(default)s")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool (>= 1)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the image sizes")
    parser.add_argument("--depths", default="128,500", help="stack depths for the mount case")
    parser.add_argument("--warm", type=int, default=5, help="warm mounts after each cold one")
    parser.add_argument(
        "--driver", default="overlay", help="laminae's driver (vfs to try the script out)"
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the raw numbers here")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--image-gib", type=int, default=16, help="scratch filesystem size")
    args = parser.parse_args(argv)
    args.case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
    if not args.case_names or set(args.case_names) - set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    args.depth_list = [int(d) for d in args.depths.split(",") if d.strip()]
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 0 < args.scale <= 4:
        parser.error("--scale must be in (0, 4]")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root()
    # Installed before entering the namespace, once; the re-executed process is told what.
    os.environ.setdefault(INSTALLED_MARK, ",".join(ensure_installed(PEERS)))
    enter_private_mount_namespace(Path(__file__).resolve(), argv)
    installed = [p for p in os.environ[INSTALLED_MARK].split(",") if p]
    console = make_console()
    peers = versions(PEERS)
    info = machine(peers)
    console.print(
        f"[bold]laminae overlay benchmark[/]  nproc {info['nproc']}, {info['cpu']}, "
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
            "depths": args.depth_list,
            "driver": args.driver,
            "filesystem": f"ext4 on a {args.image_gib} GiB loop image, direct I/O",
            "caches": "sync; echo 3 > /proc/sys/vm/drop_caches before every run",
            "rss_floor_kib": rss_floor_kib(),
        },
        "cases": {},
    }
    load_before = os.getloadavg()
    tables: list[Table] = []
    failed = False
    with (
        scratch_filesystem(args.workdir, args.image_gib * GIB, "ext4") as mnt,
        private_host_paths(mnt / "host-paths"),
    ):
        unavailable = driver_unavailable(args.driver, mnt)
        if unavailable:
            console.print(f"[yellow]laminae driver {args.driver!r} unavailable[/]: {unavailable}")
        if "mount" in args.case_names:
            rows = mount_case(
                console, mnt, args.depth_list, args.repeat, args.driver, unavailable, args.warm
            )
            tables.append(mount_table(rows, args.repeat))
            document["cases"]["mount"] = [attrs.asdict(r) for r in rows]
        if "changes" in args.case_names:
            runs, changes_info = changes_case(
                console, mnt, args.scale, args.repeat, args.driver, unavailable
            )
            times, targets, summary = changes_tables(runs, changes_info)
            tables += [times, targets]
            document["cases"]["changes"] = {
                "runs": [attrs.asdict(r) for r in runs],
                "summary": summary,
            }
            failed |= any(r.error for r in runs) and unavailable is None
        if "import" in args.case_names:
            image, tools, runs = run_import_case(
                console, mnt, args.scale, args.repeat, args.driver, unavailable,
                snapshotter="overlayfs", storage_driver="overlay",
            )  # fmt: skip
            times, targets, summary = import_tables("import", image, tools, runs)
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
