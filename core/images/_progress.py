"""Progress of a transfer, reported per layer (or blob) from as many threads as move them.

The import/export pipeline (``laminae.images._transfer``) talks to a :class:`Progress`: it *starts*
a key (a layer's digest, usually) with a description and the bytes it expects, *advances* it
as bytes go by, and *finishes* it with a one-word status (``"applied"``, ``"exists"``,
``"pushed"``, ``"failed"``...). What the reports become is the implementation's business:

- :class:`NullProgress` drops them (the API's default, ``--quiet``);
- :class:`RichProgress` draws one bar per key on a terminal: bytes done of total, rate, ETA,
  and the status once finished;
- :class:`JsonProgress` writes JSON lines, one event each, for programs (``--json``);
- :class:`LineProgress` writes one plain line per finished key, for logs and pipes.

Every implementation here may be called from several threads at once; the pipeline fetches
layers in parallel. A key that is advanced or finished without having been started is started
on the fly (described by its key): a progress display is never a reason for a transfer to fail.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO, final

import attrs
import rich.console
import rich.progress
import rich.text

__all__ = ["JsonProgress", "LineProgress", "NullProgress", "Progress", "RichProgress"]


class Progress(Protocol):
    """Where a transfer reports what it is doing; every method is safe to call from any thread.

    Example, for one blob::

        progress.start("sha256:4f4f…", "layer 1/3 sha256:4f4f…", total=2_811_478)
        for chunk in chunks:
            progress.advance("sha256:4f4f…", len(chunk))
        progress.finish("sha256:4f4f…", "applied")
        ...
        progress.close()  # once, after the last key
    """

    def start(self, key: str, description: str, total: int | None) -> None:
        """Begin reporting ``key``; ``total`` is the byte count expected, ``None`` if unknown.

        Starting a key again (a retry) resets it.
        """

    def advance(self, key: str, amount: int) -> None:
        """``amount`` more bytes of ``key`` went by."""

    def finish(self, key: str, status: str) -> None:
        """``key`` is done: ``status`` says how ("applied", "exists", "pushed", "failed"...)."""

    def close(self) -> None:
        """No more reports; release the display. Safe to call twice."""


@final
class NullProgress:
    """A :class:`Progress` that reports nothing."""

    __slots__ = ()

    def start(self, key: str, description: str, total: int | None) -> None:
        pass

    def advance(self, key: str, amount: int) -> None:
        pass

    def finish(self, key: str, status: str) -> None:
        pass

    def close(self) -> None:
        pass


# -- rich -------------------------------------------------------------------------------------

_FAILED_STATUSES = frozenset({"failed", "error", "corrupt"})


class _RateOrStatusColumn(rich.progress.ProgressColumn):
    """The transfer rate and time left while a key runs, its status once it finished."""

    def __init__(self) -> None:
        super().__init__()
        self._speed = rich.progress.TransferSpeedColumn()
        self._remaining = rich.progress.TimeRemainingColumn()

    def render(self, task: rich.progress.Task) -> rich.text.Text:
        status = task.fields.get("status")
        if status is not None:
            style = "red" if status in _FAILED_STATUSES else "green"
            return rich.text.Text(str(status), style=style)
        text = self._speed.render(task)
        text.append(" ")
        text.append_text(self._remaining.render(task))
        return text


@attrs.define
class _RichKey:
    task: rich.progress.TaskID
    total: int | None
    completed: int = 0


@final
class RichProgress:
    """One rich progress bar per key on ``console``: description, bytes, rate, ETA, status.

    The display starts with the first key and stays on screen after :meth:`close` (it is not
    transient), so the final state of every layer remains readable.

    :param console: where to draw; usually ``Console(stderr=True)``.
    :param clock: monotonic seconds for the rate and ETA (tests pass their own).
    """

    __slots__ = ("_closed", "_keys", "_lock", "_progress", "_started")

    def __init__(
        self, console: rich.console.Console, *, clock: Callable[[], float] | None = None
    ) -> None:
        self._progress = rich.progress.Progress(
            rich.progress.TextColumn("{task.description}", markup=False),
            rich.progress.BarColumn(),
            rich.progress.DownloadColumn(),
            _RateOrStatusColumn(),
            console=console,
            # The CLI prints its result on stdout after closing; redirecting the streams
            # would only fight with click's (and the test runner's) own stream handling.
            redirect_stdout=False,
            redirect_stderr=False,
            get_time=clock,
        )
        # Guards the key table; rich.progress.Progress has its own lock for its tasks, and
        # its refresh thread never takes ours, so holding ours while calling it cannot deadlock.
        self._lock = threading.Lock()
        self._keys: dict[str, _RichKey] = {}
        self._started = False
        self._closed = False

    def _start(self, key: str, description: str, total: int | None) -> _RichKey:
        if not self._started:
            self._progress.start()
            self._started = True
        state = self._keys.get(key)
        if state is None:
            task = self._progress.add_task(description, total=total, status=None)
            state = self._keys[key] = _RichKey(task, total)
        else:
            self._progress.reset(
                state.task, total=total, description=description, completed=0, status=None
            )
            state.total, state.completed = total, 0
        return state

    def start(self, key: str, description: str, total: int | None) -> None:
        with self._lock:
            if not self._closed:
                self._start(key, description, total)

    def advance(self, key: str, amount: int) -> None:
        with self._lock:
            if self._closed:
                return
            state = self._keys.get(key) or self._start(key, key, None)
            state.completed += amount
            self._progress.advance(state.task, amount)

    def finish(self, key: str, status: str) -> None:
        with self._lock:
            if self._closed:
                return
            state = self._keys.get(key) or self._start(key, key, None)
            # A blob that was already there moved no bytes: its bar is full all the same, and
            # an unknown total becomes what went by, so that the bar stops pulsing.
            total = state.total if state.total is not None else state.completed
            self._progress.update(state.task, total=total, completed=total, status=status)
            self._progress.stop_task(state.task)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._started:
                self._progress.stop()


# -- JSON lines -------------------------------------------------------------------------------


@attrs.define
class _JsonKey:
    description: str
    total: int | None
    current: int = 0
    emitted: int | None = None  # the ``current`` of the last progress event written
    emitted_at: float = float("-inf")


@final
class JsonProgress:
    """JSON lines on ``stream``, one event object per line, flushed as written.

    Every event has the keys ``event`` (``"start"``, ``"progress"`` or ``"finish"``), ``key``,
    ``description``, ``total`` (``null`` if unknown), ``current`` (bytes so far) and
    ``status`` (``null`` except on ``finish``)::

        {"event": "start", "key": "sha256:4f4f…", "description": "…", "total": 2811478, ...}
        {"event": "progress", "key": "sha256:4f4f…", ..., "current": 1048576, "status": null}
        {"event": "finish", "key": "sha256:4f4f…", ..., "current": 2811478, "status": "applied"}

    Progress events are throttled to one per ``interval`` seconds per key; the one that
    reaches the total, and the last before ``finish``, are always written, so the final byte
    count of a key is always in a progress event.

    :param stream: a text stream; lines end with ``\\n``.
    :param interval: the least time between two progress events of one key.
    :param clock: monotonic seconds (tests pass their own).
    """

    __slots__ = ("_clock", "_closed", "_interval", "_keys", "_lock", "_stream")

    def __init__(
        self,
        stream: TextIO,
        *,
        interval: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        self._keys: dict[str, _JsonKey] = {}
        self._closed = False

    def _emit(self, event: str, key: str, state: _JsonKey, status: str | None = None) -> None:
        line = json.dumps(
            {
                "event": event,
                "key": key,
                "description": state.description,
                "total": state.total,
                "current": state.current,
                "status": status,
            }
        )
        self._stream.write(line + "\n")
        self._stream.flush()

    def _progress_event(self, key: str, state: _JsonKey, now: float) -> None:
        self._emit("progress", key, state)
        state.emitted = state.current
        state.emitted_at = now

    def start(self, key: str, description: str, total: int | None) -> None:
        with self._lock:
            if self._closed:
                return
            state = self._keys[key] = _JsonKey(description, total)
            self._emit("start", key, state)

    def _state(self, key: str) -> _JsonKey:
        # Called with the lock held.
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _JsonKey(key, None)
            self._emit("start", key, state)
        return state

    def advance(self, key: str, amount: int) -> None:
        with self._lock:
            if self._closed:
                return
            state = self._state(key)
            state.current += amount
            now = self._clock()
            reached_total = state.total is not None and state.current >= state.total
            if reached_total or now - state.emitted_at >= self._interval:
                self._progress_event(key, state, now)

    def finish(self, key: str, status: str) -> None:
        with self._lock:
            if self._closed:
                return
            state = self._state(key)
            if state.current and state.emitted != state.current:
                self._progress_event(key, state, self._clock())
            self._emit("finish", key, state, status)
            del self._keys[key]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._stream.flush()


# -- plain lines ------------------------------------------------------------------------------


@final
class LineProgress:
    """One plain line per finished key on ``stream``: ``<description>: <status>``.

    For a stream that is not a terminal (a log, a pipe), where bars would be noise.

    :param stream: a text stream.
    """

    __slots__ = ("_descriptions", "_lock", "_stream")

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._descriptions: dict[str, str] = {}

    def start(self, key: str, description: str, total: int | None) -> None:
        with self._lock:
            self._descriptions[key] = description

    def advance(self, key: str, amount: int) -> None:
        pass

    def finish(self, key: str, status: str) -> None:
        with self._lock:
            description = self._descriptions.pop(key, key)
            self._stream.write(f"{description}: {status}\n")
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            self._stream.flush()
