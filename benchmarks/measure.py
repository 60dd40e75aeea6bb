"""Time a command and read its own peak RSS, whatever state the benchmark process is in.

``ru_maxrss`` of a child is not the child's alone: at ``execve`` the kernel folds the
*outgoing* address space's high-water mark into the process's maximum (``exec_mmap`` calls
``setmax_mm_hiwater_rss``), and a child forked or vforked from the benchmark leaves with the
benchmark's address space, which has just written a 1 GiB tar and holds 64 MiB of random
pool. Measured directly, GNU tar showed 161 MiB. So every measured command is started by a
small launcher, a fresh ``python -S -I`` that ``posix_spawn``\\ s the command, ``wait4``\\ s
for it and reports its time and ``ru_maxrss``: what the launcher's own address space adds is a
floor of a few MiB (:func:`rss_floor_kib` measures it), not the benchmark's size.

``RUSAGE_CHILDREN`` deltas would not do either: they give the maximum over all children so
far, not this one's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

__all__ = ["Measured", "rss_floor_kib", "run_json", "run_measured"]

_LAUNCHER = """
import json, os, sys, time
out, err, *argv = sys.argv[1:]
actions = [
    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
    (os.POSIX_SPAWN_OPEN, 1, out, os.O_WRONLY | os.O_TRUNC, 0),
    (os.POSIX_SPAWN_OPEN, 2, err, os.O_WRONLY | os.O_TRUNC, 0),
]
start = time.perf_counter()
pid = os.posix_spawnp(argv[0], argv, os.environ, file_actions=actions)
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
print(json.dumps({"seconds": seconds, "maxrss_kib": usage.ru_maxrss, "returncode": code}))
"""


@attrs.frozen
class Measured:
    """One command: its wall time, its own peak RSS, its exit code and output."""

    seconds: float
    """From spawn to reaping, as the launcher saw it (the launcher's start-up excluded)."""
    maxrss_kib: int
    returncode: int
    stdout: str
    stderr: str

    def failure(self, what: str) -> str:
        """``what`` failed: its exit code and the last lines it wrote on stderr."""
        tail = self.stderr.strip().splitlines()[-3:]
        return f"{what} exited {self.returncode}: " + " | ".join(tail)


def run_measured(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: str | None = None
) -> Measured:
    """Run ``argv`` to completion through the launcher; stdin is ``/dev/null``.

    :param env: the command's environment (default: this process's).
    :param cwd: the command's working directory.

    :raises RuntimeError: the launcher itself failed (for example, ``argv[0]`` not found).
    """
    with tempfile.TemporaryDirectory(prefix="laminae-bench-out-") as tmp:
        out, err = Path(tmp, "stdout"), Path(tmp, "stderr")
        out.touch()
        err.touch()
        launcher = [sys.executable, "-S", "-I", "-c", _LAUNCHER, str(out), str(err), *argv]
        done = subprocess.run(
            launcher, capture_output=True, text=True, check=False, env=env, cwd=cwd
        )
        if done.returncode != 0:
            raise RuntimeError(f"launching {argv[0]!r} failed: {done.stderr.strip()}")
        report = json.loads(done.stdout)
        return Measured(
            seconds=report["seconds"],
            maxrss_kib=report["maxrss_kib"],
            returncode=report["returncode"],
            stdout=out.read_text(errors="replace"),
            stderr=err.read_text(errors="replace"),
        )


def run_json(argv: Sequence[str]) -> tuple[Measured, dict[str, Any] | None, str | None]:
    """Run a command that prints one JSON object, measured: (the measurement, the object or
    ``None``, ``None`` or why it failed)."""
    measured = run_measured(argv)
    if measured.returncode != 0:
        return measured, None, measured.failure(Path(argv[1] if len(argv) > 1 else argv[0]).name)
    try:
        return measured, json.loads(measured.stdout), None
    except ValueError as exc:
        return measured, None, f"{argv[0]} printed no JSON: {exc}"


def rss_floor_kib() -> int:
    """The peak RSS reported for ``true``: no measured command can report less."""
    return run_measured(["true"]).maxrss_kib


if __name__ == "__main__":
    # ``python measure.py CMD...``: measure one command by hand.
    print(run_measured(sys.argv[1:]) if len(sys.argv) > 1 else f"floor {rss_floor_kib()} KiB")
