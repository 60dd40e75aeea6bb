"""Start-up: whole ``laminae`` processes that do least, against podman, ctr and skopeo doing the
same, and what ``import laminae`` costs.

Timed from spawn to exit (:mod:`measure`'s launcher), ``--runs`` times each in one run (the
order rotating from round to round), medians reported:

- ``laminae --help``, ``laminae layer ls`` and ``laminae image ls`` on an empty store (its
  ``storage.toml`` names the roots and ``--driver``, default overlay), against ``podman
  images`` on an empty containers-storage (overlay), ``ctr images ls`` against a containerd
  the benchmark starts on its own socket, root and state directory, and ``skopeo --help``;
- ``python -c 'import laminae'`` beside ``python -c pass`` (the difference is what the import
  costs a process), ``python -X importtime -c 'import laminae'``'s own figure for the package
  (cumulative, from stderr), and ``import laminae`` + ``open_store`` + ``close``: what a script
  pays before its first call on a store.

Everything lives on a fresh loop-mounted ext4 (:mod:`scratch_fs`), with the host's container
paths covered (:func:`peers.private_host_paths`). Every command runs once before the timed
rounds, so that the page cache and the bytecode cache are warm: start-up is measured, not the
disk. The Python processes get a bytecode cache of their own on the scratch filesystem
(``PYTHONPYCACHEPREFIX``), as an installed package has one in site-packages; without it
(``PYTHONDONTWRITEBYTECODE`` and an editable install) each run would compile laminae anew.

The peers are Debian's podman, containerd and skopeo, installed with apt-get when missing. A
peer that cannot be installed, or does not run here, is reported as such and its rows stay
empty: the script fails only when a laminae command does. Times are never asserted; the
targets get a verdict.

Run as root: ``.venv/bin/python benchmarks/startup.py [--runs 20] [--driver overlay]
[--json FILE]``; CI runs ``--runs 3``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from measure import Measured, run_measured
from peers import Containerd, Podman, ensure_installed, private_host_paths, versions
from report import REPO, Run, finish, first_line, fmt, machine, mib, ratio, run_rounds, verdict
from report import console as make_console
from rich.console import Console
from rich.table import Table
from scratch_fs import GIB, enter_private_mount_namespace, require_root, scratch_filesystem

PEERS = ("podman", "ctr", "skopeo")
INSTALL_MARK = "LAMINAE_BENCH_PEERS_MISSING"
IMPORT_TARGET_MS = 40.0
LAYER_LS_TARGET_MS = 100.0

LAMINAE = ("laminae --help", "laminae layer ls", "laminae image ls")
PYTHON = ("python -c pass", "import laminae", "importtime laminae", "open_store")
ROWS = {
    "laminae --help": "laminae --help",
    "laminae layer ls": "laminae layer ls (empty store)",
    "laminae image ls": "laminae image ls (empty store)",
    "podman images": "podman images (empty storage)",
    "ctr images ls": "ctr images ls (its own containerd)",
    "skopeo --help": "skopeo --help",
    "python -c pass": "python -c pass",
    "import laminae": "python -c 'import laminae'",
    "importtime laminae": "python -X importtime -c 'import laminae': the package, cumulative",
    "open_store": "python: import laminae, open_store, close",
}

_OPEN_STORE = "import laminae, sys; laminae.open_store(sys.argv[1], runroot=sys.argv[2]).close()"


def _process_seconds(measured: Measured) -> float:
    return measured.seconds


@attrs.frozen
class Tool:
    """One measured command: ``run`` runs it once through :func:`measure.run_measured`;
    ``parse`` turns the finished run into the number its row is about (default: the whole
    process's time)."""

    run: Callable[[], Measured]
    parse: Callable[[Measured], float] = _process_seconds

    @classmethod
    def command(
        cls,
        argv: Sequence[str],
        env: Mapping[str, str],
        parse: Callable[[Measured], float] = _process_seconds,
    ) -> Tool:
        return cls(lambda: run_measured(argv, env=env), parse)


def _importtime(measured: Measured) -> float:
    """The ``laminae`` line of ``-X importtime``: its cumulative microseconds, in seconds."""
    for line in measured.stderr.splitlines():
        fields = [f.strip() for f in line.removeprefix("import time:").split("|")]
        if len(fields) == 3 and fields[2] == "laminae":
            return int(fields[1]) / 1e6
    raise ValueError("no 'laminae' line in the -X importtime output")


def python_env(mnt: Path) -> dict[str, str]:
    """This environment, with a bytecode cache on the scratch filesystem (see the docstring)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return env | {"PYTHONPYCACHEPREFIX": str(mnt / "pycache")}


def laminae_tools(mnt: Path, driver: str) -> dict[str, Tool]:
    """The laminae and Python rows, on a store under ``mnt`` that ``storage.toml`` names."""
    base = mnt / "laminae"
    base.mkdir()
    root, runroot, config = base / "root", base / "run", base / "storage.toml"
    config.write_text(
        f'[storage]\ndriver = "{driver}"\ngraphroot = "{root}"\nrunroot = "{runroot}"\n'
    )
    env = python_env(mnt) | {"LAMINAE_CONFIG": str(config)}
    script = shutil.which("laminae", path=str(Path(sys.executable).parent)) or "laminae"
    python = sys.executable
    return {
        "laminae --help": Tool.command([script, "--help"], env),
        "laminae layer ls": Tool.command([script, "layer", "ls"], env),
        "laminae image ls": Tool.command([script, "image", "ls"], env),
        "python -c pass": Tool.command([python, "-c", "pass"], env),
        "import laminae": Tool.command([python, "-c", "import laminae"], env),
        "importtime laminae": Tool.command(
            [python, "-X", "importtime", "-c", "import laminae"], env, _importtime
        ),
        "open_store": Tool.command([python, "-c", _OPEN_STORE, str(root), str(runroot)], env),
    }


def install_peers() -> dict[str, str]:
    """Install the missing peers, one package at a time; why each missing one is missing."""
    missing: dict[str, str] = {}
    for command in PEERS:
        try:
            ensure_installed([command])
        except RuntimeError as exc:
            missing[command] = str(exc)
        if shutil.which(command) is None and command not in missing:
            missing[command] = f"{command} is not on PATH"
    return missing


@contextlib.contextmanager
def peer_tools(
    console: Console, mnt: Path, missing: Mapping[str, str]
) -> Iterator[dict[str, Tool]]:
    """The peers' rows; containerd runs for the duration."""
    tools: dict[str, Tool] = {}
    if "podman" not in missing:
        podman = Podman("overlay", mnt / "podman" / "root", mnt / "podman" / "run", mnt / "podman")
        tools["podman images"] = Tool(lambda: podman.measured("images"))
    if "skopeo" not in missing:
        tools["skopeo --help"] = Tool.command(["skopeo", "--help"], os.environ)
    with contextlib.ExitStack() as stack:
        if "ctr" not in missing:
            try:
                containerd = stack.enter_context(Containerd(mnt / "containerd"))
            except RuntimeError as exc:
                console.print(f"[yellow]peer ctr unavailable[/]: {exc}")
            else:
                tools["ctr images ls"] = Tool(lambda: containerd.ctr_measured("images", "ls"))
        yield tools


def measure(name: str, tool: Tool, round_: int) -> Run:
    measured = tool.run()
    if measured.returncode != 0:
        return Run(name, round_, None, maxrss_kib=measured.maxrss_kib, error=measured.failure(name))
    try:
        seconds = tool.parse(measured)
    except ValueError as exc:
        return Run(name, round_, None, error=f"{name}: {exc}")
    detail = {"process_seconds": measured.seconds} if seconds != measured.seconds else {}
    return Run(name, round_, seconds, maxrss_kib=measured.maxrss_kib, detail=detail)


def warm_up(console: Console, tools: dict[str, Tool]) -> list[str]:
    """Run every command once, untimed (the first laminae run creates the store); drop the
    peers that fail, and return the laminae commands that do."""
    failed = []
    for name, tool in list(tools.items()):
        run = measure(name, tool, -1)
        if run.error is None:
            continue
        if name in LAMINAE or name in PYTHON:
            failed.append(run.error)
        else:
            del tools[name]
        console.print(f"[yellow]warm-up[/]: {run.error}")
    return failed


# -- tables ----------------------------------------------------------------------------------


def _ms(seconds: float | None) -> str:
    return fmt(None if seconds is None else seconds * 1000, ",.1f")


def times_table(runs: Sequence[Run], tools: Mapping[str, Tool]) -> Table:
    table = Table(title="whole process, ms (python -X importtime: the package's own import)")
    for column in ("command", "median", "min", "max", "runs", "peak RSS MiB"):
        table.add_column(column, justify="left" if column == "command" else "right")
    for name, label in ROWS.items():
        spread = Run.spread(runs, name)
        failures = Run.failures(runs, name)
        rss = [r.maxrss_kib for r in runs if r.tool == name and r.maxrss_kib]
        table.add_row(
            label,
            _ms(spread.median if spread else None),
            _ms(spread.low if spread else None),
            _ms(spread.high if spread else None),
            ("-" if name not in tools else str(spread.runs if spread else 0))
            + (f" [red]{len(failures)} failed[/]" if failures else ""),
            fmt(mib(max(rss)) if rss else None, ".1f"),
        )
    return table


COMPARISONS = (
    ("laminae layer ls", "podman images"),
    ("laminae image ls", "podman images"),
    ("laminae image ls", "ctr images ls"),
    ("laminae --help", "skopeo --help"),
)


def summary(runs: Sequence[Run]) -> dict[str, float | None]:
    """The medians by row, the ratios against the peers, and the figures the targets judge."""
    medians = {name: (s.median if (s := Run.spread(runs, name)) else None) for name in ROWS}
    result: dict[str, float | None] = {f"median {name}": medians[name] for name in ROWS}
    for ours, theirs in COMPARISONS:
        result[f"ratio {ours} / {theirs}"] = ratio(Run.spread(runs, ours), Run.spread(runs, theirs))
    imported, bare = medians["import laminae"], medians["python -c pass"]
    result["import laminae minus python -c pass"] = (
        None if imported is None or bare is None else imported - bare
    )
    return result


def ratios_table(result: Mapping[str, float | None]) -> Table:
    table = Table(title="laminae against its peers (median over median)")
    table.add_column("laminae")
    table.add_column("peer")
    table.add_column("ratio", justify="right")
    for ours, theirs in COMPARISONS:
        table.add_row(ROWS[ours], ROWS[theirs], fmt(result[f"ratio {ours} / {theirs}"], ".2f", "x"))
    return table


def targets_table(result: Mapping[str, float | None]) -> Table:
    table = Table(title="targets (medians, ms)")
    for column in ("what", "value", "target", "verdict"):
        table.add_column(column, justify="left" if column == "what" else "right")
    rows = (
        ("import laminae: process minus python -c pass", "import laminae minus python -c pass"),
        ("import laminae: -X importtime, cumulative", "median importtime laminae"),
    )
    for label, key in rows:
        value = result[key]
        table.add_row(
            label,
            _ms(value),
            f"<= {IMPORT_TARGET_MS:.0f}",
            verdict(None if value is None else value * 1000 <= IMPORT_TARGET_MS),
        )
    value = result["median laminae layer ls"]
    table.add_row(
        "laminae layer ls, whole process",
        _ms(value),
        f"<= {LAYER_LS_TARGET_MS:.0f}",
        verdict(None if value is None else value * 1000 <= LAYER_LS_TARGET_MS),
    )
    return table


# -- running ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20, help="rounds (>= 1)")
    parser.add_argument("--driver", default="overlay", help="laminae's driver (default overlay)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="default: results/startup-*")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--image-gib", type=int, default=2, help="scratch filesystem size")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.json is None:
        commit = first_line("git", "rev-parse", "--short", "HEAD") or "unknown"
        args.json = REPO / "benchmarks" / "results" / f"startup-{commit}.json"
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root()
    # Installed before entering the namespace, once; the re-executed process is told what
    # could not be (a peer that cannot be installed leaves its rows empty, it fails nothing).
    if INSTALL_MARK not in os.environ:
        missing = install_peers()
        os.environ[INSTALL_MARK] = "\n".join(f"{k}\t{v}" for k, v in missing.items())
    enter_private_mount_namespace(Path(__file__).resolve(), argv)
    console = make_console()
    missing = dict(
        line.split("\t", 1) for line in os.environ[INSTALL_MARK].splitlines() if "\t" in line
    )
    installed = [c for c in PEERS if c not in missing]
    peers = versions([*installed, *(["containerd"] if "ctr" in installed else [])])
    info = machine(peers)
    console.print(
        f"[bold]laminae start-up benchmark[/]  nproc {info['nproc']}, {info['cpu']}, "
        f"{info['memory_gib']} GiB, kernel {info['kernel']}, python {info['python']}, "
        f"laminae {info['laminae']}"
    )
    console.print("peers: " + ("; ".join(f"{k} {v}" for k, v in peers.items()) or "none"))
    for command, reason in missing.items():
        console.print(f"[yellow]peer {command} unavailable, its rows stay empty[/]: {reason}")
    document: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": info,
        "settings": {
            "runs": args.runs,
            "driver": args.driver,
            "podman_storage_driver": "overlay",
            "filesystem": f"ext4 on a {args.image_gib} GiB loop image, direct I/O",
            "caches": "warm: every command runs once, untimed, before the rounds",
            "peers_unavailable": missing,
        },
    }
    load_before = os.getloadavg()
    with (
        scratch_filesystem(args.workdir, args.image_gib * GIB, "ext4") as mnt,
        private_host_paths(mnt / "host-paths"),
        peer_tools(console, mnt, missing) as peers_tools,
    ):
        tools = laminae_tools(mnt, args.driver) | peers_tools
        failed = warm_up(console, tools)
        if failed:
            console.print("[red]laminae failed before the rounds; nothing measured[/]")
            return 1
        console.print(f"[bold]{args.runs} rounds[/] of: {', '.join(tools)}")
        runs = run_rounds(
            console, list(tools), args.runs, lambda name, i: measure(name, tools[name], i)
        )
    result = summary(runs)
    document["runs"] = [attrs.asdict(r) for r in runs]
    document["summary"] = result
    tables = [times_table(runs, tools), ratios_table(result), targets_table(result)]
    finish(console, tables, document, load_before, args.json)
    ours = (*LAMINAE, *PYTHON)
    return 1 if any(r.error for r in runs if r.tool in ours) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
