"""The public namespace: what `import laminae` offers, and that a wheel offers the same."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import laminae

ROOT = Path(__file__).resolve().parent.parent

LIST_PUBLIC = (
    "import json, laminae, laminae.conformance, laminae.drivers.vfs, laminae.drivers.overlay, "
    "laminae.drivers.btrfs; "
    "print(json.dumps({'all': laminae.__all__, "
    "'resolved': sorted(n for n in laminae.__all__ if getattr(laminae, n, None) is not None), "
    "'drivers': sorted(laminae.available_drivers())}))"
)


def test_all_is_sorted_and_lists_exactly_the_public_names() -> None:
    assert laminae.__all__ == sorted(laminae.__all__)
    public = {
        name
        for name, value in vars(laminae).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(laminae.__all__)


def test_public_names_come_from_underscored_modules() -> None:
    for name in laminae.__all__:
        module = getattr(getattr(laminae, name), "__module__", "laminae._")
        assert module.startswith(("laminae._", "pluggy")), (name, module)


def test_errors_form_one_tree_with_distinct_exit_codes() -> None:
    errors = [getattr(laminae, n) for n in laminae.__all__]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, laminae.LaminaeError)]
    # ParentsNeeded passes between a driver and the store; it never reaches a user.
    errors.remove(laminae.ParentsNeeded)
    assert len(errors) == 11
    assert len({e.exit_code for e in errors}) == 11


def test_built_in_drivers_come_through_entry_points() -> None:
    drivers = laminae.available_drivers()
    assert {"vfs", "overlay", "btrfs"} <= set(drivers)
    assert drivers["vfs"].origin.startswith("laminae ")


@pytest.mark.slow
def test_wheel_offers_the_same_imports_as_the_checkout(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path / "dist"),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = (tmp_path / "dist").glob("laminae-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)],
        check=True,
    )
    # Run from an empty directory so the checkout cannot be imported by accident.
    from_wheel = subprocess.run(
        [str(python), "-c", LIST_PUBLIC], cwd=tmp_path, check=True, capture_output=True, text=True
    )
    here = subprocess.run(
        [sys.executable, "-c", LIST_PUBLIC],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    wheel_names, checkout_names = json.loads(from_wheel.stdout), json.loads(here.stdout)
    assert wheel_names == checkout_names
    assert wheel_names["resolved"] == wheel_names["all"]
    files = subprocess.run(
        [
            str(python),
            "-c",
            "import laminae, pathlib; "
            "print(pathlib.Path(laminae.__file__).with_name('py.typed').exists())",
        ],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        text=True,
    )
    assert files.stdout.strip() == "True"
