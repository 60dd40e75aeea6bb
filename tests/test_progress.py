"""Progress reporting: JSON lines (throttled), rich bars, plain lines, from several threads."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable
from typing import Any

import pytest
import rich.console

from laminae.images._progress import (
    JsonProgress,
    LineProgress,
    NullProgress,
    Progress,
    RichProgress,
)


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def run_threads(count: int, work: Callable[[int], None]) -> None:
    barrier = threading.Barrier(count)

    def body(index: int) -> None:
        barrier.wait()  # all threads report at the same time, to give races a chance
        work(index)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_every_implementation_is_a_progress() -> None:
    stream = io.StringIO()
    console = rich.console.Console(file=io.StringIO(), force_terminal=True)
    reporters: list[Progress] = [
        NullProgress(),
        JsonProgress(stream),
        RichProgress(console),
        LineProgress(stream),
    ]
    for reporter in reporters:
        reporter.start("k", "thing", 3)
        reporter.advance("k", 3)
        reporter.finish("k", "applied")
        reporter.close()
        reporter.close()  # twice is fine


# -- JSON -------------------------------------------------------------------------------------


def test_json_events_carry_every_key() -> None:
    stream = io.StringIO()
    progress = JsonProgress(stream, clock=FakeClock())
    progress.start("sha256:aa", "layer 1/1", 10)
    progress.advance("sha256:aa", 10)
    progress.finish("sha256:aa", "applied")
    progress.close()
    assert events(stream) == [
        {
            "event": "start",
            "key": "sha256:aa",
            "description": "layer 1/1",
            "total": 10,
            "current": 0,
            "status": None,
        },
        {
            "event": "progress",
            "key": "sha256:aa",
            "description": "layer 1/1",
            "total": 10,
            "current": 10,
            "status": None,
        },
        {
            "event": "finish",
            "key": "sha256:aa",
            "description": "layer 1/1",
            "total": 10,
            "current": 10,
            "status": "applied",
        },
    ]


def test_json_progress_is_throttled_per_key_but_keeps_the_final_count() -> None:
    clock = FakeClock()
    stream = io.StringIO()
    progress = JsonProgress(stream, interval=0.1, clock=clock)
    progress.start("a", "a", 1000)
    progress.start("b", "b", None)
    for _ in range(100):
        progress.advance("a", 1)  # same instant: only the first goes out
        progress.advance("b", 1)
    clock.now += 0.1
    progress.advance("a", 1)  # an interval later: goes out
    progress.advance("a", 1)
    clock.now += 0.05
    progress.advance("a", 898)  # reaches the total: always goes out
    progress.finish("a", "applied")
    progress.finish("b", "exists")  # 100 bytes never reported: reported before finishing
    written = [(e["event"], e["key"], e["current"]) for e in events(stream)]
    assert written == [
        ("start", "a", 0),
        ("start", "b", 0),
        ("progress", "a", 1),
        ("progress", "b", 1),
        ("progress", "a", 101),
        ("progress", "a", 1000),
        ("finish", "a", 1000),
        ("progress", "b", 100),
        ("finish", "b", 100),
    ]


def test_json_finish_without_bytes_writes_no_progress_event() -> None:
    stream = io.StringIO()
    progress = JsonProgress(stream)
    progress.start("a", "a", 5)
    progress.finish("a", "exists")
    assert [e["event"] for e in events(stream)] == ["start", "finish"]


def test_json_unknown_key_is_started_by_its_key() -> None:
    stream = io.StringIO()
    progress = JsonProgress(stream, clock=FakeClock())
    progress.advance("sha256:bb", 4)
    progress.finish("sha256:cc", "failed")
    got = [(e["event"], e["key"], e["description"], e["status"]) for e in events(stream)]
    assert got == [
        ("start", "sha256:bb", "sha256:bb", None),
        ("progress", "sha256:bb", "sha256:bb", None),
        ("start", "sha256:cc", "sha256:cc", None),
        ("finish", "sha256:cc", "sha256:cc", "failed"),
    ]


def test_json_writes_nothing_after_close() -> None:
    stream = io.StringIO()
    progress = JsonProgress(stream)
    progress.close()
    progress.start("a", "a", 1)
    progress.advance("a", 1)
    progress.finish("a", "applied")
    assert stream.getvalue() == ""


def test_json_from_many_threads_gives_whole_lines_and_exact_counts() -> None:
    stream = io.StringIO()
    progress = JsonProgress(stream, interval=0.0)  # every advance writes: the most contention
    threads, chunks = 8, 500

    def work(index: int) -> None:
        key = f"layer-{index}"
        progress.start(key, key, chunks * 3)
        for _ in range(chunks):
            progress.advance(key, 3)
        progress.finish(key, "applied")

    run_threads(threads, work)
    written = events(stream)  # every line parses: no two writes interleaved
    finishes = {e["key"]: e["current"] for e in written if e["event"] == "finish"}
    assert finishes == {f"layer-{i}": chunks * 3 for i in range(threads)}
    assert len(written) == threads * (chunks + 2)


# -- rich -------------------------------------------------------------------------------------


@pytest.fixture
def terminal() -> tuple[rich.console.Console, io.StringIO]:
    out = io.StringIO()
    return rich.console.Console(file=out, force_terminal=True, width=120), out


def test_rich_draws_a_bar_per_layer_and_the_status_when_finished(
    terminal: tuple[rich.console.Console, io.StringIO],
) -> None:
    console, out = terminal
    progress = RichProgress(console)
    progress.start("sha256:aa", "layer 1/2 aaaa", 2048)
    progress.start("sha256:bb", "layer 2/2 bbbb", 4096)
    progress.advance("sha256:aa", 2048)
    progress.advance("sha256:bb", 1024)
    progress.finish("sha256:aa", "applied")
    progress.finish("sha256:bb", "failed")
    progress.close()
    text = out.getvalue()
    assert "layer 1/2 aaaa" in text
    assert "layer 2/2 bbbb" in text
    assert "applied" in text
    assert "failed" in text
    assert "2.0/2.0 kB" in text  # bytes done of total
    assert "4.1/4.1 kB" in text  # a finished bar is full, whatever went by


def test_rich_shows_rate_and_time_left_while_running(
    terminal: tuple[rich.console.Console, io.StringIO],
) -> None:
    console, out = terminal
    clock = FakeClock()
    progress = RichProgress(console, clock=clock)
    progress.start("k", "layer k", 10_000_000)
    clock.now += 1
    progress.advance("k", 1_000_000)
    clock.now += 1
    progress.advance("k", 1_000_000)
    progress.close()
    last = out.getvalue().rsplit("layer k", 1)[1]
    assert "2.0/10.0 MB" in last
    assert "1.0 MB/s" in last
    assert "0:00:08" in last  # 8 MB left at 1 MB/s


def test_rich_unknown_total_ends_full_at_what_went_by(
    terminal: tuple[rich.console.Console, io.StringIO],
) -> None:
    console, out = terminal
    progress = RichProgress(console)
    progress.advance("sha256:cc", 3000)  # never started: described by its key
    progress.finish("sha256:cc", "exists")
    progress.close()
    text = out.getvalue()
    assert "sha256:cc" in text
    assert "3.0/3.0 kB" in text
    assert "exists" in text


def test_rich_from_many_threads_counts_every_byte(
    terminal: tuple[rich.console.Console, io.StringIO],
) -> None:
    console, out = terminal
    progress = RichProgress(console)
    threads, chunks = 8, 400

    def work(index: int) -> None:
        key = f"layer-{index}"
        progress.start(key, key, None)
        for _ in range(chunks):
            progress.advance(key, 5)
        progress.finish(key, "applied")

    run_threads(threads, work)
    progress.close()
    final = out.getvalue()
    for index in range(threads):
        assert f"layer-{index}" in final
    # Each bar's final total is the bytes counted from its thread: 2000 bytes, every one.
    assert final.count("2.0/2.0 kB") >= threads


def test_rich_draws_nothing_without_keys(
    terminal: tuple[rich.console.Console, io.StringIO],
) -> None:
    console, out = terminal
    RichProgress(console).close()
    assert out.getvalue() == ""


# -- plain lines ------------------------------------------------------------------------------


def test_lines_one_per_finished_key() -> None:
    stream = io.StringIO()
    progress = LineProgress(stream)
    progress.start("a", "layer 1/2 sha256:aa", 10)
    progress.start("b", "layer 2/2 sha256:bb", 10)
    progress.advance("a", 10)
    progress.finish("b", "exists")
    progress.finish("a", "applied")
    progress.finish("c", "failed")
    progress.close()
    assert stream.getvalue().splitlines() == [
        "layer 2/2 sha256:bb: exists",
        "layer 1/2 sha256:aa: applied",
        "c: failed",
    ]
