"""Concurrency: two processes working on one store at once, which none of the peers' suites
tries. Each applies layers of its own and one layer both apply, and creates, mounts, commits
and removes layers in a loop; both must succeed, and the store must then check clean."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

import laminae
from laminae.conformance._fixtures import StorePaths
from laminae.conformance._layers import mounted
from laminae.conformance._workers import driver_class_name, worker_command, worker_env

ROUNDS = 20
TIMEOUT = 240  # seconds; a deadlock fails the test instead of hanging the run


def _worker_failure(name: str, code: int, out: bytes, err: bytes) -> str:
    """One line for a failed worker: the step it was at and its error (the last lines of
    its stderr when it died without saying)."""
    for line in reversed(out.decode(errors="replace").splitlines()):
        try:
            said = json.loads(line)
        except ValueError:
            continue
        if isinstance(said, dict) and "failed" in said:
            return f"worker {name}, at {said['failed']}: {said['error']}"
    tail = err.decode(errors="replace").strip().splitlines()[-3:]
    return f"worker {name} died (exit {code}) without saying where: " + " | ".join(tail)


@pytest.mark.laminae_area("concurrency")
class TestConcurrency:
    def test_two_processes_one_store(
        self,
        store: laminae.Store,
        store_paths: StorePaths,
        driver_entry: laminae.DriverEntry,
    ) -> None:
        store.close()  # the workers have the store to themselves while they run
        arguments = {
            "root": str(store_paths.root),
            "runroot": str(store_paths.runroot),
            "driver": store_paths.driver,
            "driver_class": driver_class_name(driver_entry),
            "rounds": ROUNDS,
        }
        workers = {
            name: subprocess.Popen(
                worker_command("churn", worker=name, **arguments),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=worker_env(),
            )
            for name in ("left", "right")
        }
        tops = {}
        failures = []
        for name, process in workers.items():
            try:
                out, err = process.communicate(timeout=TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
                failures.append(f"worker {name} did not finish in {TIMEOUT}s: {err.decode()}")
                continue
            if process.returncode != 0:
                failures.append(_worker_failure(name, process.returncode, out, err))
                continue
            tops[name] = json.loads(out.decode().splitlines()[-1])["top"]
        assert not failures, "\n".join(failures)

        with laminae.open_store(
            store_paths.root, runroot=store_paths.runroot, driver=store_paths.driver
        ) as reopened:
            report = reopened.check()
            assert report.ok, report.problems()
            layers = reopened.layers()
            assert all(layer.kind is laminae.LayerKind.COMMITTED for layer in layers), [
                (layer.id, layer.kind.value) for layer in layers
            ]
            # Each worker's chain, and the one layer both applied, stored once.
            assert len(layers) == 2 * ROUNDS + 1, [layer.id for layer in layers]
            for name, top in tops.items():
                layer = reopened.layer(top)
                assert layer.depth == ROUNDS - 1
                with mounted(reopened, top) as root:
                    rounds = sorted(os.listdir(root / name))
                    assert rounds == sorted(f"round-{n}" for n in range(ROUNDS)), (
                        f"worker {name}'s chain lost layers: {rounds}"
                    )
