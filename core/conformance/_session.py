"""One conformance run: the driver under test, its capabilities, and the results by area.

Registered as a pytest plugin by :mod:`laminae.conformance.plugin` once a driver is
selected. It resolves the driver, moves the session into a mount namespace of its own, turns
``laminae_requires`` and the driver's known failures into skips and strict xfails, records
every test's outcome, and reports them: a header, a table by area, an optional JSON file, and
a failing exit status for a run where nothing passed.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Final, NoReturn, final

import attrs
import pytest

import laminae
from laminae.driverkit import _plugins
from laminae.kernel import _mounts

from ._timeout import PhaseTimer

__all__ = ["SESSION_KEY", "ConformanceSession", "TestResult", "installed_drivers"]

OUTCOMES: Final = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
_LAMINAE_HOOKS: Final = ("laminae_register_drivers", "laminae_conformance_home")


def installed_drivers() -> str:
    """The installed drivers' names, for a usage message."""
    try:
        names = sorted(laminae.available_drivers())
    except laminae.LaminaeError as exc:
        return f"(cannot list them: {exc})"
    return ", ".join(names) or "none"


@attrs.define
class TestResult:
    """One test's outcome over its setup, call and teardown."""

    __test__: ClassVar[bool] = False  # not a test class, whatever pytest's patterns say

    id: str
    area: str
    outcome: str = "passed"
    duration: float = 0.0
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "area": self.area,
            "outcome": self.outcome,
            "duration": round(self.duration, 4),
            "message": self.message,
        }


def _first_line(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _failure_message(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message)
    return _first_line(report.longreprtext)


def _skip_reason(report: pytest.TestReport) -> str:
    if isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return _first_line(report.longreprtext)


def conformance_id(item: pytest.Item) -> tuple[str, str] | None:
    """``(id, area)`` of a conformance test, or ``None`` for any other test.

    The id is ``<area>::<test name>`` with the parameters, ``apply::test_fifo`` or
    ``diff::test_echo[3]``: it names the test whatever class or module runs it, so that a
    driver can list it in ``Capabilities.known_failures``. Ids are API: never renamed.
    """
    marker = item.get_closest_marker("laminae_area")
    if marker is None or not marker.args:
        return None
    area = str(marker.args[0])
    return f"{area}::{item.name}", area


SESSION_KEY: Final = pytest.StashKey["ConformanceSession"]()
SUITE_DIR: Final = Path(__file__).resolve().parent
SUITE_PACKAGE: Final = __name__.rpartition(".")[0]


class SuiteModule(pytest.Module):
    """A test module of the suite, imported by its package name (``laminae.conformance.x``)
    however laminae is installed, so that it shares its helpers with the plugin."""

    def _getobj(self) -> Any:
        module = importlib.import_module(f"{SUITE_PACKAGE}.{self.path.stem}")
        self.config.pluginmanager.consider_module(module)
        return module


@final
class ConformanceSession:
    """The state of one conformance run; its methods are pytest hooks."""

    PLUGIN_NAME: ClassVar[str] = "laminae-conformance"

    def __init__(
        self, config: pytest.Config, driver_name: str, *, strict: bool, report: str | None
    ) -> None:
        self.config = config
        self.driver_name = driver_name
        self.strict = strict
        self.report_path = Path(report) if report else None
        self.entry: laminae.DriverEntry | None = None
        self.namespace = "not changed"
        self.namespace_refused: str | None = None
        self.timer: PhaseTimer | None = None
        self.results: dict[str, TestResult] = {}
        self.ids: dict[str, tuple[str, str]] = {}
        self.selected: set[str] = set()
        self.unused_known_failures: list[str] = []
        self.honour_known_failures = not config.getoption(
            "laminae_no_known_failures", default=False
        )
        self.known_failed: dict[str, str] = {}  # test id -> reason, of the tests collected
        self.unavailable_reasons: set[str] = set()
        self.nothing_passed = False
        self._bridged: list[object] = []
        config.stash[SESSION_KEY] = self

    # -- the driver ---------------------------------------------------------------------

    def select_driver(self) -> None:
        """Find the driver by name among the installed ones.

        :raises pytest.UsageError: no installed driver has that name.
        """
        try:
            drivers = laminae.available_drivers()
        except laminae.LaminaeError as exc:
            raise pytest.UsageError(f"laminae: cannot load the installed drivers: {exc}") from exc
        if self.driver_name not in drivers:
            raise pytest.UsageError(
                f"--laminae-driver {self.driver_name!r}: no such driver; installed drivers: "
                f"{', '.join(sorted(drivers)) or 'none'}"
            )
        self.entry = drivers[self.driver_name]

    @property
    def capabilities(self) -> laminae.Capabilities:
        assert self.entry is not None
        return self.entry.capabilities

    def unavailable(self, reason: str) -> NoReturn:
        """Skip the test because the driver cannot run here, or fail it in strict mode."""
        self.unavailable_reasons.add(reason)
        if self.strict:
            pytest.fail(
                f"driver {self.driver_name!r} is unavailable: {reason} "
                "(strict mode: an unavailable driver is an error, not a skip)",
                pytrace=False,
            )
        pytest.skip(f"driver {self.driver_name!r} is unavailable: {reason}")

    def check_available(self, home: Path) -> None:
        """Skip or fail (see :meth:`unavailable`) unless the driver can run at ``home``."""
        assert self.entry is not None
        if os.geteuid() != 0:
            # Whatever the driver needs, the store's mount executor mounts for real, and
            # the suite reads every result back from a real mount.
            self.unavailable("the conformance suite mounts layers and needs root (CAP_SYS_ADMIN)")
        if self.namespace_refused is not None:
            self.unavailable(f"the conformance suite {self.namespace_refused}")
        reason = self.entry.probe(home / "root" / self.driver_name, {})
        if reason is not None:
            self.unavailable(reason)

    # -- plugins that register drivers ---------------------------------------------------

    def pytest_plugin_registered(self, plugin: object, manager: pytest.PytestPluginManager) -> None:
        # A conftest.py or a -p module may carry laminae hooks (a driver written for a test,
        # a conformance home); hand it to laminae's plugin manager too. Historic hook: this
        # also sees every plugin registered before the session was.
        if not any(hasattr(getattr(plugin, h, None), "laminae_impl") for h in _LAMINAE_HOOKS):
            return
        pm = _plugins.plugin_manager()
        if not pm.is_registered(plugin):
            pm.register(plugin)
            self._bridged.append(plugin)

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        pm = _plugins.plugin_manager()
        for plugin in self._bridged:
            if pm.is_registered(plugin):
                pm.unregister(plugin)
        self._bridged.clear()

    # -- collection: the suite's modules under their one name -----------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_collect_directory(self, path: Path, parent: pytest.Collector) -> Any:
        # A plain directory, not a Package: a Package imports ``__init__.py`` by its path,
        # which for an editable install names it ``core.conformance`` and loads a second
        # copy of laminae under the name ``core``.
        if path == SUITE_DIR:
            return pytest.Dir.from_parent(parent, path=path)
        return None

    @pytest.hookimpl(tryfirst=True)
    def pytest_pycollect_makemodule(self, module_path: Path, parent: pytest.Collector) -> Any:
        if module_path.parent == SUITE_DIR:
            return SuiteModule.from_parent(parent, path=module_path)
        return None

    # -- the mount namespace -------------------------------------------------------------

    def isolate_mounts(self) -> None:
        """Move the session into a mount namespace of its own, with every mount in it
        private, before the first test.

        Done whatever the propagation looks like: "no shared mount" does not mean "a
        namespace of my own" (a container's processes, or a host that never made ``/``
        shared, share one namespace), and a namespace of one's own whose mounts are still
        shared with the host's would send every test mount there. After this, nothing the
        tests mount reaches another namespace, and nothing mounted in another one (after
        now) appears here.

        ``unshare(CLONE_NEWNS)`` moves the calling thread only: the tests (pytest's main
        thread) and every thread and process they start are in the new namespace; a thread
        a plugin started before this stays in the caller's, and the header says so. Hence
        this runs from ``pytest_configure``, as early as the selected driver is known.

        Not root: nothing is done; the suite cannot mount, and every test reports the driver
        unavailable (a rootless run is already root in a user namespace of its own, where
        this works: ``unshare --user --map-root-user``). Root without ``CAP_SYS_ADMIN`` (a
        container's default): the kernel refuses (``EPERM``), and every test reports the
        driver unavailable, saying why: nothing can be mounted there either.

        :raises pytest.UsageError: the kernel refused for another reason (``ENOSPC``: the
            host's ``user.max_mnt_namespaces`` is reached), or ``/`` cannot be made private:
            running the tests in the caller's namespace instead would mount there.
        """
        if os.geteuid() != 0:
            self.namespace = "the caller's (not root: the suite mounts nothing)"
            return
        earlier = threading.active_count() - 1
        try:
            _mounts.unshare(_mounts.CLONE_NEWNS)
        except OSError as exc:
            if exc.errno == errno.EPERM:
                self.namespace_refused = (
                    f"cannot make a mount namespace of its own ({exc.strerror}: needs "
                    "CAP_SYS_ADMIN), so it cannot mount either"
                )
                self.namespace = f"the caller's ({self.namespace_refused})"
                return
            raise pytest.UsageError(
                "laminae: cannot move the session into a mount namespace of its own: "
                f"unshare(CLONE_NEWNS) failed: {exc.strerror}"
            ) from exc
        try:
            _mounts.mount("none", "/", None, _mounts.MS_REC | _mounts.MS_PRIVATE)
        except OSError as exc:
            raise pytest.UsageError(
                f"laminae: cannot make the session's mounts private: {exc}"
            ) from exc
        self.namespace = "private (unshared by the laminae plugin before the first test)"
        if earlier:
            self.namespace += (
                f"; {earlier} thread(s) started before it stay in the caller's namespace"
            )

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        if self.entry is None:
            return []
        caps = self.capabilities
        features = ",".join(sorted(f.value for f in caps.features)) or "none"
        return [
            f"laminae driver: {self.driver_name} ({self.entry.origin})",
            f"laminae capabilities: features={features} max_depth={caps.max_depth} "
            f"needs_root={'yes' if caps.needs_root else 'no'} "
            f"independent_layers={'yes' if caps.independent_layers else 'no'} "
            f"known_failures={len(caps.known_failures)}"
            + ("" if self.honour_known_failures else " (run as ordinary tests)"),
            "laminae mode: "
            + (
                "strict (an unavailable driver is an error)"
                if self.strict
                else "lenient (an unavailable driver is skipped)"
            ),
            f"laminae mount namespace: {self.namespace}",
            f"laminae timeout: {self.timer.describe() if self.timer else 'none'}",
        ]

    # -- collection: requirements and known failures -------------------------------------

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        if self.entry is None:
            return
        caps = self.capabilities
        known = dict(caps.known_failures) if self.honour_known_failures else {}
        used: set[str] = set()
        for item in items:
            identity = conformance_id(item)
            if identity is None:
                continue
            self.ids[item.nodeid] = identity
            cid = identity[0]
            for marker in item.iter_markers("laminae_requires"):
                missing = [
                    str(getattr(f, "value", f)) for f in marker.args if not self._declares(f)
                ]
                if missing:
                    item.add_marker(
                        pytest.mark.skip(
                            reason=f"driver {self.driver_name!r} does not declare "
                            f"{', '.join(missing)}"
                        )
                    )
            key = cid if cid in known else cid.split("[", 1)[0]
            if key in known:
                used.add(key)
                self.known_failed[cid] = known[key]
                item.add_marker(
                    pytest.mark.xfail(
                        reason=f"known failure of {self.driver_name}: {known[key]}", strict=True
                    )
                )
        self.unused_known_failures = sorted(known.keys() - used)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.config.option.collectonly:
            return  # nothing runs: nothing to count or to fail
        self.selected = {item.nodeid for item in session.items if item.nodeid in self.ids}

    def _declares(self, feature: object) -> bool:
        try:
            wanted = laminae.Feature(getattr(feature, "value", feature))
        except ValueError:
            return False
        return wanted in self.capabilities.features

    # -- results -------------------------------------------------------------------------

    def pytest_report_teststatus(
        self, report: pytest.TestReport, config: pytest.Config
    ) -> tuple[str, str, tuple[str, dict[str, bool]]] | None:
        """A known failure is counted as one in pytest's own final line, not as an xfail
        like any other: a strict run that passes with known failures says so where a reader
        looks last."""
        xfail = getattr(report, "wasxfail", None)
        if (
            report.skipped
            and xfail is not None
            and report.nodeid in self.ids
            and str(xfail).startswith(f"known failure of {self.driver_name}:")
        ):
            return "known failures", "K", ("KNOWN FAILURE", {"yellow": True})
        return None

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        identity = self.ids.get(report.nodeid)
        if identity is None:
            return
        result = self.results.setdefault(report.nodeid, TestResult(*identity))
        result.duration += report.duration
        xfail = getattr(report, "wasxfail", None)
        if report.when == "setup":
            if report.failed:
                result.outcome, result.message = "error", _failure_message(report)
            elif report.skipped:
                if xfail is not None:
                    result.outcome, result.message = "xfailed", str(xfail)
                else:
                    result.outcome, result.message = "skipped", _skip_reason(report)
        elif report.when == "call":
            if report.failed:
                result.outcome, result.message = "failed", _failure_message(report)
            elif report.skipped:
                if xfail is not None:
                    result.outcome, result.message = "xfailed", str(xfail)
                else:
                    result.outcome, result.message = "skipped", _skip_reason(report)
            elif xfail is not None:
                result.outcome, result.message = "xpassed", str(xfail)
        elif report.when == "teardown" and report.failed:
            # A leak or a store that does not check clean after the test fails the test.
            message = _failure_message(report)
            if result.outcome in ("passed", "xpassed", "skipped"):
                result.outcome, result.message = "failed", message
            else:
                result.message = f"{result.message}; then at teardown: {message}"

    def counts(self) -> dict[str, dict[str, int]]:
        """Outcome counts by area, areas sorted."""
        table: dict[str, dict[str, int]] = {}
        for result in self.results.values():
            row = table.setdefault(result.area, dict.fromkeys(OUTCOMES, 0))
            row[result.outcome] += 1
        return dict(sorted(table.items()))

    def _report_json(self) -> dict[str, Any]:
        caps = self.capabilities
        return {
            "driver": self.driver_name,
            "origin": self.entry.origin if self.entry else None,
            "strict": self.strict,
            "capabilities": {
                "features": sorted(f.value for f in caps.features),
                "max_depth": caps.max_depth,
                "needs_root": caps.needs_root,
                "independent_layers": caps.independent_layers,
                "known_failures": dict(caps.known_failures),
            },
            "areas": self.counts(),
            "tests": [r.to_json() for r in sorted(self.results.values(), key=lambda r: r.id)],
        }

    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        if self.entry is None:
            return
        passed = any(r.outcome == "passed" for r in self.results.values())
        if self.selected and not passed and session.exitstatus == pytest.ExitCode.OK:
            self.nothing_passed = True
            session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if self.report_path is not None:
            self.report_path.parent.mkdir(parents=True, exist_ok=True)
            self.report_path.write_text(json.dumps(self._report_json(), indent=2) + "\n")

    def _table(self) -> Iterator[str]:
        counts = self.counts()
        width = max([len("area"), len("total"), *(len(a) for a in counts)])
        yield f"{'area':<{width}}  " + "  ".join(f"{o:>7}" for o in OUTCOMES)
        totals = dict.fromkeys(OUTCOMES, 0)
        for area, row in counts.items():
            yield f"{area:<{width}}  " + "  ".join(f"{row[o]:>7}" for o in OUTCOMES)
            for outcome in OUTCOMES:
                totals[outcome] += row[outcome]
        yield f"{'total':<{width}}  " + "  ".join(f"{totals[o]:>7}" for o in OUTCOMES)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.entry is None or not self.selected:
            return
        terminalreporter.section(f"laminae conformance: driver {self.driver_name}")
        for line in self._table():
            terminalreporter.write_line(line)
        for reason in sorted(self.unavailable_reasons):
            terminalreporter.write_line(f"driver unavailable: {reason}")
        for result in sorted(self.results.values(), key=lambda r: r.id):
            if result.id in self.known_failed:
                # a strict xfail that passes is reported as a failure, "[XPASS(strict)] ..."
                passed = result.outcome == "xpassed" or "XPASS(strict)" in result.message
                terminalreporter.write_line(
                    f"known failure {result.id}: {self.known_failed[result.id]}"
                    + (" (it passed: take it out of known_failures)" if passed else ""),
                    yellow=True,
                )
        if self.unused_known_failures:
            terminalreporter.write_line(
                "known failures declared by the driver that name no collected test: "
                + ", ".join(self.unused_known_failures)
            )
        if self.nothing_passed:
            terminalreporter.write_line(
                f"FAILED: no conformance test passed for driver {self.driver_name!r}: "
                "a run that skips everything does not show the driver works",
                red=True,
                bold=True,
            )
        if self.report_path is not None:
            terminalreporter.write_line(f"report written to {self.report_path}")
