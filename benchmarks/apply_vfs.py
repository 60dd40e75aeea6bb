"""laminae's vfs apply against GNU tar extracting the same uncompressed tar, in one run.

Two layers: ``small`` (100,000 files of 0-4 KiB in 1,000 nested directories) and ``large``
(two files of 512 MiB). For each, the two tools take turns on a fresh ext4 filesystem (a
sparse image on a loop device, made by this script and removed at the end):

- laminae: ``store.apply_layer(tar_path)`` on a store opened with ``driver="vfs"``, timed
  inside a fresh process (``apply_once.py``);
- GNU tar: ``tar -xf TAR -C DIR``, then ``sync -f DIR``, each timed around its process.

Before every run the previous result is deleted and the page cache is dropped (``sync``,
then ``echo 3 > /proc/sys/vm/drop_caches``). Peak RSS is the measured process's own, read
with ``os.wait4``. See README.md for how to read the output.

Run as root: ``.venv/bin/python benchmarks/apply_vfs.py [--cases small,large] [--repeat 3]
[--scale 1.0] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from layer_tars import (
    MIB,
    LayerTar,
    TreeSummary,
    summarize_tree,
    write_large_files_tar,
    write_small_files_tar,
)
from measure import rss_floor_kib, run_measured
from report import Spread, first_line, fmt, loads, machine, mib, verdict
from report import console as make_console
from rich.console import Console
from rich.table import Table
from scratch_fs import (
    GIB,
    drop_caches,
    enter_private_mount_namespace,
    remove_tree,
    require_root,
    scratch_ext4,
)

HERE = Path(__file__).resolve().parent
APPLY_ONCE = HERE / "apply_once.py"

TIME_TARGET = 1.5
"""laminae's median apply time may be at most this multiple of GNU tar's (with its sync)."""
MEMORY_TARGET_MIB = 150.0
"""laminae's peak RSS must stay under this, whatever the layer size."""


@attrs.frozen
class Case:
    """One layer to apply: how to describe it and how to write it at a given scale."""

    name: str
    describe: Callable[[float], str]
    write: Callable[[Path, float], LayerTar]


def _small_dirs(scale: float) -> int:
    return max(1, round(1000 * scale))


def _large_bytes(scale: float) -> int:
    return max(MIB, round(512 * MIB * scale))


CASES = {
    "small": Case(
        "small",
        lambda s: f"{_small_dirs(s) * 100:,} files of 0-4 KiB in {_small_dirs(s):,} nested dirs",
        lambda path, s: write_small_files_tar(path, dirs=_small_dirs(s)),
    ),
    "large": Case(
        "large",
        lambda s: f"2 files of {_large_bytes(s) / MIB:,.0f} MiB",
        lambda path, s: write_large_files_tar(path, file_bytes=_large_bytes(s)),
    ),
}


@attrs.frozen
class Run:
    """One measured run of one tool.

    For laminae, ``seconds`` is ``apply_layer`` alone (timed inside the process) and
    ``process_seconds`` the whole process, start-up and imports included. For tar,
    ``seconds`` is ``tar -xf`` and ``sync_seconds`` the ``sync -f`` after it.
    """

    tool: str
    repeat: int
    seconds: float | None
    process_seconds: float
    maxrss_kib: int
    sync_seconds: float | None = None
    error: str | None = None


def _check_tree(found: TreeSummary, expected: TreeSummary) -> str | None:
    if found == expected:
        return None
    return f"applied tree differs: expected {expected}, found {found}"


def _laminae_tree(root: Path, runroot: Path, layer_id: str) -> TreeSummary:
    """Mount the applied layer read-only through the store and count what it holds."""
    import laminae  # only here: the parent needs laminae to check results, not to time them

    with laminae.open_store(root, runroot=runroot, driver="vfs") as store:
        path = store.mount(layer_id, readonly=True)
        try:
            return summarize_tree(path)
        finally:
            store.unmount(layer_id)


def run_laminae(mnt: Path, tar: LayerTar, repeat: int) -> Run:
    root, runroot = mnt / "laminae-store", mnt / "laminae-run"
    try:
        argv = [sys.executable, str(APPLY_ONCE), str(root), str(runroot), str(tar.path)]
        measured = run_measured([*argv, tar.diff_id])
        if measured.returncode != 0:
            failure = measured.failure("apply_once.py")
            return Run(
                "laminae", repeat, None, measured.seconds, measured.maxrss_kib, error=failure
            )
        report = json.loads(measured.stdout)
        error: str | None
        try:
            error = _check_tree(_laminae_tree(root, runroot, report["layer"]), tar.tree)
        except Exception as exc:  # a broken check must not hide the other runs' numbers
            error = f"checking the applied layer failed: {exc!r}"
        return Run(
            "laminae",
            repeat,
            report["seconds"],
            measured.seconds,
            measured.maxrss_kib,
            error=error,
        )
    finally:
        remove_tree(root)
        remove_tree(runroot)


def run_tar(mnt: Path, tar: LayerTar, repeat: int) -> Run:
    target = mnt / "tar-target"
    target.mkdir()
    try:
        measured = run_measured(["tar", "-xf", str(tar.path), "-C", str(target)])
        synced = run_measured(["sync", "-f", str(target)])
        if measured.returncode != 0 or synced.returncode != 0:
            bad = measured if measured.returncode != 0 else synced
            error = bad.failure("tar" if bad is measured else "sync")
            return Run("tar", repeat, None, measured.seconds, measured.maxrss_kib, error=error)
        return Run(
            "tar",
            repeat,
            measured.seconds,
            measured.seconds,
            measured.maxrss_kib,
            sync_seconds=synced.seconds,
            error=_check_tree(summarize_tree(target), tar.tree),
        )
    finally:
        remove_tree(target)


RUNNERS: dict[str, Callable[[Path, LayerTar, int], Run]] = {"laminae": run_laminae, "tar": run_tar}


@attrs.frozen
class CaseResult:
    case: str
    description: str
    tar: LayerTar
    runs: list[Run]


def run_case(console: Console, mnt: Path, case: Case, scale: float, repeat: int) -> CaseResult:
    tars = mnt / "tars"
    tars.mkdir(exist_ok=True)
    description = case.describe(scale)
    console.print(f"[bold]{case.name}[/]: writing the layer tar ({description})")
    start = time.perf_counter()
    tar = case.write(tars / f"{case.name}.tar", scale)
    console.print(
        f"  {tar.size / MIB:,.1f} MiB, {tar.entries:,} entries, {tar.diff_id[:19]}..., "
        f"written in {time.perf_counter() - start:.1f} s"
    )
    runs: list[Run] = []
    try:
        for i in range(repeat):
            # Alternate which tool goes first, so a slow drift (the host's disk, its page
            # cache refilling) does not always favour the same one.
            order = ("laminae", "tar") if i % 2 == 0 else ("tar", "laminae")
            for tool in order:
                drop_caches()
                run = RUNNERS[tool](mnt, tar, i)
                runs.append(run)
                console.print(f"  run {i + 1}/{repeat} {_describe_run(run)}")
    finally:
        tar.path.unlink()
    return CaseResult(case.name, description, tar, runs)


def _describe_run(run: Run) -> str:
    if run.error is not None:
        return f"{run.tool:8} [red]FAILED[/]: {run.error}"
    line = f"{run.tool:8} {run.seconds:8.2f} s"
    if run.sync_seconds is not None:
        line += f" + sync {run.sync_seconds:6.2f} s"
    else:
        line += f" (process {run.process_seconds:.2f} s)"
    return line + f", peak RSS {mib(run.maxrss_kib):6.1f} MiB"


@attrs.frozen
class Summary:
    """A case's numbers as the tables show them."""

    laminae: Spread | None
    tar: Spread | None
    tar_sync: Spread | None
    laminae_rss_mib: float | None
    tar_rss_mib: float | None
    ratio: float | None
    """laminae's median over tar-plus-sync's median: the number the time target is about."""
    ratio_no_sync: float | None
    ratio_best: float | None
    """laminae's fastest run over tar-plus-sync's fastest: other load on the host only ever
    adds time, so on a busy machine this is the steadier number (the target is the median's)."""
    failures: int

    @classmethod
    def of(cls, result: CaseResult) -> Summary:
        good = [r for r in result.runs if r.error is None and r.seconds is not None]
        lam = [r for r in good if r.tool == "laminae"]
        tar = [r for r in good if r.tool == "tar"]
        lam_s = Spread.of([r.seconds for r in lam if r.seconds is not None])
        tar_s = Spread.of([r.seconds for r in tar if r.seconds is not None])
        sync_s = Spread.of([(r.seconds or 0.0) + (r.sync_seconds or 0.0) for r in tar])
        return cls(
            laminae=lam_s,
            tar=tar_s,
            tar_sync=sync_s,
            laminae_rss_mib=mib(max(r.maxrss_kib for r in lam)) if lam else None,
            tar_rss_mib=mib(max(r.maxrss_kib for r in tar)) if tar else None,
            ratio=lam_s.median / sync_s.median if lam_s and sync_s else None,
            ratio_no_sync=lam_s.median / tar_s.median if lam_s and tar_s else None,
            ratio_best=lam_s.low / sync_s.low if lam_s and sync_s else None,
            failures=len(result.runs) - len(good),
        )


def print_report(console: Console, results: list[CaseResult], repeat: int, floor_kib: int) -> None:
    times = Table(
        title=f"vfs apply vs GNU tar: wall time over {repeat} run(s) each, caches cold",
        caption=f"peak RSS: the process's own ru_maxrss, max over runs; a process smaller "
        f"than the launcher's floor ({mib(floor_kib):.1f} MiB) reports the floor",
    )
    for column in ("case", "tool", "median s", "min s", "max s", "MiB/s", "peak RSS MiB"):
        times.add_column(column, justify="left" if column in ("case", "tool") else "right")
    targets = Table(title="targets")
    for column in (
        "case",
        "laminae / (tar + sync)",
        f"time <= {TIME_TARGET}x",
        "laminae / tar alone",
        "fastest / fastest",
        "laminae peak RSS MiB",
        f"memory < {MEMORY_TARGET_MIB:.0f} MiB",
        "failed runs",
    ):
        targets.add_column(column, justify="left" if column == "case" else "right")
    for result in results:
        summary = Summary.of(result)
        label = f"{result.case}\n{result.description}\n{result.tar.size / MIB:,.0f} MiB tar"
        rows = (
            ("laminae apply_layer", summary.laminae, summary.laminae_rss_mib),
            ("tar -xf", summary.tar, summary.tar_rss_mib),
            ("tar -xf + sync -f", summary.tar_sync, summary.tar_rss_mib),
        )
        for i, (tool, spread, rss) in enumerate(rows):
            throughput = result.tar.size / MIB / spread.median if spread else None
            times.add_row(
                label if i == 0 else "",
                tool,
                fmt(spread.median if spread else None, ".2f"),
                fmt(spread.low if spread else None, ".2f"),
                fmt(spread.high if spread else None, ".2f"),
                fmt(throughput, ",.0f"),
                fmt(rss, ".1f"),
                end_section=i == len(rows) - 1,
            )
        time_met = None if summary.ratio is None else summary.ratio <= TIME_TARGET
        rss = summary.laminae_rss_mib
        memory_met = None if rss is None else rss < MEMORY_TARGET_MIB
        targets.add_row(
            result.case,
            fmt(summary.ratio, ".2f") + ("x" if summary.ratio else ""),
            verdict(time_met),
            fmt(summary.ratio_no_sync, ".2f") + ("x" if summary.ratio_no_sync else ""),
            fmt(summary.ratio_best, ".2f") + ("x" if summary.ratio_best else ""),
            fmt(rss, ".1f"),
            verdict(memory_met),
            str(summary.failures),
        )
    console.print(times)
    console.print(targets)


def _json_result(result: CaseResult) -> dict[str, Any]:
    summary = Summary.of(result)
    return {
        "case": result.case,
        "description": result.description,
        "tar": {
            "bytes": result.tar.size,
            "entries": result.tar.entries,
            "diff_id": result.tar.diff_id,
            "tree": attrs.asdict(result.tar.tree),
        },
        "runs": [attrs.asdict(run) for run in result.runs],
        "summary": attrs.asdict(summary),
        "targets": {
            "time_ratio_max": TIME_TARGET,
            "time_met": None if summary.ratio is None else summary.ratio <= TIME_TARGET,
            "memory_mib_max": MEMORY_TARGET_MIB,
            "memory_met": (
                None
                if summary.laminae_rss_mib is None
                else summary.laminae_rss_mib < MEMORY_TARGET_MIB
            ),
        },
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time laminae's vfs apply_layer against GNU tar on a fresh ext4 filesystem.",
    )
    parser.add_argument(
        "--cases",
        default="small,large",
        help="comma-separated, from: %(default)s (default: both)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and case (>= 1)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="fraction of the default layer sizes, e.g. 0.1 for a quick run",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the raw numbers here")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/var/tmp"),
        help="where the sparse filesystem image goes (default: %(default)s)",
    )
    parser.add_argument(
        "--image-gib",
        type=int,
        help="size of the scratch filesystem (default: 8, more for --scale above 1)",
    )
    args = parser.parse_args(argv)
    args.case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.case_names if c not in CASES]
    if unknown or not args.case_names:
        parser.error(f"--cases: unknown {unknown}; choose from {', '.join(CASES)}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if not 0 < args.scale <= 16:
        parser.error("--scale must be in (0, 16]")
    if args.image_gib is None:
        args.image_gib = max(8, -(-6 * args.scale // 1))
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root()
    enter_private_mount_namespace(Path(__file__).resolve(), argv)
    # Piped into a file, rich would wrap the tables at 80 columns.
    console = make_console()
    command = shlex.join([sys.executable, *sys.argv])
    info = machine({"gnu_tar": first_line("tar", "--version") or "?"})
    floor_kib = rss_floor_kib()
    console.print(
        f"[bold]laminae vfs apply benchmark[/]  {datetime.date.today()}  "
        f"nproc {info['nproc']}, {info['cpu']}, {info['memory_gib']} GiB, "
        f"kernel {info['kernel']}, {info['gnu_tar']}, laminae {info['laminae']}"
    )
    console.print(
        f"ext4 on a {args.image_gib:.0f} GiB sparse image under {args.workdir} (loop, direct "
        "I/O); caches dropped before every run; runs alternate laminae and tar"
    )
    results: list[CaseResult] = []
    # Other work on the host shows up as spread between runs; the load average says how much.
    load_before = os.getloadavg()
    with scratch_ext4(args.workdir, int(args.image_gib * GIB)) as mnt:
        for name in args.case_names:
            results.append(run_case(console, mnt, CASES[name], args.scale, args.repeat))
    load_after = os.getloadavg()
    print_report(console, results, args.repeat, floor_kib)
    console.print(
        f"load average (1, 5, 15 min) before {loads(load_before)}, after {loads(load_after)}"
    )
    if args.json is not None:
        document = {
            "command": command,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": info,
            "settings": {
                "repeat": args.repeat,
                "scale": args.scale,
                "image_gib": args.image_gib,
                "tar_command": "tar -xf TAR -C DIR; sync -f DIR",
                "filesystem": "ext4 (mkfs.ext4 -q, no lazy init) on a loop device, direct I/O",
                "caches": "sync; echo 3 > /proc/sys/vm/drop_caches before every run",
                "rss_floor_kib": floor_kib,
                "load_average_before": load_before,
                "load_average_after": load_after,
            },
            "cases": [_json_result(r) for r in results],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        console.print(f"raw numbers in {args.json}")
    return 1 if any(r.error for result in results for r in result.runs) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
