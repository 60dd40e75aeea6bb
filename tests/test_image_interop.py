"""laminae against the tools people use: a real registry (Debian's docker-registry), skopeo and
umoci, with every built-in driver.

Each side checks the other: skopeo verifies every digest laminae pushes and reports the
manifest digest the registry serves; umoci unpacks the image laminae pulled, and the two trees
must agree file by file (type, mode, owner, content, symlink target, xattrs, hard-link groups,
device numbers). The test image carries what layers carry in practice and what is easy to get
wrong: owners other than root, setuid and sticky modes, user and capability xattrs, hard
links, symlinks, character and block devices, a fifo, whiteouts of a file and of a directory,
and an opaque directory.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
import zstandard
from imagebuild import BuiltImage, write_layout
from registryserver import RegistryServer
from tarbuild import CAPABILITY, Layer
from tools import require_tool, run_skopeo
from trees import Tree, image_read, read_tree

import laminae
from laminae import images
from laminae.conformance._tree import Entry, describe_differences
from laminae.images._registry import RegistryClient, RegistryOptions

pytestmark = pytest.mark.root

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
UID = 1000
GID = 1000
# One byte flipped in a blob's middle: same size, so only the digest can tell.
_CORRUPT_OFFSET = 0.5


def base_layer() -> bytes:
    """The first layer: every kind of entry, owners, modes and xattrs."""
    return (
        Layer()
        .dir("bin")
        .dir("etc")
        .dir("dev")
        .dir("home")
        .dir("home/user", mode=0o700, uid=UID, gid=GID)
        .dir("tmp", mode=0o1777)
        .dir("data", mode=0o750, gid=GID, xattrs={"user.dir": "on a directory"})
        .dir("opq")
        .dir("gone")
        .dir("gone/sub")
        .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
        .file("etc/removed", b"whited out by the next layer\n")
        .file("bin/tool", b"#!tool\n" * 10, mode=0o4755)
        .file(
            "bin/ping",
            b"\x7fELF-not-really",
            mode=0o755,
            xattrs={"security.capability": CAPABILITY.decode("ascii")},
        )
        .file(
            "home/user/.profile",
            b"export PS1='$ '\n",
            mode=0o600,
            uid=UID,
            gid=GID,
            xattrs={"user.comment": "kept", "user.other": "x" * 100},
        )
        .file("data/a", bytes(range(256)) * 800, mode=0o640, uid=UID, gid=GID)
        .hardlink("data/a-link", "data/a")
        .hardlink("data/a-link2", "data/a")
        .file("opq/one", b"1")
        .file("opq/two", b"2")
        .file("gone/sub/f", b"in a directory the next layer removes")
        .symlink("bin/sh", "tool")
        .symlink("etc/abs", "/etc/passwd")
        .symlink("dangling", "/no/such/target", uid=UID, gid=GID)
        .char("dev/null", 1, 3, mode=0o666)
        .block("dev/loop0", 7, 0, mode=0o660, gid=6)
        .fifo("dev/pipe", mode=0o620, uid=UID)
        .bytes()
    )


def changes_layer() -> bytes:
    """The second layer: whiteouts, an opaque directory, a changed owner and a changed file."""
    return (
        Layer()
        .file("etc/.wh.removed")
        .file(".wh.gone")
        .dir("opq", mode=0o711)
        .file("opq/.wh..wh..opq")
        .file("opq/three", b"3")
        .file(
            "etc/passwd", b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/home/user:\n", mode=0o600
        )
        .dir("home/user", mode=0o750, uid=UID + 1, gid=GID + 1)
        .file("home/user/notes", b"second layer", uid=UID + 1, gid=GID + 1, xattrs={"user.x": "y"})
        .bytes()
    )


def top_layer(marker: str) -> bytes:
    """A small last layer; ``marker`` makes its blobs unique to one test."""
    return (
        Layer()
        .dir("srv", mode=0o755, uid=UID, gid=GID)
        .file("srv/marker", marker.encode(), uid=UID, gid=GID)
        .hardlink("srv/marker-link", "srv/marker")
        .symlink("srv/up", "../etc/passwd")
        .bytes()
    )


def rich_layers(marker: str) -> list[bytes]:
    return [base_layer(), changes_layer(), top_layer(marker)]


# --- tools ------------------------------------------------------------------------------------


def run(*args: str) -> str:
    """Run a tool; its stderr is in the failure message when it fails."""
    require_tool(args[0])
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stderr}{done.stdout}"
    return done.stdout


skopeo = run_skopeo


def skopeo_digest(reference: str) -> str:
    """The manifest digest the registry serves for ``reference`` (``HOST/REPO:TAG``)."""
    info = json.loads(skopeo("inspect", "--tls-verify=false", f"docker://{reference}"))
    return str(info["Digest"])


def insecure(server: RegistryServer, **options: object) -> RegistryOptions:
    return RegistryOptions(insecure_hosts=frozenset({server.host}), **options)  # type: ignore[arg-type]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """One anonymous registry for the module; each test pushes to repositories of its own."""
    directory = tmp_path_factory.mktemp("registry")
    server = RegistryServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(each_driver_store: laminae.Store) -> laminae.Store:
    """The store of the test, one per built-in driver (``each_driver_store`` in conftest)."""
    return each_driver_store


@pytest.fixture
def repo(request: pytest.FixtureRequest) -> str:
    """A repository name unique to this test and driver, so tests share the registry."""
    driver = request.getfixturevalue("store").driver_name
    return f"{request.node.originalname.removeprefix('test_').replace('_', '-')}/{driver}"


# --- trees ------------------------------------------------------------------------------------


def image_tree(store: laminae.Store, ref: str) -> Tree:
    """The tree of image ``ref``, read from a mounted view of its top layer."""
    return image_read(store, ref, read_tree)


def umoci_tree(layout: Path, ref: str, bundle: Path) -> Tree:
    """The tree umoci unpacks from ``layout:ref`` (as root: owners, devices and all)."""
    run("umoci", "unpack", "--image", f"{layout}:{ref}", str(bundle))
    return read_tree(bundle / "rootfs")


def assert_trees_equal(got: Tree, want: Tree) -> None:
    """Equal trees, with every difference named when they are not."""
    assert describe_differences(want.entries, got.entries) == []
    assert got.hardlinks == want.hardlinks


# --- layouts and layers -----------------------------------------------------------------------


def layout_layers(layout: Path, ref: str) -> tuple[dict[str, object], list[bytes]]:
    """The config of image ``ref`` in ``layout`` and its layers uncompressed, base first."""
    index = json.loads((layout / "index.json").read_bytes())
    (entry,) = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref
    ]
    manifest = json.loads(blob(layout, entry["digest"]).read_bytes())
    config = json.loads(blob(layout, manifest["config"]["digest"]).read_bytes())
    layers = []
    for desc in manifest["layers"]:
        data = blob(layout, desc["digest"]).read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        elif data[:4] == ZSTD_MAGIC:
            data = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        layers.append(data)
    return config, layers


def blob(layout: Path, digest: str) -> Path:
    return layout / "blobs" / "sha256" / digest.removeprefix("sha256:")


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def diff_ids(store: laminae.Store, ref: str) -> list[str | None]:
    return [layer.diff_id for layer in store.image_layers(ref)]


def import_rich(store: laminae.Store, tmp_path: Path, marker: str) -> BuiltImage:
    """Import the rich test image, as ``rich:1``, from a layout written under ``tmp_path``."""
    built = write_layout(tmp_path / "layout", rich_layers(marker))
    store.import_image(f"oci:{tmp_path / 'layout'}:v1", names=["rich:1"])
    return built


# --- 1. laminae pushes, skopeo pulls ----------------------------------------------------------


@pytest.mark.parametrize(
    "compression", [laminae.Compression.GZIP, laminae.Compression.ZSTD], ids=["gzip", "zstd"]
)
def test_skopeo_pulls_and_verifies_what_laminae_pushed(
    store: laminae.Store,
    shared_registry: RegistryServer,
    repo: str,
    tmp_path: Path,
    compression: laminae.Compression,
) -> None:
    built = import_rich(store, tmp_path, f"{repo} {compression.name}")
    target = f"{shared_registry.host}/{repo}:{compression.name.lower()}"
    pushed = store.push(
        "rich:1", target, registry=insecure(shared_registry), compression=compression
    )
    assert skopeo_digest(target) == pushed
    # skopeo checks every blob's digest and size as it copies.
    skopeo("copy", "--src-tls-verify=false", f"docker://{target}", f"oci:{tmp_path / 'out'}:x")
    config, layers = layout_layers(tmp_path / "out", "x")
    assert config["rootfs"]["diff_ids"] == list(built.diff_ids)  # type: ignore[index]
    assert [sha256(layer) for layer in layers] == list(built.diff_ids)
    assert diff_ids(store, "rich:1") == list(built.diff_ids)
    # The layers went out exactly as they came in (rebuilt from the tar-split record).
    assert layers == rich_layers(f"{repo} {compression.name}")


# --- 2. skopeo pushes, laminae pulls, umoci agrees --------------------------------------------


def test_laminae_pulls_what_skopeo_pushed_and_umoci_agrees_on_the_tree(
    store: laminae.Store, shared_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    built = write_layout(layout, rich_layers(repo))
    target = f"{shared_registry.host}/{repo}:1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{target}")
    image = store.pull(target, registry=insecure(shared_registry))
    assert image.manifest_digest == skopeo_digest(target)
    assert image.id == built.config_digest
    assert image.names == (target,)
    assert diff_ids(store, image.id) == list(built.diff_ids)
    got = image_tree(store, image.id)
    want = umoci_tree(layout, "v1", tmp_path / "bundle")
    assert_trees_equal(got, want)
    # The comparison saw what it was meant to see.
    assert got.entries["bin/ping"].xattrs == (("security.capability", CAPABILITY),)
    assert got.entries["dev/loop0"].rdev == (7, 0)
    assert sorted(p for p in got.entries if p.startswith("opq/")) == ["opq/three"]
    assert "etc/removed" not in got.entries and "gone" not in got.entries
    assert frozenset({"data/a", "data/a-link", "data/a-link2"}) in got.hardlinks
    assert got.entries["home/user"] == Entry("dir", 0o750, UID + 1, GID + 1)
    assert got.entries["home/user/.profile"].xattrs == (
        ("user.comment", b"kept"),
        ("user.other", b"x" * 100),
    )
    assert got.entries["data"].xattrs == (("user.dir", b"on a directory"),)
    assert got.entries["bin/tool"].mode == 0o4755 and got.entries["tmp"].mode == 0o1777
    assert got.entries["dev/pipe"] == Entry("fifo", 0o620, UID, 0)
    assert got.entries["dangling"].uid == UID


# --- 3. a corrupt blob in the registry --------------------------------------------------------


def corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * _CORRUPT_OFFSET)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_blob_corrupt_in_the_registry_is_named_and_leaves_nothing(
    store: laminae.Store, shared_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    options = insecure(shared_registry)
    # A first image the store keeps, sharing the base with the one that will fail.
    write_layout(tmp_path / "good", [base_layer(), top_layer(f"{repo} good")])
    good = f"{shared_registry.host}/{repo}:good"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'good'}:v1", f"docker://{good}")
    store.pull(good, registry=options)
    before = (store.layers(), store.images(), files_under(store.root / "tar-split"))

    built = write_layout(
        tmp_path / "bad", [base_layer(), changes_layer(), top_layer(f"{repo} bad")]
    )
    bad = f"{shared_registry.host}/{repo}:bad"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{tmp_path / 'bad'}:v1", f"docker://{bad}")
    victim = built.layer_digests[2]
    corrupt(shared_registry.blob_path(victim))
    with pytest.raises(laminae.CorruptLayer, match=victim):
        store.pull(bad, registry=options)
    assert (store.layers(), store.images(), files_under(store.root / "tar-split")) == before
    assert store.check().ok
    assert files_under(store.root / "tmp") == set()


def files_under(directory: Path) -> set[str]:
    return (
        {str(p.relative_to(directory)) for p in directory.rglob("*")}
        if directory.exists()
        else set()
    )


# --- 4. auth: basic and bearer ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["auth_registry", "token_registry"])
def test_push_and_pull_with_credentials_and_refusals(
    store: laminae.Store, request: pytest.FixtureRequest, kind: str, tmp_path: Path
) -> None:
    server: RegistryServer = request.getfixturevalue(kind)
    assert server.username is not None and server.password is not None
    # An empty auth file, so that nothing on this host lends credentials.
    auth_file = tmp_path / "auth.json"
    auth_file.write_text('{"auths": {}}')
    good = insecure(server, credentials=(server.username, server.password), auth_file=auth_file)
    wrong = insecure(server, credentials=(server.username, "wrong"), auth_file=auth_file)
    anonymous = insecure(server, auth_file=auth_file)
    built = import_rich(store, tmp_path, kind)
    target = f"{server.host}/private/app:1"

    with pytest.raises(laminae.PermissionDenied, match="private/app"):
        store.push("rich:1", target, registry=wrong)
    with pytest.raises(laminae.PermissionDenied, match="private/app"):
        store.push("rich:1", target, registry=anonymous)
    pushed = store.push("rich:1", target, registry=good)

    assert store.remove_image("rich:1")
    assert store.layers() == []
    with pytest.raises(laminae.PermissionDenied, match="private/app"):
        store.pull(target, registry=wrong)
    with pytest.raises(laminae.PermissionDenied, match="private/app"):
        store.pull(target, registry=anonymous)
    assert store.layers() == [] and store.images() == []
    image = store.pull(target, registry=good)
    assert image.manifest_digest == pushed
    assert image.id == built.config_digest
    assert diff_ids(store, image.id) == list(built.diff_ids)
    assert store.check().ok


# --- 5. docker-archive both ways --------------------------------------------------------------


def test_skopeo_reads_the_docker_archive_laminae_writes(
    store: laminae.Store, tmp_path: Path
) -> None:
    built = import_rich(store, tmp_path, "docker-archive out")
    archive = tmp_path / "rich.tar"
    store.export_image("rich:1", f"docker-archive:{archive}:example/rich:1")
    # skopeo finds the image by the RepoTag laminae wrote; plain layers are their DiffIDs.
    info = json.loads(skopeo("inspect", f"docker-archive:{archive}:example/rich:1"))
    assert info["Layers"] == list(built.diff_ids)
    skopeo("copy", f"docker-archive:{archive}", f"oci:{tmp_path / 'out'}:x")
    config, layers = layout_layers(tmp_path / "out", "x")
    assert config["rootfs"]["diff_ids"] == list(built.diff_ids)  # type: ignore[index]
    assert [sha256(layer) for layer in layers] == list(built.diff_ids)


def test_laminae_imports_the_docker_archive_skopeo_writes(
    store: laminae.Store, tmp_path: Path
) -> None:
    layout = tmp_path / "layout"
    built = write_layout(layout, rich_layers("docker-archive in"))
    archive = tmp_path / "rich.tar"
    skopeo("copy", f"oci:{layout}:v1", f"docker-archive:{archive}:example/rich:2")
    image = store.import_image(f"docker-archive:{archive}")
    assert image.id == built.config_digest
    # skopeo writes the RepoTag fully qualified (docker.io/...), docker save familiar.
    assert image.names == ("docker.io/example/rich:2",)
    assert diff_ids(store, image.id) == list(built.diff_ids)
    assert_trees_equal(image_tree(store, image.id), umoci_tree(layout, "v1", tmp_path / "bundle"))


# --- 6. layers shared across pulls ------------------------------------------------------------


@attrs.define
class Statuses:
    """A progress reporter that keeps each layer's final status."""

    finished: list[tuple[str, str]] = attrs.field(factory=list)

    def start(self, key: str, description: str, total: int | None) -> None:
        pass

    def advance(self, key: str, amount: int) -> None:
        pass

    def finish(self, key: str, status: str) -> None:
        self.finished.append((key, status))

    def close(self) -> None:
        pass


def test_two_pulls_store_their_shared_base_once(
    store: laminae.Store, shared_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    options = insecure(shared_registry)
    pulled = []
    for name in ("a", "b"):
        layout = tmp_path / name
        write_layout(layout, [base_layer(), changes_layer(), top_layer(f"{repo} {name}")])
        target = f"{shared_registry.host}/{repo}-{name}:1"
        skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{target}")
        progress = Statuses()
        pulled.append(store.pull(target, registry=options, progress=progress))
        statuses = [status for _, status in progress.finished]
        if name == "b":
            # Base and middle were there already: not fetched, not applied again.
            assert statuses[:2] == ["exists", "exists"] and statuses[2] != "exists", statuses
    a, b = (store.image_layers(image.id) for image in pulled)
    assert [layer.id for layer in a[:2]] == [layer.id for layer in b[:2]]
    assert a[2].id != b[2].id
    assert len(store.layers()) == 4
    # Removing one image keeps what the other uses.
    store.remove_image(pulled[0].id)
    assert {layer.id for layer in store.layers()} == {layer.id for layer in b}


# --- links across layers, platforms and digests -----------------------------------------------


def test_a_hard_link_to_a_lower_layer_file_matches_umoci(
    store: laminae.Store, shared_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    lower = (
        Layer()
        .dir("data")
        .file("data/a", repo.encode() * 100, uid=UID)
        .hardlink("data/a-old", "data/a")
        .file("data/c", b"c")
        .bytes()
    )
    upper = (
        Layer()
        .hardlink("data/b", "data/a")
        # A link to the old c, then c replaced: d keeps the old content.
        .hardlink("data/d", "data/c")
        .file("data/c", b"new c")
        .bytes()
    )
    layout = tmp_path / "layout"
    write_layout(layout, [lower, upper])
    target = f"{shared_registry.host}/{repo}:1"
    skopeo("copy", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{target}")
    store.pull(target, registry=insecure(shared_registry))
    got = image_tree(store, target)
    want = umoci_tree(layout, "v1", tmp_path / "bundle")
    assert got.entries == want.entries
    assert frozenset({"data/a", "data/a-old", "data/b"}) in want.hardlinks
    if store.driver_name == "overlay":
        # The link is made in the upper directory, to a copy of data/a there; data/a-old stays
        # in the lower layer on the old inode. OCI's image spec allows this ("union
        # filesystems may have limited support"); content and metadata still agree.
        assert got.hardlinks == {frozenset({"data/a", "data/b"})}
    else:
        assert got.hardlinks == want.hardlinks


def test_a_platform_and_digests_from_a_multi_platform_index_skopeo_pushed(
    store: laminae.Store, shared_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    options = insecure(shared_registry)
    layout = tmp_path / "layout"
    built = write_layout(layout, [base_layer(), top_layer(repo)], multi_platform=True)
    target = f"{shared_registry.host}/{repo}:1"
    skopeo("copy", "--all", "--dest-tls-verify=false", f"oci:{layout}:v1", f"docker://{target}")
    assert skopeo_digest(target) == built.index_digest
    arm = store.pull(target, registry=options, platform="linux/arm64/v8")
    assert arm.manifest_digest == built.platforms["linux/arm64/v8"]
    amd = store.pull(target, registry=options, platform="linux/amd64")
    assert amd.manifest_digest == built.platforms["linux/amd64"]
    assert amd.id != arm.id
    # By digest: the platform's manifest, and the index with a platform to pick.
    by_manifest = f"{shared_registry.host}/{repo}@{built.platforms['linux/amd64']}"
    assert store.pull(by_manifest, registry=options).id == amd.id
    by_index = f"{shared_registry.host}/{repo}@{built.index_digest}"
    assert store.pull(by_index, registry=options, platform="linux/arm64/v8").id == arm.id
    assert store.image(by_manifest).id == amd.id and store.image(by_index).id == arm.id
    assert store.check().ok


def test_docker_v2_manifests_and_a_manifest_list_are_pulled(
    store: laminae.Store, shared_registry: RegistryServer, repo: str, tmp_path: Path
) -> None:
    options = insecure(shared_registry)
    layout = tmp_path / "layout"
    built = write_layout(layout, [base_layer(), top_layer(repo)])
    # skopeo converts the image to Docker's schema 2 (manifest, config and layer types).
    single = f"{shared_registry.host}/{repo}:v2s2"
    skopeo(
        "copy",
        "--format",
        "v2s2",
        "--dest-tls-verify=false",
        f"oci:{layout}:v1",
        f"docker://{single}",
    )
    raw = json.loads(skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{single}"))
    assert raw["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    image = store.pull(single, registry=options)
    assert image.manifest_digest == skopeo_digest(single)
    assert diff_ids(store, single) == list(built.diff_ids)
    # A Docker manifest list over that manifest, and one for another platform.
    manifest_bytes = skopeo("inspect", "--raw", "--tls-verify=false", f"docker://{single}").encode()
    entry = {
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "digest": sha256(manifest_bytes),
        "size": len(manifest_bytes),
    }
    listing = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
            "manifests": [
                {**entry, "platform": {"architecture": "s390x", "os": "linux"}},
                {
                    **entry,
                    "platform": {
                        "architecture": images.Platform.host().architecture,
                        "os": "linux",
                    },
                },
            ],
        }
    ).encode()
    with RegistryClient(shared_registry.host, options) as client:
        client.put_manifest(
            repo, "list", listing, "application/vnd.docker.distribution.manifest.list.v2+json"
        )
    listed = store.pull(f"{shared_registry.host}/{repo}:list", registry=options)
    assert listed.id == image.id and listed.manifest_digest == image.manifest_digest
    with pytest.raises(laminae.NotFound, match="linux/arm"):
        store.pull(f"{shared_registry.host}/{repo}:list", registry=options, platform="linux/arm")
