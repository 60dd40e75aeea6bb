"""Many processes on one store at once: counts, latencies and error kinds per operation.

``workers`` load workers (:mod:`_reliability_child`) open the same store and run a random mix
of operations for ``seconds``: importing and removing images, creating, mounting, unmounting,
committing and removing containers, listing layers. They race on purpose (one removes the
image another is creating a container from), so laminae errors that mean "someone else got
there first" (``NotFound``, ``FailedPrecondition``, ``AlreadyExists``) are expected and only
counted by kind. Any other exception is a raw error. Afterwards the store is inspected as after
a kill (:func:`_reliability_kills.inspect_store`).
"""

from __future__ import annotations

import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from _reliability_child import LOAD_OPERATIONS
from _reliability_fixtures import Foreign, TarSignature
from _reliability_kills import CHILD, Inspection, inspect_store

import laminae

__all__ = ["EXPECTED_UNDER_CONTENTION", "LoadFigures", "load_campaign"]

EXPECTED_UNDER_CONTENTION = frozenset({"NotFound", "FailedPrecondition", "AlreadyExists"})
GRACE_SECONDS = 120.0
"""How long past its deadline a worker may take to finish its last operation: longer is a hang."""


@attrs.define
class LoadFigures:
    """What the load did and left.

    :param ok: successful calls by operation.
    :param errors: laminae errors by operation and kind.
    :param p50, p99: latency of the successful calls by operation, seconds.
    :param raw: non-laminae exceptions (must be none).
    :param hung: workers still running :data:`GRACE_SECONDS` after their deadline.
    """

    driver: str
    workers: int
    seconds: float
    ok: dict[str, int] = attrs.field(factory=dict)
    errors: dict[str, dict[str, int]] = attrs.field(factory=dict)
    p50: dict[str, float | None] = attrs.field(factory=dict)
    p99: dict[str, float | None] = attrs.field(factory=dict)
    raw: list[dict[str, Any]] = attrs.field(factory=list)
    hung: int = 0
    after: Inspection = attrs.field(factory=Inspection)
    foreign_touched: list[str] = attrs.field(factory=list)
    wall_seconds: float = 0.0

    @property
    def operations(self) -> int:
        return sum(self.ok.values()) + sum(sum(k.values()) for k in self.errors.values())

    def unexpected_errors(self) -> dict[str, int]:
        """Laminae errors of kinds that contention does not explain, by ``op: kind``."""
        return {
            f"{op}: {kind}": n
            for op, kinds in self.errors.items()
            for kind, n in kinds.items()
            if kind not in EXPECTED_UNDER_CONTENTION
        }


def _percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def load_campaign(
    driver: str,
    home: Path,
    spec: Mapping[str, Any],
    expected: Mapping[str, TarSignature],
    workers: int,
    seconds: float,
    rng: random.Random,
    *,
    say: Callable[[str], None],
) -> LoadFigures:
    """Run the load on a new store of ``driver`` under ``home`` (see the module docstring)."""
    figures = LoadFigures(driver, workers, seconds)
    started = time.monotonic()
    root, runroot, scratch = home / "store", home / "run", home / "scratch"
    scratch.mkdir(parents=True)
    with laminae.open_store(root, runroot=runroot, driver=driver) as store:
        store.import_image(spec["base"], names=["base"])
    foreign = Foreign.make(home / "foreign-source")
    foreign.surround(root, runroot, home / "elsewhere")
    latencies: dict[str, list[float]] = {op: [] for op in LOAD_OPERATIONS}
    errors: dict[str, dict[str, int]] = {op: {} for op in LOAD_OPERATIONS}
    try:
        processes = []
        for worker in range(workers):
            out = scratch / f"worker-{worker}.json"
            worker_spec = {
                "root": str(root),
                "runroot": str(runroot),
                "worker": worker,
                "seed": rng.randrange(1 << 32),
                "seconds": seconds,
                "layouts": spec["layouts"],
                "base_image": "base",
                "out": str(out),
            }
            command = [sys.executable, str(CHILD), "load", json.dumps(worker_spec)]
            processes.append((subprocess.Popen(command), out))
        say(f"  {workers} workers on one {driver} store for {seconds:.0f} s")
        deadline = time.monotonic() + seconds + GRACE_SECONDS
        for process, out in processes:
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                figures.hung += 1
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
            if not out.exists():
                figures.raw.append({"op": "worker", "type": "died", "message": str(out)})
                continue
            result = json.loads(out.read_text())
            figures.raw += result["raw"]
            for op, values in result["latencies"].items():
                latencies[op] += values
            for op, kinds in result["errors"].items():
                for kind, n in kinds.items():
                    errors[op][kind] = errors[op].get(kind, 0) + n
        figures.ok = {op: len(values) for op, values in latencies.items()}
        figures.errors = errors
        figures.p50 = {op: _percentile(values, 50) for op, values in latencies.items()}
        figures.p99 = {op: _percentile(values, 99) for op, values in latencies.items()}
        figures.after = inspect_store(root, runroot, driver, expected, scratch, clean=False)
    finally:
        figures.foreign_touched = foreign.touched()
        foreign.unmount()
    figures.wall_seconds = time.monotonic() - started
    return figures
