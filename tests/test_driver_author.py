"""A driver author's first day: README's tox snippet, ``laminae driver new``, and which driver
``laminae drivers`` says the store opens with.

The snippet is read from README.md, so the page cannot drift from what is tested: it runs with
tox from a fresh directory against laminae's wheel, and it is the conformance env of the
``tox.ini`` that ``laminae driver new`` writes. A new driver is installed beside laminae (in a
``--target`` directory, never into this environment) and the conformance suite runs against
it: what it does not yet do fails, naming the function left to write, and the rest passes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import laminae
from laminae.cli._main import cli

CHECKOUT = Path(__file__).resolve().parents[1]
LEFT_TO_WRITE = "copy_layer() in laminae_mydriver/_copy.py is left to write"
# A test that needs base layers only, one that needs a layer made from its parent, and one
# more of each kind, from three areas of the suite.
BASE_ONLY = ("test_create_empty", "test_close_twice", "test_unknown_ref_is_not_found")
NEEDS_A_CHILD = ("test_regular_files", "test_create_snap")


@pytest.fixture(autouse=True)
def _environment(clean_environment: None) -> None:
    """Every test here runs in conftest's clean environment."""


def _readme_snippet() -> str:
    """The tox env README.md gives driver authors, as written there."""
    text = (CHECKOUT / "README.md").read_text()
    section = text[text.index("Then run the conformance suite against it from a tox env") :]
    match = re.search(r"```ini\n(.*?)```", section, re.DOTALL)
    assert match is not None, "README.md: no ini block after the conformance paragraph"
    return match.group(1)


def _run(
    argv: Sequence[str | Path], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


def _new_driver(directory: Path, name: str = "mydriver") -> Result:
    return CliRunner().invoke(cli, ["driver", "new", name, str(directory)])


def _outcomes(report: Path) -> dict[str, dict[str, Any]]:
    tests = json.loads(report.read_text())["tests"]
    return {test["id"].split("::")[-1]: test for test in tests}


# -- laminae driver new -----------------------------------------------------------------------


def test_driver_new_writes_a_distribution(tmp_path: Path) -> None:
    target = tmp_path / "laminae-mydriver"
    result = _new_driver(target)
    assert result.exit_code == 0, result.output
    written = {Path(line).relative_to(target).as_posix() for line in result.stdout.split()}
    assert written == {
        "pyproject.toml",
        "laminae_mydriver/__init__.py",
        "laminae_mydriver/_driver.py",
        "laminae_mydriver/_copy.py",
        "laminae_mydriver/py.typed",
        "tox.ini",
        ".github/workflows/conformance.yml",
        "README.md",
    }
    pyproject = (target / "pyproject.toml").read_text()
    assert '[project.entry-points."laminae.drivers"]\nmydriver = "laminae_mydriver"' in pyproject
    assert "def laminae_register_drivers(" in (target / "laminae_mydriver/__init__.py").read_text()
    workflow = (target / ".github/workflows/conformance.yml").read_text()
    assert "sudo " in workflow and "tox -e conformance" in workflow
    # Every template placeholder was filled, and the workflow's own expressions kept.
    for path in target.rglob("*"):
        if path.is_file():
            assert "$name" not in path.read_text() and "$package" not in path.read_text(), path
    assert "${{ vars.LAMINAE_SOURCE }}" in workflow


def test_driver_new_writes_the_readme_tox_env(tmp_path: Path) -> None:
    assert _new_driver(tmp_path / "d").exit_code == 0
    assert _readme_snippet() in (tmp_path / "d" / "tox.ini").read_text()


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("vfs", "is a built-in driver's"),
        ("My-Driver", "expected a lowercase identifier"),
        ("9lives", "expected a lowercase identifier"),
    ],
)
def test_driver_new_refuses_a_bad_name(tmp_path: Path, name: str, words: str) -> None:
    result = _new_driver(tmp_path / "d", name)
    assert result.exit_code == laminae.InvalidArgument.exit_code
    assert words in result.stderr
    assert not (tmp_path / "d").exists()


def test_driver_new_refuses_a_directory_with_files(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "mine.py").write_text("")
    result = _new_driver(tmp_path / "d")
    assert result.exit_code == laminae.AlreadyExists.exit_code
    assert "exists and is not empty" in result.stderr
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["mine.py"]


def test_driver_new_defaults_to_a_directory_named_after_the_distribution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["driver", "new", "my_store"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "laminae-my-store" / "laminae_my_store" / "_driver.py").is_file()
    assert (
        "class MyStoreDriver:"
        in (tmp_path / "laminae-my-store/laminae_my_store/_driver.py").read_text()
    )


@pytest.mark.slow
@pytest.mark.root
def test_a_new_driver_fails_only_where_left_to_write(tmp_path: Path) -> None:
    assert _new_driver(tmp_path / "src").exit_code == 0
    # Beside laminae, not into this environment: a directory on PYTHONPATH, with the
    # distribution's metadata (its entry point) as pip writes it. Built in isolation, as a
    # user's pip builds it: this environment need not hold setuptools.
    site = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site]
    installed = _run([*pip, tmp_path / "src"])
    assert installed.returncode == 0, installed.stderr
    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = _run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "--pyargs",
            "laminae.conformance",
            "--laminae-driver",
            "mydriver",
            "--laminae-strict",
            "--laminae-report",
            report,
            "-k",
            " or ".join(BASE_ONLY + NEEDS_A_CHILD),
        ],
        cwd=tmp_path,
        env=env,
    )
    assert run.returncode == 1, run.stdout + run.stderr
    outcomes = _outcomes(report)
    assert {name: outcomes[name]["outcome"] for name in BASE_ONLY + NEEDS_A_CHILD} == {
        **dict.fromkeys(BASE_ONLY, "passed"),
        **dict.fromkeys(NEEDS_A_CHILD, "failed"),
    }
    for name in NEEDS_A_CHILD:
        assert outcomes[name]["message"].startswith(
            f"NotImplementedError: mydriver: {LEFT_TO_WRITE}"
        )


# -- README's tox env, run as written ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.root
def test_readme_tox_env_runs_from_a_fresh_directory(tmp_path: Path) -> None:
    """The snippet alone as tox.ini, beside a new driver, with laminae's wheel and nothing
    else of laminae: tox brings pytest through the ``conformance`` extra."""
    built = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", CHECKOUT]
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("laminae-*.whl")
    fresh = tmp_path / "fresh"
    assert _new_driver(fresh).exit_code == 0
    (fresh / "tox.ini").write_text(_readme_snippet())
    # Nothing of an outer tox run (this module runs under `tox -e unit`): tox reads TOX_*
    # variables as settings, TOX_WORK_DIR among them, and would build in the outer work dir.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LAMINAE_", "TOX_")) and k != "VIRTUAL_ENV"
    }
    env["LAMINAE_WHEEL"] = str(wheel)
    tests = " or ".join((BASE_ONLY[0], NEEDS_A_CHILD[0]))
    run = _run(
        [sys.executable, "-m", "tox", "-e", "conformance", "--", "-k", tests], cwd=fresh, env=env
    )
    output = run.stdout + run.stderr
    assert "No module named" not in output
    assert run.returncode == 1, output  # the one test left to write fails
    assert "1 failed, 1 passed" in output, output
    assert LEFT_TO_WRITE in output
    outcomes = _outcomes(fresh / ".tox" / "conformance" / "tmp" / "report.json")
    assert outcomes[BASE_ONLY[0]]["outcome"] == "passed"
    assert LEFT_TO_WRITE in outcomes[NEEDS_A_CHILD[0]]["message"]


# -- laminae drivers: which one, and why ------------------------------------------------------


def _selected(args: Sequence[str], config: Path, root: Path) -> dict[str, str | None]:
    """``laminae drivers --json`` with ``args`` before it: each driver's ``selected_by``."""
    result = CliRunner().invoke(
        cli, ["--config", str(config), "--root", str(root), *args, "drivers", "--json"]
    )
    assert result.exit_code == 0, result.output
    return {d["name"]: d["selected_by"] for d in json.loads(result.stdout) if "priority" in d}


def _only(selected: dict[str, str | None]) -> tuple[str, str | None]:
    chosen = [(name, why) for name, why in selected.items() if why is not None]
    assert len(chosen) == 1, selected
    return chosen[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "storage.toml"
    path.write_text("")
    return path


def test_drivers_marks_the_driver_given_by_flag(config: Path, tmp_path: Path) -> None:
    assert _only(_selected(["--driver", "vfs"], config, tmp_path / "root")) == ("vfs", "--driver")


def test_drivers_marks_the_driver_given_by_environment(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMINAE_DRIVER", "vfs")
    config.write_text('[storage]\ndriver = "overlay"\n')
    assert _only(_selected([], config, tmp_path / "root")) == ("vfs", "$LAMINAE_DRIVER")


def test_drivers_marks_the_driver_named_in_the_file(config: Path, tmp_path: Path) -> None:
    config.write_text('[storage]\ndriver = "vfs"\n')
    selected = _selected([], config, tmp_path / "root")
    assert _only(selected) == ("vfs", f"{config}: storage.driver")


def test_drivers_marks_the_driver_that_made_the_store(config: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    with laminae.open_store(root, runroot=tmp_path / "run", driver="vfs"):
        pass
    before = sorted(p.name for p in root.iterdir())
    assert _only(_selected([], config, root)) == ("vfs", f"made the store ({root / 'graph.db'})")
    assert sorted(p.name for p in root.iterdir()) == before, "reading the record wrote nothing"
    # A name given wins, and the listing says the store will not open with it.
    name, why = _only(_selected(["--driver", "overlay"], config, root))
    assert (name, why) == (
        "overlay",
        "--driver; but the store was made by 'vfs' and will not open with it",
    )


def test_drivers_marks_the_first_usable_by_priority(config: Path, tmp_path: Path) -> None:
    selected = _selected([], config, tmp_path / "root")
    name, why = _only(selected)
    assert why == "priority: the highest usable"
    listed = CliRunner().invoke(
        cli, ["--config", str(config), "--root", str(tmp_path / "root"), "drivers", "--json"]
    )
    usable = [d["name"] for d in json.loads(listed.stdout) if d["unavailable"] is None]
    assert name == usable[0]  # the listing is in priority order
    assert not (tmp_path / "root").exists()


def test_drivers_marks_the_first_usable_of_the_files_priority(config: Path, tmp_path: Path) -> None:
    config.write_text('[storage]\ndriver_priority = ["btrfs", "vfs"]\n')
    # tmp_path is no btrfs: its probe fails, and the next one is chosen.
    selected = _selected([], config, tmp_path / "root")
    assert _only(selected) == ("vfs", f"{config}: storage.driver_priority")


def test_drivers_shows_the_reason_in_its_last_column(config: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["--config", str(config), "--root", str(tmp_path / "r"), "--driver", "vfs", "drivers"]
    )
    rows = {line.split("\t")[0]: line.split("\t") for line in result.stdout.splitlines()}
    assert rows["vfs"][4] == "--driver"
    assert {row[4] for name, row in rows.items() if name != "vfs"} == {"-"}


def test_drivers_lists_and_selects_beside_a_damaged_graph(config: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "graph.db").write_bytes(b"not a database, not even close" * 100)
    _, why = _only(_selected([], config, root))
    assert why is not None and why.startswith("priority: the highest usable (graph ")
    assert "graph.db is damaged" in why
    assert sorted(p.name for p in root.iterdir()) == ["graph.db"]
