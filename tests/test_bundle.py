"""OCI runtime bundles: the config.json a container gets, its user lookup, unbundling, the CLI.

The image here is crafted (a base layer with account files, a config with every field a
bundle reads), so each field of ``config.json`` has one known right value; the rest of the
config must be the runtime's own ``crun spec`` output, untouched. Running bundles is the end
to end test's job (``test_container_e2e.py``).

User lookup is also tested on plain directories (no root needed): that is where a hostile
``/etc/passwd`` symlink is aimed at the host's files.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from tarbuild import make_tar
from tools import needs

import laminae
import laminae.kernel._paths
from laminae.cli._main import cli
from laminae.containers._bundle import (
    MARKER_NAME,
    BindMount,
    make_bundle,
    merge_env,
    read_marker,
    remove_bundle,
    resolve_user,
    runtime_spec,
)
from laminae.kernel._mountinfo import is_mountpoint

crun = needs("crun")

PASSWD = b"""root:x:0:0:root:/root:/bin/sh
# a comment, and a malformed line below, both skipped
broken
app:x:1000:1001:an app:/home/app:/bin/sh
daemon:x:2:2::/:/sbin/nologin
"""
GROUP = b"""root:x:0:
app:x:1001:
staff:x:50:other,app
audio:x:63:app
wheel:x:10:root
"""
BASE = make_tar(
    {"etc/passwd": PASSWD, "etc/group": GROUP, "srv/app/run": b"#!/bin/sh\n"},
    dirs=["etc", "srv", "srv/app", "dev", "proc", "sys"],
)
RUN_CONFIG: dict[str, Any] = {
    "Env": ["PATH=/srv/app/bin:/usr/bin", "GREETING=hi", "EMPTY="],
    "Entrypoint": ["/srv/app/run", "--serve"],
    "Cmd": ["--port", "80"],
    "WorkingDir": "/srv/app",
    "User": "app",
}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def image_config(run: dict[str, Any]) -> bytes:
    document = {
        "architecture": "amd64",
        "os": "linux",
        "config": run,
        "rootfs": {"type": "layers", "diff_ids": [sha256(BASE)]},
    }
    return json.dumps(document).encode()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[laminae.Store]:
    with laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", driver="vfs") as s:
        yield s
        for layer in s.layers():
            if layer.mount_count:
                s.unmount(layer.id, force=True)


def crafted(store: laminae.Store, run: dict[str, Any], name: str = "box") -> laminae.Container:
    """A container named ``name`` on an image of :data:`BASE` whose config says ``run``."""
    base = store.apply_layer(io.BytesIO(BASE))
    image = store.create_image(base.id, names=[f"img-{name}"], config=image_config(run))
    return store.create_container(image.id, name=name)


def mounted(store: laminae.Store, container: laminae.Container) -> int:
    return store.layer(container.layer).mount_count


# --- config.json ------------------------------------------------------------------------------


@crun
@pytest.mark.root
def test_config_applies_the_image_over_the_runtime_spec(
    store: laminae.Store, tmp_path: Path
) -> None:
    box = crafted(store, RUN_CONFIG)
    tools = tmp_path / "tools"
    tools.mkdir()
    made = make_bundle(
        store, "box", tmp_path / "bundle", mounts=[BindMount(tools, "/opt/tools", readonly=False)]
    )
    config = json.loads((tmp_path / "bundle" / "config.json").read_text())
    defaults = runtime_spec("crun")

    assert made.directory == tmp_path / "bundle"
    assert made.container == box.id
    assert made.runtime == "crun"
    assert config["root"] == {"path": str(made.rootfs), "readonly": False}
    assert is_mountpoint(str(made.rootfs))
    assert mounted(store, box) == 1
    assert (made.rootfs / "srv" / "app" / "run").exists()

    process = config["process"]
    assert process["args"] == ["/srv/app/run", "--serve", "--port", "80"]
    # The runtime's defaults, the image's PATH replacing the default one in place.
    assert process["env"] == ["PATH=/srv/app/bin:/usr/bin", "TERM=xterm", "GREETING=hi", "EMPTY="]
    assert process["cwd"] == "/srv/app"
    assert process["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [50, 63]}
    assert process["terminal"] is False
    assert config["hostname"] == "box"
    assert config["mounts"] == [
        *defaults["mounts"],
        {
            "destination": "/opt/tools",
            "type": "bind",
            "source": str(tools),
            "options": ["rbind", "rw"],
        },
    ]
    # Everything else is what `crun spec` wrote.
    for key in set(defaults) - {"root", "hostname", "mounts", "process"}:
        assert config[key] == defaults[key], key
    for key in set(defaults["process"]) - {"args", "env", "cwd", "user", "terminal"}:
        assert process[key] == defaults["process"][key], key
    assert read_marker(made.directory).container == box.id


@crun
@pytest.mark.root
def test_given_args_and_terminal_replace_the_image_command(
    store: laminae.Store, tmp_path: Path
) -> None:
    crafted(store, {**RUN_CONFIG, "WorkingDir": "", "User": ""})
    made = make_bundle(store, "box", tmp_path / "b", args=["/bin/true", "x"], terminal=True)
    process = json.loads(made.config_path.read_text())["process"]
    assert process["args"] == ["/bin/true", "x"]
    assert process["terminal"] is True
    assert process["cwd"] == "/"
    # No User is root; root's supplementary groups come from /etc/group too.
    assert process["user"] == {"uid": 0, "gid": 0, "additionalGids": [10]}


@crun
@pytest.mark.root
def test_a_nameless_container_gets_its_short_id_as_hostname(
    store: laminae.Store, tmp_path: Path
) -> None:
    base = store.apply_layer(io.BytesIO(BASE))
    image = store.create_image(base.id, config=image_config(RUN_CONFIG))
    box = store.create_container(image.id)
    made = make_bundle(store, box.id, tmp_path / "b")
    assert json.loads(made.config_path.read_text())["hostname"] == box.id[:12]


@crun
@pytest.mark.root
@pytest.mark.parametrize(
    ("user", "expected"),
    [
        ("1000", {"uid": 1000, "gid": 1001, "additionalGids": [50, 63]}),
        ("4242", {"uid": 4242, "gid": 0}),  # in no passwd entry: group 0, as runc does
        ("1000:50", {"uid": 1000, "gid": 50}),  # an explicit group: no supplementary ones
        ("app:staff", {"uid": 1000, "gid": 50}),
        ("daemon:7", {"uid": 2, "gid": 7}),
        ("4242:audio", {"uid": 4242, "gid": 63}),
    ],
)
def test_user_forms(
    store: laminae.Store, tmp_path: Path, user: str, expected: dict[str, Any]
) -> None:
    crafted(store, {**RUN_CONFIG, "User": user})
    made = make_bundle(store, "box", tmp_path / "b")
    assert json.loads(made.config_path.read_text())["process"]["user"] == expected


@crun
@pytest.mark.root
@pytest.mark.parametrize(
    ("user", "named"),
    [("nobody-here", "user 'nobody-here'"), ("app:no-such-group", "group 'no-such-group'")],
)
def test_unknown_user_or_group_fails_naming_it_and_leaves_nothing(
    store: laminae.Store, tmp_path: Path, user: str, named: str
) -> None:
    box = crafted(store, {**RUN_CONFIG, "User": user})
    with pytest.raises(laminae.InvalidArgument, match=named):
        make_bundle(store, "box", tmp_path / "b")
    assert mounted(store, box) == 0
    assert not (tmp_path / "b").exists()  # made by make_bundle, so removed again


@crun
@pytest.mark.root
def test_an_image_without_a_command_needs_args(store: laminae.Store, tmp_path: Path) -> None:
    box = crafted(store, {"Env": ["A=1"]})
    with pytest.raises(laminae.InvalidArgument, match="neither Entrypoint nor Cmd"):
        make_bundle(store, "box", tmp_path / "b")
    assert mounted(store, box) == 0
    assert not (tmp_path / "b").exists()
    with pytest.raises(laminae.NotFound, match="bind mount source"):
        make_bundle(store, "box", tmp_path / "b", args=["/x"], mounts=[BindMount("/nope", "/n")])
    with pytest.raises(laminae.InvalidArgument, match="runtime 'no-such-runtime'"):
        make_bundle(store, "box", tmp_path / "b", args=["/x"], runtime="no-such-runtime")
    assert not (tmp_path / "b").exists()
    made = make_bundle(store, "box", tmp_path / "b", args=["/bin/x"])
    assert json.loads(made.config_path.read_text())["process"]["args"] == ["/bin/x"]


@crun
@pytest.mark.root
def test_a_malformed_image_config_is_named(store: laminae.Store, tmp_path: Path) -> None:
    crafted(store, {**RUN_CONFIG, "Env": ["NOEQUALS"]})
    with pytest.raises(laminae.InvalidArgument, match="'NOEQUALS' is not NAME=VALUE"):
        make_bundle(store, "box", tmp_path / "b")


# --- the account files are the container's own --------------------------------------------


@crun
@pytest.mark.root
def test_a_passwd_symlink_out_of_the_rootfs_is_not_followed(
    store: laminae.Store, tmp_path: Path
) -> None:
    # The host holds a passwd naming "evil"; the container's /etc/passwd points at it.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"evil:x:666:666::/:/bin/sh\n")
    box = crafted(store, {**RUN_CONFIG, "User": "evil"})
    root = store.mount_container("box")
    try:
        os.unlink(root / "etc" / "passwd")
        os.symlink(outside / "passwd", root / "etc" / "passwd")
    finally:
        store.unmount_container("box")
    with pytest.raises(laminae.InvalidArgument, match="no user 'evil'"):
        make_bundle(store, "box", tmp_path / "b")
    assert mounted(store, box) == 0


@pytest.fixture(params=["openat2", "walk"])
def resolution(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of resolving inside the root: openat2 where the kernel has it, and the walk
    older kernels get (chosen by switching off openat2, which the kernel here does have)."""
    if request.param == "walk":
        monkeypatch.setattr(laminae.kernel._paths, "openat2_available", lambda: False)
    elif not laminae.kernel._paths.openat2_available():
        pytest.skip("this kernel has no openat2")
    return str(request.param)


@pytest.mark.parametrize("how", ["absolute", "relative", "through-dir"])
@pytest.mark.usefixtures("resolution")
def test_resolve_user_stays_in_the_root(tmp_path: Path, how: str) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_bytes(b"evil:x:666:666::/:/bin/sh\n")
    if how == "absolute":
        (rootfs / "etc" / "passwd").symlink_to(outside / "passwd")
    elif how == "relative":
        (rootfs / "etc" / "passwd").symlink_to("../" * 20 + str(outside / "passwd").lstrip("/"))
    else:
        (rootfs / "etc").rmdir()
        (rootfs / "etc").symlink_to(outside)
    with pytest.raises(laminae.InvalidArgument, match="no user 'evil'"):
        resolve_user(rootfs, "evil")


@pytest.mark.usefixtures("resolution")
def test_resolve_user_follows_symlinks_inside_the_root(tmp_path: Path) -> None:
    # An absolute link means the container's /, as it would inside the container.
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc" / "real").mkdir(parents=True)
    (rootfs / "etc" / "real" / "accounts").write_bytes(b"app:x:1000:1000::/:/bin/sh\n")
    (rootfs / "etc" / "real" / "groups").write_bytes(b"ops:x:5:app\n")
    (rootfs / "etc" / "passwd").symlink_to("/etc/real/accounts")
    (rootfs / "etc" / "link").symlink_to("real")
    (rootfs / "etc" / "group").symlink_to("link/../link/groups")
    assert resolve_user(rootfs, "app") == {"uid": 1000, "gid": 1000, "additionalGids": [5]}


@pytest.mark.usefixtures("resolution")
def test_a_symlink_loop_is_no_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").symlink_to("passwd")
    assert resolve_user(tmp_path, "0") == {"uid": 0, "gid": 0}


@pytest.mark.usefixtures("resolution")
def test_a_fifo_for_passwd_does_not_hang(tmp_path: Path) -> None:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True)
    os.mkfifo(rootfs / "etc" / "passwd")
    outcome: list[BaseException] = []

    def lookup() -> None:
        try:
            resolve_user(rootfs, "app")
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "opening a FIFO /etc/passwd blocked"
    assert len(outcome) == 1 and isinstance(outcome[0], laminae.InvalidArgument)


def test_missing_account_files_leave_numeric_users(tmp_path: Path) -> None:
    assert resolve_user(tmp_path, "") == {"uid": 0, "gid": 0}
    assert resolve_user(tmp_path, "7:8") == {"uid": 7, "gid": 8}
    with pytest.raises(laminae.InvalidArgument, match="out of range"):
        resolve_user(tmp_path, "4294967295")
    with pytest.raises(laminae.InvalidArgument, match="empty group"):
        resolve_user(tmp_path, "7:")


# --- values -----------------------------------------------------------------------------------


def test_merge_env_keeps_order_and_lets_the_image_win() -> None:
    assert merge_env(["PATH=/bin", "TERM=xterm"], ["A=1", "PATH=/usr/bin", "A=2"]) == [
        "PATH=/usr/bin",
        "TERM=xterm",
        "A=2",
    ]


def test_bind_mount_parse() -> None:
    assert BindMount.parse("/src:/dst") == BindMount(Path("/src"), "/dst", readonly=True)
    assert BindMount.parse("rel:/dst:rw") == BindMount(Path("rel"), "/dst", readonly=False)
    assert BindMount.parse("/s:/d:rw").to_oci() == {
        "destination": "/d",
        "type": "bind",
        "source": "/s",
        "options": ["rbind", "rw"],
    }
    for bad in ("/src", "/src:/dst:rx", ":/dst", "/a:/b:ro:x"):
        with pytest.raises(laminae.InvalidArgument, match="SRC:DST"):
            BindMount.parse(bad)
    for bad in ("dst", "/", "/a/../b"):
        with pytest.raises(laminae.InvalidArgument, match="destination"):
            BindMount(Path("/src"), bad)


# --- the directory ----------------------------------------------------------------------------


@crun
@pytest.mark.root
def test_a_foreign_config_json_is_refused(store: laminae.Store, tmp_path: Path) -> None:
    box = crafted(store, RUN_CONFIG)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "config.json").write_text('{"mine": true}')
    with pytest.raises(laminae.AlreadyExists, match="did not write"):
        make_bundle(store, "box", tmp_path / "b")
    assert (tmp_path / "b" / "config.json").read_text() == '{"mine": true}'
    assert not (tmp_path / "b" / MARKER_NAME).exists()
    assert mounted(store, box) == 0


@crun
@pytest.mark.root
def test_rebundling_replaces_our_own_bundle(store: laminae.Store, tmp_path: Path) -> None:
    box = crafted(store, RUN_CONFIG)
    make_bundle(store, "box", tmp_path / "b", args=["/first"])
    made = make_bundle(store, "box", tmp_path / "b", args=["/second"])
    assert json.loads(made.config_path.read_text())["process"]["args"] == ["/second"]
    assert mounted(store, box) == 1  # the first bundle's mount was dropped
    remove_bundle(store, made.directory)
    assert not made.directory.exists()  # still the directory make_bundle made


@crun
@pytest.mark.root
def test_remove_bundle_unmounts_and_removes_what_it_wrote(
    store: laminae.Store, tmp_path: Path
) -> None:
    box = crafted(store, RUN_CONFIG)
    # A directory that was there before stays, with the caller's files.
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes").write_text("mine")
    kept = make_bundle(store, "box", tmp_path / "kept")
    remove_bundle(store, kept.directory)
    assert mounted(store, box) == 0
    assert not is_mountpoint(str(kept.rootfs))
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["notes"]
    # One it made goes.
    made = make_bundle(store, "box", tmp_path / "new" / "bundle")
    remove_bundle(store, made.directory)
    assert not made.directory.exists()
    with pytest.raises(laminae.NotFound, match="not a laminae bundle"):
        remove_bundle(store, made.directory)


@crun
@pytest.mark.root
def test_remove_bundle_of_a_removed_container_removes_the_files(
    store: laminae.Store, tmp_path: Path
) -> None:
    crafted(store, RUN_CONFIG)
    made = make_bundle(store, "box", tmp_path / "b")
    store.remove_container("box", force=True)
    remove_bundle(store, made.directory)
    assert not made.directory.exists()


@crun
@pytest.mark.root
def test_remove_bundle_refuses_another_store(store: laminae.Store, tmp_path: Path) -> None:
    crafted(store, RUN_CONFIG)
    made = make_bundle(store, "box", tmp_path / "b")
    other = laminae.open_store(tmp_path / "other", runroot=tmp_path / "other-run", driver="vfs")
    with other, pytest.raises(laminae.FailedPrecondition, match=f"store {store.root}"):
        remove_bundle(other, made.directory)
    assert (made.directory / "config.json").exists()


# --- the CLI ----------------------------------------------------------------------------------


@crun
@pytest.mark.root
def test_cli_bundle_and_unbundle(store: laminae.Store, tmp_path: Path) -> None:
    box = crafted(store, RUN_CONFIG)
    tools = tmp_path / "tools"
    tools.mkdir()
    bundle_dir = tmp_path / "bundle"
    where = ["--root", str(store.root), "--runroot", str(store.runroot), "--driver", "vfs"]
    runner = CliRunner()
    mount = f"{tools}:/opt/tools"
    command = ["--", "/opt/tools/sh", "-c", "echo hi"]
    result = runner.invoke(
        cli, [*where, "bundle", "box", str(bundle_dir), "--mount", mount, "-t", *command]
    )
    assert result.exit_code == 0, result.output
    assert result.output == f"{bundle_dir}\n"
    config = json.loads((bundle_dir / "config.json").read_text())
    assert config["process"]["args"] == ["/opt/tools/sh", "-c", "echo hi"]
    assert config["process"]["terminal"] is True
    assert config["mounts"][-1]["options"] == ["rbind", "ro"]
    assert mounted(store, box) == 1

    # The marker is enough: no --root, --runroot or --driver.
    result = runner.invoke(cli, ["unbundle", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    assert mounted(store, box) == 0
    assert not bundle_dir.exists()

    result = runner.invoke(cli, ["unbundle", str(bundle_dir)])
    assert result.exit_code == laminae.NotFound.exit_code
    assert result.output.count("\n") == 1 and "laminae: error:" in result.output


@crun
@pytest.mark.root
def test_cli_bundle_errors(store: laminae.Store, tmp_path: Path) -> None:
    crafted(store, {**RUN_CONFIG, "User": "ghost"})
    where = ["--root", str(store.root), "--runroot", str(store.runroot), "--driver", "vfs"]
    runner = CliRunner()
    result = runner.invoke(cli, [*where, "bundle", "box", str(tmp_path / "b")])
    assert result.exit_code == laminae.InvalidArgument.exit_code
    assert "user 'ghost'" in result.output
    result = runner.invoke(cli, [*where, "bundle", "box", str(tmp_path / "b"), "--mount", "/x"])
    assert result.exit_code == 2 and "SRC:DST" in result.output
    result = runner.invoke(cli, [*where, "bundle", "nope", str(tmp_path / "b")])
    assert result.exit_code == laminae.NotFound.exit_code
