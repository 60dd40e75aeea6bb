"""The public namespaces: what ``import laminae`` offers (and what it costs), the names that
moved to ``laminae.driverkit`` and ``laminae.images``, and that a wheel offers the same."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest

import laminae
from laminae import images

ROOT = Path(__file__).resolve().parent.parent

LIST_PUBLIC = (
    "import json, laminae, laminae.conformance, laminae.drivers.vfs, laminae.drivers.overlay, "
    "laminae.drivers.btrfs; "
    "print(json.dumps({'all': laminae.__all__, "
    "'resolved': sorted(n for n in laminae.__all__ if getattr(laminae, n, None) is not None), "
    "'drivers': sorted(laminae.available_drivers())}))"
)


def public_names(module: types.ModuleType) -> set[str]:
    """What ``dir`` shows of ``module``, modules and underscored names left out."""
    return {
        name
        for name in dir(module)
        if not name.startswith("_") and not isinstance(getattr(module, name), types.ModuleType)
    }


def type_checking_imports(namespace: types.ModuleType) -> dict[str, tuple[str, bool]]:
    """The names ``namespace`` imports for type checkers: name -> (module, ``as`` form)."""
    assert namespace.__file__ is not None
    tree = ast.parse(Path(namespace.__file__).read_text())
    found: dict[str, tuple[str, bool]] = {}
    for node in tree.body:
        # `if TYPE_CHECKING:` (not `if not TYPE_CHECKING:`, which holds __getattr__).
        if not isinstance(node, ast.If) or not isinstance(node.test, ast.Attribute | ast.Name):
            continue
        if not ast.unparse(node.test).endswith("TYPE_CHECKING"):
            continue
        for statement in node.body:
            assert isinstance(statement, ast.ImportFrom) and statement.module, statement
            for alias in statement.names:
                assert alias.asname in (None, alias.name), alias.asname
                found[alias.name] = (statement.module, alias.asname is not None)
    return found


def test_all_is_sorted_and_lists_exactly_the_public_names() -> None:
    assert laminae.__all__ == sorted(laminae.__all__)
    assert public_names(laminae) == set(laminae.__all__)
    assert not set(laminae.__all__) & set(laminae._MOVED)


def test_type_checkers_see_the_names_that_resolve() -> None:
    seen = type_checking_imports(laminae)
    assert {name for name, (_, moved) in seen.items() if not moved} == set(laminae.__all__)
    assert {name for name, (_, moved) in seen.items() if moved} == set(laminae._MOVED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name, (module, _) in seen.items():
            assert getattr(laminae, name) is getattr(importlib.import_module(module), name), name


def test_public_names_come_from_underscored_modules() -> None:
    for name in laminae.__all__:
        module = getattr(getattr(laminae, name), "__module__", "laminae._")
        assert module.rpartition(".")[2].startswith("_"), (name, module)


@pytest.mark.parametrize("name", sorted(laminae._MOVED))
def test_moved_name_warns_and_is_the_new_homes(name: str) -> None:
    home = laminae._MOVED[name]
    with pytest.warns(
        DeprecationWarning, match=rf"laminae\.{name} has moved: use {home}\.{name}"
    ) as caught:
        value = getattr(laminae, name)
    # The warning points at the code that used the old name.
    assert [Path(w.filename) for w in caught] == [Path(__file__)]
    namespace = importlib.import_module(home)
    assert name in namespace.__all__
    assert value is getattr(namespace, name)


def test_moved_name_warns_on_from_import() -> None:
    with pytest.warns(DeprecationWarning, match=r"use laminae\.driverkit\.MountSpec"):
        from laminae import MountSpec  # noqa: F401


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        laminae.NoSuchThing  # noqa: B018
    assert not hasattr(laminae, "NoSuchThing")


def test_public_namespaces_are_reachable_as_attributes() -> None:
    assert laminae.images is images
    assert laminae.driverkit is importlib.import_module("laminae.driverkit")


def test_images_namespace_lists_the_image_documents() -> None:
    assert images.__all__ == sorted(images.__all__)
    assert public_names(images) == set(images.__all__)
    moved = {name for name, home in laminae._MOVED.items() if home == "laminae.images"}
    # What left laminae for here, and the row a transport plugin registers.
    assert set(images.__all__) == moved | {"LocationSyntax", "PathAndReference", "Transport"}
    seen = type_checking_imports(images)
    assert set(seen) == set(images.__all__)
    for name, (module, _) in seen.items():
        assert getattr(images, name) is getattr(importlib.import_module(module), name), name


def test_errors_form_one_tree_with_distinct_exit_codes() -> None:
    errors = [getattr(laminae, n) for n in laminae.__all__]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, laminae.LaminaeError)]
    assert len(errors) == 12
    assert len({e.exit_code for e in errors}) == 12


def test_built_in_drivers_are_listed_with_laminae_as_their_origin() -> None:
    drivers = laminae.available_drivers()
    assert {"vfs", "overlay", "btrfs"} <= set(drivers)
    assert drivers["vfs"].origin.startswith("laminae ")


# -- what starting up costs: the modules a fresh process imports ------------------------------

HEAVY = frozenset(
    {"attrs", "cattrs", "click", "httpx", "importlib.metadata", "pluggy", "rich", "sqlite3"}
)
"""Modules worth their own line in a start-up profile; importlib.metadata is the entry-point
scan's (it costs as much as starting Python)."""


def imported_by(code: str, tmp_path: Path, *args: str) -> set[str]:
    """The modules a fresh interpreter has imported after running ``code`` with ``args``."""
    report = tmp_path / "modules.json"
    epilogue = (
        f"\nimport json, sys\nopen({str(report)!r}, 'w').write(json.dumps(list(sys.modules)))"
    )
    env = {"HOME": str(tmp_path), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    subprocess.run(
        [sys.executable, "-c", code + epilogue, *args],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    # importlib's _bootstrap modules are frozen into the interpreter: naming them in
    # sys.modules, as `import importlib` does in a plain venv, loads nothing.
    frozen = {"importlib._bootstrap", "importlib._bootstrap_external"}
    return set(json.loads(report.read_text())) - frozen


def laminae_modules(modules: set[str], *packages: str) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in packages)}


RUN_CLI = """
import sys
from laminae.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    assert not exc.code, exc.code
"""


def test_import_laminae_imports_nothing_else(tmp_path: Path) -> None:
    # Not even typing: it would be most of what the import costs.
    bare = imported_by("pass", tmp_path)
    assert imported_by("import laminae", tmp_path) - bare <= {"importlib", "laminae", "warnings"}


def test_image_documents_come_without_the_registry_client(tmp_path: Path) -> None:
    bare = imported_by("pass", tmp_path)
    modules = imported_by("import laminae.images", tmp_path) - bare
    assert modules <= {"importlib", "laminae", "laminae.images", "warnings"}
    modules = imported_by("from laminae.images import Manifest, parse_location", tmp_path)
    assert modules & HEAVY == {"attrs"}
    assert laminae_modules(modules, "laminae.store", "laminae.images._registry") == set()


def test_help_imports_neither_the_store_nor_the_image_code(tmp_path: Path) -> None:
    modules = imported_by(RUN_CLI, tmp_path, "--help")
    assert modules & HEAVY == {"attrs", "click"}
    assert laminae_modules(modules, "laminae") == {
        "laminae",
        "laminae._exceptions",
        "laminae._storeoptions",  # the options' definitions; it opens stores lazily
        "laminae.cli",
        "laminae.cli._main",
    }


def test_help_lists_lazy_commands_by_their_own_help() -> None:
    from laminae.cli._main import _LAZY_COMMANDS

    for name, (module, summary) in _LAZY_COMMANDS.items():
        command = getattr(importlib.import_module(module), name)
        assert command.help is not None, name
        assert " ".join(command.help.split("\n\n")[0].split()) == summary, name


def test_opening_a_store_by_a_built_in_driver_scans_no_entry_points(tmp_path: Path) -> None:
    code = (
        "import sys, laminae\n"
        "with laminae.open_store(sys.argv[1], runroot=sys.argv[2], driver='vfs') as store:\n"
        "    store.layers()\n"
        "with laminae.open_store(sys.argv[1], runroot=sys.argv[2]) as store:  # recorded\n"
        "    store.layers()\n"
    )
    modules = imported_by(code, tmp_path, str(tmp_path / "root"), str(tmp_path / "run"))
    # No configuration file here: cattrs, which reads one, is not imported.
    assert modules & HEAVY == {"attrs", "pluggy", "sqlite3"}


@pytest.mark.parametrize("command", ["layer", "image", "container"])
def test_listing_imports_no_registry_client_and_no_rich(tmp_path: Path, command: str) -> None:
    store = ["--root", str(tmp_path / "root"), "--runroot", str(tmp_path / "run")]
    modules = imported_by(RUN_CLI, tmp_path, *store, "--driver", "vfs", command, "ls")
    assert modules & HEAVY == {"attrs", "click", "pluggy", "sqlite3"}
    assert laminae_modules(modules, "laminae.images._registry", "laminae.images._progress") == set()


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
