"""The processes the reliability campaign starts: victims it kills, and load workers.

``python _reliability_child.py victim`` imports laminae, prints ``loaded``, reads one JSON
line from stdin (the store, the driver, the kind of loop, the layouts), opens the store, clears
what an earlier victim of its kind left, prints ``ready``, and loops over its operations until
it is killed. Before each operation it prints ``op NAME``, so that the parent knows what a kill
interrupted; every exception it catches is printed as ``error {json}`` (``raw`` when it is not
a laminae error) and the loop goes on.

``python _reliability_child.py load JSON`` is one load worker: it opens the store once and
runs a random mix of operations on it until its deadline, then writes its counts, latencies
and errors to the JSON file named in its arguments.

``python _reliability_child.py attempt JSON`` opens a store, imports one image into it if the
JSON names one, and prints how that ended: the bad-input cases and the full filesystem use it.
"""

from __future__ import annotations

import functools
import json
import random
import secrets
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import laminae

__all__ = ["KINDS", "LOAD_OPERATIONS", "describe_error"]

KINDS = ("import", "remove-image", "apply", "commit", "containers", "mount")
"""The victims' loops: import and remove an image; the same, starting with the image imported
(so that an early kill lands in the removal); apply and remove a chain of named layers;
create, write, commit and remove a container and its image; create and remove containers;
mount and unmount a container and an image's top layer."""

LOAD_OPERATIONS = {
    "import image": 2,
    "remove image": 2,
    "create container": 2,
    "mount container": 2,
    "unmount container": 2,
    "remove container": 3,
    "commit container": 1,
    "layer ls": 2,
}
"""Each load operation and its weight in the mix."""


_COMMIT_SOURCE = "victim-commit-src"


def describe_error(exc: BaseException) -> dict[str, Any]:
    """An exception as the campaign counts it: laminae's or raw, its type, message and where
    it was raised (the innermost frame)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    return {
        "raw": not isinstance(exc, laminae.LaminaeError),
        "type": type(exc).__name__,
        "message": str(exc)[:500],
        "where": where,
    }


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class _Victim:
    """One victim's loop; ``spec`` is the parent's JSON line."""

    def __init__(self, store: laminae.Store, spec: dict[str, Any]) -> None:
        self.store = store
        self.spec = spec
        self.base = spec["base_image"]

    def run(self, name: str, call: Callable[[], object]) -> object:
        _say(f"op {name}")
        try:
            return call()
        except Exception as exc:  # every kind is reported; the loop goes on
            _say("error " + json.dumps({"op": name, **describe_error(exc)}))
            return None

    def quietly(self, call: Callable[[], object]) -> None:
        """Clearing what an earlier victim left: NotFound means there was nothing."""
        try:
            call()
        except laminae.NotFound:
            pass
        except Exception as exc:
            _say("error " + json.dumps({"op": "clear", **describe_error(exc)}))

    def clear(self, kind: str) -> None:
        store = self.store
        if kind in ("import", "remove-image"):
            self.quietly(lambda: store.remove_image("victim-churn"))
        if kind == "remove-image":
            churn = self.spec["churn"]
            self.quietly(lambda: store.import_image(churn, names=["victim-churn"]))
        elif kind == "apply":
            for i in reversed(range(len(self.spec["apply_tars"]))):
                self.quietly(functools.partial(store.remove_layer, f"victim-apply-{i}"))
        elif kind == "commit":
            self.quietly(lambda: store.remove_container(_COMMIT_SOURCE, force=True))
            self.quietly(lambda: store.remove_image("victim-commit"))
        elif kind == "containers":
            self.quietly(lambda: store.remove_container("victim-ctr", force=True))
        elif kind == "mount":
            self.quietly(lambda: store.remove_container("victim-mnt", force=True))
            top = store.image(self.base).top_layer
            if top is not None and store.layer(top).mount_count:
                self.quietly(lambda: store.unmount(top, force=True))
            self.quietly(lambda: store.create_container(self.base, name="victim-mnt"))

    def once(self, kind: str) -> None:
        """One round of ``kind``'s loop."""
        store, run = self.store, self.run
        if kind == "import":
            churn = self.spec["churn"]
            run("import image", lambda: store.import_image(churn, names=["victim-churn"]))
            run("remove image", lambda: store.remove_image("victim-churn"))
        elif kind == "remove-image":
            churn = self.spec["churn"]
            run("remove image", lambda: store.remove_image("victim-churn"))
            run("import image", lambda: store.import_image(churn, names=["victim-churn"]))
        elif kind == "apply":
            parent = None
            tars = self.spec["apply_tars"]
            for i, tar in enumerate(tars):
                apply = functools.partial(
                    store.apply_layer, tar, parent, names=[f"victim-apply-{i}"]
                )
                layer = run("apply layer", apply)
                parent = getattr(layer, "id", None)
            for i in reversed(range(len(tars))):
                run("remove layer", functools.partial(store.remove_layer, f"victim-apply-{i}"))
        elif kind == "commit":
            src = _COMMIT_SOURCE
            run("create container", lambda: store.create_container(self.base, name=src))
            where = run("mount container", lambda: store.mount_container(src))
            if isinstance(where, Path):
                run("write files", lambda: _write_commit_files(where))
            run("unmount container", lambda: store.unmount_container(src))
            run("commit container", lambda: store.commit_container(src, "victim-commit"))
            run("remove container", lambda: store.remove_container(src, force=True))
            run("remove image", lambda: store.remove_image("victim-commit"))
        elif kind == "containers":
            run("create container", lambda: store.create_container(self.base, name="victim-ctr"))
            run("remove container", lambda: store.remove_container("victim-ctr"))
        elif kind == "mount":
            top = store.image(self.base).top_layer
            assert top is not None
            run("mount container", lambda: store.mount_container("victim-mnt"))
            run("unmount container", lambda: store.unmount_container("victim-mnt"))
            run("mount layer", lambda: store.mount(top, readonly=True))
            run("unmount layer", lambda: store.unmount(top))


def _write_commit_files(root: Path) -> None:
    """Files whose content is their own name, so the parent can tell a committed layer whole."""
    work = root / "work"
    work.mkdir(exist_ok=True)
    for _ in range(3):
        token = secrets.token_hex(8)
        (work / token).write_bytes(token.encode() * 64)


def victim() -> int:
    # Resolve the lazy names now, before the parent's clock starts.
    for name in ("Store", "open_store", "LaminaeError", "NotFound"):
        getattr(laminae, name)
    _say("loaded")
    spec = json.loads(sys.stdin.readline())
    store = laminae.open_store(spec["root"], runroot=spec["runroot"], driver=spec["driver"])
    victim = _Victim(store, spec)
    victim.clear(spec["kind"])
    _say("ready")
    while True:
        victim.once(spec["kind"])


# -- load ------------------------------------------------------------------------------------


class _Worker:
    """One load worker: a random mix of operations on one open store."""

    def __init__(self, store: laminae.Store, spec: dict[str, Any]) -> None:
        self.store = store
        self.spec = spec
        self.index = spec["worker"]
        self.rng = random.Random(spec["seed"])
        self.serial = 0
        self.mounted: list[str] = []
        self.latencies: dict[str, list[float]] = {op: [] for op in LOAD_OPERATIONS}
        self.errors: dict[str, dict[str, int]] = {op: {} for op in LOAD_OPERATIONS}
        self.raw: list[dict[str, Any]] = []

    def name(self, what: str) -> str:
        self.serial += 1
        return f"load-{what}-w{self.index}-{self.serial}"

    def pick_image(self) -> str:
        images = self.store.images()
        return self.rng.choice(images).id if images else str(self.spec["base_image"])

    def pick_container(self) -> str | None:
        containers = self.store.containers()
        return self.rng.choice(containers).id if containers else None

    def operation(self, op: str) -> None:
        store, rng = self.store, self.rng
        if op == "import image":
            store.import_image(rng.choice(self.spec["layouts"]), names=[self.name("image")])
        elif op == "remove image":
            removable = [i for i in store.images() if any("load-" in n for n in i.names)]
            if removable:
                image = rng.choice(removable)
                store.remove_image(rng.choice([n for n in image.names if "load-" in n]))
        elif op == "create container":
            store.create_container(self.pick_image(), name=self.name("ctr"))
        elif op == "mount container":
            if (container := self.pick_container()) is not None:
                store.mount_container(container)
                self.mounted.append(container)
        elif op == "unmount container":
            if self.mounted:
                store.unmount_container(self.mounted.pop(rng.randrange(len(self.mounted))))
        elif op == "remove container":
            if (container := self.pick_container()) is not None:
                store.remove_container(container)
        elif op == "commit container":
            if (container := self.pick_container()) is not None:
                store.commit_container(container, self.name("commit"))
        elif op == "layer ls":
            store.layers()

    def run(self, deadline: float) -> None:
        ops, weights = list(LOAD_OPERATIONS), list(LOAD_OPERATIONS.values())
        while time.monotonic() < deadline:
            op = self.rng.choices(ops, weights)[0]
            start = time.perf_counter()
            try:
                self.operation(op)
            except laminae.LaminaeError as exc:
                kind = type(exc).__name__
                self.errors[op][kind] = self.errors[op].get(kind, 0) + 1
                continue
            except Exception as exc:  # a raw error: counted and described, never fatal
                self.raw.append({"op": op, **describe_error(exc)})
                continue
            self.latencies[op].append(time.perf_counter() - start)


def load(spec_text: str) -> int:
    spec = json.loads(spec_text)
    deadline = time.monotonic() + spec["seconds"]
    result: dict[str, Any] = {"worker": spec["worker"], "raw": [], "latencies": {}, "errors": {}}
    try:
        with laminae.open_store(spec["root"], runroot=spec["runroot"]) as store:
            worker = _Worker(store, spec)
            worker.run(deadline)
            result |= {"latencies": worker.latencies, "errors": worker.errors, "raw": worker.raw}
    except Exception as exc:
        result["raw"].append({"op": "open/close", **describe_error(exc)})
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


# -- bad inputs ------------------------------------------------------------------------------


def attempt(spec_text: str) -> int:
    """Open a store (and import ``source`` into it, if given) and print how that ended, as
    JSON: ``{"ok": true}`` or the error as :func:`describe_error` describes it."""
    spec = json.loads(spec_text)
    floor = spec.get("floor")
    limits = None if floor is None else laminae.Limits(compression_ratio_floor_bytes=floor)
    result: dict[str, Any] = {"ok": True}
    try:
        with laminae.open_store(
            spec.get("root"), runroot=spec.get("runroot"), driver=spec.get("driver"), limits=limits
        ) as store:
            if spec.get("source"):
                store.import_image(spec["source"], names=["attempt"])
    except Exception as exc:  # whatever it is, the parent judges it
        result = {"ok": False, **describe_error(exc)}
    _say(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["victim"]:
        sys.exit(victim())
    if sys.argv[1:2] == ["load"]:
        sys.exit(load(sys.argv[2]))
    if sys.argv[1:2] == ["attempt"]:
        sys.exit(attempt(sys.argv[2]))
    sys.exit(f"usage: {sys.argv[0]} victim | load JSON | attempt JSON")
