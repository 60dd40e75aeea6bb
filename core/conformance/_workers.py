"""Other processes for the concurrency and crash tests: each opens the test's store itself.

Run as ``python -m laminae.conformance._workers COMMAND JSON``; the JSON names the store
(``root``, ``runroot``, ``driver``) and, for a driver that no entry point provides (one
defined in a test's conftest), the class to register (``driver_class``:
``"module:QualName"``). The test starts the process with :func:`worker_command` and
:func:`worker_env`.

Commands:

``churn``
    Apply ``rounds`` layers of its own in a chain, and one layer every worker applies, and
    create, mount, write, commit and remove layers on them; print the ids it kept as JSON.
``apply-stdin``
    Apply the layer tar read from standard input. Once more than ``signal_after`` bytes are
    read (so the store has marked the layer incomplete and the driver is writing it), write
    one byte to the file descriptor ``signal_fd``: the test kills the process then.
``mount-and-wait``
    Mount layer ``ref``, print its path, and wait for standard input to close.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, BinaryIO

import laminae

from ._tars import LayerTar

__all__ = ["worker_command", "worker_env"]


def worker_command(command: str, **arguments: Any) -> list[str]:
    """The argv that runs ``command`` in a new Python process."""
    return [sys.executable, "-m", __name__, command, json.dumps(arguments)]


def worker_env() -> dict[str, str]:
    """The environment for a worker: this process's, and its import path, so that a driver
    defined next to the tests imports there too."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


def driver_class_name(entry: laminae.DriverEntry) -> str:
    """``module:QualName`` of the driver class, for a worker to register it."""
    return f"{entry.cls.__module__}:{entry.cls.__qualname__}"


def _ensure_driver(name: str, class_name: str | None) -> None:
    if name in laminae.available_drivers() or class_name is None:
        return
    from laminae import driverkit
    from laminae.driverkit import _plugins

    module_name, _, qualname = class_name.partition(":")
    target: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        target = getattr(target, part)

    class _Registers:
        @driverkit.hookimpl
        def laminae_register_drivers(self, register: driverkit.DriverRegistry) -> None:
            register(target)

    _plugins.plugin_manager().register(_Registers())


def _open(args: Mapping[str, Any]) -> laminae.Store:
    _ensure_driver(args["driver"], args.get("driver_class"))
    return laminae.open_store(args["root"], runroot=args["runroot"], driver=args["driver"])


# What the worker is doing, for the one-line failure report main() prints.
_doing = {"step": "start"}


def _step(text: str) -> None:
    _doing["step"] = text


def churn(args: Mapping[str, Any]) -> dict[str, Any]:
    worker = str(args["worker"])
    _step("open the store")
    with _open(args) as store:
        parent: str | None = None
        shared = LayerTar().file("shared", b"every worker applies this").build()
        for round_number in range(int(args["rounds"])):
            at = f"round {round_number}: "
            mine = LayerTar().dir(worker).file(f"{worker}/round-{round_number}", worker.encode())
            _step(at + "apply_layer (its own layer)")
            parent = store.apply_layer(mine.stream(), parent=parent).id
            _step(at + "apply_layer (the layer both workers apply)")
            common = store.apply_layer(io.BytesIO(shared))
            key = f"{worker}-active-{round_number}"
            _step(at + f"create_layer {key}")
            store.create_layer(key, parent=parent)
            _step(at + f"mount {key}")
            path = store.mount(key)
            try:
                _step(at + f"write into {key}")
                (path / "written").write_bytes(key.encode())
            finally:
                _step(at + f"unmount {key}")
                store.unmount(key)
            _step(at + f"commit_layer {key}")
            committed = store.commit_layer(key)
            _step(at + "create_layer (a view of the shared layer)")
            view = store.create_layer(f"{worker}-view-{round_number}", parent=common.id, view=True)
            _step(at + "remove_layer (the view)")
            store.remove_layer(view.id)
            _step(at + "remove_layer (the committed layer)")
            store.remove_layer(committed.id)
    return {"top": parent}


class _Signalling(io.RawIOBase):
    """Reads ``source``; once past ``after`` bytes, writes a byte to ``fd`` (once)."""

    def __init__(self, source: BinaryIO, fd: int, after: int) -> None:
        self._source = source
        self._fd = fd
        self._after = after
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        buffer[: len(data)] = data
        self._read += len(data)
        if self._fd >= 0 and self._read > self._after:
            os.write(self._fd, b"!")
            os.close(self._fd)
            self._fd = -1
        return len(data)


def apply_stdin(args: Mapping[str, Any]) -> dict[str, Any]:
    with _open(args) as store:
        reader = io.BufferedReader(
            _Signalling(sys.stdin.buffer, int(args["signal_fd"]), int(args["signal_after"]))
        )
        layer = store.apply_layer(reader, parent=args.get("parent"))
    return {"id": layer.id}


def mount_and_wait(args: Mapping[str, Any]) -> dict[str, Any]:
    store = _open(args)
    path = store.mount(args["ref"])
    print(json.dumps({"path": str(path)}), flush=True)
    sys.stdin.buffer.read()
    store.unmount(args["ref"])
    store.close()
    return {"path": str(path)}


COMMANDS = {"churn": churn, "apply-stdin": apply_stdin, "mount-and-wait": mount_and_wait}


def main(argv: Sequence[str]) -> int:
    """Run a command; on failure print one JSON line naming the step and the error (the
    traceback still goes to stderr, for whoever wants it) and return 1."""
    command, raw = argv
    try:
        result = COMMANDS[command](json.loads(raw))
    except Exception as exc:
        failure = {"failed": _doing["step"], "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(failure), flush=True)
        raise
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
