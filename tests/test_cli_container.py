"""The container commands through click's runner, on a vfs store under ``tmp_path``.

create, ls, inspect, mount, diff, commit, export and rm, with their output formats, exit
codes and one-line errors; files are written through the mount the CLI printed. The refusal
to write a tar to a terminal runs the installed script on a pseudo-terminal.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from imagebuild import write_layout
from tarbuild import make_tar
from terminal import run_in_pty

import laminae
from laminae import images
from laminae.cli._main import cli

pytestmark = pytest.mark.root

BASE = make_tar(
    {"etc/hostname": b"box\n", "etc/passwd": b"root:x:0:0::/:/bin/sh\n", "etc/gone": b"x"},
    dirs=["etc"],
)
TOP = make_tar({"etc/motd": b"hi\n"}, dirs=["etc"], whiteouts=["etc/gone"])
SCRIPT = Path(sys.executable).with_name("laminae")

Invoke = Callable[..., Result]


@pytest.fixture(autouse=True)
def _environment(clean_environment: None) -> None:
    """Every test here runs in conftest's clean environment."""


@pytest.fixture
def store_args(tmp_path: Path) -> Iterator[list[str]]:
    """The global options for a vfs store under ``tmp_path``; left with nothing mounted."""
    config = tmp_path / "storage.toml"
    config.write_text("")
    args = [
        "--config", str(config), "--root", str(tmp_path / "root"),
        "--runroot", str(tmp_path / "run"), "--driver", "vfs",
    ]  # fmt: skip
    yield args
    with laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", driver="vfs") as store:
        for layer in store.layers():
            if layer.mount_count:
                store.unmount(layer.id, force=True)


@pytest.fixture
def invoke(store_args: list[str]) -> Invoke:
    """Run ``laminae <store options> ARGS`` in-process and check the exit status."""

    def run(*args: str, expect: int | None = 0) -> Result:
        result = CliRunner().invoke(cli, [*store_args, *args])
        if expect is not None:
            assert result.exit_code == expect, (result.stdout, result.stderr, result.exception)
        return result

    return run


@pytest.fixture
def image(invoke: Invoke, tmp_path: Path) -> str:
    """An image named base:latest (Cmd and Env in its config); its id."""
    write_layout(tmp_path / "layout", [BASE, TOP], platform=str(images.Platform.host()))
    invoke("image", "import", "-q", "--name", "base", f"oci:{tmp_path / 'layout'}:v1")
    return str(json.loads(invoke("image", "inspect", "base").stdout)["Id"])


def one_error_line(result: Result) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("laminae: error: ")
    return lines[0].removeprefix("laminae: error: ")


def tar_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getnames()


def test_help_lists_the_container_commands(invoke: Invoke) -> None:
    assert "  container " in invoke("--help").stdout
    sub = invoke("container", "--help").stdout
    for command in ("create", "ls", "inspect", "rm", "mount", "unmount", "diff", "commit"):
        assert f"  {command} " in sub
    assert "  export " in sub


def test_create_ls_and_inspect(invoke: Invoke, image: str) -> None:
    container_id = invoke("container", "create", "--image", "base", "--name", "web").stdout.strip()
    assert len(container_id) == 64
    # Off a terminal: full ids, tab-separated, no header.
    (line,) = invoke("container", "ls").stdout.splitlines()
    fields = line.split("\t")
    assert fields[:3] == [container_id, "web", "base:latest"]
    assert fields[4] == "no"
    (listed,) = json.loads(invoke("container", "ls", "--json").stdout)
    assert listed["id"] == container_id and listed["image"] == image
    assert listed["image_names"] == ["base:latest"] and listed["mounted"] is False
    shown = json.loads(invoke("container", "inspect", "web").stdout)
    assert shown["Id"] == container_id and shown["Name"] == "web"
    assert shown["Image"] == image and shown["ImageName"] == "base:latest"
    assert shown["Mounted"] is False and shown["MountPoint"] is None
    assert shown["Config"] == {"Cmd": ["/bin/sh"], "Env": ["PATH=/usr/bin:/bin"]}
    assert shown["Created"] == listed["created"]
    assert shown["Layer"] == listed["layer"]


def test_mount_diff_unmount(invoke: Invoke, image: str) -> None:
    invoke("container", "create", "--image", "base", "--name", "web")
    root = Path(invoke("container", "mount", "web").stdout.strip())
    (root / "etc" / "hostname").write_bytes(b"web\n")
    (root / "etc" / "passwd").unlink()
    (root / "srv").mkdir()
    (root / "srv" / "index.html").write_bytes(b"<p>\n")
    assert json.loads(invoke("container", "inspect", "web").stdout)["MountPoint"] == str(root)
    assert invoke("container", "ls").stdout.split("\t")[4].strip() == "yes"
    expected = ["C /etc", "C /etc/hostname", "D /etc/passwd", "A /srv", "A /srv/index.html"]
    assert invoke("container", "diff", "web").stdout.splitlines() == expected
    as_json = json.loads(invoke("container", "diff", "web", "--json").stdout)
    assert as_json[2] == {"path": "/etc/passwd", "kind": "deleted"}
    invoke("container", "unmount", "web")
    assert json.loads(invoke("container", "inspect", "web").stdout)["Mounted"] is False
    assert invoke("container", "diff", "web").stdout.splitlines() == expected
    not_mounted = invoke("container", "unmount", "web", expect=5)
    assert "not mounted" in one_error_line(not_mounted)


def test_commit_prints_the_new_image_and_works_while_mounted(invoke: Invoke, image: str) -> None:
    invoke("container", "create", "--image", "base", "--name", "web")
    root = Path(invoke("container", "mount", "web").stdout.strip())
    (root / "new").write_bytes(b"new\n")
    new_id = invoke(
        "container", "commit", "-m", "add new", "--author", "Ada", "web", "web:v2"
    ).stdout.strip()
    assert new_id.startswith("sha256:")
    shown = json.loads(invoke("image", "inspect", "web:v2").stdout)
    assert shown["Id"] == new_id and shown["Names"] == ["web:v2"]
    assert len(shown["Layers"]) == 3
    assert json.loads(invoke("image", "inspect", "base").stdout)["Id"] == image
    assert json.loads(invoke("container", "inspect", "web").stdout)["Mounted"] is True
    # A container of the new image has the file.
    invoke("container", "create", "--image", "web:v2", "--name", "second")
    second = Path(invoke("container", "mount", "second").stdout.strip())
    assert (second / "new").read_bytes() == b"new\n"
    assert invoke("container", "diff", "second").stdout == ""
    # Without NEWREF the image has no name.
    bare = invoke("container", "commit", "second").stdout.strip()
    assert json.loads(invoke("image", "inspect", bare).stdout)["Names"] == []


def test_export_to_a_file_and_to_stdout(invoke: Invoke, image: str, tmp_path: Path) -> None:
    invoke("container", "create", "--image", "base", "--name", "web")
    root = Path(invoke("container", "mount", "web").stdout.strip())
    (root / "etc" / "passwd").unlink()
    (root / "new").write_bytes(b"new\n")
    invoke("container", "unmount", "web")
    out = tmp_path / "web.tar.gz"
    shown = invoke("container", "export", "web", "-o", str(out), "--compression", "gzip")
    diff_id, written, size = shown.stdout.strip().split("\t")
    data = out.read_bytes()
    assert int(size) == len(data)
    plain = gzip.decompress(data)
    assert tar_names(plain) == ["etc", "etc/.wh.passwd", "new"]
    streamed = invoke("container", "export", "web").stdout_bytes
    assert streamed == plain
    assert diff_id == "sha256:" + hashlib.sha256(plain).hexdigest()
    assert written == "sha256:" + hashlib.sha256(data).hexdigest()


def test_rm_refuses_a_mounted_container_unless_forced(invoke: Invoke, image: str) -> None:
    first = invoke("container", "create", "--image", "base").stdout.strip()
    second = invoke("container", "create", "--image", "base", "--name", "two").stdout.strip()
    invoke("container", "mount", "two")
    refused = invoke("container", "rm", first, "two", expect=5)
    assert refused.stdout == first + "\n"  # removed in order, stopped at the first error
    assert "mounted" in one_error_line(refused)
    assert invoke("container", "rm", "--force", "two").stdout == second + "\n"
    assert invoke("container", "ls").stdout == ""
    assert invoke("image", "rm", "base").exit_code == 0  # nothing uses it any more


def test_errors_are_one_line_with_their_exit_code(invoke: Invoke, image: str) -> None:
    for args in (
        ("inspect", "nope"),
        ("mount", "nope"),
        ("unmount", "nope"),
        ("diff", "nope"),
        ("commit", "nope"),
        ("export", "nope"),
        ("rm", "nope"),
    ):
        result = invoke("container", *args, expect=3)
        assert one_error_line(result) == "container 'nope': no such container", args
    missing = invoke("container", "create", "--image", "missing", expect=3)
    assert one_error_line(missing) == "image 'missing': no such image"
    invoke("container", "create", "--image", "base", "--name", "web")
    taken = invoke("container", "create", "--image", "base", "--name", "web", expect=4)
    assert "already in use" in one_error_line(taken)
    bad_name = invoke("container", "commit", "web", "Bad Name", expect=2)
    assert "Bad Name" in one_error_line(bad_name)
    invoke("container", "create", expect=2)  # --image is required (a usage error)
    invoke("container", "export", "web", "--compression", "lz4", expect=2)


def test_export_refuses_a_terminal(store_args: list[str], image: str) -> None:
    subprocess.run(
        [str(SCRIPT), *store_args, "container", "create", "--image", "base", "--name", "web"],
        check=True,
        capture_output=True,
    )
    done = run_in_pty(
        [str(SCRIPT), *store_args, "container", "export", "web"],
        env={k: v for k, v in os.environ.items() if not k.startswith("LAMINAE_")},
    )
    assert done.returncode == 2
    assert done.stdout.splitlines() == [
        "laminae: error: refusing to write a tar to a terminal: redirect stdout or use -o FILE"
    ]
