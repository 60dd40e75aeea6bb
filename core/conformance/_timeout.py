"""Time limits for conformance tests: a hung driver fails its test, naming the call that hung.

Each phase of a test (setup, call, teardown) has ``--laminae-timeout`` seconds (300 by
default; 0 turns the limit off). When they run out, the test fails with a message naming
the store call the test was making (``Store.create_layer``), the driver call under it
(``MyDriver.create``) and the innermost frame, where it was stuck; the traceback shows the
rest. Teardown gets its own time, so a test that timed out still unmounts and cleans up.

The timer is ``SIGALRM`` (``setitimer(ITIMER_REAL)``), and the handler raises in the test's
own thread, where the hung call is: a read of a device node, a FIFO or a FUSE file, a lock,
a ``wait`` for a child; the kernel interrupts the system call, Python runs the handler, and
the test fails where it hung, with its ``finally`` blocks run. A watchdog thread could only
dump stacks and end the process (pytest-timeout's ``thread`` method), losing the summary,
the report and the cleanup of the tests' mounts; pytest-timeout's ``signal`` method does
what this does but cannot say which laminae call hung. A call the kernel does not interrupt
(a process in uninterruptible sleep, ``D`` in ``ps``) is not ended by any signal: the run
then waits for the kernel.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Generator
from pathlib import Path
from types import FrameType
from typing import Any, final

import pytest

__all__ = ["PhaseTimer", "describe_hang"]

_SUITE_PACKAGE = __name__.rpartition(".")[0]


def _stack(frame: FrameType | None) -> list[FrameType]:
    """The frames from ``frame`` outwards, outermost first."""
    frames = []
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    return frames[::-1]


def _is_laminae(frame: FrameType) -> bool:
    """Code of laminae itself (the store, the toolkit, built-in drivers), not the suite's."""
    module = str(frame.f_globals.get("__name__", ""))
    in_laminae = module == "laminae" or module.startswith("laminae.")
    return in_laminae and not module.startswith(_SUITE_PACKAGE)


def _where(frame: FrameType) -> str:
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"


def _method(frame: FrameType) -> str:
    """``Class.method`` for a method's frame, named by the object's class (``Store``, not
    the base class that defines it), else the function's qualified name."""
    owner = frame.f_locals.get("self")
    if owner is not None:
        return f"{type(owner).__name__}.{frame.f_code.co_name}"
    owner = frame.f_locals.get("cls")
    if isinstance(owner, type):
        return f"{owner.__name__}.{frame.f_code.co_name}"
    return frame.f_code.co_qualname


def _is_driver(frame: FrameType, driver_class: type) -> bool:
    """A method of the driver under test (``self``), or a class method (``cls``: probe)."""
    owner = frame.f_locals.get("self")
    if isinstance(owner, driver_class):
        return True
    owner = frame.f_locals.get("cls")
    return isinstance(owner, type) and issubclass(owner, driver_class)


def describe_hang(frame: FrameType | None, driver_class: type | None) -> str:
    """What the interrupted thread was doing: the outermost laminae call (what the test
    asked the store for), the outermost call into the driver under test, and the innermost
    frame (where it was stuck).

    :param frame: the interrupted thread's innermost frame.
    :param driver_class: the class of the driver under test; its methods' frames are the
        driver's calls, wherever the class was defined.
    """
    frames = _stack(frame)
    if not frames:
        return "no Python code was running"
    parts = []
    store_call = next((f for f in frames if _is_laminae(f)), None)
    if store_call is not None:
        parts.append(f"in {_method(store_call)} ({_where(store_call)})")
    if driver_class is not None:
        driver_call = next((f for f in frames if _is_driver(f, driver_class)), None)
        if driver_call is not None:
            parts.append(f"in the driver's {_method(driver_call)} ({_where(driver_call)})")
    if not parts:
        parts.append("outside laminae")
    innermost = frames[-1]
    parts.append(f"stuck in {innermost.f_code.co_qualname} ({_where(innermost)})")
    return ", ".join(parts)


@final
class PhaseTimer:
    """A pytest plugin that limits every phase of every test to ``seconds``.

    :param seconds: the limit; 0 (or less) for none.
    :param driver_class: the class of the driver under test, to name its calls.
    """

    PLUGIN_NAME = "laminae-conformance-timeout"

    def __init__(self, seconds: float, driver_class: type | None) -> None:
        self.seconds = seconds
        self.driver_class = driver_class
        # Signals reach only the main thread; a pytest run elsewhere has no limit.
        self.available = threading.current_thread() is threading.main_thread()

    def describe(self) -> str:
        """The limit, for the run's header."""
        if self.seconds <= 0:
            return "none (--laminae-timeout 0)"
        if not self.available:
            return "none (pytest does not run in the main thread, where signals arrive)"
        return f"{self.seconds:g}s for each of a test's setup, call and teardown"

    def _guarded(self, when: str) -> Generator[None, Any, Any]:
        if self.seconds <= 0 or not self.available:
            return (yield)
        seconds = self.seconds

        def expire(signum: int, frame: FrameType | None) -> None:
            # Re-armed: if the failure's own unwinding hangs too, it fails again later
            # rather than never.
            signal.setitimer(signal.ITIMER_REAL, seconds)
            pytest.fail(
                f"laminae: the test's {when} timed out after {seconds:g}s "
                f"(--laminae-timeout): {describe_hang(frame, self.driver_class)}",
                pytrace=True,
            )

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            return (yield)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, Any, Any]:
        return (yield from self._guarded("setup"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, Any]:
        return (yield from self._guarded("call"))

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_teardown(
        self, item: pytest.Item, nextitem: pytest.Item | None
    ) -> Generator[None, Any, Any]:
        return (yield from self._guarded("teardown"))
