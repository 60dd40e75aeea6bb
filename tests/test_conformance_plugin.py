"""The conformance plugin itself, run in pytest subprocesses (pytester): inert without a
driver, and failing deliberately broken drivers with a message that names the fault."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import laminae

pytest_plugins = ["pytester"]

SUITE = ("--pyargs", "laminae.conformance", "-p", "no:cacheprovider")

# Drivers broken on purpose, each in one way, registered through a plugin module's
# laminae_register_drivers hook (the suite hands such plugins to laminae's plugin manager).
BROKEN_DRIVERS = '''
from __future__ import annotations

import os
from pathlib import Path

import attrs

import laminae
from laminae import driverkit
from laminae.kernel import _mounts
from laminae.drivers.vfs._driver import VfsDriver


def _root(driver, id, parents):
    return Path(driver.mounts(id, parents, False)[0].source)


class XattrDroppingVfs(VfsDriver):
    """Copies a parent into a new layer, but not its extended attributes."""

    name = "vfs_drops_xattrs"

    def create(self, id, parents, writable):
        super().create(id, parents, writable)
        for dirpath, dirnames, filenames in os.walk(_root(self, id, parents)):
            for name in [".", *dirnames, *filenames]:
                path = os.path.join(dirpath, name)
                for attribute in os.listxattr(path, follow_symlinks=False):
                    os.removexattr(path, attribute, follow_symlinks=False)


class XattrDroppingVfsKnown(XattrDroppingVfs):
    """The same fault, declared as a known failure (and one test that passes, declared too)."""

    name = "vfs_drops_xattrs_known"
    capabilities = attrs.evolve(
        VfsDriver.capabilities,
        known_failures={
            "apply::test_xattrs_in_child_layers": "copies drop xattrs",
            "layers::test_root_permission": "declared, but it passes",
        },
    )


class WhiteoutIgnoringVfs(VfsDriver):
    """Applies layers itself, writing whiteouts as overlayfs markers instead of deleting."""

    name = "vfs_ignores_whiteouts"
    capabilities = attrs.evolve(
        VfsDriver.capabilities, features=frozenset({laminae.Feature.APPLY})
    )

    def apply(self, id, parents, tar, limits):
        driverkit.apply_tar(
            _root(self, id, parents), tar, limits=limits, whiteouts=driverkit.WhiteoutMode.OVERLAY
        )


class MountLeakingVfs(VfsDriver):
    """Mounts a tmpfs in its home for every layer it creates, and never unmounts it."""

    name = "vfs_leaks_mounts"

    def __init__(self, home, options):
        super().__init__(home, options)
        self.leak_home = Path(home)

    def create(self, id, parents, writable):
        super().create(id, parents, writable)
        target = self.leak_home / f"leak-{id}"
        target.mkdir()
        _mounts.mount("tmpfs", str(target), "tmpfs", 0, "size=1m")


class UnavailableVfs(VfsDriver):
    """Can never run."""

    name = "vfs_unavailable"

    @classmethod
    def probe(cls, home, options):
        raise laminae.DriverUnavailable("needs a host this is not")


@driverkit.hookimpl
def laminae_register_drivers(register):
    for cls in (
        XattrDroppingVfs,
        XattrDroppingVfsKnown,
        WhiteoutIgnoringVfs,
        MountLeakingVfs,
        UnavailableVfs,
    ):
        register(cls)
'''


@pytest.fixture(autouse=True)
def lenient_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs here are lenient and name their driver, whatever CI's environment says."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("LAMINAE_DRIVER", raising=False)


@pytest.fixture
def broken(pytester: pytest.Pytester) -> pytest.Pytester:
    """A pytester directory holding the broken drivers as plugin module ``broken_drivers``."""
    pytester.makepyfile(broken_drivers=BROKEN_DRIVERS)
    return pytester


def run_suite(pytester: pytest.Pytester, driver: str, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(
        *SUITE, "-p", "broken_drivers", "--laminae-driver", driver, "-rA", *args
    )


# -- inert without a driver ------------------------------------------------------------------


def test_plugin_is_inert_without_a_driver(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A project's own tests see no laminae fixture, header or summary, and the plugin
    imports nothing of laminae beyond the package itself."""
    # LAMINAE_DRIVER picks the CLI's driver too; it must not turn a plain run into a
    # conformance run.
    monkeypatch.setenv("LAMINAE_DRIVER", "vfs")
    pytester.makeconftest(
        """
        import json, sys

        def pytest_sessionfinish(session):
            loaded = sorted(m for m in sys.modules if m == "laminae" or m.startswith("laminae."))
            with open("loaded.json", "w") as out:
                json.dump(loaded, out)
        """
    )
    pytester.makepyfile(
        test_plain="""
        def test_plain():
            pass

        def test_wants_store(store):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*fixture 'store' not found*"])
    result.stdout.no_fnmatch_line("*laminae driver:*")
    result.stdout.no_fnmatch_line("*laminae conformance*")

    fixtures = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--fixtures")
    fixtures.stdout.no_fnmatch_line("*driver_home*")
    fixtures.stdout.no_fnmatch_line("*laminae_leak_guard*")

    loaded = set(json.loads((pytester.path / "loaded.json").read_text()))
    plain = pytester.run(
        sys.executable,
        "-c",
        "import json, sys, laminae; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('laminae'))))",
    )
    by_import = set(json.loads(plain.stdout.lines[-1]))
    assert loaded - by_import == {"laminae.conformance", "laminae.conformance.plugin"}


def test_suite_without_a_driver_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(*SUITE)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*needs a driver: --laminae-driver NAME*installed drivers:*vfs*"])


def test_unknown_driver_is_a_usage_error(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess(*SUITE, "--laminae-driver", "no_such_driver")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*'no_such_driver': no such driver; installed drivers:*vfs*"])


# -- broken drivers fail, naming the fault ---------------------------------------------------


@pytest.mark.root
def test_driver_dropping_xattrs_fails(broken: pytest.Pytester) -> None:
    result = run_suite(broken, "vfs_drops_xattrs", "-k", "test_xattrs")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) >= 1, outcomes
    result.stdout.fnmatch_lines(["*xattrs of /etc/config in an * child layer: lost or changed*"])
    result.stdout.fnmatch_lines(["apply * 1 * 1 *"])  # the table: one passed, one failed


@pytest.mark.root
def test_driver_ignoring_whiteouts_fails(broken: pytest.Pytester) -> None:
    result = run_suite(broken, "vfs_ignores_whiteouts", "-k", "test_whiteout_removes")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*whiteout .wh.gone did not delete the lower file: etc/gone is still there*",
            "*whiteout .wh.cache did not delete the lower dir: var/cache is still there*",
        ],
        consecutive=False,
    )


@pytest.mark.root
def test_driver_leaking_a_mount_fails(broken: pytest.Pytester) -> None:
    result = run_suite(broken, "vfs_leaks_mounts", "-k", "test_create_empty")
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, errors=1)  # the test passes; its teardown finds the leak
    result.stdout.fnmatch_lines(["*leaked mount: */leak-* (tmpfs from tmpfs)*"])
    result.stdout.fnmatch_lines(["layers * 0 * 1 *"])  # counted as a failed conformance test
    with open("/proc/self/mountinfo") as mountinfo:
        assert str(broken.path) not in mountinfo.read(), "the leaked mount was not cleaned up"


@pytest.mark.root
def test_known_failures_are_strict_xfails(broken: pytest.Pytester) -> None:
    result = run_suite(
        broken, "vfs_drops_xattrs_known", "-k", "test_xattrs_in_child_layers or test_root_perm"
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*XPASS(strict)*known failure of vfs_drops_xattrs_known*"])
    # Known failures are named in pytest's final line and listed with their reasons.
    result.stdout.fnmatch_lines(["*= 1 failed, * 1 known failures in *"])
    result.stdout.fnmatch_lines(
        [
            "known failure apply::test_xattrs_in_child_layers: copies drop xattrs",
            "known failure layers::test_root_permission: declared, but it passes (it passed: "
            "take it out of known_failures)",
        ]
    )


@pytest.mark.root
def test_no_known_failures_runs_them_as_ordinary_tests(broken: pytest.Pytester) -> None:
    result = run_suite(
        broken,
        "vfs_drops_xattrs_known",
        "--laminae-no-known-failures",
        "-k",
        "test_xattrs_in_child_layers or test_root_perm",
    )
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*known_failures=2 (run as ordinary tests)*"])


def test_a_known_failure_needs_a_reason() -> None:
    with pytest.raises(laminae.InvalidArgument, match="'apply::test_fifo' needs a reason"):
        laminae.Capabilities(known_failures={"apply::test_fifo": " "})


# -- unavailable drivers, strict mode, runs that pass by skipping ----------------------------


@pytest.mark.root
def test_unavailable_driver_is_skipped_and_the_run_fails(broken: pytest.Pytester) -> None:
    result = run_suite(broken, "vfs_unavailable", "-k", "test_create_empty or test_stat_active")
    result.assert_outcomes(skipped=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(
        [
            "*unavailable: needs a host this is not*",
            "*no conformance test passed for driver 'vfs_unavailable'*",
        ],
        consecutive=False,
    )


@pytest.mark.root
@pytest.mark.parametrize("how", ["--laminae-strict", "CI=true"])
def test_strict_mode_makes_unavailable_an_error(
    broken: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    if how == "CI=true":
        monkeypatch.setenv("CI", "true")
        args: tuple[str, ...] = ()
    else:
        args = (how,)
    result = run_suite(broken, "vfs_unavailable", "-k", "test_create_empty", *args)
    result.assert_outcomes(errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*'vfs_unavailable' is unavailable: needs a host this is not*"])
    result.stdout.fnmatch_lines(["laminae mode: strict*"])


# -- markers, subclassing, header and report -------------------------------------------------


@pytest.mark.root
def test_requires_marker_and_subclassing(pytester: pytest.Pytester) -> None:
    """A driver package may run the suite's classes by subclassing them; a test needing a
    feature the driver lacks is skipped with the reason."""
    pytester.makepyfile(
        test_mine="""
        import pytest
        import laminae
        from laminae.conformance.test_layers import TestLayers as Base

        class TestMine(Base):
            pass

        @pytest.mark.laminae_area("mine")
        @pytest.mark.laminae_requires(laminae.Feature.QUOTA)
        def test_needs_quota(store):
            raise AssertionError("must not run")
        """
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--laminae-driver", "vfs", "-rs",
        "-k", "TestMine and test_root_permission or test_needs_quota",
    )  # fmt: skip
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*driver 'vfs' does not declare quota*"])


@pytest.mark.root
def test_header_summary_and_report(pytester: pytest.Pytester, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    result = pytester.runpytest_subprocess(
        *SUITE, "--laminae-driver", "vfs", "--laminae-report", str(report),
        "-k", "test_create_empty or test_fifos",
    )  # fmt: skip
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "laminae driver: vfs (laminae *)",
            "laminae capabilities: features=* max_depth=* needs_root=*",
            "laminae mount namespace: private*",
        ]
    )
    result.stdout.fnmatch_lines(
        ["*laminae conformance: driver vfs*", "area *passed*failed*", "apply *1 *0*", "layers *1*"]
    )
    data = json.loads(report.read_text())
    assert data["driver"] == "vfs"
    assert (
        data["capabilities"]["max_depth"]
        == laminae.available_drivers()["vfs"].capabilities.max_depth
    )
    assert data["areas"]["apply"]["passed"] == 1 and data["areas"]["layers"]["passed"] == 1
    assert [t["id"] for t in data["tests"]] == ["apply::test_fifos", "layers::test_create_empty"]
    assert {t["outcome"] for t in data["tests"]} == {"passed"}
    assert all(set(t) == {"id", "area", "outcome", "duration", "message"} for t in data["tests"])
