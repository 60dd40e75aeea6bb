"""The image commands through click's runner: import, ls, inspect, tag, export, rm, pull, push.

Images come from OCI layouts written here byte by byte (so every digest is known), into a
vfs store under ``tmp_path``. Pull and push run against a real registry on 127.0.0.1.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import pytest
from click.testing import CliRunner, Result
from tarbuild import make_tar

from laminae.cli._main import cli
from laminae.images._image import Platform

BASE_TAR = make_tar({"etc/hostname": b"box\n", "etc/gone": b"x\n"}, dirs=("etc",))
TOP_TAR = make_tar({"etc/motd": b"hi\n"}, whiteouts=("etc/gone",))
if TYPE_CHECKING:
    from registryserver import RegistryServer

# The registry fixtures (docker-registry on 127.0.0.1, stopped by PID). Not imported by name
# above: pytest must import the module itself, to rewrite its asserts.

HOST = Platform.host()


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@attrs.frozen
class Layout:
    """An OCI image layout on disk and the digests it was built with."""

    path: Path
    ref: str
    manifest_digest: str
    image_id: str  # the config's digest
    diff_ids: tuple[str, ...]
    config: dict[str, Any]

    def location(self) -> str:
        return f"oci:{self.path}:{self.ref}"


def _put_blob(layout: Path, data: bytes) -> dict[str, Any]:
    blob = digest(data)
    (layout / "blobs" / "sha256" / blob.removeprefix("sha256:")).write_bytes(data)
    return {"digest": blob, "size": len(data)}


def write_layout(path: Path, ref: str, layers: list[bytes]) -> Layout:
    """An OCI layout at ``path`` holding one image, ``ref``, of gzip layers from ``layers``."""
    (path / "blobs" / "sha256").mkdir(parents=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    diff_ids = tuple(digest(tar) for tar in layers)
    config = {
        "created": "2024-01-01T00:00:00Z",
        "architecture": HOST.architecture,
        "os": HOST.os,
        "config": {
            "Env": ["PATH=/usr/bin:/bin", "GREETING=hello"],
            "Cmd": ["/bin/sh"],
            "WorkingDir": "/srv",
            "User": "1000",
            "Labels": {"org.example.purpose": "test"},
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    config_raw = json.dumps(config).encode()
    layer_descs = [
        {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **_put_blob(path, blob)}
        for blob in (gzip.compress(tar, mtime=0) for tar in layers)
    ]
    manifest_raw = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                **_put_blob(path, config_raw),
            },
            "layers": layer_descs,
        }
    ).encode()
    manifest = _put_blob(path, manifest_raw)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                **manifest,
                "annotations": {"org.opencontainers.image.ref.name": ref},
            }
        ],
    }
    (path / "index.json").write_text(json.dumps(index))
    return Layout(path, ref, manifest["digest"], digest(config_raw), diff_ids, config)


def read_layout(path: Path, ref: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    """The manifest and config of ``ref`` in the layout at ``path``, and the manifest digest."""
    index = json.loads((path / "index.json").read_text())
    (entry,) = [
        m
        for m in index["manifests"]
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == ref
    ]

    def blob(desc: dict[str, Any]) -> bytes:
        hexdigest = str(desc["digest"]).removeprefix("sha256:")
        data = (path / "blobs" / "sha256" / hexdigest).read_bytes()
        assert digest(data) == desc["digest"]
        return data

    manifest = json.loads(blob(entry))
    return manifest, json.loads(blob(manifest["config"])), entry["digest"]


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _environment(clean_environment: None) -> None:
    """Every test here runs in conftest's clean environment."""


Invoke = Callable[..., Result]


@pytest.fixture
def invoke(tmp_path: Path) -> Invoke:
    """Run ``laminae <store options> ARGS`` in-process and check the exit status."""
    config = tmp_path / "storage.toml"
    config.write_text("")
    store_args = [
        "--config", str(config), "--root", str(tmp_path / "root"),
        "--runroot", str(tmp_path / "run"), "--driver", "vfs",
    ]  # fmt: skip

    def run(*args: str, input: str | None = None, expect: int | None = 0) -> Result:
        result = CliRunner().invoke(cli, [*store_args, *args], input=input)
        if expect is not None:
            assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


def one_error_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("laminae: error: ")
    return lines[0].removeprefix("laminae: error: ")


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return write_layout(tmp_path / "layout", "v1", [BASE_TAR, TOP_TAR])


@pytest.fixture
def hello(invoke: Invoke, layout: Layout) -> Layout:
    """The layout imported as hello:latest."""
    invoke("image", "import", "-q", "--name", "hello", layout.location())
    return layout


def lines(text: str) -> list[str]:
    return text.splitlines()


# -- without a store --------------------------------------------------------------------------


def test_help_lists_the_image_commands(invoke: Invoke) -> None:
    listed = invoke("--help").stdout
    for command in ("image", "pull", "push", "layer"):
        assert f"  {command} " in listed
    sub = invoke("image", "--help").stdout
    for command in ("import", "export", "ls", "inspect", "rm", "tag"):
        assert f"  {command} " in sub


@pytest.mark.parametrize(
    "source",
    ["not-a-transport:/x", "/just/a/path", "docker:busybox", "oci:"],
    ids=["unknown-transport", "no-transport", "docker-without-slashes", "empty-path"],
)
def test_import_bad_source_is_named_with_exit_2(
    invoke: Invoke, source: str, tmp_path: Path
) -> None:
    result = invoke("image", "import", source, expect=2)
    assert repr(source) in one_error_line(result)
    assert result.stdout == ""
    assert not (tmp_path / "root").exists()  # refused before any store was made


def test_export_bad_destination_is_named_with_exit_2(invoke: Invoke) -> None:
    result = invoke("image", "export", "hello", "nowhere", expect=2)
    assert "'nowhere'" in one_error_line(result)


def test_creds_without_user_is_refused(invoke: Invoke) -> None:
    result = invoke("pull", "--creds", ":secret", "localhost:1/x", expect=2)
    assert "--creds" in one_error_line(result)
    assert "secret" not in result.stderr  # a password is never echoed


def test_jobs_must_be_positive(invoke: Invoke, layout: Layout) -> None:
    result = invoke("image", "import", "--jobs", "0", layout.location(), expect=2)
    assert "--jobs" in result.stderr


# -- import, ls, inspect ----------------------------------------------------------------------


@pytest.mark.root
def test_import_prints_loaded_image_and_one_line_per_layer(invoke: Invoke, layout: Layout) -> None:
    result = invoke("image", "import", "--name", "hello", layout.location())
    assert lines(result.stdout) == [f"Loaded image: hello:latest ({layout.image_id})"]
    # Not a terminal: one plain line per finished layer (and maybe the config), each with
    # a status.
    progress = lines(result.stderr)
    assert len(progress) >= 2
    assert all(": " in line for line in progress), progress


@pytest.mark.root
def test_import_without_a_name_takes_the_layout_ref(invoke: Invoke, layout: Layout) -> None:
    result = invoke("image", "import", "-q", layout.location())
    # An OCI ref name ("v1") is the name the spec gives the image.
    assert layout.image_id in result.stdout
    assert result.stdout.startswith("Loaded image")


@pytest.mark.root
def test_import_quiet_prints_only_the_result(invoke: Invoke, layout: Layout) -> None:
    result = invoke("image", "import", "-q", "--name", "hello", layout.location())
    assert result.stdout == f"Loaded image: hello:latest ({layout.image_id})\n"
    assert result.stderr == ""


@pytest.mark.root
def test_import_json_writes_progress_events_then_the_result(invoke: Invoke, layout: Layout) -> None:
    result = invoke("image", "import", "--json", "--name", "hello", layout.location())
    assert result.stderr == ""
    events = [json.loads(line) for line in lines(result.stdout)]  # every line parses
    *progress, final = events
    assert final == {
        "event": "result",
        "id": layout.image_id,
        "names": ["hello:latest"],
        "digest": layout.manifest_digest,
    }
    kinds = {e["event"] for e in progress}
    assert kinds <= {"start", "progress", "finish"}
    for event in progress:
        assert set(event) == {"event", "key", "description", "total", "current", "status"}
    finished = {e["key"]: e for e in progress if e["event"] == "finish"}
    started = {e["key"] for e in progress if e["event"] == "start"}
    assert started == set(finished)
    assert len(finished) >= 2  # both layers at least
    assert all(e["status"] for e in finished.values())


@pytest.mark.root
def test_import_json_quiet_prints_only_the_result_object(invoke: Invoke, layout: Layout) -> None:
    result = invoke("image", "import", "--json", "-q", layout.location())
    (line,) = lines(result.stdout)
    assert json.loads(line)["id"] == layout.image_id


@pytest.mark.root
def test_import_missing_layout_names_it(invoke: Invoke, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-layout"
    result = invoke("image", "import", f"oci:{missing}", expect=None)
    assert result.exit_code in (2, 3)  # bad input, or not found: either way it says which
    assert str(missing) in one_error_line(result)


@pytest.mark.root
def test_ls_lists_id_names_created_size_and_layer_count(invoke: Invoke, hello: Layout) -> None:
    (line,) = lines(invoke("image", "ls").stdout)
    image_id, names, created, size, layers = line.split("\t")
    assert (image_id, names, size, layers) == (
        hello.image_id, "hello:latest", str(len(BASE_TAR) + len(TOP_TAR)), "2",
    )  # fmt: skip
    assert created[:4].isdigit()
    (row,) = json.loads(invoke("image", "ls", "--json").stdout)
    assert row["id"] == hello.image_id
    assert row["names"] == ["hello:latest"]
    assert row["digest"] == hello.manifest_digest
    assert (row["size"], row["layers"]) == (len(BASE_TAR) + len(TOP_TAR), 2)


@pytest.mark.root
def test_ls_of_an_empty_store_prints_nothing(invoke: Invoke) -> None:
    assert invoke("image", "ls").stdout == ""
    assert json.loads(invoke("image", "ls", "--json").stdout) == []


@pytest.mark.root
def test_inspect_shows_identity_and_config(invoke: Invoke, hello: Layout) -> None:
    shown = json.loads(invoke("image", "inspect", "hello").stdout)
    run = hello.config["config"]
    assert shown["Id"] == hello.image_id
    assert shown["Names"] == ["hello:latest"]
    assert shown["Digest"] == hello.manifest_digest
    assert shown["Created"] == "2024-01-01T00:00:00Z"
    assert (shown["Os"], shown["Architecture"], shown["Variant"]) == (
        HOST.os, HOST.architecture, None,
    )  # fmt: skip
    assert shown["Layers"] == list(hello.diff_ids)
    assert shown["Env"] == run["Env"]
    assert shown["Cmd"] == run["Cmd"]
    assert shown["Entrypoint"] is None
    assert (shown["WorkingDir"], shown["User"]) == ("/srv", "1000")
    assert shown["Labels"] == run["Labels"]
    assert shown["Size"] == len(BASE_TAR) + len(TOP_TAR)


@pytest.mark.root
def test_inspect_unknown_image_exits_3(invoke: Invoke) -> None:
    result = invoke("image", "inspect", "nothing:here", expect=3)
    assert "nothing:here" in one_error_line(result)


# -- tag, export, rm --------------------------------------------------------------------------


@pytest.mark.root
def test_tag_adds_a_name(invoke: Invoke, hello: Layout) -> None:
    assert invoke("image", "tag", "hello", "other:1").stdout == ""
    (row,) = json.loads(invoke("image", "ls", "--json").stdout)
    assert sorted(row["names"]) == ["hello:latest", "other:1"]
    assert json.loads(invoke("image", "inspect", "other:1").stdout)["Id"] == hello.image_id


@pytest.mark.root
def test_tag_unknown_image_exits_3(invoke: Invoke) -> None:
    invoke("image", "tag", "nothing:here", "x:1", expect=3)


@pytest.mark.root
@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_export_writes_a_layout_with_the_same_config(
    invoke: Invoke, hello: Layout, tmp_path: Path, compression: str
) -> None:
    target = tmp_path / "exported"
    destination = f"oci:{target}:v2"
    result = invoke("image", "export", "hello", destination, "--compression", compression)
    manifest, config, manifest_digest = read_layout(target, "v2")
    assert lines(result.stdout) == [f"Exported hello to {destination}: {manifest_digest}"]
    assert manifest["config"]["digest"] == hello.image_id  # the config goes out unchanged
    assert config["rootfs"]["diff_ids"] == list(hello.diff_ids)
    suffix = {"gzip": "+gzip", "zstd": "+zstd", "none": ""}[compression]
    media_types = {layer["mediaType"] for layer in manifest["layers"]}
    assert media_types == {"application/vnd.oci.image.layer.v1.tar" + suffix}


@pytest.mark.root
def test_export_then_import_gives_the_same_image(
    invoke: Invoke, hello: Layout, tmp_path: Path
) -> None:
    archive = tmp_path / "hello.tar"
    exported = invoke("image", "export", "-q", "--json", "hello", f"oci-archive:{archive}:v1")
    (line,) = lines(exported.stdout)
    assert json.loads(line) == {
        "event": "result",
        "image": "hello",
        "destination": f"oci-archive:{archive}:v1",
        "digest": json.loads(line)["digest"],
    }
    invoke("image", "rm", "hello")
    again = invoke("image", "import", "-q", "--name", "back", f"oci-archive:{archive}:v1")
    assert lines(again.stdout) == [f"Loaded image: back:latest ({hello.image_id})"]


@pytest.mark.root
def test_export_unknown_image_exits_3(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("image", "export", "nothing:here", f"oci:{tmp_path / 'x'}", expect=3)
    assert "nothing:here" in one_error_line(result)
    assert not (tmp_path / "x" / "index.json").exists()


@pytest.mark.root
def test_rm_of_one_name_of_several_only_untags(invoke: Invoke, hello: Layout) -> None:
    invoke("image", "tag", "hello", "other:1")
    assert lines(invoke("image", "rm", "other:1").stdout) == ["Untagged: other:1"]
    (row,) = json.loads(invoke("image", "ls", "--json").stdout)
    assert row["names"] == ["hello:latest"]


@pytest.mark.root
def test_rm_of_the_last_name_deletes_the_image_and_its_layers(
    invoke: Invoke, hello: Layout
) -> None:
    layer_ids = {row["id"] for row in json.loads(invoke("layer", "ls", "--json").stdout)}
    assert len(layer_ids) == 2
    removed = lines(invoke("image", "rm", "hello").stdout)
    assert removed[:2] == ["Untagged: hello:latest", f"Deleted image: {hello.image_id}"]
    assert {line.removeprefix("Deleted layer: ") for line in removed[2:]} == layer_ids
    assert json.loads(invoke("image", "ls", "--json").stdout) == []
    assert json.loads(invoke("layer", "ls", "--json").stdout) == []


@pytest.mark.root
def test_rm_keeps_layers_another_image_uses(invoke: Invoke, hello: Layout, tmp_path: Path) -> None:
    base_only = write_layout(tmp_path / "base-only", "b", [BASE_TAR])
    invoke("image", "import", "-q", "--name", "base", base_only.location())
    removed = lines(invoke("image", "rm", "hello").stdout)
    deleted_layers = [line for line in removed if line.startswith("Deleted layer: ")]
    assert deleted_layers == [f"Deleted layer: {json_top_layer(hello)}"]
    assert len(json.loads(invoke("layer", "ls", "--json").stdout)) == 1


def json_top_layer(layout: Layout) -> str:
    """The ChainID of the layout's top layer (the id the store gives it)."""
    chain = layout.diff_ids[0]
    for diff_id in layout.diff_ids[1:]:
        chain = digest(f"{chain} {diff_id}".encode())
    return chain


@pytest.mark.root
def test_rm_unknown_image_exits_3_and_stops(invoke: Invoke, hello: Layout) -> None:
    result = invoke("image", "rm", "nothing:here", "hello", expect=3)
    assert "nothing:here" in one_error_line(result)
    assert len(json.loads(invoke("image", "ls", "--json").stdout)) == 1


# -- pull and push ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.root
def test_push_then_pull_gives_the_same_image(
    invoke: Invoke, hello: Layout, registry: RegistryServer
) -> None:
    target = f"{registry.host}/team/hello:v1"
    insecure = ("--insecure-registry", registry.host)
    pushed = invoke("push", *insecure, "hello", f"docker://{target}")
    (result,) = [line for line in lines(pushed.stdout) if line.startswith("Pushed ")]
    assert result.startswith(f"Pushed hello to docker://{target}: sha256:")
    assert all(": " in line for line in lines(pushed.stderr))  # plain progress lines
    invoke("image", "rm", "hello")
    pulled = invoke("pull", "-q", *insecure, target)
    assert pulled.stdout == f"Pulled image: {target} ({hello.image_id})\n"
    assert pulled.stderr == ""


@pytest.mark.root
def test_push_defaults_to_the_image_name_and_pull_takes_docker_prefix(
    invoke: Invoke, hello: Layout, registry: RegistryServer
) -> None:
    name = f"{registry.host}/solo:1"
    insecure = ("--insecure-registry", registry.host)
    invoke("image", "tag", "hello", name)
    pushed = invoke("push", "--json", *insecure, name)
    events = [json.loads(line) for line in lines(pushed.stdout)]
    assert events[-1]["event"] == "result"
    assert events[-1]["destination"] == f"docker://{name}"
    assert {e["event"] for e in events[:-1]} <= {"start", "progress", "finish"}
    invoke("image", "rm", "hello", name)
    pulled = invoke("pull", "--json", "-q", *insecure, f"docker://{name}")
    (line,) = lines(pulled.stdout)
    assert json.loads(line) == {
        "event": "result",
        "id": hello.image_id,
        "names": [name],
        "digest": events[-1]["digest"],
    }


@pytest.mark.root
def test_pull_and_push_with_credentials(
    invoke: Invoke, hello: Layout, auth_registry: RegistryServer
) -> None:
    host = auth_registry.host
    creds = f"{auth_registry.username}:{auth_registry.password}"
    target = f"{host}/private/hello:v1"
    refused = invoke(
        "push", "-q", "--insecure-registry", host, "hello", f"docker://{target}", expect=10
    )
    assert host in one_error_line(refused)
    invoke(
        "push", "-q", "--insecure-registry", host, "--creds", creds, "hello", f"docker://{target}"
    )
    wrong = invoke(
        "pull", "-q", "--insecure-registry", host, "--creds", "laminae:wrong", target, expect=10
    )
    assert "wrong" not in wrong.stderr  # a password is never echoed
    invoke("image", "rm", "hello")
    pulled = invoke("pull", "-q", "--insecure-registry", host, "--creds", creds, target)
    assert hello.image_id in pulled.stdout


@pytest.mark.root
def test_pull_from_nowhere_exits_11_naming_the_registry(invoke: Invoke) -> None:
    host = f"127.0.0.1:{free_port()}"
    result = invoke("pull", "-q", "--insecure-registry", host, f"{host}/x:1", expect=11)
    assert host in one_error_line(result)


@pytest.mark.root
def test_pull_over_tls_from_a_plain_http_registry_exits_11(
    invoke: Invoke, registry: RegistryServer
) -> None:
    # Without --insecure-registry a registry is spoken to over TLS only, never plain HTTP.
    result = invoke("pull", "-q", f"{registry.host}/x:1", expect=11)
    assert registry.host in one_error_line(result)


@pytest.mark.root
def test_registries_from_the_config_file_and_flags_add_up(
    invoke: Invoke, hello: Layout, registry: RegistryServer, tmp_path: Path
) -> None:
    target = f"{registry.host}/from-config/hello:v1"
    # The store's config (see the invoke fixture) names the registry insecure: no flag needed.
    (tmp_path / "storage.toml").write_text(f'[registries]\ninsecure = ["{registry.host}"]\n')
    pushed = invoke("push", "-q", "hello", target)
    assert pushed.stdout.startswith(f"Pushed hello to docker://{target}: sha256:")
    # A flag adds a host to the file's list; it does not replace it.
    invoke("image", "rm", "hello")
    invoke("pull", "-q", "--insecure-registry", "elsewhere:5000", target)
    (tmp_path / "storage.toml").write_text("")
    invoke("pull", "-q", target, expect=11)  # neither: TLS, which this registry does not speak
