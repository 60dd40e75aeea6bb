"""The pytest plugin behind ``pytest --pyargs laminae.conformance --laminae-driver NAME``.

Every pytest run in an environment where laminae is installed loads this module (the
``pytest11`` entry point ``laminae``), so it stays inert until a driver is selected: it adds
its options and registers its markers, and nothing else. No fixture, no autouse, no import
of the rest of laminae. Selecting a driver (``--laminae-driver NAME``, or ``LAMINAE_DRIVER``
when the suite itself is being run) registers the conformance session
(:mod:`laminae.conformance._session`) and the fixtures (:mod:`laminae.conformance._fixtures`).

Options:

``--laminae-driver NAME``
    The installed driver to check (``laminae drivers`` lists them).
``--laminae-strict``
    A driver that cannot run on this host is an error instead of a skip; on by itself when
    ``CI=true``, so that a CI run cannot pass by skipping.
``--laminae-report FILE``
    Write the results as JSON: driver, capabilities, counts by area, and every test.
``--laminae-timeout SECONDS``
    The time each phase of a test (setup, call, teardown) may take; a test that takes
    longer fails, naming the store and driver call that hung (300 by default; 0: no limit).

Markers:

``laminae_requires(*features)``
    The test needs these :class:`laminae.Feature` values; skipped, with the reason, for a
    driver that does not declare them.
``laminae_area(name)``
    The area a test is counted under in the summary and the report (its module's, by
    default: ``test_apply.py`` is ``apply``).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pytest

SUITE_DIR = Path(__file__).resolve().parent
SUITE_PACKAGE = "laminae.conformance"
DEFAULT_TIMEOUT = 300.0

# Helper modules that assert: rewritten like test modules, so a failure shows its values.
_ASSERTING_HELPERS = (
    "laminae.conformance._fixtures",
    "laminae.conformance._layers",
    "laminae.conformance._tree",
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("laminae", "laminae conformance suite")
    group.addoption(
        "--laminae-driver",
        dest="laminae_driver",
        metavar="NAME",
        default=None,
        help="run the laminae conformance suite against the installed driver NAME "
        "(default: $LAMINAE_DRIVER when the suite is run)",
    )
    group.addoption(
        "--laminae-strict",
        dest="laminae_strict",
        action="store_true",
        default=False,
        help="a driver that cannot run here is an error, not a skip (on when CI=true)",
    )
    group.addoption(
        "--laminae-report",
        dest="laminae_report",
        metavar="FILE",
        default=None,
        help="write the conformance results as JSON to FILE",
    )
    group.addoption(
        "--laminae-no-known-failures",
        dest="laminae_no_known_failures",
        action="store_true",
        default=False,
        help="run the tests the driver declares as known failures as ordinary tests, so that "
        "any of them fails the run (for CI that must see none)",
    )
    group.addoption(
        "--laminae-timeout",
        dest="laminae_timeout",
        metavar="SECONDS",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help="fail a conformance test whose setup, call or teardown takes longer, naming "
        f"the call that hung (default: {DEFAULT_TIMEOUT:g}; 0: no limit)",
    )


def _seconds(text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise argparse.ArgumentTypeError(f"0 (no limit) or more seconds, not {text!r}")
    return seconds


def _suite_requested(config: pytest.Config) -> bool:
    """Whether the command line names the suite (``--pyargs laminae.conformance`` or a path)."""
    for arg in config.args:
        if arg.split("::")[0].startswith(SUITE_PACKAGE):
            return True
        path = Path(config.invocation_params.dir, arg.split("::")[0])
        try:
            path.resolve().relative_to(SUITE_DIR)
        except (ValueError, OSError):
            continue
        return True
    return False


def selected_driver(config: pytest.Config) -> str | None:
    """The driver this run checks, or ``None``: the plugin is then inert.

    ``LAMINAE_DRIVER`` also picks the store's driver for the CLI, so it selects a driver
    here only for a run of the suite itself; a user who exports it does not turn every
    other pytest run into a conformance run.
    """
    name: str | None = config.getoption("laminae_driver", default=None)
    if name:
        return name
    env = os.environ.get("LAMINAE_DRIVER")
    if env and _suite_requested(config):
        return env
    return None


def strict_mode(config: pytest.Config) -> bool:
    """``--laminae-strict``, or a CI run (``CI=true``)."""
    if config.getoption("laminae_strict", default=False):
        return True
    return os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "laminae_requires(*features): the test needs these laminae.Feature values; "
        "skipped for a driver that does not declare them",
    )
    config.addinivalue_line(
        "markers",
        "laminae_area(name): the area a laminae conformance test is counted under",
    )
    name = selected_driver(config)
    if name is None:
        return
    pytest.register_assert_rewrite(*_ASSERTING_HELPERS)
    from . import _fixtures
    from ._session import ConformanceSession
    from ._timeout import PhaseTimer

    session = ConformanceSession(
        config, name, strict=strict_mode(config), report=config.getoption("laminae_report")
    )
    config.pluginmanager.register(session, ConformanceSession.PLUGIN_NAME)
    config.pluginmanager.register(_fixtures, "laminae-conformance-fixtures")
    session.select_driver()
    assert session.entry is not None
    session.timer = PhaseTimer(config.getoption("laminae_timeout"), session.entry.cls)
    config.pluginmanager.register(session.timer, PhaseTimer.PLUGIN_NAME)
    # Here, not at session start: unshare(CLONE_NEWNS) moves only the calling thread, and a
    # plugin may start threads from its own pytest_sessionstart.
    session.isolate_mounts()


def _in_suite(path: Path) -> bool:
    try:
        path.resolve().relative_to(SUITE_DIR)
    except (ValueError, OSError):
        return False
    return True


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    # Without a driver the suite's tests would only fail on missing fixtures; say why instead.
    if selected_driver(config) is not None:
        return
    if any(_in_suite(item.path) for item in items):
        from ._session import installed_drivers

        raise pytest.UsageError(
            "the laminae conformance suite needs a driver: --laminae-driver NAME "
            f"(or LAMINAE_DRIVER=NAME); installed drivers: {installed_drivers()}"
        )
