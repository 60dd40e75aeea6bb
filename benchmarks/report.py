"""What every benchmark reports the same way: spreads of runs, verdicts, the machine, JSON.

The numbers of a benchmark are runs of tools; a table row is a :class:`Spread` (median,
minimum, maximum) over a tool's good runs; a target is a ratio of medians with a verdict.
:func:`machine` says what the numbers were measured on, :func:`laminae_origin` which laminae.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from rich.console import Console
from scratch_fs import remove_tree

__all__ = [
    "REPO",
    "Run",
    "Spread",
    "console",
    "describe_run",
    "driver_unavailable",
    "first_line",
    "fmt",
    "laminae_origin",
    "loads",
    "machine",
    "mib",
    "ratio",
    "run_rounds",
    "verdict",
    "write_json",
]

REPO = Path(__file__).resolve().parent.parent


@attrs.frozen
class Spread:
    """Median, minimum and maximum of a tool's good runs."""

    median: float
    low: float
    high: float
    runs: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        return cls(statistics.median(values), min(values), max(values), len(values))


@attrs.frozen
class Run:
    """One measured run of one tool (a table row gathers a tool's runs).

    ``seconds`` is what the row is about, ``None`` when the run failed (``error`` says why);
    ``sync_seconds`` a ``sync -f`` timed after a peer that does not make its data durable
    itself; ``detail`` anything else worth keeping in the JSON.
    """

    tool: str
    round: int
    seconds: float | None
    sync_seconds: float | None = None
    maxrss_kib: int | None = None
    error: str | None = None
    detail: dict[str, Any] = attrs.field(factory=dict)

    @property
    def total(self) -> float | None:
        """``seconds`` plus the sync after it, if any."""
        if self.seconds is None:
            return None
        return self.seconds + (self.sync_seconds or 0.0)

    @staticmethod
    def spread(runs: Sequence[Run], tool: str, *, total: bool = True) -> Spread | None:
        """The spread of ``tool``'s good runs (with their syncs, unless ``total`` is false); a
        run with an error (a wrong result, too) does not count."""
        values = [r.total if total else r.seconds for r in runs if r.tool == tool and not r.error]
        return Spread.of([v for v in values if v is not None])

    @staticmethod
    def failures(runs: Sequence[Run], tool: str) -> list[str]:
        return [r.error for r in runs if r.tool == tool and r.error is not None]


def run_rounds(
    console: Console, tools: Sequence[str], repeat: int, run: Callable[[str, int], Run]
) -> list[Run]:
    """``repeat`` rounds of every tool; each round starts with the next tool (a rotation), so
    that a slow drift of the host does not always favour the same one. Prints every run."""
    runs: list[Run] = []
    for i in range(repeat):
        shift = i % len(tools)
        for tool in [*tools[shift:], *tools[:shift]]:
            result = run(tool, i)
            runs.append(result)
            console.print(f"  round {i + 1}/{repeat} {describe_run(result)}")
    return runs


def describe_run(run: Run) -> str:
    if run.error is not None or run.seconds is None:
        return f"{run.tool}: [red]FAILED[/] {run.error}"
    line = f"{run.tool}: {_seconds(run.seconds)}"
    if run.sync_seconds is not None:
        line += f" + sync {_seconds(run.sync_seconds)}"
    if run.maxrss_kib is not None:
        line += f", peak RSS {mib(run.maxrss_kib):.1f} MiB"
    return line


def _seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def driver_unavailable(driver: str, where: Path) -> str | None:
    """Why laminae's ``driver`` cannot open a store under ``where`` (``None``: it can).

    Opens and closes a throwaway store there, which is exactly what the measured processes
    do, then removes it.
    """
    import laminae  # only here: the tables do not need laminae

    root, runroot = where / "probe-store", where / "probe-run"
    try:
        with laminae.open_store(root, runroot=runroot, driver=driver):
            return None
    except laminae.LaminaeError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        remove_tree(root)
        remove_tree(runroot)


def ratio(a: Spread | None, b: Spread | None, *, best: bool = False) -> float | None:
    """``a``'s median over ``b``'s (with ``best``, fastest over fastest), if both exist."""
    if a is None or b is None:
        return None
    return a.low / b.low if best else a.median / b.median


def mib(kib: int) -> float:
    return kib / 1024


def verdict(met: bool | None) -> str:
    return {True: "[green]met[/]", False: "[red]missed[/]", None: "[yellow]no data[/]"}[met]


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def loads(load: tuple[float, float, float]) -> str:
    return " ".join(f"{x:.2f}" for x in load)


def console() -> Console:
    """A console for the tables; piped into a file, rich would wrap them at 80 columns."""
    return Console() if Console().is_terminal else Console(width=200)


def first_line(*argv: str) -> str:
    """The first line a command prints on stdout, or ``""`` if it cannot run."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, check=False)
    except OSError:
        return ""
    return done.stdout.strip().partition("\n")[0]


def machine(tools: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What the numbers were measured on; ``tools`` adds the peers' versions."""
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "laminae": laminae_origin(),
        **(tools or {}),
    }


def laminae_origin() -> str:
    """The commit of this checkout when laminae is imported from it (an editable install),
    with ``-dirty`` when core/ or drivers/ have uncommitted changes; else where it is."""
    spec = importlib.util.find_spec("laminae")
    origin = Path(spec.origin) if spec and spec.origin else None
    if origin is None or not origin.is_relative_to(REPO):
        where = origin.parent if origin else "nowhere"
        return f"{importlib.metadata.version('laminae')} installed at {where}"
    commit = first_line("git", "rev-parse", "--short", "HEAD") or "?"
    dirty = first_line("git", "status", "--porcelain", "--", "core", "drivers")
    return f"{commit}{'-dirty' if dirty else ''} (this checkout)"


def write_json(path: Path, document: Mapping[str, Any]) -> None:
    """Write ``document`` with the date added, creating the directory."""
    dated = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**dated, **document}, indent=2, default=str) + "\n")


def finish(
    console: Console,
    tables: Sequence[Any],
    document: dict[str, Any],
    load_before: tuple[float, float, float],
    json_path: Path | None,
) -> None:
    """Print the tables and the load average, and write the JSON document if asked."""
    load_after = os.getloadavg()
    for table in tables:
        console.print(table)
    console.print(f"load average before {loads(load_before)}, after {loads(load_after)}")
    document["settings"] |= {"load_average_before": load_before, "load_average_after": load_after}
    if json_path is not None:
        write_json(json_path, document)
        console.print(f"raw numbers in {json_path}")
