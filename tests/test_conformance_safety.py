"""The conformance suite is safe on any host: it runs in a mount namespace of its own,
touches only mounts and loop devices in its tests' own directories, makes device nodes
no host driver owns, and fails a hung test in time, naming the call that hung.

Each runs the suite in a pytest subprocess (pytester), as tests/test_conformance_plugin.py
does; the mounting neighbours are processes these tests start and stop by PID.
"""

from __future__ import annotations

import ast
import importlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tools import needs

from laminae.conformance import _tars

pytest_plugins = ["pytester"]

SUITE = ("--pyargs", "laminae.conformance", "-p", "no:cacheprovider")
SUITE_DIR = Path(_tars.__file__).parent

# Mounts a tmpfs that stays ("steady"), then mounts and unmounts another in a loop until
# SIGTERM, checking after each cycle that its mounts are still its own; reports as JSON.
NEIGHBOUR = """
import json, os, signal, sys
from laminae.kernel import _mountinfo, _mounts

base, report = sys.argv[1], sys.argv[2]
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
steady, cycle = os.path.join(base, "steady"), os.path.join(base, "cycle")
os.makedirs(steady, exist_ok=True)
os.makedirs(cycle, exist_ok=True)
_mounts.mount("tmpfs", steady, "tmpfs", 0, "size=1m")
with open(os.path.join(steady, "mine"), "w") as mark:
    mark.write("mine")
print("ready", flush=True)
errors, cycles = [], 0

def pause():
    return signal.sigtimedwait({signal.SIGTERM}, 0.005) is not None

stopped = False
while not stopped:
    try:
        _mounts.mount("tmpfs", cycle, "tmpfs", 0, "size=1m")
        stopped = pause()
        _mounts.umount(cycle)
    except OSError as exc:
        errors.append(f"cycle {cycles}: {exc}")
        break
    if not os.path.exists(os.path.join(steady, "mine")):
        errors.append(f"cycle {cycles}: the steady mount went away")
        break
    cycles += 1
    stopped = stopped or pause()
mounted = [m.mount_point for m in _mountinfo.mountinfo()]
_mounts.umount(steady)
with open(report, "w") as out:
    json.dump({"cycles": cycles, "errors": errors, "mounted": mounted}, out)
"""


class Neighbour:
    """A process that mounts beside the suite, started and stopped by its PID."""

    def __init__(self, script: Path, base: Path) -> None:
        self.base = base
        self.report = base.with_suffix(".json")
        base.mkdir(parents=True)
        self.process = subprocess.Popen(
            [sys.executable, str(script), str(base), str(self.report)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "ready\n", "the neighbour did not start"

    def stop(self) -> dict[str, object]:
        """Stop it (SIGTERM to its PID), and return what it saw."""
        self.process.send_signal(signal.SIGTERM)
        returncode = self.process.wait(timeout=60)
        assert self.process.stdout is not None
        self.process.stdout.close()
        assert returncode == 0, "the neighbour failed"
        result: dict[str, object] = json.loads(self.report.read_text())
        return result


@pytest.fixture(autouse=True)
def lenient_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs here are lenient and name their driver, whatever CI's environment says."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LAMINAE_DRIVER", raising=False)


# -- the mount namespace and the leak guard's scope ------------------------------------------

# In the suite's own session, so in its namespace: a neighbour started at session start,
# stopped (by its PID) at the end, what it saw written for the test to read.
INSIDE_CONFTEST = """
import os, signal, subprocess, sys

def pytest_sessionstart(session):
    process = subprocess.Popen(
        [sys.executable, os.environ["NEIGHBOUR_SCRIPT"], os.environ["NEIGHBOUR_BASE"],
         os.environ["NEIGHBOUR_RESULT"]],
        stdout=subprocess.PIPE, text=True,
    )
    assert process.stdout.readline() == "ready\\n"
    session.config.neighbour = process

def pytest_sessionfinish(session):
    process = session.config.neighbour
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0
    process.stdout.close()
"""

SELECTION = "test_create_empty or test_fifos or test_mount_counting or test_diff_round_trip"


@pytest.fixture
def neighbour_script(pytester: pytest.Pytester) -> Path:
    path = pytester.path / "neighbour.py"
    path.write_text(NEIGHBOUR)
    return path


@pytest.mark.root
def test_suite_leaves_a_neighbour_in_another_namespace_alone(
    pytester: pytest.Pytester, neighbour_script: Path
) -> None:
    """A process outside the session's namespace mounts and unmounts beside it all along:
    the session touches none of it, and no test fails for it."""
    neighbour = Neighbour(neighbour_script, pytester.path / "elsewhere")
    try:
        result = pytester.runpytest_subprocess(*SUITE, "--laminae-driver", "vfs", "-k", SELECTION)
    finally:
        seen = neighbour.stop()
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["laminae mount namespace: private (unshared by the laminae*"])
    assert seen["errors"] == [] and isinstance(seen["cycles"], int) and seen["cycles"] > 0
    assert str(neighbour.base / "steady") in seen["mounted"]  # type: ignore[operator]


@pytest.mark.root
def test_suite_leaves_a_neighbour_in_its_own_namespace_alone(
    pytester: pytest.Pytester, neighbour_script: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process the session itself starts shares its namespace, so its mounts show in the
    session's mount table while tests run: the leak guard takes none of them for a leak and
    unmounts none of them."""
    pytester.makeconftest(INSIDE_CONFTEST)
    base, seen_file = pytester.path / "elsewhere", pytester.path / "seen.json"
    base.mkdir()
    monkeypatch.setenv("NEIGHBOUR_SCRIPT", str(neighbour_script))
    monkeypatch.setenv("NEIGHBOUR_BASE", str(base))
    monkeypatch.setenv("NEIGHBOUR_RESULT", str(seen_file))
    result = pytester.runpytest_subprocess(*SUITE, "--laminae-driver", "vfs", "-k", SELECTION)
    result.assert_outcomes(passed=4)
    result.stdout.no_fnmatch_line("*leaked mount*")
    seen = json.loads(seen_file.read_text())
    assert seen["errors"] == [] and seen["cycles"] > 0
    assert str(base / "steady") in seen["mounted"]


@pytest.mark.root
def test_threads_started_before_the_namespace_are_named(pytester: pytest.Pytester) -> None:
    """unshare(CLONE_NEWNS) moves the calling thread only: a thread a plugin started
    earlier stays in the caller's namespace, and the header says so."""
    pytester.makeconftest(
        """
        import threading
        stop = threading.Event()
        threading.Thread(target=stop.wait, daemon=True).start()
        """
    )
    result = pytester.runpytest_subprocess(
        *SUITE, "--laminae-driver", "vfs", "-k", "test_create_empty"
    )
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["laminae mount namespace: private (*); 1 thread(s) started before it stay in the "
         "caller's namespace"]
    )  # fmt: skip


@pytest.mark.root
@needs("setpriv")
def test_without_cap_sys_admin_the_driver_is_unavailable(pytester: pytest.Pytester) -> None:
    """Root without CAP_SYS_ADMIN (a container's default) can make no namespace and no
    mount: every test says so (an error under strict mode), and none mounts."""
    result = pytester.run(
        "setpriv", "--bounding-set=-sys_admin", "--inh-caps=-sys_admin",
        sys.executable, "-m", "pytest", *SUITE, "--laminae-driver", "vfs", "--laminae-strict",
        "-k", "test_create_empty",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "laminae mount namespace: the caller's (cannot make a mount namespace of its own "
            "(Operation not permitted: needs CAP_SYS_ADMIN), so it cannot mount either)",
            "*ERROR at setup of TestLayers.test_create_empty*",
            "driver 'vfs' is unavailable: the conformance suite cannot make a mount namespace "
            "of its own (*)*",
        ],
        consecutive=False,
    )


# Tests run with the suite's fixtures: mounts and a loop device outside the tests'
# directories (one made before the session's tests, one during a test), and leaks under a
# store's root, the test's own or another one's. What is mounted and attached at the end of
# the session is written down; then the session undoes what it made, by path.
NEIGHBOURS = """
import json, os
from pathlib import Path

import pytest

from laminae.conformance._leaks import loop_devices
from laminae.kernel import _loop, _mountinfo, _mounts

OUTSIDE = Path(os.environ["OUTSIDE"])


def tmpfs(target):
    target.mkdir(parents=True)
    _mounts.mount("tmpfs", str(target), "tmpfs", 0, "size=1m")


@pytest.fixture(scope="session", autouse=True)
def neighbours():
    tmpfs(OUTSIDE / "before")
    made = {}
    yield made
    state = {
        "mounted": sorted(_mountinfo.mount_points()),
        "loops": loop_devices(),
        "made": made,
    }
    (OUTSIDE / "state.json").write_text(json.dumps(state))
    for target in ("during", "before"):
        if (OUTSIDE / target).is_mount():
            _mounts.umount(str(OUTSIDE / target))
    if "loop" in made:
        _loop.detach_loop(made["loop"])


def test_mount_outside_during(store, neighbours):
    store.create_layer("base")
    tmpfs(OUTSIDE / "during")
    image = OUTSIDE / "outside.img"
    image.write_bytes(bytes(1 << 20))
    neighbours["loop"] = _loop.attach_loop(str(image))


def test_leak_under_store_root(store, store_paths, scratch, neighbours):
    store.create_layer("base")
    tmpfs(store_paths.root / "leak")
    image = scratch / "leak.img"
    image.write_bytes(bytes(1 << 20))
    neighbours["leaked loop"] = _loop.attach_loop(str(image))


def test_leak_under_another_store(make_store):
    other = make_store(OUTSIDE / "other-store")
    other.create_layer("base")
    tmpfs(OUTSIDE / "other-store-run" / "leak")
"""


@pytest.mark.root
def test_only_the_tests_own_mounts_and_loops_are_leaks(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = pytester.path / "outside"
    monkeypatch.setenv("OUTSIDE", str(outside))
    pytester.makepyfile(test_neighbours=NEIGHBOURS)
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--laminae-driver", "vfs", "-rA", "test_neighbours.py"
    )
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leak_under_store_root*",
            "the test left things behind:",
            "  leaked mount: */home/root/leak (tmpfs from tmpfs)",
            "  leaked loop device: /dev/loop* (backing */scratch/leak.img)",
            "*ERROR at teardown of test_leak_under_another_store*",
            "the test left things behind:",
            "  leaked mount: */outside/other-store-run/leak (tmpfs from tmpfs)",
        ]
    )
    result.stdout.no_fnmatch_line("*leaked * */outside/before*")
    result.stdout.no_fnmatch_line("*leaked * */outside/during*")
    result.stdout.no_fnmatch_line("*outside.img*")
    state = json.loads((outside / "state.json").read_text())
    # Outside the tests' directories: still there at the end of the session.
    assert {str(outside / "before"), str(outside / "during")} <= set(state["mounted"])
    assert state["loops"].get(state["made"]["loop"]) == str(outside / "outside.img")
    # The leaks: cleaned up after their tests.
    assert not [m for m in state["mounted"] if m.endswith("/leak")]
    assert state["made"]["leaked loop"] not in state["loops"]


# -- time limits -----------------------------------------------------------------------------

HANGING_DRIVERS = '''
import os
import threading

from laminae import driverkit
from laminae.drivers.vfs._driver import VfsDriver


class HangingVfs(VfsDriver):
    """Reads a FIFO no one ever writes to before it makes a layer, as a naive copy reads a
    device node: it never returns (and leaves nothing behind when interrupted)."""

    name = "vfs_hangs"

    def __init__(self, home, options):
        super().__init__(home, options)
        self.fifo = os.path.join(home, "never-written")

    def create(self, id, parents, writable):
        if not os.path.exists(self.fifo):
            os.mkfifo(self.fifo)
        with open(self.fifo, "rb") as fifo:
            fifo.read()
        super().create(id, parents, writable)


class HangingProbeVfs(VfsDriver):
    """Waits for ever when asked whether it can run."""

    name = "vfs_hangs_in_probe"

    @classmethod
    def probe(cls, home, options):
        threading.Event().wait()


@driverkit.hookimpl
def laminae_register_drivers(register):
    register(HangingVfs)
    register(HangingProbeVfs)
'''


@pytest.fixture
def hanging(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(hanging_drivers=HANGING_DRIVERS)
    return pytester


@pytest.mark.root
def test_a_hung_driver_call_fails_its_test_in_time(hanging: pytest.Pytester) -> None:
    report = hanging.path / "report.json"
    result = hanging.runpytest_subprocess(
        *SUITE, "-p", "hanging_drivers", "--laminae-driver", "vfs_hangs",
        "--laminae-timeout", "2", "--laminae-report", str(report),
        "-k", "test_create_empty or test_create_base",
    )  # fmt: skip
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["laminae timeout: 2s for each of a test's setup, call and*"])
    result.stdout.fnmatch_lines(
        [
            "*laminae: the test's call timed out after 2s (--laminae-timeout): "
            "in Store.create_layer (_layers.py:*), "
            "in the driver's HangingVfs.create (hanging_drivers.py:*), "
            "stuck in HangingVfs.create (hanging_drivers.py:*)"
        ]
    )
    tests = json.loads(report.read_text())["tests"]
    assert [t["outcome"] for t in tests] == ["failed", "failed"]
    assert all(t["duration"] < 30 for t in tests), tests


@pytest.mark.root
def test_a_hung_probe_fails_the_setup_in_time(hanging: pytest.Pytester) -> None:
    result = hanging.runpytest_subprocess(
        *SUITE, "-p", "hanging_drivers", "--laminae-driver", "vfs_hangs_in_probe",
        "--laminae-timeout", "1", "-k", "test_create_empty",
    )  # fmt: skip
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        [
            "*laminae: the test's setup timed out after 1s (--laminae-timeout): "
            "in DriverEntry.probe (*), in the driver's HangingProbeVfs.probe (*), "
            "stuck in *wait*"
        ]
    )


def test_timeout_option_checks_its_value(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(
        *SUITE, "--laminae-driver", "vfs", "--laminae-timeout", "-1", "--co"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--laminae-timeout*0 (no limit) or more seconds, not '-1'*"])


# -- device nodes in test data ---------------------------------------------------------------

# Calls that give a device node its numbers, and where the major is: (position, keyword).
_MAJOR_ARGUMENT = {"chardev": (1, "major"), "blockdev": (1, "major"), "makedev": (0, "major")}


def _device_majors() -> Iterator[tuple[str, int]]:
    """``(where, major)`` of every device number the suite's modules write, evaluated in
    the module's namespace: a constant, or an expression of module-level names."""
    for path in sorted(SUITE_DIR.glob("*.py")):
        module = importlib.import_module(f"laminae.conformance.{path.stem}")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            expressions = [k.value for k in node.keywords if k.arg == "devmajor"]
            if name in _MAJOR_ARGUMENT:
                position, keyword = _MAJOR_ARGUMENT[name]
                if len(node.args) > position:
                    expressions.append(node.args[position])
                expressions += [k.value for k in node.keywords if k.arg == keyword]
            for expression in expressions:
                where = f"{path.name}:{expression.lineno}"
                if isinstance(expression, ast.Name) and expression.id in ("major", "devmajor"):
                    continue  # the builder passing its own argument on
                code = compile(ast.Expression(expression), where, "eval")
                try:
                    major = eval(code, vars(module))
                except NameError as exc:
                    raise AssertionError(
                        f"{where}: a device major must be a module-level constant ({exc})"
                    ) from exc
                yield where, major


def test_device_nodes_in_test_data_use_numbers_no_host_driver_owns() -> None:
    owned = _tars.host_majors()
    majors = list(_device_majors())
    assert majors, "found no device node in the suite's test data"
    taken = [
        (where, major, owned["char"].get(major) or owned["block"].get(major))
        for where, major in majors
        if major in owned["char"] or major in owned["block"]
    ]
    assert not taken, f"device majors this host's drivers own (/proc/devices): {taken}"


def test_the_tar_builder_refuses_a_major_a_host_driver_owns() -> None:
    # Major 1 is the kernel's memory devices (/dev/mem, /dev/null) on every Linux host.
    with pytest.raises(ValueError, match="char device major 1 belongs to this host's 'mem'"):
        _tars.LayerTar().chardev("dev/null", 1, 3)
    owned_block = min(_tars.host_majors()["block"])
    with pytest.raises(ValueError, match=f"block device major {owned_block} belongs to"):
        _tars.LayerTar().blockdev("dev/disk", owned_block, 0)
    _tars.LayerTar().chardev("dev/chr0", _tars.UNOWNED_MAJOR, 0)
