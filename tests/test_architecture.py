"""The shape of the code: layers import downward only, no import cycles, drivers use public names.

docs/architecture.md draws the layers; this module is what holds the code to that drawing. It
reads the installed package's source (and the example driver's, from the checkout) with
:mod:`ast`, so an import inside a function or under ``if TYPE_CHECKING:`` is an edge like any
other: a cycle that only type checkers see is still a cycle for a reader.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import attrs
import pytest

import laminae

MAX_MODULE_LINES = 800

# Each package's layer, lowest first (docs/architecture.md draws them). A module may import
# from lower layers and from its own group; never up, never sideways into another group.
GROUPS: Mapping[str, tuple[int, str]] = {
    "laminae._exceptions": (0, "errors"),
    "laminae.kernel": (1, "kernel"),
    "laminae.archive": (2, "archive"),
    "laminae.driverkit": (3, "driverkit"),
    "laminae.store": (4, "store"),
    "laminae.images": (5, "images"),
    "laminae.containers": (6, "containers"),
    "laminae": (7, "facade"),  # the package, _store (Store, open_store), _config, _storeoptions
    "laminae.cli": (8, "cli"),
    "laminae.conformance": (8, "conformance"),
    "laminae.snapshotter": (8, "snapshotter"),
    "laminae.drivers": (9, "drivers"),  # plugins: nothing in laminae imports them
}

# What a driver, built in or third-party, may import from laminae: the documented namespaces.
PUBLIC = frozenset({"laminae", "laminae.driverkit", "laminae.driverkit.btrfs", "laminae.images"})

EXAMPLE_DRIVER = (
    Path(__file__).parent.parent / "examples" / "laminae-blockfile" / "laminae_blockfile"
)


@attrs.frozen
class Edge:
    """``importer`` imports ``imported`` at ``where`` (``path:line``)."""

    importer: str
    imported: str
    where: str


def package_modules(package: str, top: Path) -> dict[str, Path]:
    """Every module of ``package`` whose source lies under ``top``, by dotted name."""
    modules: dict[str, Path] = {}
    for path in sorted(top.rglob("*.py")):
        parts = path.relative_to(top).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join((package, *parts))] = path
    return modules


def laminae_modules() -> dict[str, Path]:
    """The installed laminae: ``laminae`` and ``laminae.drivers`` may lie apart (editable)."""
    modules: dict[str, Path] = {}
    for package in ("laminae", "laminae.drivers"):
        spec = importlib.util.find_spec(package)
        assert spec is not None and spec.submodule_search_locations
        for location in spec.submodule_search_locations:
            found = package_modules(package, Path(location))
            if package == "laminae":  # a wheel puts drivers/ inside laminae/: counted below
                found = {k: v for k, v in found.items() if not k.startswith("laminae.drivers")}
            modules.update(found)
    return modules


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_edges(
    modules: Mapping[str, Path], known: Iterable[str] = (), prefix: str = "laminae"
) -> Iterator[Edge]:
    """Each import of a module of ``prefix`` by one of ``modules``, wherever in the file it is.

    ``from pkg import name`` is an import of the module ``pkg.name`` when that is one of
    ``modules`` or ``known``, or when ``name`` is underscored (a private module or name: both
    are private to ``pkg``, and a driver may use neither); otherwise of ``pkg``.
    """
    submodules = set(modules) | set(known)
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path}:{getattr(node, 'lineno', 0)}"
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, path.name == "__init__.py", node)
                # ``from pkg import mod`` imports the module pkg.mod, not only pkg.
                targets = [
                    f"{base}.{a.name}"
                    if f"{base}.{a.name}" in submodules or a.name.startswith("_")
                    else base
                    for a in node.names
                ]
            for target in targets:
                if target == prefix or target.startswith(prefix + "."):
                    yield Edge(name, target, where)


def find_cycles(edges: Iterable[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        if edge.importer != edge.imported:
            graph.setdefault(edge.importer, set()).add(edge.imported)
            graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        # Recursion is fine here: the import graph is a few hundred modules deep at most.
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def layer_of(module: str) -> tuple[int, str]:
    """The layer of ``module`` and its group, by the longest package in :data:`GROUPS`."""
    for package in sorted(GROUPS, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return GROUPS[package]
    raise AssertionError(f"{module} is in no layer: add its package to GROUPS and the docs")


def upward_imports(edges: Iterable[Edge]) -> list[str]:
    """Imports that go up a layer, or sideways into another group of the same layer."""
    wrong = []
    for edge in edges:
        if edge.importer.startswith("laminae.drivers"):
            continue  # drivers have a rule of their own: public names only
        here, own = layer_of(edge.importer)
        there, theirs = layer_of(edge.imported)
        if there > here or (there == here and own != theirs):
            wrong.append(f"{edge.where}: {edge.importer} imports {edge.imported}")
    return wrong


def private_imports(edges: Iterable[Edge], own: str) -> list[str]:
    """Imports by a driver of anything but the public namespaces and its own package."""
    return [
        f"{e.where}: {e.importer} imports {e.imported}"
        for e in edges
        if e.imported not in PUBLIC and not (e.imported == own or e.imported.startswith(own + "."))
    ]


@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    return laminae_modules()


@pytest.fixture(scope="module")
def edges(modules: dict[str, Path]) -> list[Edge]:
    return list(import_edges(modules))


def test_the_package_is_found_whole(modules: dict[str, Path]) -> None:
    # A checker that read nothing would pass everything: it must see every layer and driver.
    for package in ("laminae.kernel", "laminae.archive", "laminae.cli", "laminae.drivers.vfs"):
        assert package in modules, package
    assert Path(laminae.__file__).resolve() == modules["laminae"].resolve()


def test_no_import_cycles(edges: list[Edge]) -> None:
    assert find_cycles(edges) == []


def test_layers_import_downward_only(edges: list[Edge]) -> None:
    assert upward_imports(edges) == []


@pytest.mark.parametrize("driver", ["vfs", "overlay", "btrfs"])
def test_builtin_drivers_import_public_names_only(edges: list[Edge], driver: str) -> None:
    own = f"laminae.drivers.{driver}"
    mine = [e for e in edges if e.importer == own or e.importer.startswith(own + ".")]
    assert mine, f"no imports found for {own}"
    assert private_imports(mine, own) == []


def test_example_driver_imports_public_names_only() -> None:
    if not EXAMPLE_DRIVER.is_dir():
        pytest.skip("the example driver is not beside the tests (an installed test tree)")
    found = package_modules("laminae_blockfile", EXAMPLE_DRIVER)
    mine = list(import_edges(found, known=laminae_modules()))  # its imports of laminae
    assert mine, "the example driver imports nothing of laminae?"
    assert private_imports(mine, "laminae_blockfile") == []


def test_no_module_over_the_size_limit(modules: dict[str, Path]) -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    assert {n: s for n, s in sizes.items() if s > MAX_MODULE_LINES} == {}


@pytest.mark.parametrize("namespace", sorted(PUBLIC))
def test_public_namespaces_export_only_public_names(namespace: str) -> None:
    module = importlib.import_module(namespace)
    assert module.__all__ == sorted(module.__all__), "keep __all__ sorted"
    for name in module.__all__:
        assert not name.startswith("_"), name
        assert getattr(module, name) is not None, name


# The checker itself, on a package made for it: each rule must be able to fail.


def _write(top: Path, files: Mapping[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = top / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package_modules("laminae", top)


def test_checker_finds_a_cycle_through_type_checking(tmp_path: Path) -> None:
    modules = _write(
        tmp_path,
        {
            "__init__.py": "",
            "store/__init__.py": "",
            "store/_a.py": "from laminae.store._b import B\n",
            "store/_b.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ._a import A\n"
            ),
        },
    )
    assert find_cycles(import_edges(modules)) == [["laminae.store._a", "laminae.store._b"]]


def test_checker_finds_upward_sideways_and_lazy_imports(tmp_path: Path) -> None:
    modules = _write(
        tmp_path,
        {
            "__init__.py": "",
            "kernel/__init__.py": "",
            "kernel/_mounts.py": "def f():\n    from laminae.store import _graph\n",
            "images/__init__.py": "",
            "images/_x.py": "from laminae.containers import _y\n",
            "containers/__init__.py": "",
            "containers/_y.py": "from laminae.images._x import X\n",
            "store/__init__.py": "",
            "store/_graph.py": "import laminae\n",
            "cli/__init__.py": "from laminae.conformance import plugin\n",
            "conformance/__init__.py": "",
            "conformance/plugin.py": "from laminae import open_store\n",
            "archive/__init__.py": "",
            "archive/_ok.py": "from laminae.kernel._mounts import f\n",
        },
    )
    found = [w.split(": ", 1)[1] for w in upward_imports(import_edges(modules))]
    assert sorted(found) == [
        "laminae.cli imports laminae.conformance.plugin",
        "laminae.images._x imports laminae.containers._y",
        "laminae.kernel._mounts imports laminae.store._graph",
        "laminae.store._graph imports laminae",
    ]


def test_checker_finds_a_driver_reaching_into_private_modules(tmp_path: Path) -> None:
    top = tmp_path / "drv"
    top.mkdir()
    (top / "__init__.py").write_text(
        "from laminae import driverkit\nfrom laminae.driverkit import hookimpl\n"
        "from laminae.kernel import _mounts\nfrom . import _impl\n"
    )
    (top / "_impl.py").write_text("from laminae.driverkit._contract import Driver\n")
    edges = import_edges(package_modules("laminae.drivers.drv", top))
    found = [w.split(": ", 1)[1] for w in private_imports(edges, "laminae.drivers.drv")]
    assert found == [
        "laminae.drivers.drv imports laminae.kernel._mounts",
        "laminae.drivers.drv._impl imports laminae.driverkit._contract",
    ]
