"""``laminae driver new NAME [DIR]``: the start of a storage driver distribution of your own.

It writes what a third-party driver is made of (docs/writing-a-driver.md says what each part
must do)::

    DIR/pyproject.toml                     the distribution, its laminae.drivers entry point
    DIR/<package>/__init__.py              the laminae_register_drivers hook
    DIR/<package>/_driver.py               the driver, on laminae.driverkit alone
    DIR/<package>/_copy.py                 the part left to write: a layer from its parent
    DIR/<package>/py.typed
    DIR/tox.ini                            the conformance suite, strict, as root; lint, type
    DIR/.github/workflows/conformance.yml  the same on every push
    DIR/README.md

The driver works for base layers: created, mounted, listed, measured and removed the way the
built-in vfs driver does it, crash-safe. Creating a layer from its parent raises
:class:`NotImplementedError` saying what to write and where, so the strict conformance run of
a new driver fails on the tests that need it, and those only. The conformance env of its
``tox.ini`` is the one README.md shows (tests/test_driver_author.py holds the two together).

The files are templates in this module (:class:`string.Template`, ``$$`` for a dollar): they
are few and short, and as strings they need no package data.
"""

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Mapping
from pathlib import Path
from string import Template
from typing import Final

import attrs
import click

from laminae._exceptions import AlreadyExists, InvalidArgument, map_os_errors

__all__ = ["DriverNames", "driver", "write_driver"]

# A driver's name is an identifier (the registry refuses others); lowercase, so that the
# package, the distribution and the entry point can all be spelled from it.
_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,62}")
_BUILT_IN: Final = frozenset({"btrfs", "overlay", "vfs"})


@attrs.frozen
class DriverNames:
    """Every name of a new driver, spelled from the driver's own.

    :param name: the driver's name, as ``--driver`` and ``storage.toml`` give it.
    :param package: the Python package: ``laminae_<name>``.
    :param distribution: the distribution: ``laminae-<name>`` (underscores as dashes).
    :param class_name: the driver class: ``<Name>Driver``.
    :param laminae_version: the laminae it is written against (its lowest requirement).
    """

    name: str
    package: str
    distribution: str
    class_name: str
    laminae_version: str

    @classmethod
    def of(cls, name: str) -> DriverNames:
        """The names of driver ``name``.

        :raises InvalidArgument: ``name`` is not a lowercase identifier, or a built-in's.
        """
        if not _NAME.fullmatch(name):
            raise InvalidArgument(
                f"driver name {name!r}: expected a lowercase identifier "
                "(a letter, then letters, digits or _; at most 63)"
            )
        if name in _BUILT_IN:
            raise InvalidArgument(f"driver name {name!r} is a built-in driver's; pick another")
        try:
            version = importlib.metadata.version("laminae")
        except importlib.metadata.PackageNotFoundError:  # imported from a checkout
            version = "0.1"
        return cls(
            name=name,
            package=f"laminae_{name}",
            distribution=f"laminae-{name.replace('_', '-')}",
            class_name="".join(part.capitalize() for part in name.split("_")) + "Driver",
            laminae_version=version,
        )


def write_driver(names: DriverNames, directory: Path) -> list[Path]:
    """Write the distribution of driver ``names.name`` into ``directory``.

    :returns: the files written, in the order written.
    :raises AlreadyExists: ``directory`` exists and is not empty (nothing is written).
    :raises LaminaeError: a file cannot be written (the ``OSError`` as cause).
    """
    with map_os_errors(f"write driver {names.name} into {directory}"):
        if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
            raise AlreadyExists(f"{directory} exists and is not empty; name a new directory")
        values = attrs.asdict(names)
        written = []
        for relative, template in _files(names).items():
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(Template(template).substitute(values))
            written.append(path)
        return written


def _files(names: DriverNames) -> Mapping[str, str]:
    return {
        "pyproject.toml": _PYPROJECT,
        f"{names.package}/__init__.py": _INIT,
        f"{names.package}/_driver.py": _DRIVER,
        f"{names.package}/_copy.py": _COPY,
        f"{names.package}/py.typed": "",
        "tox.ini": _TOX,
        ".github/workflows/conformance.yml": _WORKFLOW,
        "README.md": _README,
    }


@click.group()
def driver() -> None:
    """Start a storage driver distribution of your own."""


@driver.command("new")
@click.argument("name")
@click.argument("directory", metavar="[DIR]", required=False, type=click.Path(path_type=Path))
def driver_new(name: str, directory: Path | None) -> None:
    """Write driver NAME's distribution into DIR (default: ./laminae-NAME); print each file.

    The driver works for base layers; creating a layer from its parent is left to write, and
    raises NotImplementedError saying what until it is. `tox -e conformance` in DIR runs
    laminae's conformance suite against it (see its README.md).
    """
    names = DriverNames.of(name)
    for path in write_driver(names, directory or Path(names.distribution)):
        click.echo(str(path))


# -- the files --------------------------------------------------------------------------------

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$distribution"
version = "0.1.0"
description = "The $name storage driver for laminae"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["laminae>=$laminae_version"]

# laminae finds the driver through this entry point: `laminae drivers` lists it once installed.
[project.entry-points."laminae.drivers"]
$name = "$package"

[tool.setuptools]
packages = ["$package"]

[tool.setuptools.package-data]
$package = ["py.typed"]

[tool.ruff]
line-length = 100
target-version = "py311"

[tool.ruff.lint]
select = ["E", "F", "W", "I", "B", "UP", "SIM", "RUF", "TID251"]

# A driver uses laminae's public namespaces only (laminae, laminae.driverkit, laminae.images):
# everything else may change in any release.
[tool.ruff.lint.flake8-tidy-imports.banned-api]
"laminae._config".msg = "private to laminae; drivers use laminae.driverkit"
"laminae._exceptions".msg = "private to laminae; the errors are in laminae.driverkit"
"laminae._store".msg = "private to laminae; drivers use laminae.driverkit"
"laminae.archive".msg = "private to laminae; apply_tar and the rest are in laminae.driverkit"
"laminae.kernel".msg = "private to laminae; kernel calls are in laminae.driverkit"
"laminae.store".msg = "private to laminae; drivers use laminae.driverkit"

[tool.mypy]
python_version = "3.11"
strict = true
"""

_INIT = '''\
"""$distribution: the $name storage driver for laminae.

Installed, it registers driver ``$name`` through the ``laminae.drivers`` entry point; select
it with ``laminae --driver $name`` or ``driver = "$name"`` in ``storage.toml``.
"""

from __future__ import annotations

from laminae.driverkit import DriverRegistry, hookimpl

from ._driver import $class_name

__all__ = ["$class_name", "laminae_register_drivers"]


@hookimpl
def laminae_register_drivers(register: DriverRegistry) -> None:
    """Register :class:`$class_name`.

    Priority 5 is below every built-in driver (overlay 30, btrfs 20, vfs 10): the store picks
    $name when it is asked for by name, not by auto-selection.
    """
    register($class_name, priority=5)
'''

_DRIVER = '''\
"""The $name driver: every layer is a directory of its own below the driver's home.

The contract is the docstring of :class:`laminae.driverkit.Driver`; laminae's
docs/writing-a-driver.md says what each method must keep and raise. This driver works for
base layers. The part left to write, a layer made from its parent, is :func:`._copy.copy_layer`;
``TODO`` marks what to decide besides.

On disk, below ``home``::

    layers/<id>/   a layer's root
    tmp-<id>/      a layer being created; renamed into layers/ only when complete
    rm-<id>/       a layer being removed; renamed out of layers/ first

So ``layers/`` only ever holds complete layers, whatever happens to the process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar, final

from laminae.driverkit import (
    AlreadyExists,
    Capabilities,
    DriverUnavailable,
    InvalidArgument,
    MountSpec,
    NotFound,
    Usage,
    check_storage_id,
    is_storage_id,
    map_os_errors,
    rename_noreplace,
    tree_usage,
)

from ._copy import copy_layer

__all__ = ["$class_name", "check_options"]


def check_options(options: Mapping[str, str]) -> None:
    """Refuse what this driver cannot take, naming the option.

    TODO: the options $name takes (``--storage-opt KEY=VALUE``, ``[storage.options.$name]``),
    parsed here so that ``probe`` and ``__init__`` refuse the same things with the same words;
    sizes with :func:`laminae.driverkit.parse_size`.

    :raises InvalidArgument: an unknown option, or a value that cannot be right anywhere.
    """
    for key in options:
        raise InvalidArgument(f"$name: unknown option {key!r} ($name takes no options)")


@final
class $class_name:
    """Layers as directories below ``home``; see the module docstring for the layout."""

    name: ClassVar[str] = "$name"
    # TODO: what $name provides. features: the optional parts it implements (Feature.APPLY,
    # CHANGES, COMMIT, QUOTA, ...); max_depth: the longest parent chain it can mount.
    capabilities: ClassVar[Capabilities] = Capabilities(max_depth=128, needs_root=True)

    __slots__ = ("_home", "_layers")

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        """Whether $name can run with ``home`` (or its nearest existing ancestor).

        :raises InvalidArgument: an option is wrong (:func:`check_options`).
        :raises DriverUnavailable: not root, or no directory to keep layers in.
        """
        check_options(options)
        # Layers hold files of every owner, and device nodes; mounts need CAP_SYS_ADMIN.
        if os.geteuid() != 0:
            raise DriverUnavailable("$name: needs root (owners, device nodes, mounts)")
        existing = Path(os.path.abspath(home))
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise DriverUnavailable(f"$name: {existing} is not a directory")

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        check_options(options)
        self._home = Path(home)
        self._layers = self._home / "layers"
        with map_os_errors(f"$name: prepare {self._layers}"):
            # 0700: layers hold setuid binaries that other users must not reach.
            self._home.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._layers.mkdir(mode=0o700, exist_ok=True)

    def create(self, id: str, parents: Sequence[str], writable: bool) -> None:
        """Create layer ``id``: empty (root-owned, 0755), or a copy of ``parents[0]``.

        Made under ``tmp-<id>`` and renamed into place, so a crash leaves no half layer.

        :raises AlreadyExists: ``id`` is on disk already.
        :raises NotFound: ``parents[0]`` is not on disk.
        """
        check_storage_id(id)
        final_path = self._layers / id
        if os.path.lexists(final_path):
            raise AlreadyExists(f"$name: layer {id} exists")
        source = None
        if parents:
            source = self._layer(parents[0])
        staging = self._home / f"tmp-{id}"
        with map_os_errors(f"$name: create layer {id}"):
            if os.path.lexists(staging):  # left by a crash during an earlier create
                shutil.rmtree(staging)
            try:
                if source is None:
                    os.mkdir(staging, 0o755)
                    os.chmod(staging, 0o755)  # whatever the umask
                    os.chown(staging, 0, 0)
                else:
                    copy_layer(source, staging)
                times = os.lstat(staging)
                rename_noreplace(str(staging), str(final_path))
            except BaseException:
                # The original failure is the one to report, not a cleanup hiccup.
                with contextlib.suppress(OSError):
                    shutil.rmtree(staging)
                raise
            # Moving a directory to another parent rewrites its "..": keep its times exact.
            os.utime(final_path, ns=(times.st_atime_ns, times.st_mtime_ns))

    def remove(self, id: str) -> None:
        """Remove layer ``id``, and what a crash left of it (a half copy, a half removal).

        :raises NotFound: nothing of ``id`` is on disk.
        """
        check_storage_id(id)
        path = self._layers / id
        doomed = self._home / f"rm-{id}"
        leftovers = [p for p in (self._home / f"tmp-{id}", doomed) if os.path.lexists(p)]
        with map_os_errors(f"$name: remove layer {id}"):
            for leftover in leftovers:
                shutil.rmtree(leftover)
            if not os.path.lexists(path):
                if leftovers:
                    return
                raise NotFound(f"$name: layer {id} is not on disk")
            # Out of layers/ in one step, so a crash mid-removal leaves no half layer listed.
            os.rename(path, doomed)
            shutil.rmtree(doomed)

    def mounts(self, id: str, parents: Sequence[str], readonly: bool) -> list[MountSpec]:
        """One recursive bind of the layer's directory, ``ro`` when ``readonly``.

        :raises NotFound: ``id`` is not on disk.
        """
        mode = "ro" if readonly else "rw"
        return [MountSpec(type="bind", source=str(self._layer(id)), options=("rbind", mode))]

    def usage(self, id: str) -> Usage:
        """Bytes (allocated blocks) and inodes under layer ``id``.

        :raises NotFound: ``id`` is not on disk.
        """
        path = self._layer(id)
        with map_os_errors(f"$name: usage of layer {id}"):
            return tree_usage(path)

    def layers(self) -> list[str]:
        """The storage ids under ``layers/``; layers being created or removed are not."""
        with map_os_errors(f"$name: list {self._layers}"), os.scandir(self._layers) as entries:
            return sorted(e.name for e in entries if is_storage_id(e.name))

    def close(self) -> None:
        """Nothing to release: no fds, mounts or locks are held between calls."""

    def _layer(self, id: str) -> Path:
        check_storage_id(id)
        path = self._layers / id
        if not path.is_dir():
            raise NotFound(f"$name: layer {id} is not on disk")
        return path
'''

_COPY = '''\
"""A layer made from its parent: the part of the $name driver left to write."""

from __future__ import annotations

from pathlib import Path

__all__ = ["copy_layer"]


def copy_layer(source: Path, destination: Path) -> None:
    """Make ``destination``, which does not exist yet, a copy of the layer at ``source``.

    TODO: write it. Everything must come through: owners, modes with setuid, setgid and
    sticky, hard links as hard links, symlinks (never followed), every xattr
    (``security.capability`` after ``chown``, which clears it), character and block devices,
    FIFOs, holes in sparse files, and atime and mtime to the nanosecond (directories last).
    :class:`laminae.driverkit.DataCopier` copies data keeping holes (a reflink where it can);
    :func:`laminae.driverkit.read_xattrs` and :func:`~laminae.driverkit.set_xattr` take the
    ``bytes`` names xattrs have. Leave ``destination`` half made on error: ``create`` removes it.

    :raises OSError: the first failure, naming the path.
    """
    raise NotImplementedError(
        "$name: copy_layer() in $package/_copy.py is left to write: a layer made from "
        f"its parent (copy {source} to {destination}, keeping owners, modes, hard links, "
        "xattrs, devices, FIFOs, holes and times)"
    )
'''

_TOX = """\
# Checks for the $name driver. laminae's conformance suite, as root (it mounts layers):
#
#   LAMINAE_WHEEL=/path/to/laminae-$laminae_version-py3-none-any.whl tox -e conformance
#   LAMINAE_WHEEL=/path/to/laminae tox -e conformance     (a checkout: pip builds it)
#
# Once laminae is on an index you use, `deps = laminae[conformance]` is all it takes.
[tox]
requires = tox>=4.20
env_list = lint, type, conformance

[testenv:lint]
description = ruff over the driver: its style, and laminae's public names only
skip_install = true
deps = ruff
commands =
    ruff check $package
    ruff format --check $package

[testenv:type]
description = mypy --strict over the installed driver, against laminae's own types
deps =
    laminae @ file://{env:LAMINAE_WHEEL}
    mypy
commands = mypy -p $package

[testenv:conformance]
description = laminae's conformance suite against $name, strict, in a private mount namespace
deps = laminae[conformance] @ file://{env:LAMINAE_WHEEL}
pass_env = CI
allowlist_externals = unshare
commands =
    unshare --mount --propagation private -- {envpython} -m pytest -p no:cacheprovider \\
        --pyargs laminae.conformance --laminae-driver $name --laminae-strict \\
        --laminae-report {envtmpdir}/report.json {posargs}
"""

_WORKFLOW = """\
# laminae's conformance suite against $name on every push, as root (it mounts layers).
#
# LAMINAE_SOURCE, a repository variable, is where laminae comes from until it is on an index:
# anything pip builds a wheel of (git+https://.../laminae.git@v$laminae_version, a URL).
name: conformance
on: [push, pull_request]

jobs:
  conformance:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - uses: actions/setup-python@v5
        with:
          python-version: "3.11"
      - name: laminae's wheel
        env:
          LAMINAE_SOURCE: $${{ vars.LAMINAE_SOURCE }}
        run: python -m pip wheel --no-deps -w "$$RUNNER_TEMP/laminae" "$$LAMINAE_SOURCE"
      - name: tox -e conformance
        run: |
          python -m pip install tox
          wheel=$$(echo "$$RUNNER_TEMP"/laminae/laminae-*.whl)
          sudo env "PATH=$$PATH" CI=true LAMINAE_WHEEL="$$wheel" tox -e conformance
"""

_README = """\
# $distribution

The $name storage driver for [laminae](https://pypi.org/project/laminae/), started with
`laminae driver new $name`.

| file | what |
| --- | --- |
| `$package/__init__.py` | the `laminae_register_drivers` hook (the entry point names it) |
| `$package/_driver.py` | `$class_name`: layers as directories below the driver's home |
| `$package/_copy.py` | `copy_layer`, **left to write**: a layer made from its parent |
| `tox.ini` | `tox -e conformance`: laminae's conformance suite, strict, as root; `lint`, `type` |
| `.github/workflows/conformance.yml` | the same on every push |

## What is left to write

Base layers work. Creating a layer from its parent raises `NotImplementedError` naming
`copy_layer()` until it is written, so the conformance suite fails on the tests that need a
child layer, each saying so. `TODO` marks the other choices: the options `$name` takes, and
the capabilities it declares. The contract is the docstring of `laminae.driverkit.Driver`;
laminae's `docs/writing-a-driver.md` says what a layer copy must keep and which error to
raise when.

## Checks

```sh
pip install -e .                       # then: laminae drivers   lists $name
LAMINAE_WHEEL=/path/to/laminae-$laminae_version-py3-none-any.whl tox -e conformance   # as root
tox -e conformance -- -x               # stop at the first failure
tox -e conformance -- -k test_create   # only the tests whose names match
```

The JSON report of the last run is `.tox/conformance/tmp/report.json`.
"""
