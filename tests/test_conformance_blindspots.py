"""The conformance suite's checks of holes, xattrs on special files and directory mtimes,
each shown failing a driver with that one fault (pytester, in a pytest subprocess), with a
message that names the path, the property and the step."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SUITE = ("--pyargs", "laminae.conformance", "-p", "no:cacheprovider")

# Drivers broken on purpose, each in one way: a vfs whose create() copies its parent and then
# does what a careless copy would have done instead.
BLINDSPOT_DRIVERS = '''
from __future__ import annotations

import os
import stat
from pathlib import Path

from laminae import driverkit
from laminae.drivers.vfs._driver import VfsDriver


def _walk(driver, id, parents):
    """Every path of the new layer but its root, with its lstat."""
    root = Path(driver.mounts(id, parents, False)[0].source)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            yield path, os.lstat(path)


class DenseCopyVfs(VfsDriver):
    """Copies a parent's files with plain read() and write(): every hole becomes zeros."""

    name = "vfs_copies_densely"

    def create(self, id, parents, writable):
        super().create(id, parents, writable)
        if not parents:
            return
        for path, st in _walk(self, id, parents):
            if not stat.S_ISREG(st.st_mode):
                continue
            # What a read()/write() copy leaves: the same bytes, every block of them written.
            with open(path, "r+b") as file:
                while chunk := file.read(1 << 20):
                    file.seek(-len(chunk), os.SEEK_CUR)
                    file.write(chunk)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


class SpecialXattrDroppingVfs(VfsDriver):
    """Copies a parent, but not the xattrs of its symlinks, FIFOs and device nodes."""

    name = "vfs_drops_special_xattrs"

    def create(self, id, parents, writable):
        super().create(id, parents, writable)
        for path, st in _walk(self, id, parents):
            if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
                continue
            for attribute in os.listxattr(path, follow_symlinks=False):
                os.removexattr(path, attribute, follow_symlinks=False)


class DirMtimeResettingVfs(VfsDriver):
    """Copies a parent, but its directories end with the time of the copy as their mtime."""

    name = "vfs_resets_dir_mtimes"

    def create(self, id, parents, writable):
        super().create(id, parents, writable)
        for path, st in _walk(self, id, parents):
            if stat.S_ISDIR(st.st_mode):
                os.utime(path)


@driverkit.hookimpl
def laminae_register_drivers(register):
    for cls in (DenseCopyVfs, SpecialXattrDroppingVfs, DirMtimeResettingVfs):
        register(cls)
'''


@pytest.fixture(autouse=True)
def lenient_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs here are lenient and name their driver, whatever CI's environment says."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LAMINAE_DRIVER", raising=False)


@pytest.fixture
def broken(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory holding the broken drivers as plugin module ``blindspot_drivers``."""
    pytester.makepyfile(blindspot_drivers=BLINDSPOT_DRIVERS)
    return pytester


def run_suite(pytester: pytest.Pytester, driver: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        *SUITE, "-p", "blindspot_drivers", "--laminae-driver", driver, "-rA", *args
    )


@pytest.mark.root
def test_vfs_passes_the_new_checks(broken: pytest.Pytester) -> None:
    """The checks the broken drivers fail pass the driver they are broken from."""
    result = run_suite(broken, "vfs", "-k", "TestHoles or TestMetadata")
    result.assert_outcomes(passed=10)


@pytest.mark.root
def test_driver_copying_densely_fails(broken: pytest.Pytester) -> None:
    result = run_suite(broken, "vfs_copies_densely", "-k", "TestHoles")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # Every check of a child fails; the diff, which has no child, passes.
    result.assert_outcomes(failed=3, passed=1)
    result.stdout.fnmatch_lines(
        [
            "*after create from parent (the child's mount):*",
            "*/holes/middle: allocated bytes expected at most * (holes unallocated), "
            "got * of 67112960 apparent: the holes were filled*",
            "*/holes/middle: hole map expected data at ((0, 4096), (67108864, 67112960)), "
            "got ((0, 67112960),)*",
        ],
        consecutive=False,
    )
    result.stdout.fnmatch_lines(["*after create from an applied parent (the child's mount):*"])
    result.stdout.fnmatch_lines(["holes * 1 * 3 *"])


@pytest.mark.root
def test_driver_dropping_xattrs_of_special_files_fails(broken: pytest.Pytester) -> None:
    result = run_suite(broken, "vfs_drops_special_xattrs", "-k", "test_xattrs_through")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    # user.* on files and directories is kept; trusted.* on the others is not.
    result.assert_outcomes(failed=2, passed=2)
    result.stdout.fnmatch_lines(
        [
            "*xattrs lost or changed after create from parent (the child's mount):*",
            "*/meta/link (symlink): xattrs expected {'trusted.laminae.link': b'on a symlink'}, "
            "got {}*",
            "*/meta/fifo (fifo): xattrs expected {'trusted.laminae.fifo': b'on a fifo'}, got {}*",
        ],
        consecutive=False,
    )
    result.stdout.fnmatch_lines(["*/meta/char (character device): xattrs expected*got {}*"])
    result.stdout.fnmatch_lines(["*/meta/block (block device): xattrs expected*got {}*"])


@pytest.mark.root
def test_driver_resetting_directory_mtimes_fails(broken: pytest.Pytester) -> None:
    result = run_suite(broken, "vfs_resets_dir_mtimes", "-k", "test_directory_mtimes")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*after create from parent (the child's mount):*",
            "*/a/b: directory mtime expected 1500000100222222222, got *",
        ],
        consecutive=False,
    )
    result.stdout.fnmatch_lines(["metadata * 0 * 2 *"])
