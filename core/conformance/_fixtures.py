"""The fixtures the conformance tests use, and nothing else: a test sees a driver only
through them, so the suite also runs when a driver package subclasses its test classes.

``driver_entry``
    The :class:`laminae.DriverEntry` under test (session).
``capabilities``
    What it declares (session).
``driver_home``
    A fresh directory for one test: a plain directory under ``tmp_path``, or whatever the
    ``laminae_conformance_home`` hook of a driver package yields (a filesystem the driver
    needs, such as btrfs on a loop image). The driver is probed there first: a driver that
    cannot run is skipped, or an error under ``--laminae-strict``.
``store_paths``, ``make_store``, ``store``
    A store of the driver under test in ``driver_home`` (``root/`` and ``run/``); more
    handles on it, or stores elsewhere, from ``make_store``. Every store is closed after the
    test, its mounts dropped, and it must then check clean.
``tar``
    :class:`laminae.conformance._tars.LayerTar`, to build layer tars.
``scratch``
    A directory for the test's own files (flat copies, tars, other stores), beside the
    driver's home and on the same filesystem, so a store made there can run the driver too.
``sentinel``
    A directory outside every store holding one file, ``victim``; hostile layers aim at it,
    and nothing may change in it.

After every test the leak guard (autouse) looks for mounts, loop devices and files the test
left behind in its own directories, fails the test naming them, and cleans them up; it
never counts or touches anything elsewhere (:mod:`laminae.conformance._leaks`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import attrs
import pytest

import laminae
from laminae.driverkit import _plugins

from ._leaks import FileWatch, HostState, cleanup, describe
from ._session import SESSION_KEY, ConformanceSession
from ._tars import LayerTar

__all__ = [
    "LeakGuard",
    "StoreFactory",
    "StorePaths",
    "capabilities",
    "driver_entry",
    "driver_home",
    "laminae_leak_guard",
    "laminae_session",
    "make_store",
    "scratch",
    "sentinel",
    "store",
    "store_paths",
    "tar",
]

VICTIM_CONTENT = b"must not change\n"


@pytest.fixture(scope="session")
def laminae_session(request: pytest.FixtureRequest) -> ConformanceSession:
    """The conformance run (driver, strictness, results)."""
    return request.config.stash[SESSION_KEY]


@pytest.fixture(scope="session")
def driver_entry(laminae_session: ConformanceSession) -> laminae.DriverEntry:
    """The driver under test, as the registry lists it."""
    assert laminae_session.entry is not None
    return laminae_session.entry


@pytest.fixture(scope="session")
def capabilities(driver_entry: laminae.DriverEntry) -> laminae.Capabilities:
    """What the driver under test declares."""
    return driver_entry.capabilities


@attrs.define
class LeakGuard:
    """What a test may leave behind in its own directories: nothing. Collects findings
    until the test ends.

    :param before: the mounts and loop devices when the test started.
    :param scopes: the test's own directories; only mounts and loop devices there are the
        test's (see :mod:`laminae.conformance._leaks`). Fixtures that hand out a directory
        elsewhere (a driver's home on a filesystem of its own, another store's root) add it.
    """

    before: HostState
    scopes: list[Path]
    findings: list[str] = attrs.field(factory=list)

    def watch(self, path: Path) -> None:
        """Count mounts below ``path`` (and loop devices backed there) as the test's too."""
        path = path.resolve()
        if not any(path == s or s in path.parents for s in self.scopes):
            self.scopes.append(path)

    def finish(self) -> list[str]:
        """Compare the test's directories with :attr:`before`, clean up, and return every
        finding."""
        mounts, loops = HostState.now().leaks_since(self.before, self.scopes)
        findings = [*self.findings, *describe(mounts, loops), *cleanup(mounts, loops)]
        self.findings.clear()
        return findings


@pytest.fixture(autouse=True)
def laminae_leak_guard(tmp_path: Path) -> Iterator[LeakGuard]:
    """Fail the test if it leaves mounts, loop devices or files behind.

    Everything a test makes is below its ``tmp_path`` (the driver's home, the store, the
    scratch and sentinel directories) unless a fixture says otherwise, so mounts and loop
    devices are looked for there, and only there.
    """
    guard = LeakGuard(HostState.now(), [tmp_path.resolve()])
    yield guard
    findings = guard.finish()
    if findings:
        pytest.fail("the test left things behind:\n  " + "\n  ".join(findings), pytrace=False)


@pytest.fixture
def sentinel(tmp_path: Path) -> Path:
    """A directory outside every store, holding ``victim``; nothing may change in it."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "victim").write_bytes(VICTIM_CONTENT)
    (path / "victim").chmod(0o644)
    return path


@pytest.fixture
def driver_home(
    tmp_path: Path,
    laminae_session: ConformanceSession,
    laminae_leak_guard: LeakGuard,
    sentinel: Path,
) -> Iterator[Path]:
    """A fresh home for the driver under test, where it can run (else skip or error)."""
    base = tmp_path / "fs"
    base.mkdir()
    provided = _plugins.conformance_home(laminae_session.driver_name, base)
    with contextlib.ExitStack() as stack:
        if provided is None:
            home = tmp_path / "home"
            home.mkdir()
        else:
            try:
                home = Path(stack.enter_context(provided))
            except laminae.DriverUnavailable as exc:
                laminae_session.unavailable(exc.reason)
            laminae_leak_guard.watch(home)
        laminae_session.check_available(home)
        # Beside the home, on its filesystem: stores a test makes in scratch need it too.
        scratch = home.parent / "scratch"
        scratch.mkdir()
        laminae_leak_guard.watch(scratch)
        watches = [FileWatch.start(tmp_path, excluded=(home, scratch, base))]
        if provided is not None and home.parent != tmp_path:
            # Around a provided home only new files count: its own image changes as it works.
            watches.append(FileWatch.start(home.parent, excluded=(home, scratch)))
        yield home
        # Checked before the provided home goes away: files written beside it go with it.
        for number, watch in enumerate(watches):
            changes = watch.changes()
            if number > 0:
                changes = [c for c in changes if c.startswith("file written")]
            laminae_leak_guard.findings.extend(changes)


@pytest.fixture
def scratch(driver_home: Path) -> Path:
    """A directory for the test's own files, on the driver home's filesystem."""
    return driver_home.parent / "scratch"


@attrs.frozen
class StorePaths:
    """Where the test's store lives, and which driver it uses."""

    root: Path
    runroot: Path
    driver: str


@pytest.fixture
def store_paths(driver_home: Path, laminae_session: ConformanceSession) -> StorePaths:
    """The root and run directory of the test's store, in the driver's home."""
    return StorePaths(driver_home / "root", driver_home / "run", laminae_session.driver_name)


class StoreFactory(Protocol):
    """Opens a store of the driver under test; closed after the test."""

    def __call__(
        self,
        root: Path | None = None,
        runroot: Path | None = None,
        *,
        limits: laminae.Limits | None = None,
    ) -> laminae.Store: ...


def _settle(paths: StorePaths) -> list[str]:
    """Drop the mounts a test left on a store, and check it; return what is wrong."""
    with laminae.open_store(paths.root, runroot=paths.runroot, driver=paths.driver) as store:
        for layer in store.layers():
            if layer.mount_count:
                store.unmount(layer.id, force=True)
        report = store.check()
        if report.ok:
            return []
        return [
            f"store {paths.root} does not check clean after the test: {problem}"
            for problem in report.problems()
        ]


@pytest.fixture
def make_store(
    store_paths: StorePaths, laminae_session: ConformanceSession, laminae_leak_guard: LeakGuard
) -> Iterator[StoreFactory]:
    """Open stores of the driver under test: the test's own by default, or another root
    (whose mounts the leak guard then watches too)."""
    opened: list[laminae.Store] = []
    used: dict[Path, StorePaths] = {}

    def make(
        root: Path | None = None,
        runroot: Path | None = None,
        *,
        limits: laminae.Limits | None = None,
    ) -> laminae.Store:
        if root is None:
            paths = store_paths
        else:
            run = runroot if runroot is not None else root.with_name(root.name + "-run")
            paths = StorePaths(root, run, store_paths.driver)
        laminae_leak_guard.watch(paths.root)
        laminae_leak_guard.watch(paths.runroot)
        try:
            store = laminae.open_store(
                paths.root, runroot=paths.runroot, driver=paths.driver, limits=limits
            )
        except laminae.DriverUnavailable as exc:
            laminae_session.unavailable(exc.reason)
        opened.append(store)
        used.setdefault(paths.root, paths)
        return store

    yield make
    for store in reversed(opened):
        store.close()
    problems = []
    for paths in used.values():
        problems.extend(_settle(paths))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)


@pytest.fixture
def store(make_store: StoreFactory) -> laminae.Store:
    """A store of the driver under test, fresh for this test."""
    return make_store()


@pytest.fixture
def tar() -> type[LayerTar]:
    """The layer tar builder: ``tar().dir("etc").file("etc/hostname", b"box").build()``."""
    return LayerTar
