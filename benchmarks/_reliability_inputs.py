"""Inputs that are not what they claim, and a filesystem that fills up during an import.

Each bad input is tried by a fresh process (:func:`_reliability_child.attempt`) under a time
limit, and must end in a laminae error whose message names the input (the blob, the document,
the file or the directory), not in a hang, a raw exception or a success:

- a layer blob that is a FIFO (opening it must not block);
- a layer blob that is a symlink to a file outside the layout holding the very bytes the
  descriptor names (followed, it would import);
- an ``index.json`` nested 100,000 deep;
- a gzip bomb: a tar of one file of zeros, in gzip members of 64 MiB each (what a small blob
  inflates to), at the default limits or, in the short form, with a 64 MiB ratio floor;
- a binary ``storage.toml``, and one naming a driver that is not installed;
- a run directory on a read-only filesystem.

The full filesystem: a store on a 256 MiB ext4 filled up but for 4 MiB, then an import of
a 24 MiB incompressible image. It must fail with ``ResourceExhausted``; opened again, the
store must check clean and hold nothing of the image; with the space back, the import works.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
from _reliability_fixtures import Layout, layer_tar, write_layout
from _reliability_kills import CHILD, unreferenced_layers
from scratch_fs import scratch_filesystem

import laminae

__all__ = ["FullDisk", "InputResult", "bad_inputs", "full_disk"]

MIB = 1 << 20
TIME_LIMIT = 60.0
"""Seconds a bad input may take to be refused (the bomb at default limits gets more)."""


@attrs.frozen
class InputResult:
    """How one bad input ended: ``passed`` when a laminae error named it in time."""

    case: str
    passed: bool
    seconds: float
    outcome: str
    raw: bool = False


def _attempt(spec: dict[str, Any], env: dict[str, str] | None, limit: float) -> dict[str, Any]:
    command = [sys.executable, str(CHILD), "attempt", json.dumps(spec)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=limit, env=env, check=False
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "timeout": True}
    lines = done.stdout.strip().splitlines()
    try:
        return dict(json.loads(lines[-1]))
    except (IndexError, ValueError):
        return {"ok": False, "raw": True, "type": "crash", "message": done.stderr[-500:]}


def _judge(case: str, result: dict[str, Any], names: list[str], seconds: float) -> InputResult:
    if result.get("timeout"):
        return InputResult(case, False, seconds, "no answer within the time limit: a hang")
    if result["ok"]:
        return InputResult(case, False, seconds, "accepted")
    outcome = f"{result['type']}: {result['message']}"
    if result["raw"]:
        return InputResult(case, False, seconds, outcome, raw=True)
    if not any(name in result["message"] for name in names):
        return InputResult(case, False, seconds, f"does not name {names[0]}: {outcome}")
    return InputResult(case, True, seconds, outcome)


def _bomb(layout: Path, inflated: int) -> Layout:
    """A one-layer image whose blob is a tar header for a file of ``inflated`` zeros, then
    64 MiB gzip members of zeros (valid gzip: readers go on to the next member). The config
    names some other DiffID: the import must stop long before it could compare."""
    header = tarfile.TarInfo("zeros")
    header.size = inflated
    member = gzip.compress(bytes(64 * MIB), compresslevel=9, mtime=0)
    blob = gzip.compress(header.tobuf(tarfile.PAX_FORMAT), mtime=0)
    blob += member * (inflated // (64 * MIB))
    return write_layout(layout, "bomb", [b"not the bomb"], blobs=[blob])


def bad_inputs(
    home: Path, driver: str, *, short: bool, say: Callable[[str], None]
) -> list[InputResult]:
    """Try every bad input on a store of ``driver`` under ``home``."""
    results: list[InputResult] = []
    root, runroot = home / "store", home / "run"
    small = [layer_tar("bad", 20, 99)]

    def store_spec(source: str) -> dict[str, Any]:
        return {"root": str(root), "runroot": str(runroot), "driver": driver, "source": source}

    def run(
        case: str,
        spec: dict[str, Any],
        names: list[str],
        *,
        env: Any = None,
        limit: float = TIME_LIMIT,
    ) -> None:
        start = time.monotonic()
        result = _attempt(spec, env, limit)
        judged = _judge(case, result, names, time.monotonic() - start)
        results.append(judged)
        say(
            f"  {case}: {'refused' if judged.passed else 'FAILED'} in {judged.seconds:.1f} s: "
            f"{judged.outcome[:160]}"
        )

    fifo = write_layout(home / "fifo", "fifo", small)
    fifo.blob(fifo.layer_digests[0]).unlink()
    os.mkfifo(fifo.blob(fifo.layer_digests[0]))
    run("layer blob is a FIFO", store_spec(fifo.reference), [fifo.layer_digests[0][7:]])

    link = write_layout(home / "symlink", "symlink", small)
    outside = home / "outside-the-layout"
    shutil.copyfile(link.blob(link.layer_digests[0]), outside)
    link.blob(link.layer_digests[0]).unlink()
    link.blob(link.layer_digests[0]).symlink_to(outside)
    run(
        "layer blob is a symlink out of the layout",
        store_spec(link.reference),
        [link.layer_digests[0][7:]],
    )

    deep = write_layout(home / "deep", "deep", small)
    depth = 100_000
    (deep.path / "index.json").write_text('{"manifests":' + "[" * depth + "]" * depth + "}")
    run("index.json nested 100,000 deep", store_spec(deep.reference), ["index.json"])

    inflated = (64 if short else 1536) * MIB
    bomb = _bomb(home / "bomb", inflated + 64 * MIB)
    spec = store_spec(bomb.reference) | ({"floor": 64 * MIB} if short else {})
    run(
        f"gzip bomb ({len(bomb.blob(bomb.layer_digests[0]).read_bytes()) // 1024:,} KiB)",
        spec,
        [bomb.layer_digests[0][7:], "ratio"],
        limit=TIME_LIMIT * (1 if short else 5),
    )

    env = {k: v for k, v in os.environ.items() if k != "LAMINAE_CONFIG"}
    binary = home / "binary-storage.toml"
    binary.write_bytes(bytes(range(256)) * 4)
    run("binary storage.toml", {}, [str(binary)], env=env | {"LAMINAE_CONFIG": str(binary)})

    unknown = home / "unknown-driver.toml"
    unknown.write_text(
        f'[storage]\ndriver = "no-such-driver"\ngraphroot = "{home / "u-root"}"\n'
        f'runroot = "{home / "u-run"}"\n'
    )
    run(
        "storage.toml names a driver not installed",
        {},
        [str(unknown)],
        env=env | {"LAMINAE_CONFIG": str(unknown)},
    )

    readonly = home / "read-only"
    readonly.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "ro", str(readonly)], check=True)
    try:
        run(
            "run directory on a read-only filesystem",
            {"root": str(home / "ro-root"), "runroot": str(readonly / "run"), "driver": driver},
            [str(readonly / "run"), str(readonly)],
        )
    finally:
        subprocess.run(["umount", str(readonly)], check=True)
    return results


def _fill(filler: Path, room: Path) -> None:
    """Fill the filesystem but for 4 MiB: reserve them in ``room``, fill ``filler`` until
    ENOSPC (root writes into the blocks ext4 keeps for it too), then free ``room``."""
    with open(room, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 4 * MIB)
    with open(filler, "wb") as f:
        offset = 0
        for chunk in (16 * MIB, MIB, 64 * 1024, 4096):
            with contextlib.suppress(OSError):
                while True:
                    os.posix_fallocate(f.fileno(), offset, chunk)
                    offset += chunk
    room.unlink()


@attrs.define
class FullDisk:
    """The import on a full filesystem, and the store after it."""

    outcome: str = ""
    resource_exhausted: bool = False
    raw: bool = False
    left: list[str] = attrs.field(factory=list)
    """What the failed import left: check's problems, layers, images, unreferenced layers."""
    import_after: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.resource_exhausted and not self.left and self.import_after == "ok"


def full_disk(workdir: Path, layouts: Path, driver: str, say: Callable[[str], None]) -> FullDisk:
    """See the module docstring."""
    found = FullDisk()
    started = time.monotonic()
    big = write_layout(
        layouts / "big",
        "big",
        [layer_tar("big", 24, 7, max_size=2 * MIB)],
    )
    with scratch_filesystem(workdir, 256 * MIB, "ext4") as mnt:
        root, runroot = mnt / "store", mnt / "run"
        spec = {"root": str(root), "runroot": str(runroot), "driver": driver}
        with laminae.open_store(root, runroot=runroot, driver=driver):
            pass
        filler = mnt / "filler"
        _fill(filler, room=mnt / "room")
        result = _attempt(spec | {"source": big.reference}, None, TIME_LIMIT * 2)
        if result.get("timeout"):
            found.outcome = "no answer within the time limit: a hang"
        elif result["ok"]:
            found.outcome = "imported (the filesystem was not full enough)"
        else:
            found.outcome = f"{result['type']}: {result['message']}"
            found.raw = result["raw"]
            found.resource_exhausted = result["type"] == "ResourceExhausted"
        try:
            with laminae.open_store(root, runroot=runroot, driver=driver) as store:
                found.left += store.check().problems()
                found.left += [f"layer {layer.id}" for layer in store.layers()]
                found.left += [f"image {image.id}" for image in store.images()]
                found.left += [f"unreferenced {x.id}" for x in unreferenced_layers(store)]
        except Exception as exc:
            found.left.append(f"reopen: {type(exc).__name__}: {exc}")
            found.raw = found.raw or not isinstance(exc, laminae.LaminaeError)
        filler.unlink()
        again = _attempt(spec | {"source": big.reference}, None, TIME_LIMIT * 2)
        found.import_after = "ok" if again.get("ok") else str(again)
    found.seconds = time.monotonic() - started
    say(
        f"  full filesystem: {found.outcome[:160]}; left {found.left or 'nothing'}; "
        f"import with space back: {found.import_after[:160]}"
    )
    return found
