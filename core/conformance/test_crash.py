"""Crashes: a process killed with SIGKILL in the middle of applying a layer, or while it
holds a mount, and the store reopened. Opening must find and fix what the dead process
left: the store checks clean, the half-written layer is gone with its storage, and mounts
are counted as they really are."""

from __future__ import annotations

import fcntl
import json
import os
import select
import subprocess
from pathlib import Path

import pytest

import laminae
from laminae.conformance._fixtures import StoreFactory, StorePaths
from laminae.conformance._layers import apply, mounted
from laminae.conformance._leaks import mount_points
from laminae.conformance._tars import LayerTar, file_header
from laminae.conformance._workers import driver_class_name, worker_command, worker_env

TIMEOUT = 120  # seconds; a worker that never gets going fails the test instead of hanging it
SIGNAL_AFTER = 4 << 20  # bytes read: far past any sniffing of the compression format
CHUNK = 1 << 16


def storage_entries(store_paths: StorePaths) -> set[str]:
    """Every path below the driver's directory in the store, for a before/after look."""
    home = store_paths.root / store_paths.driver
    return {
        os.path.relpath(os.path.join(dirpath, name), home)
        for dirpath, dirnames, filenames in os.walk(home)
        for name in dirnames + filenames
    }


def kill_during_apply(
    store_paths: StorePaths, entry: laminae.DriverEntry, parent: str | None
) -> None:
    """Start a worker applying an endless layer from a pipe; SIGKILL it once it is writing."""
    signal_read, signal_write = os.pipe()
    process = subprocess.Popen(
        worker_command(
            "apply-stdin",
            root=str(store_paths.root),
            runroot=str(store_paths.runroot),
            driver=store_paths.driver,
            driver_class=driver_class_name(entry),
            parent=parent,
            signal_fd=signal_write,
            signal_after=SIGNAL_AFTER,
        ),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        pass_fds=(signal_write,),
        env=worker_env(),
    )
    os.close(signal_write)
    assert process.stdin is not None and process.stderr is not None
    feed = process.stdin.fileno()
    fcntl.fcntl(feed, fcntl.F_SETFL, fcntl.fcntl(feed, fcntl.F_GETFL) | os.O_NONBLOCK)
    # A file far larger than will ever be sent: the worker is killed first.
    pending = LayerTar().dir("big").build(end=False) + file_header("big/file", 1 << 32)
    zeros = b"\0" * CHUNK
    signalled = False
    try:
        while not signalled:
            readable, writable, _ = select.select([signal_read], [feed], [], TIMEOUT)
            if not readable and not writable:
                raise AssertionError(f"the applying worker made no progress in {TIMEOUT}s")
            if readable:
                signalled = os.read(signal_read, 1) == b"!"
                if not signalled:  # EOF: the worker exited before it was killed
                    process.wait(TIMEOUT)
                    raise AssertionError(
                        f"the applying worker exited ({process.returncode}) before the kill:\n"
                        + process.stderr.read().decode()
                    )
                break
            try:
                written = os.write(feed, pending or zeros)
            except BlockingIOError:
                continue
            pending = pending[written:]
        process.kill()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(TIMEOUT)
        os.close(signal_read)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()
    assert process.returncode == -9, f"worker ended with {process.returncode}, not SIGKILL"


@pytest.mark.laminae_area("crash")
class TestCrash:
    @pytest.mark.parametrize("on", ["base", "child"])
    def test_sigkill_during_apply(
        self,
        make_store: StoreFactory,
        store_paths: StorePaths,
        driver_entry: laminae.DriverEntry,
        tar: type[LayerTar],
        on: str,
    ) -> None:
        with make_store() as store:
            parent = apply(store, tar().file("parent", b"p")) if on == "child" else None
            before = [layer.id for layer in store.layers()]
        entries_before = storage_entries(store_paths)

        kill_during_apply(store_paths, driver_entry, None if parent is None else parent.id)

        store = make_store()
        report = store.check()
        assert report.ok, f"reopened after a crash, the store is not clean: {report.problems()}"
        assert [layer.id for layer in store.layers()] == before, "the half-applied layer is listed"
        leftovers = storage_entries(store_paths) - entries_before
        assert not leftovers, f"the half-applied layer left storage behind: {sorted(leftovers)}"
        # And the store still works: the same parent takes a complete layer.
        layer = apply(store, tar().file("after-crash", b"fine"), parent)
        with mounted(store, layer.id) as root:
            assert (root / "after-crash").read_bytes() == b"fine"

    def test_sigkill_while_mounted(
        self,
        make_store: StoreFactory,
        store_paths: StorePaths,
        driver_entry: laminae.DriverEntry,
    ) -> None:
        with make_store() as store:
            store.create_layer("held")
        process = subprocess.Popen(
            worker_command(
                "mount-and-wait",
                root=str(store_paths.root),
                runroot=str(store_paths.runroot),
                driver=store_paths.driver,
                driver_class=driver_class_name(driver_entry),
                ref="held",
            ),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=worker_env(),
        )
        assert process.stdout is not None and process.stderr is not None
        try:
            line = process.stdout.readline()
            assert line, f"the worker did not mount: {process.stderr.read().decode()}"
            path = Path(json.loads(line)["path"])
            process.kill()
            process.wait(TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(TIMEOUT)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    stream.close()

        store = make_store()
        report = store.check()
        assert report.ok, f"reopened after a crash, the store is not clean: {report.problems()}"
        layer = store.layer("held")
        mounted_now = str(path) in mount_points()
        assert (layer.mount_count > 0) == mounted_now, (
            f"mount count {layer.mount_count} but {'mounted' if mounted_now else 'not mounted'}"
        )
        if mounted_now:
            store.unmount("held", force=True)
        assert str(path) not in mount_points()
        store.remove_layer("held")
        assert store.layers() == []
