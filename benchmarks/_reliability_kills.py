"""SIGKILL at random points of a store's operations, and what the store looks like after.

For one driver: a store with a base image, foreign mounts around it, then ``kills`` rounds.
Each round hands the next victim (:mod:`_reliability_child`, started while the previous round
was being inspected, so that its interpreter start is not the campaign's bottleneck) one kind
of loop, waits until it is ready, lets it run for a random delay and kills it with SIGKILL.
Then the store is opened again and inspected (:func:`inspect_store`): ``check()``,
``check(content=True)`` when the API has it, the layers that nothing holds, and every
committed layer exported again and compared with the tar it came from.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import inspect
import json
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
from _reliability_child import KINDS, describe_error
from _reliability_fixtures import COMMIT_DIR, Foreign, TarSignature, signature

import laminae

__all__ = ["Inspection", "KillFigures", "has_content_check", "inspect_store", "kill_campaign"]

CHILD = Path(__file__).with_name("_reliability_child.py")
DELAY_SCALE = {"remove-image": 0.25}
"""A victim whose first operation is short is killed within this fraction of the delay."""
READY_SECONDS = 120.0
"""How long a victim may take to open the store and clear its leftovers: longer is a hang."""


def has_content_check() -> bool:
    """Whether ``Store.check`` takes ``content`` (re-deriving each committed layer's DiffID)."""
    return "content" in inspect.signature(laminae.Store.check).parameters


def _is_problem(report_type: type[laminae.CheckReport], field: str) -> bool:
    """Whether an entry in ``field`` of a check report is a problem (one of its ``problems()``)
    rather than a note (unreferenced layers, foreign mounts, ...); asked of the report class
    itself, so that fields this script does not know are sorted too."""
    sample = report_type(**{field: ("sample",)})
    return bool(sample.problems())


def _categories(report: laminae.CheckReport, *, notes: bool = False) -> dict[str, int]:
    """The non-empty problem fields of a check report (with ``notes``, the note fields), and
    how many entries each has, whatever fields this laminae's report has."""
    report_type = type(report)
    return {
        field.name: len(value)
        for field in attrs.fields(report_type)
        if isinstance(value := getattr(report, field.name), tuple)
        and value
        and _is_problem(report_type, field.name) != notes
    }


def unreferenced_layers(store: laminae.Store) -> list[laminae.Layer]:
    """Layers that no image, container, layer name or held child holds, topmost first."""
    layers = {layer.id: layer for layer in store.layers()}
    held: set[str] = set()
    tops = [image.top_layer for image in store.images()]
    tops += [container.layer for container in store.containers()]
    tops += [layer.id for layer in layers.values() if layer.names]
    for top in tops:
        current = top
        while current is not None and current not in held:
            held.add(current)
            current = layers[current].parent if current in layers else None
    return sorted(
        (layer for layer in layers.values() if layer.id not in held),
        key=lambda layer: layer.depth,
        reverse=True,
    )


def _is_commit(found: TarSignature) -> bool:
    """A committing victim's layer: its directory and files whose content is their name."""
    for name, kind, size, content in found:
        if kind == "dir" and name in ("", COMMIT_DIR):
            continue
        token = name.removeprefix(COMMIT_DIR + "/")
        if kind != "file" or token == name or "/" in token:
            return False
        if (size, content) != (len(token) * 64, hashlib.sha256(token.encode() * 64).hexdigest()):
            return False
    return True


@attrs.define
class Inspection:
    """What a reopened store looked like.

    :param problems: check's findings by category, after the open (and its sweep).
    :param notes: what check lists that is not a problem (foreign mounts, ...), by category.
    :param persisting: the same after one more open: what no open cleans.
    :param content: ``check(content=True)``'s findings by category (``None``: not in the API).
    :param dangling: layers nothing holds (counted here from layers, images and containers).
    :param check_unreferenced: what check's own ``unreferenced`` field lists (``None``: no
        such field).
    :param mismatches: committed layers whose export differs from their DiffID or their tar.
    :param raw: non-laminae exceptions raised while reopening and inspecting.
    :param failures: laminae errors raised while reopening and inspecting.
    """

    problems: dict[str, int] = attrs.field(factory=dict)
    notes: dict[str, int] = attrs.field(factory=dict)
    persisting: dict[str, int] = attrs.field(factory=dict)
    content: dict[str, int] | None = None
    dangling: list[str] = attrs.field(factory=list)
    check_unreferenced: int | None = None
    layers_verified: int = 0
    mismatches: list[str] = attrs.field(factory=list)
    raw: list[dict[str, Any]] = attrs.field(factory=list)
    failures: list[str] = attrs.field(factory=list)


def _verify_layers(
    store: laminae.Store, expected: Mapping[str, TarSignature], scratch: Path, found: Inspection
) -> None:
    for layer in store.layers(kind=laminae.LayerKind.COMMITTED):
        with tempfile.TemporaryFile(dir=scratch) as out:
            try:
                result = store.export_layer(layer.id, out)
            except laminae.LaminaeError as exc:
                found.mismatches.append(f"layer {layer.id}: export failed: {exc}")
                continue
            out.seek(0)
            tree = signature(out)
        found.layers_verified += 1
        if result.diff_id != layer.diff_id:
            found.mismatches.append(
                f"layer {layer.id}: exports with DiffID {result.diff_id}, records {layer.diff_id}"
            )
        want = expected.get(str(layer.diff_id))
        if (tree != want) if want is not None else not _is_commit(tree):
            found.mismatches.append(f"layer {layer.id}: its files are not the ones applied")


def inspect_store(
    root: Path,
    runroot: Path,
    driver: str,
    expected: Mapping[str, TarSignature],
    scratch: Path,
    *,
    clean: bool = True,
) -> Inspection:
    """Open the store, check it and its committed layers; with ``clean``, then take away
    what the next round must not count again (dangling layers, what repair fixes)."""
    found = Inspection()
    try:
        with laminae.open_store(root, runroot=runroot, driver=driver) as store:
            report = store.check()
            found.problems = _categories(report)
            found.notes = _categories(report, notes=True)
            unreferenced = getattr(report, "unreferenced", None)
            if unreferenced is not None:
                found.check_unreferenced = len(unreferenced)
            if has_content_check():
                found.content = _categories(store.check(content=True))
            dangling = unreferenced_layers(store)
            found.dangling = [layer.id for layer in dangling]
            _verify_layers(store, expected, scratch, found)
        if found.problems:
            with laminae.open_store(root, runroot=runroot, driver=driver) as store:
                found.persisting = _categories(store.check())
                if found.persisting and clean:
                    store.repair()
        if clean and found.dangling:
            with laminae.open_store(root, runroot=runroot, driver=driver) as store:
                for layer in unreferenced_layers(store):
                    if layer.mount_count:
                        store.unmount(layer.id, force=True)
                    store.remove_layer(layer.id)
    except laminae.LaminaeError as exc:
        found.failures.append(f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # a raw error: the figure that must be 0
        found.raw.append({"op": "reopen and inspect", **describe_error(exc)})
    return found


@attrs.define
class KillFigures:
    """One driver's kill campaign, summed over its rounds."""

    driver: str
    kills: int = 0
    by_kind: collections.Counter[str] = attrs.field(factory=collections.Counter)
    by_op: collections.Counter[str] = attrs.field(factory=collections.Counter)
    dangling_kills: int = 0
    dangling_layers: int = 0
    dangling_by_op: collections.Counter[str] = attrs.field(factory=collections.Counter)
    dangling_seen: list[str] = attrs.field(factory=list)
    """Each kill that left dangling layers: the operation in flight and the layers' ids."""
    check_unreferenced: int | None = None
    problems: collections.Counter[str] = attrs.field(factory=collections.Counter)
    notes: dict[str, int] = attrs.field(factory=dict)
    """Check's notes after the last kill (not problems: foreign mounts, unreferenced...)."""
    persisting: collections.Counter[str] = attrs.field(factory=collections.Counter)
    content: collections.Counter[str] | None = None
    layers_verified: int = 0
    mismatches: list[str] = attrs.field(factory=list)
    raw: list[dict[str, Any]] = attrs.field(factory=list)
    victim_errors: collections.Counter[str] = attrs.field(factory=collections.Counter)
    failures: list[str] = attrs.field(factory=list)
    hung: int = 0
    foreign_touched: list[str] = attrs.field(factory=list)
    seconds: float = 0.0

    def add(self, kind: str, op: str, found: Inspection) -> None:
        self.kills += 1
        self.by_kind[kind] += 1
        self.by_op[op] += 1
        if found.dangling:
            self.dangling_kills += 1
            self.dangling_layers += len(found.dangling)
            self.dangling_by_op[op] += 1
            self.dangling_seen.append(f"kill {self.kills} during {op}: {found.dangling}")
        if found.check_unreferenced is not None:
            self.check_unreferenced = (self.check_unreferenced or 0) + found.check_unreferenced
        self.problems.update(found.problems)
        self.notes = found.notes
        self.persisting.update(found.persisting)
        if found.content is not None:
            if self.content is None:
                self.content = collections.Counter()
            self.content.update(found.content)
        self.layers_verified += found.layers_verified
        self.mismatches += found.mismatches
        self.raw += found.raw
        self.failures += found.failures


class _Victim:
    """A started victim process, and the lines it printed."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), "victim"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.buffer = b""
        self.lines: list[str] = []

    def wait_for(self, word: str, timeout: float) -> bool:
        """Read lines until one is ``word``; false on a timeout or the end of the output."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        deadline = time.monotonic() + timeout
        while word not in self.lines:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return False
            chunk = os.read(fd, 65536)
            if not chunk:
                return False
            self.buffer += chunk
            *complete, self.buffer = self.buffer.split(b"\n")
            self.lines += [line.decode(errors="replace") for line in complete]
        return True

    def start(self, spec: Mapping[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(spec).encode() + b"\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        """SIGKILL, by its PID; then read what it printed up to its death. Once only."""
        if self.process.stdout is None or self.process.stdout.closed:
            return
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()
        assert self.process.stdout is not None
        rest = self.buffer + self.process.stdout.read()
        self.lines += [line.decode(errors="replace") for line in rest.split(b"\n") if line]
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                stream.close()

    def last_op(self) -> str:
        ops = [line[3:] for line in self.lines if line.startswith("op ")]
        return ops[-1] if ops else "(before the first operation)"

    def errors(self) -> list[dict[str, Any]]:
        found = []
        for line in self.lines:
            if line.startswith("error "):
                with contextlib.suppress(ValueError):  # the line the kill cut short
                    found.append(json.loads(line[6:]))
            elif line.startswith("Traceback"):
                # Outside its loop: the victim itself died of an exception.
                found.append(
                    {"raw": True, "type": "crash", "message": self.lines[-1], "op": "victim"}
                )
        return found


def kill_campaign(
    driver: str,
    home: Path,
    spec: Mapping[str, Any],
    expected: Mapping[str, TarSignature],
    kills: int,
    rng: random.Random,
    *,
    max_delay: float,
    say: Callable[[str], None],
) -> KillFigures:
    """``kills`` rounds on a new store of ``driver`` under ``home`` (see the module docstring).

    :param spec: what every victim is told besides the store: the layouts and tars.
    :param expected: the signature of every tar the campaign applies, by DiffID.
    :param say: prints one line of progress.
    """
    figures = KillFigures(driver)
    started = time.monotonic()
    root, runroot, scratch = home / "store", home / "run", home / "scratch"
    scratch.mkdir(parents=True)
    with laminae.open_store(root, runroot=runroot, driver=driver) as store:
        store.import_image(spec["base"], names=["base"])
    foreign = Foreign.make(home / "foreign-source")
    foreign.surround(root, runroot, home / "elsewhere")
    victim_spec = {**spec, "root": str(root), "runroot": str(runroot), "driver": driver}
    victim_spec["base_image"] = "base"
    upcoming: _Victim | None = _Victim()
    victim: _Victim | None = None
    try:
        for round_ in range(kills):
            kind = KINDS[round_ % len(KINDS)]
            assert upcoming is not None
            victim, upcoming = upcoming, None
            victim.start({**victim_spec, "kind": kind})
            ready = victim.wait_for("ready", READY_SECONDS)
            if ready:
                time.sleep(rng.uniform(0.0, max_delay * DELAY_SCALE.get(kind, 1.0)))
            victim.kill()
            upcoming = _Victim()
            if not ready:
                figures.hung += 1
                figures.failures.append(f"{kind} victim never ready: {victim.lines[-5:]}")
            for error in victim.errors():
                if error.get("raw"):
                    figures.raw.append({"kind": kind, **error})
                else:
                    figures.victim_errors[f"{error['op']}: {error['type']}"] += 1
            op = f"{kind}: {victim.last_op()}"
            found = inspect_store(root, runroot, driver, expected, scratch)
            figures.add(kind, op, found)
            note = f"dangling {len(found.dangling)}" if found.dangling else ""
            note += f" problems {found.problems}" if found.problems else ""
            note += f" RAW {found.raw}" if found.raw else ""
            say(f"  {driver} kill {round_ + 1}/{kills} during {op} {note}")
    finally:
        for left in (victim, upcoming):
            if left is not None:
                left.kill()
        figures.foreign_touched = foreign.touched()
        foreign.unmount()
    figures.seconds = time.monotonic() - started
    return figures
