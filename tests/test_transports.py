"""The transport table: built-in rows, and a third-party transport installed as a distribution.

The plugin here is a real distribution made on the fly: a module and a ``*.dist-info`` with
``entry_points.txt`` on ``sys.path``, found by the plugin manager's entry-point scan like any
installed driver. Its transport is containers' ``dir:`` (a manifest and its blobs as files),
written against the public protocols only.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from imagebuild import write_layout
from tarbuild import make_tar

import laminae
from laminae.driverkit import _plugins
from laminae.images._credentials import RegistryOptions
from laminae.images._image import ImageSink, ImageSource
from laminae.images._transports import (
    ImageLocation,
    PathAndReference,
    Transport,
    built_in_transports,
    installed_transports,
    open_sink,
    open_source,
    parse_location,
)

CHECKOUT = Path(__file__).resolve().parents[1]

# containers' dir: transport, as a third party would write it: the protocols are structural,
# so it needs no laminae class, only the table row and the hook.
DIR_TRANSPORT = textwrap.dedent(
    '''
    """The dir: transport: manifest.json and one file per blob, named by its hex digest."""

    import contextlib
    import os
    import shutil
    from pathlib import Path

    import pluggy

    from laminae import NotFound
    from laminae.images import PathAndReference, Transport

    hookimpl = pluggy.HookimplMarker("laminae")


    class DirSource:
        def __init__(self, root):
            if not (root / "manifest.json").is_file():
                raise NotFound(f"dir:{root}: no manifest.json")
            self.root = root

        def describe(self):
            return f"dir:{self.root}"

        def resolve(self):
            return (self.root / "manifest.json").read_bytes(), None

        def fetch_manifest(self, desc):
            raise NotFound(f"{self.describe()}: holds one manifest, not an index")

        def open_blob(self, desc):
            path = self.root / desc.digest.partition(":")[2]
            if not path.is_file():
                raise NotFound(f"{self.describe()}: no blob {desc.digest}")
            return open(path, "rb")

        def close(self):
            pass


    class DirSink:
        layer_compression = None
        docker_media_types = False

        def __init__(self, root):
            self.root = root
            self.staging = root.with_name(root.name + ".partial")
            self.staging.mkdir(parents=True)

        def describe(self):
            return f"dir:{self.root}"

        def has_blob(self, desc):
            return False

        def put_blob(self, desc, path):
            shutil.copyfile(path, self.staging / desc.digest.partition(":")[2])

        def put_manifest(self, manifest, config):
            (self.staging / config.digest.partition(":")[2]).write_bytes(config.raw)
            (self.staging / "manifest.json").write_bytes(manifest.raw)

        def commit(self):
            (self.staging / "version").write_text("Directory Transport Version: 1.1\\n")
            os.rename(self.staging, self.root)

        def close(self):
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.staging)


    @hookimpl
    def laminae_register_transports(register):
        register(
            Transport(
                "dir",
                "dir:PATH",
                "a directory: manifest.json and its blobs",
                PathAndReference(),
                open_source=lambda location, registry: DirSource(location.path),
                open_sink=lambda location, registry: DirSink(location.path),
            )
        )
    '''
)

# A plugin that wants a built-in name.
CLASH = textwrap.dedent(
    """
    import pluggy

    from laminae.images import PathAndReference, Transport

    hookimpl = pluggy.HookimplMarker("laminae")


    def refuse(location, registry):
        raise AssertionError("never opened")


    @hookimpl
    def laminae_register_transports(register):
        register(Transport("oci", "oci:DIR", "not the OCI layout", PathAndReference(),
                           open_source=refuse, open_sink=refuse))
    """
)


def never_source(location: ImageLocation, registry: RegistryOptions) -> ImageSource:
    raise AssertionError("never opened")


def never_sink(location: ImageLocation, registry: RegistryOptions) -> ImageSink:
    raise AssertionError("never opened")


def dir_row(name: str = "dir", usage: str = "dir:PATH", summary: str = "a directory") -> Transport:
    return Transport(name, usage, summary, PathAndReference(), never_source, never_sink)


@pytest.fixture
def plugins() -> Iterator[None]:
    """A plugin manager and transport table loaded anew in the test, and again after it."""
    _plugins.plugin_manager.cache_clear()
    installed_transports.cache_clear()
    yield
    _plugins.plugin_manager.cache_clear()
    installed_transports.cache_clear()


def install(
    site: Path, monkeypatch: pytest.MonkeyPatch, distribution: str, module: str, source: str
) -> None:
    """Install ``module`` as distribution ``distribution`` 1.0, with a ``laminae.drivers``
    entry point, into ``site`` (put on ``sys.path``): what pip would leave behind."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(source)
    info = site / f"{distribution.replace('-', '_')}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[laminae.drivers]\n{module} = {module}\n")
    monkeypatch.syspath_prepend(str(site))  # also invalidates the import caches
    monkeypatch.delitem(sys.modules, module, raising=False)  # and forgets it afterwards


# -- the built-in rows ---------------------------------------------------------------------


def test_built_in_transports_in_the_order_the_help_lists_them() -> None:
    assert list(built_in_transports()) == ["oci", "oci-archive", "docker-archive", "docker"]
    for name, transport in built_in_transports().items():
        assert transport.name == name
        assert transport.usage.startswith(f"{name}:")
        assert 0 < len(transport.summary) <= 46  # one help line beside the usage
    assert [t.remote for t in built_in_transports().values()] == [False, False, False, True]


@pytest.mark.parametrize("document", ["docs/cli.md", "README.md"])
def test_the_docs_list_every_built_in_transport(document: str) -> None:
    text = (CHECKOUT / document).read_text().replace("\\|", "|")  # a table cell escapes "|"
    for transport in built_in_transports().values():
        assert f"`{transport.usage}`" in text, f"{document} does not list {transport.usage}"


def test_cli_help_lists_the_table() -> None:
    from laminae.cli._image import image

    for command in ("import", "export"):
        help_text = image.commands[command].help or ""
        for transport in built_in_transports().values():
            assert transport.usage in help_text
            assert transport.summary in help_text


def test_a_built_in_location_loads_no_transport_and_no_plugin() -> None:
    # A fresh interpreter: which modules a parse pulls in, and whether the plugins were asked.
    script = textwrap.dedent(
        """
        import sys
        from laminae.images._transports import installed_transports, parse_location

        for text in ("docker://busybox", "oci:/srv/l:v1", "docker-archive:/x.tar:@0"):
            assert str(parse_location(text)) == text
        loaded = [m for m in ("httpx", "laminae.images._registry", "laminae.images._layout",
                              "laminae.images._dockerarchive") if m in sys.modules]
        assert not loaded, loaded
        assert installed_transports.cache_info().currsize == 0, "the plugins were asked"
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_open_source_and_sink_use_the_row(tmp_path: Path) -> None:
    built = write_layout(tmp_path / "layout", [make_tar({"f": b"x"})])
    location = parse_location(f"oci:{tmp_path / 'layout'}:v1")
    with contextlib.closing(open_source(location)) as source:
        assert source.describe() == str(location)
        assert json.loads(source.resolve()[0])["config"]["digest"] == built.config_digest
    archive = ImageLocation("oci-archive", tmp_path / "out.tar", "v1")
    with contextlib.closing(open_sink(archive)) as sink:
        assert sink.describe() == str(archive)
    assert not archive.path or not archive.path.exists()  # closed without a commit: no file


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        pytest.param({"name": "Dir"}, "lower-case", id="upper-case-name"),
        pytest.param({"name": "a:b"}, "lower-case", id="colon-in-name"),
        pytest.param({"name": "-x"}, "starting with a letter", id="leading-dash"),
        pytest.param({"usage": "other:PATH"}, "must start with 'dir:'", id="usage-of-another"),
    ],
)
def test_a_row_checks_its_name_and_usage(fields: dict[str, str], complaint: str) -> None:
    with pytest.raises(laminae.InvalidArgument, match=complaint):
        dir_row(**fields)


def test_path_syntax_refuses_a_reference_unless_it_takes_one() -> None:
    with pytest.raises(laminae.InvalidArgument, match="takes no reference"):
        PathAndReference().check(Path("/x"), "v1")
    PathAndReference(lambda reference: None).check(Path("/x"), "v1")


# -- a third-party transport -------------------------------------------------------------------


@pytest.mark.root
def test_a_plugin_distribution_adds_a_transport_that_imports_and_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugins: None
) -> None:
    install(tmp_path / "site", monkeypatch, "laminae-dir", "laminae_dir", DIR_TRANSPORT)
    assert list(installed_transports()) == [*built_in_transports(), "dir"]
    location = parse_location(f"dir:{tmp_path / 'exported'}")
    assert location == ImageLocation("dir", tmp_path / "exported")
    assert str(location) == f"dir:{tmp_path / 'exported'}"

    built = write_layout(tmp_path / "layout", [make_tar({"etc/motd": b"hi\n"}, dirs=["etc"])])
    with laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", driver="vfs") as store:
        store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["hello"])
        digest = store.export_image("hello", f"dir:{tmp_path / 'exported'}")
        manifest = json.loads((tmp_path / "exported" / "manifest.json").read_bytes())
        blobs = [manifest["config"], *manifest["layers"]]
        assert sorted(os.listdir(tmp_path / "exported")) == sorted(
            ["manifest.json", "version", *(b["digest"].partition(":")[2] for b in blobs)]
        )
        store.remove_image("hello")  # the layers go too: the import below needs every blob
        assert not store.layers()
        again = store.import_image(f"dir:{tmp_path / 'exported'}", names=["again"])
    assert again.id == built.config_digest
    assert again.manifest_digest == digest


def test_a_plugin_transport_is_listed_in_the_unknown_transport_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugins: None
) -> None:
    install(tmp_path / "site", monkeypatch, "laminae-dir", "laminae_dir", DIR_TRANSPORT)
    with pytest.raises(laminae.InvalidArgument, match="unknown transport 'ftp'") as info:
        parse_location("ftp:/x")
    assert str(info.value).endswith("(known: oci:, oci-archive:, docker-archive:, docker:, dir:)")
    with pytest.raises(laminae.InvalidArgument, match="takes no reference"):
        parse_location(f"dir:{tmp_path}:v1")


def test_a_plugin_cannot_take_a_built_in_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plugins: None
) -> None:
    install(tmp_path / "site", monkeypatch, "laminae-clash", "laminae_clash", CLASH)
    refusal = (
        r"image transport 'oci' of laminae-clash 1\.0 is refused: "
        r"the name is taken by laminae \(built in\)"
    )
    with pytest.raises(laminae.InvalidArgument, match=refusal):
        installed_transports()
    # Where a user meets it: the first location that is not built in.
    with pytest.raises(laminae.InvalidArgument, match=refusal):
        parse_location("dir:/x")
    # The built-in transport is untouched, and found without asking the plugins.
    assert parse_location("oci:/x:v1") == ImageLocation("oci", Path("/x"), "v1")


class _Registers:
    def __init__(self, *transports: object) -> None:
        self.transports = transports

    @_plugins.hookimpl
    def laminae_register_transports(self, register: Callable[[object], None]) -> None:
        for transport in self.transports:
            register(transport)


def test_two_plugins_cannot_take_one_name(plugins: None) -> None:
    pm = _plugins.plugin_manager()
    pm.register(_Registers(dir_row(summary="first")), name="first")
    pm.register(_Registers(dir_row(summary="second")), name="second")
    with pytest.raises(
        laminae.InvalidArgument, match="'dir' of plugin second is refused: the name is taken by"
    ):
        installed_transports()


def test_a_plugin_registering_something_else_is_named(plugins: None) -> None:
    _plugins.plugin_manager().register(_Registers("dir:PATH"), name="confused")
    with pytest.raises(
        laminae.InvalidArgument, match=r"confused: register\(\) takes a Transport, not 'dir:PATH'"
    ):
        installed_transports()


def test_a_failing_plugin_hook_names_the_plugin(plugins: None) -> None:
    class Broken:
        @_plugins.hookimpl
        def laminae_register_transports(self, register: object) -> None:
            raise RuntimeError("no pony")

    _plugins.plugin_manager().register(Broken(), name="broken")
    with pytest.raises(laminae.LaminaeError, match="plugin 'broken' failed to register: no pony"):
        installed_transports()
