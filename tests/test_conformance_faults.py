"""The conformance suite's fault checks (``faults`` area) and its driver tier (``contract``
area), each shown failing a driver with that one fault (pytester, in a pytest subprocess)
with a message that names it: a driver that swallows write errors during an apply, one that
declares commit but leaves committed storage writable, one whose mounts opt out of
``nodev``, and one that ignores ``readonly``."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

SUITE = ("--pyargs", "laminae.conformance", "-p", "no:cacheprovider")

FAULTY_DRIVERS = '''
from __future__ import annotations

import os

import attrs

import laminae
from laminae import driverkit
from laminae.drivers.vfs._driver import VfsDriver


class SwallowingVfs(VfsDriver):
    """Applies tars itself, and carries on when a write fails."""

    name = "vfs_swallows_write_errors"
    capabilities = attrs.evolve(
        VfsDriver.capabilities,
        features=VfsDriver.capabilities.features | {laminae.Feature.APPLY},
    )

    def apply(self, id, parents, tar, limits):
        root = __import__("pathlib").Path(self.mounts(id, parents, False)[0].source)
        try:
            driverkit.apply_tar(root, tar, limits=limits)
        except (OSError, laminae.LaminaeError):
            pass  # the fault: what was written stays, the rest is lost
        while tar.read(1 << 20):
            pass


class UnfrozenVfs(VfsDriver):
    """Declares commit, and does nothing when asked to freeze a layer."""

    name = "vfs_leaves_commits_writable"
    capabilities = attrs.evolve(
        VfsDriver.capabilities,
        features=VfsDriver.capabilities.features | {laminae.Feature.COMMIT},
    )

    def commit(self, id):
        pass


class DevVfs(VfsDriver):
    """Asks for its mounts without nodev."""

    name = "vfs_mounts_with_dev"

    def mounts(self, id, parents, readonly):
        return [
            attrs.evolve(spec, options=(*spec.options, "dev"))
            for spec in super().mounts(id, parents, readonly)
        ]


class ReadWriteVfs(VfsDriver):
    """Ignores readonly: every mount it describes is writable."""

    name = "vfs_ignores_readonly"

    def mounts(self, id, parents, readonly):
        return super().mounts(id, parents, False)


class SymlinkRewritingVfs(VfsDriver):
    """Copies a parent, and makes its absolute symlinks relative on the way."""

    name = "vfs_rewrites_symlinks"

    def create(self, id, parents, writable):
        super().create(id, parents, writable)
        root = __import__("pathlib").Path(super().mounts(id, parents, False)[0].source)
        for path in root.rglob("*"):
            if path.is_symlink() and os.readlink(path).startswith("/"):
                target = os.readlink(path)
                path.unlink()
                os.symlink(os.path.relpath(target, "/" + str(path.parent.relative_to(root))),
                           path)


class CapabilityDroppingVfs(VfsDriver):
    """Copies a parent, but not its files' capabilities."""

    name = "vfs_drops_capabilities"

    def create(self, id, parents, writable):
        super().create(id, parents, writable)
        root = __import__("pathlib").Path(super().mounts(id, parents, False)[0].source)
        for path in root.rglob("*"):
            if "security.capability" in os.listxattr(path, follow_symlinks=False):
                os.removexattr(path, "security.capability", follow_symlinks=False)


class ModeLosingVfs(VfsDriver):
    """Copies a parent, and its directories end up 0755."""

    name = "vfs_loses_dir_modes"

    def create(self, id, parents, writable):
        super().create(id, parents, writable)
        root = __import__("pathlib").Path(super().mounts(id, parents, False)[0].source)
        for path in root.rglob("*"):
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)


class UsageZeroVfs(VfsDriver):
    """Says every layer holds nothing."""

    name = "vfs_usage_zero"

    def usage(self, id):
        return laminae.Usage(size=0, inodes=0)


@driverkit.hookimpl
def laminae_register_drivers(register):
    for cls in (
        SwallowingVfs,
        UnfrozenVfs,
        DevVfs,
        ReadWriteVfs,
        SymlinkRewritingVfs,
        CapabilityDroppingVfs,
        UsageZeroVfs,
        ModeLosingVfs,
    ):
        register(cls)
'''


@pytest.fixture(autouse=True)
def lenient_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs here are lenient and name their driver, whatever CI's environment says."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LAMINAE_DRIVER", raising=False)


@pytest.fixture
def faulty(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(faulty_drivers=FAULTY_DRIVERS)
    return pytester


def run_faults(pytester: pytest.Pytester, driver: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        *SUITE, "-p", "faulty_drivers", "--laminae-driver", driver, "-rA", "-k", "faults"
    )


@pytest.mark.root
def test_vfs_passes_the_fault_checks(faulty: pytest.Pytester) -> None:
    result = run_faults(faulty, "vfs")
    result.assert_outcomes(passed=3, skipped=1)  # vfs does not declare commit


@pytest.mark.root
@pytest.mark.parametrize(
    ("driver", "failing", "message"),
    [
        (
            "vfs_swallows_write_errors",
            "test_a_write_past_the_file_size_limit_fails_the_apply",
            "a driver must not swallow write errors",
        ),
        (
            "vfs_leaves_commits_writable",
            "test_committed_storage_refuses_writes_when_mounted_writable",
            "the driver declares commit and must freeze the storage",
        ),
        ("vfs_mounts_with_dev", "test_every_mount_is_nodev", "lack nodev"),
    ],
)
def test_a_driver_with_the_fault_fails(
    faulty: pytest.Pytester, driver: str, failing: str, message: str
) -> None:
    result = run_faults(faulty, driver)
    failed = [line for line in result.outlines if line.startswith("FAILED")]
    assert failed and all(failing in line for line in failed), result.stdout.str()
    assert message in result.stdout.str()


@pytest.mark.root
def test_the_driver_tier_names_a_driver_that_ignores_readonly(faulty: pytest.Pytester) -> None:
    """The contract area calls the driver itself, and its report row says the driver failed."""
    result = faulty.runpytest_subprocess(
        *SUITE,
        "-p",
        "faulty_drivers",
        "--laminae-driver",
        "vfs_ignores_readonly",
        "-rA",
        "-k",
        "contract",
    )
    failed = sorted(
        line.split("::")[-1].split(" ")[0] for line in result.outlines if line.startswith("FAILED")
    )
    assert failed == [
        "test_a_read_only_layer_refuses_writes",
        "test_create_mount_usage_and_remove",
    ], result.stdout.str()
    assert "a write through a read-only mount succeeded" in result.stdout.str()
    assert any(line.split()[:3] == ["contract", "2", "2"] for line in result.outlines), (
        result.stdout.str()
    )


@pytest.mark.root
@pytest.mark.parametrize(
    ("driver", "failing", "message"),
    [
        ("vfs_rewrites_symlinks", "test_an_untouched_child", "modified /absolute"),
        ("vfs_drops_capabilities", "test_an_untouched_child", "modified /ping"),
        ("vfs_usage_zero", "test_usage_follows_the_data", "its usage went from 0 to 0 bytes"),
    ],
)
def test_the_second_checks_catch_what_the_first_do(
    faulty: pytest.Pytester, driver: str, failing: str, message: str
) -> None:
    """Each fault is caught here too, by the crosscheck area, with the mount-based areas
    deselected: a second, independent detection."""
    result = faulty.runpytest_subprocess(
        *SUITE, "-p", "faulty_drivers", "--laminae-driver", driver, "-rA", "-k", "crosscheck"
    )
    failed = [line for line in result.outlines if line.startswith("FAILED")]
    assert failed and all(failing in line for line in failed), result.stdout.str()
    assert message in result.stdout.str()


@pytest.mark.root
def test_a_failure_names_the_step_the_path_and_the_property(faulty: pytest.Pytester) -> None:
    result = faulty.runpytest_subprocess(
        *SUITE,
        "-p",
        "faulty_drivers",
        "--laminae-driver",
        "vfs_loses_dir_modes",
        "-rA",
        "-k",
        "test_directories",
    )
    result.assert_outcomes(failed=1)
    # The committed layer is right; its child, copied by the driver, is not.
    result.stdout.fnmatch_lines(
        ["*create from parent: /tmp (dir): mode expected 0o1777, got 0o755*"]
    )
