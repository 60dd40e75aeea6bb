"""Reliability: SIGKILL at random points of a store's operations, many processes on one store,
a full filesystem during an import, and inputs that are not what they claim.

1. **Kills** (:mod:`_reliability_kills`): on each driver (vfs and overlay on an ext4 loop
   filesystem, btrfs on a btrfs one), victims loop over one kind of work each (importing and
   removing an image, removing and importing it again, applying and removing named layers,
   committing a container, creating and removing containers, mounting and unmounting) and are
   killed with SIGKILL after a random delay; the store is then opened again, checked
   (``check()``, and ``check(content=True)`` when the API has it), its unreferenced layers
   counted, and every committed layer exported again and compared with the tar it came from.
   Foreign tmpfs and bind mounts sit under the run directory, the scratch directory and
   elsewhere for the whole campaign.
2. **Load** (:mod:`_reliability_load`): N processes on one store for T seconds, a random mix
   of operations; per operation the successful calls, p50 and p99 latency, and laminae errors
   by kind; raw (non-laminae) errors must not happen.
3. **Full filesystem** and **bad inputs** (:mod:`_reliability_inputs`).

The script ends with the figures and exits non-zero when one that must be 0 is not (the
``must be 0`` table). Everything happens on fresh loop filesystems under ``--workdir``, in a
private mount namespace the script re-executes itself in; they are unmounted by path and their
images deleted at the end.

Run as root: ``.venv/bin/python benchmarks/reliability.py [--short] [--json FILE]``; CI runs
``--short`` (``scripts/test-all``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from _reliability_child import KINDS, LOAD_OPERATIONS
from _reliability_fixtures import Layout, digest, layer_tar, signature, write_layout
from _reliability_inputs import FullDisk, InputResult, bad_inputs, full_disk
from _reliability_kills import KillFigures, has_content_check, kill_campaign
from _reliability_load import EXPECTED_UNDER_CONTENTION, LoadFigures, load_campaign
from report import console as make_console
from report import fmt, machine, write_json
from rich.console import Console
from rich.table import Table
from scratch_fs import GIB, enter_private_mount_namespace, require_root, scratch_filesystem

DRIVERS = ("vfs", "overlay", "btrfs")
PARTS = ("kills", "load", "full-disk", "inputs")
FULL = {"kills": 216, "load_workers": 8, "load_seconds": 300.0}
SHORT = {"kills": 36, "load_workers": 4, "load_seconds": 60.0}


def build_fixtures(where: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The layouts and tars the campaign uses, and the signature of every tar by DiffID.

    ``base``: the image every store starts with (containers are made from it); ``churn``: the
    image import victims bring in and remove; ``apply``: tars applied as a chain of named
    layers; ``load-K``: the images load workers import under many names.
    """
    tars = {
        "base": [layer_tar(f"base{i}", n, 10 + i) for i, n in enumerate((200, 100, 50))],
        "churn": [layer_tar(f"churn{i}", n, 20 + i) for i, n in enumerate((300, 200, 100, 50))],
        "apply": [layer_tar(f"apply{i}", n, 30 + i) for i, n in enumerate((150, 60, 20))],
    }
    for k in range(4):
        tars[f"load-{k}"] = [layer_tar(f"load{k}x{i}", 60, 40 + 2 * k + i) for i in range(2)]
    layouts: dict[str, Layout] = {
        name: write_layout(where / name, name, content)
        for name, content in tars.items()
        if name != "apply"
    }
    apply_paths = []
    for i, content in enumerate(tars["apply"]):
        path = where / f"apply{i}.tar"
        path.write_bytes(content)
        apply_paths.append(str(path))
    spec = {
        "base": layouts["base"].reference,
        "churn": layouts["churn"].reference,
        "apply_tars": apply_paths,
        "layouts": [layouts[f"load-{k}"].reference for k in range(4)],
    }
    expected = {digest(t): signature(t) for content in tars.values() for t in content}
    return spec, expected


# -- tables ----------------------------------------------------------------------------------


def _total(figures: Sequence[KillFigures], get: Callable[[KillFigures], Any]) -> str:
    values = [get(f) for f in figures]
    if any(v is None for v in values):
        return "not available" if all(v is None for v in values) else "partly available"
    if values and isinstance(values[0], dict):
        merged: dict[str, int] = {}
        for value in values:
            for key, n in value.items():
                merged[key] = merged.get(key, 0) + n
        return _counts(merged)
    return str(sum(values))


def _counts(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "not available"
    return ", ".join(f"{k} {n}" for k, n in sorted(counts.items()) if n) or "0"


KILL_ROWS: list[tuple[str, Callable[[KillFigures], Any]]] = [
    ("kills", lambda f: f.kills),
    ("kills leaving dangling layers", lambda f: f.dangling_kills),
    ("dangling layers (counted here)", lambda f: f.dangling_layers),
    ("unreferenced layers (check's own field)", lambda f: f.check_unreferenced),
    ("check problems after the reopen", lambda f: dict(f.problems)),
    ("... still there after one more open", lambda f: dict(f.persisting)),
    ("check's notes after the last kill (not problems)", lambda f: f.notes),
    ("check --content problems", lambda f: None if f.content is None else dict(f.content)),
    ("committed layers re-exported and compared", lambda f: f.layers_verified),
    ("... differing from their DiffID or tar", lambda f: len(f.mismatches)),
    ("raw errors (victims, reopen)", lambda f: len(f.raw)),
    ("laminae errors seen by victims", lambda f: dict(f.victim_errors)),
    ("reopen failures, hung victims", lambda f: len(f.failures) + f.hung),
    ("foreign mounts touched", lambda f: len(f.foreign_touched)),
    ("seconds", lambda f: round(f.seconds)),
]


def kills_table(figures: Sequence[KillFigures]) -> Table:
    table = Table(title="SIGKILL campaign")
    table.add_column("figure")
    for f in figures:
        table.add_column(f.driver, justify="right")
    table.add_column("total", justify="right")
    for label, get in KILL_ROWS:
        cells = [get(f) for f in figures]
        shown = [_counts(c) if isinstance(c, dict) or c is None else str(c) for c in cells]
        table.add_row(label, *shown, _total(figures, get))
    return table


def kill_points_table(figures: Sequence[KillFigures]) -> Table:
    table = Table(title="where the kills landed (victim: operation in flight)")
    for column in ("operation", "kills", "leaving dangling layers"):
        table.add_column(column, justify="left" if column == "operation" else "right")
    ops: dict[str, list[int]] = {}
    for f in figures:
        for op, n in f.by_op.items():
            ops.setdefault(op, [0, 0])[0] += n
        for op, n in f.dangling_by_op.items():
            ops.setdefault(op, [0, 0])[1] += n
    for op, (n, dangling) in sorted(ops.items()):
        table.add_row(op, str(n), str(dangling))
    return table


def load_table(load: LoadFigures) -> Table:
    table = Table(
        title=f"load: {load.workers} processes on one {load.driver} store for "
        f"{load.seconds:.0f} s, {load.operations:,} calls"
    )
    for column in ("operation", "ok", "p50 ms", "p99 ms", "laminae errors by kind"):
        table.add_column(column, justify="left" if column in ("operation",) else "right")
    for op in LOAD_OPERATIONS:
        p50, p99 = load.p50.get(op), load.p99.get(op)
        table.add_row(
            op,
            f"{load.ok.get(op, 0):,}",
            fmt(None if p50 is None else p50 * 1000, ",.1f"),
            fmt(None if p99 is None else p99 * 1000, ",.1f"),
            _counts(load.errors.get(op, {})),
        )
    return table


def inputs_table(results: Sequence[InputResult], disk: FullDisk | None) -> Table:
    table = Table(title="bad inputs and a full filesystem")
    for column in ("input", "verdict", "seconds", "what happened"):
        table.add_column(column, justify="right" if column == "seconds" else "left")
    for r in results:
        verdict = "[green]refused[/]" if r.passed else "[red]FAILED[/]"
        table.add_row(r.case, verdict, f"{r.seconds:.1f}", r.outcome[:150])
    if disk is not None:
        verdict = "[green]clean[/]" if disk.passed else "[red]FAILED[/]"
        left = "; ".join(disk.left[:3]) or "nothing"
        what = f"{disk.outcome[:100]}; left: {left}; import with space back: {disk.import_after}"
        table.add_row("import on a full filesystem", verdict, f"{disk.seconds:.1f}", what[:300])
    return table


def must_be_zero(
    kills: Sequence[KillFigures],
    load: LoadFigures | None,
    inputs: Sequence[InputResult],
    disk: FullDisk | None,
) -> dict[str, int]:
    """The figures that fail the run when they are not 0."""
    figures = {
        "kills leaving dangling layers": sum(f.dangling_kills for f in kills),
        "check problems after a kill that the next open does not clean": sum(
            sum(f.persisting.values()) for f in kills
        ),
        "check --content problems after a kill": sum(
            sum((f.content or {}).values()) for f in kills
        ),
        "committed layers differing from their DiffID or tar": sum(
            len(f.mismatches) for f in kills
        ),
        "raw errors": sum(len(f.raw) for f in kills)
        + (len(load.raw) if load else 0)
        + sum(r.raw for r in inputs)
        + (int(disk.raw) if disk else 0),
        "reopen failures, hung victims and workers": sum(len(f.failures) + f.hung for f in kills)
        + (load.hung + len(load.after.failures) if load else 0),
        "foreign mounts touched": sum(len(f.foreign_touched) for f in kills)
        + (len(load.foreign_touched) if load else 0),
    }
    if load is not None:
        after = load.after
        figures["check problems after the load"] = sum(after.problems.values()) + sum(
            (after.content or {}).values()
        )
        figures["dangling layers after the load"] = len(after.dangling)
        figures["committed layers differing after the load"] = len(after.mismatches)
    if inputs:
        figures["bad inputs not refused by a laminae error naming them"] = sum(
            not r.passed for r in inputs
        )
    if disk is not None:
        figures["full filesystem: not ResourceExhausted, or not clean after"] = int(not disk.passed)
    return figures


def zero_table(figures: dict[str, int], load: LoadFigures | None) -> Table:
    table = Table(title="must be 0")
    for column in ("figure", "value", "verdict"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for label, value in figures.items():
        table.add_row(label, str(value), "[green]ok[/]" if value == 0 else "[red]FAILED[/]")
    if load is not None:
        other = load.unexpected_errors()
        table.add_row(
            "load: laminae errors of kinds contention does not explain (reported only)",
            str(sum(other.values())),
            _counts(other) if other else "-",
        )
    return table


# -- running ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--short", action="store_true", help="the CI form: fewer kills, 1 min load")
    parser.add_argument("--kills", type=int, help="kills over all drivers (full 216, short 36)")
    parser.add_argument("--drivers", default=",".join(DRIVERS), help="kill campaign's drivers")
    parser.add_argument("--parts", default=",".join(PARTS), help="what to run")
    parser.add_argument("--load-workers", type=int, help="processes (full 8, short 4)")
    parser.add_argument("--load-seconds", type=float, help="seconds (full 300, short 60)")
    parser.add_argument("--load-driver", default="overlay")
    parser.add_argument("--max-delay", type=float, default=1.2, help="latest kill, s after ready")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every figure here")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    defaults = SHORT if args.short else FULL
    args.kills = defaults["kills"] if args.kills is None else args.kills
    args.load_workers = args.load_workers or defaults["load_workers"]
    args.load_seconds = args.load_seconds or defaults["load_seconds"]
    args.drivers = [d for d in args.drivers.split(",") if d]
    args.parts = [p for p in args.parts.split(",") if p]
    for part in args.parts:
        if part not in PARTS:
            parser.error(f"--parts: {part!r} is not one of {', '.join(PARTS)}")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1 << 32)
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root(["mkfs.btrfs"] if "btrfs" in args.drivers else [])
    enter_private_mount_namespace(Path(__file__).resolve(), argv)
    console: Console = make_console()
    started = time.monotonic()
    info = machine()
    console.print(
        f"[bold]laminae reliability campaign[/] ({'short' if args.short else 'full'}, seed "
        f"{args.seed})  nproc {info['nproc']}, kernel {info['kernel']}, python "
        f"{info['python']}, laminae {info['laminae']}"
    )
    rng = random.Random(args.seed)
    kills: list[KillFigures] = []
    load: LoadFigures | None = None
    inputs: list[InputResult] = []
    disk: FullDisk | None = None
    with contextlib.ExitStack() as stack:
        ext4 = stack.enter_context(scratch_filesystem(args.workdir, 8 * GIB, "ext4"))
        layouts = ext4 / "layouts"
        layouts.mkdir()
        spec, expected = build_fixtures(layouts)
        if "kills" in args.parts:
            per_driver = math.ceil(args.kills / max(1, len(args.drivers)))
            console.print(
                f"[bold]kills[/]: {per_driver} per driver ({', '.join(args.drivers)}), "
                f"victims {', '.join(KINDS)} in turn; check --content "
                f"{'available' if has_content_check() else 'not available'}"
            )
            for driver in args.drivers:
                home = ext4 / f"kills-{driver}"
                if driver == "btrfs":
                    btrfs = stack.enter_context(scratch_filesystem(args.workdir, 2 * GIB, "btrfs"))
                    home = btrfs / "kills-btrfs"
                kills.append(
                    kill_campaign(
                        driver,
                        home,
                        spec,
                        expected,
                        per_driver,
                        rng,
                        max_delay=args.max_delay,
                        say=console.print,
                    )
                )
        if "load" in args.parts:
            console.print("[bold]load[/]")
            load = load_campaign(
                args.load_driver,
                ext4 / "load",
                spec,
                expected,
                args.load_workers,
                args.load_seconds,
                rng,
                say=console.print,
            )
        if "full-disk" in args.parts:
            console.print("[bold]full filesystem[/]")
            disk = full_disk(args.workdir, layouts, "overlay", console.print)
        if "inputs" in args.parts:
            console.print("[bold]bad inputs[/]")
            home = ext4 / "inputs"
            home.mkdir()
            inputs = bad_inputs(home, "overlay", short=args.short, say=console.print)
    zero = must_be_zero(kills, load, inputs, disk)
    tables: list[Table] = []
    if kills:
        tables += [kills_table(kills), kill_points_table(kills)]
    if load is not None:
        tables.append(load_table(load))
    if inputs or disk is not None:
        tables.append(inputs_table(inputs, disk))
    tables.append(zero_table(zero, load))
    for table in tables:
        console.print(table)
    for f in kills:
        for line in [*f.dangling_seen, *f.mismatches, *f.failures, *f.foreign_touched]:
            console.print(f"[red]{f.driver}[/]: {line}")
        for raw in f.raw:
            console.print(f"[red]{f.driver} raw error[/]: {raw}")
    if load is not None:
        for raw in load.raw[:20]:
            console.print(f"[red]load raw error[/]: {raw}")
        for line in [*load.after.mismatches, *load.after.failures, *load.foreign_touched]:
            console.print(f"[red]load[/]: {line}")
    seconds = time.monotonic() - started
    failed = [k for k, v in zero.items() if v]
    verdict = f"[red]FAILED[/]: {', '.join(failed)}" if failed else "[green]all 0[/]"
    console.print(f"must be 0: {verdict} ({seconds:.0f} s)")
    if args.json is not None:
        document = {
            "command": shlex.join([sys.executable, *sys.argv]),
            "machine": info,
            "settings": {
                "short": args.short,
                "seed": args.seed,
                "kills": args.kills,
                "drivers": args.drivers,
                "parts": args.parts,
                "load_workers": args.load_workers,
                "load_seconds": args.load_seconds,
                "load_driver": args.load_driver,
                "max_delay": args.max_delay,
                "content_check": has_content_check(),
                "expected_under_contention": sorted(EXPECTED_UNDER_CONTENTION),
            },
            "seconds": seconds,
            "must_be_zero": zero,
            "kills": [attrs.asdict(f) for f in kills],
            "load": None if load is None else attrs.asdict(load),
            "inputs": [attrs.asdict(r) for r in inputs],
            "full_disk": None if disk is None else attrs.asdict(disk),
        }
        write_json(args.json, document)
        console.print(f"figures in {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
