"""The ``laminae`` command: every command through click's runner, and the installed script.

The runner tests call :data:`laminae.cli._main.cli` in-process; the script tests run
``.venv/bin/laminae`` as a user would, with a temporary ``--root``/``--runroot`` and vfs.
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
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import pytest
import terminal
from click.testing import CliRunner, Result
from tarbuild import make_tar

import laminae
from laminae.cli import _main as _cli
from laminae.cli._main import cli

SCRIPT = Path(sys.executable).with_name("laminae")


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


BASE_TAR = make_tar({"etc/hostname": b"box\n", "etc/gone": b"x\n"}, dirs=("etc",))
TOP_TAR = make_tar({"etc/hostname": b"other\n", "etc/motd": b"hi\n"}, whiteouts=("etc/gone",))


@pytest.fixture(autouse=True)
def _environment(clean_environment: None) -> None:
    """Every test here runs in conftest's clean environment."""


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """An empty storage.toml, so the host's files never count."""
    path = tmp_path / "storage.toml"
    path.write_text("")
    return path


@pytest.fixture
def store_args(tmp_path: Path, config: Path) -> list[str]:
    return [
        "--config",
        str(config),
        "--root",
        str(tmp_path / "root"),
        "--runroot",
        str(tmp_path / "run"),
        "--driver",
        "vfs",
    ]


Invoke = Callable[..., Result]


@pytest.fixture
def invoke(store_args: list[str]) -> Invoke:
    """Run ``laminae <store options> ARGS`` in-process; ``input`` is stdin bytes."""

    def run(*args: str, input: bytes | None = None, expect: int | None = 0) -> Result:
        result = CliRunner().invoke(cli, [*store_args, *args], input=input)
        if expect is not None:
            assert result.exit_code == expect, (result.stdout, result.stderr)
        return result

    return run


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def one_error_line(result: Result | subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command, without its prefix."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("laminae: error: ")
    return lines[0].removeprefix("laminae: error: ")


@pytest.fixture
def base(invoke: Invoke, tmp_path: Path) -> str:
    """A committed base layer named 'base'; its id."""
    tar = write(tmp_path / "base.tar", BASE_TAR)
    return invoke("layer", "apply", "--name", "base", str(tar)).stdout.strip()


@pytest.fixture
def top(invoke: Invoke, base: str) -> str:
    """A committed layer on 'base', named 'top', applied from stdin; its id."""
    return invoke(
        "layer", "apply", "--parent", "base", "--name", "top", "-", input=TOP_TAR
    ).stdout.strip()


# -- layers ---------------------------------------------------------------------------------


def test_apply_prints_the_chain_id(base: str, top: str) -> None:
    assert base == digest(BASE_TAR)
    assert top == laminae.chain_id([digest(BASE_TAR), digest(TOP_TAR)])


@pytest.mark.parametrize("compress", [gzip.compress, lambda data: data], ids=["gzip", "plain"])
def test_apply_from_stdin_detects_compression(
    invoke: Invoke, compress: Callable[[bytes], bytes]
) -> None:
    result = invoke("layer", "apply", "-", input=compress(BASE_TAR))
    assert result.stdout == digest(BASE_TAR) + "\n"


def test_apply_checks_diff_id_and_digest(invoke: Invoke, tmp_path: Path) -> None:
    packed = gzip.compress(BASE_TAR)
    tar = write(tmp_path / "layer.tar.gz", packed)
    ok = invoke(
        "layer", "apply", "--diff-id", digest(BASE_TAR), "--digest", digest(packed), str(tar)
    )
    assert ok.stdout.strip() == digest(BASE_TAR)
    wrong = invoke("layer", "apply", "--diff-id", digest(b"other"), str(tar), expect=8)
    assert digest(b"other") in one_error_line(wrong)


def test_ls_prints_one_tab_separated_line_per_layer(invoke: Invoke, base: str, top: str) -> None:
    lines = invoke("layer", "ls").stdout.splitlines()
    rows = [line.split("\t") for line in lines]
    assert [row[:4] for row in rows] == [
        [base, "committed", "-", "base"],
        [top, "committed", base, "top"],
    ]
    assert all(len(row) == 7 for row in rows)


def test_ls_json(invoke: Invoke, base: str, top: str) -> None:
    layers = json.loads(invoke("layer", "ls", "--json").stdout)
    assert [(item["id"], item["parent"], item["names"]) for item in layers] == [
        (base, None, ["base"]),
        (top, base, ["top"]),
    ]
    first = layers[0]
    assert first["kind"] == "committed"
    assert first["diff_id"] == digest(BASE_TAR)
    assert first["size"] == len(BASE_TAR)
    assert first["labels"] == {}
    assert first["mount_point"] is None
    assert isinstance(datetime.fromisoformat(first["created"]), datetime)


def test_ls_by_kind(invoke: Invoke, base: str) -> None:
    invoke("layer", "create", "--parent", "base", "work")
    active = json.loads(invoke("layer", "ls", "--json", "--kind", "active").stdout)
    assert [item["id"] for item in active] == ["work"]
    committed = json.loads(invoke("layer", "ls", "--json", "--kind", "committed").stdout)
    assert [item["id"] for item in committed] == [base]


def test_ls_of_an_empty_store_prints_nothing(invoke: Invoke) -> None:
    assert invoke("layer", "ls").stdout == ""
    assert json.loads(invoke("layer", "ls", "--json").stdout) == []


def test_create_active_and_view_layers(invoke: Invoke, base: str) -> None:
    assert (
        invoke("layer", "create", "--label", "a=1", "--label", "b=x=y", "work").stdout == "work\n"
    )
    view = invoke("layer", "create", "--view", "--parent", base).stdout.strip()
    work = json.loads(invoke("layer", "inspect", "work", "--json").stdout)
    assert (work["kind"], work["parent"], work["labels"]) == (
        "active",
        None,
        {"a": "1", "b": "x=y"},
    )
    made = json.loads(invoke("layer", "inspect", view, "--json").stdout)
    assert (made["kind"], made["parent"]) == ("view", base)


def test_inspect_by_name_and_prefix(invoke: Invoke, base: str, top: str) -> None:
    by_name = json.loads(invoke("layer", "inspect", "top", "--json").stdout)
    prefix = top.removeprefix("sha256:")[:12]
    by_prefix = json.loads(invoke("layer", "inspect", prefix, "--json").stdout)
    assert by_name == by_prefix
    assert (by_name["id"], by_name["parent"], by_name["depth"]) == (top, base, 1)


def test_inspect_plain_is_key_tab_value(invoke: Invoke, base: str, top: str) -> None:
    lines = invoke("layer", "inspect", "top").stdout.splitlines()
    fields = dict(line.split("\t", 1) for line in lines)
    assert fields["id"] == top
    assert fields["parent"] == base
    assert fields["kind"] == "committed"
    assert fields["names"] == "top"
    assert fields["mount_point"] == "-"


def test_changes_docker_style(invoke: Invoke, top: str) -> None:
    assert invoke("layer", "changes", "top").stdout.splitlines() == [
        "D /etc/gone",
        "C /etc/hostname",
        "A /etc/motd",
    ]


def test_changes_json(invoke: Invoke, top: str) -> None:
    changes = json.loads(invoke("layer", "changes", top, "--json").stdout)
    assert changes == [
        {"path": "/etc/gone", "kind": "deleted"},
        {"path": "/etc/hostname", "kind": "modified"},
        {"path": "/etc/motd", "kind": "added"},
    ]


def test_changes_of_a_base_layer_are_all_additions(invoke: Invoke, base: str) -> None:
    assert invoke("layer", "changes", "base").stdout.splitlines() == [
        "A /etc",
        "A /etc/gone",
        "A /etc/hostname",
    ]


def test_export_then_apply_gives_the_same_diff_id(
    invoke: Invoke, top: str, tmp_path: Path, config: Path
) -> None:
    out = tmp_path / "top.tar"
    diff_id, layer_digest, size = invoke("layer", "export", "top", "-o", str(out)).stdout.split(
        "\t"
    )
    data = out.read_bytes()
    assert (diff_id, layer_digest, int(size)) == (digest(data), digest(data), len(data))
    # Into a second store, on the same base: the exported tar is the same layer.
    other = [
        "--config", str(config), "--root", str(tmp_path / "root2"),
        "--runroot", str(tmp_path / "run2"), "--driver", "vfs",
    ]  # fmt: skip
    runner = CliRunner()
    assert runner.invoke(cli, [*other, "layer", "apply", "-"], input=BASE_TAR).exit_code == 0
    again = runner.invoke(cli, [*other, "layer", "apply", "--parent", digest(BASE_TAR), str(out)])
    assert again.exit_code == 0, again.stderr
    shown = json.loads(
        runner.invoke(cli, [*other, "layer", "inspect", "--json", again.stdout.strip()]).stdout
    )
    assert shown["diff_id"] == diff_id
    # The exported tar of the re-applied layer has the same DiffID again.
    out2 = tmp_path / "again.tar"
    second = runner.invoke(cli, [*other, "layer", "export", shown["id"], "-o", str(out2)])
    assert second.stdout.split("\t")[0] == diff_id


def test_export_to_stdout_compressed(invoke: Invoke, base: str) -> None:
    plain = invoke("layer", "export", "base").stdout_bytes
    packed = invoke("layer", "export", "base", "--compression", "gzip").stdout_bytes
    assert gzip.decompress(packed) == plain
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        assert sorted(tar.getnames()) == ["etc", "etc/gone", "etc/hostname"]


def test_failed_export_leaves_no_file(invoke: Invoke, tmp_path: Path) -> None:
    out = tmp_path / "nothing.tar"
    invoke("layer", "export", "nosuch", "-o", str(out), expect=3)
    assert not out.exists()
    assert list(tmp_path.glob(".__atomic-write*")) == []


def test_rm_removes_and_prints_ids(invoke: Invoke, base: str, top: str) -> None:
    assert invoke("layer", "rm", "top", "base").stdout.splitlines() == [top, base]
    assert invoke("layer", "ls").stdout == ""


def test_rm_of_a_layer_with_children_fails(invoke: Invoke, base: str, top: str) -> None:
    result = invoke("layer", "rm", "base", expect=5)
    assert "'base'" in one_error_line(result)
    assert len(invoke("layer", "ls").stdout.splitlines()) == 2


def test_info(invoke: Invoke, base: str, tmp_path: Path) -> None:
    fields = dict(line.split("\t", 1) for line in invoke("info").stdout.splitlines())
    assert fields["driver"] == "vfs"
    assert fields["root"] == str(tmp_path / "root")
    assert fields["layers"] == "1"
    assert "capabilities.max_depth" in fields
    shown = json.loads(invoke("info", "--json").stdout)
    assert (shown["driver"], shown["root"], shown["layers"]) == ("vfs", str(tmp_path / "root"), 1)
    assert shown["driver_origin"].startswith("laminae ")


# -- drivers --------------------------------------------------------------------------------


def test_drivers_lists_vfs_as_usable(invoke: Invoke) -> None:
    rows = [line.split("\t") for line in invoke("drivers").stdout.splitlines()]
    by_name = {row[0]: row for row in rows}
    assert by_name["vfs"][1:] == ["10", by_name["vfs"][2], "ok", "--driver"]
    assert by_name["vfs"][2].startswith("laminae ")
    assert [int(row[1]) for row in rows] == sorted((int(row[1]) for row in rows), reverse=True)


def test_drivers_json(invoke: Invoke, tmp_path: Path) -> None:
    entries = {e["name"]: e for e in json.loads(invoke("drivers", "--json").stdout)}
    vfs = entries["vfs"]
    assert vfs["unavailable"] is None
    assert vfs["home"] == str(tmp_path / "root" / "vfs")
    assert isinstance(vfs["capabilities"]["features"], list)


def test_drivers_works_where_no_store_can_be_opened(config: Path, tmp_path: Path) -> None:
    not_a_dir = write(tmp_path / "file", b"")
    args = ["--config", str(config), "--root", str(not_a_dir)]
    assert CliRunner().invoke(cli, [*args, "info"]).exit_code == 2
    result = CliRunner().invoke(cli, [*args, "drivers"])
    assert result.exit_code == 0, result.stderr
    assert "vfs" in result.stdout
    assert not (tmp_path / "file" / "vfs").exists()


# -- check and repair -----------------------------------------------------------------------


@pytest.fixture
def orphan(tmp_path: Path, base: str) -> str:
    """Storage on disk that no layer owns, planted behind the store's back."""
    storage_id = "feedface" * 4
    with laminae.open_store(tmp_path / "root", runroot=tmp_path / "run", driver="vfs") as store:
        store.driver.create(storage_id, [], True)
    return storage_id


def test_check_on_a_clean_store(invoke: Invoke, base: str) -> None:
    assert invoke("check").stdout == ""
    report = json.loads(invoke("check", "--json").stdout)
    assert all(value == [] for value in report.values())


def test_check_reports_an_orphan_and_repair_removes_it(invoke: Invoke, orphan: str) -> None:
    found = invoke("check", expect=8)
    assert found.stdout.splitlines() == [f"orphan storage {orphan}: on disk, owned by no layer"]
    assert "repair" in one_error_line(found)
    report = json.loads(invoke("check", "--json", expect=8).stdout)
    assert report["orphan_storage"] == [orphan]
    kept = invoke("repair")
    assert kept.stdout.splitlines() == [
        f"kept orphan storage {orphan}: owned by no layer; --force removes it"
    ]
    invoke("check", expect=8)
    fixed = invoke("repair", "--force")
    assert orphan in fixed.stdout
    assert invoke("check").stdout == ""
    assert json.loads(invoke("repair", "--json").stdout)["orphan_storage"] == []


def test_repair_json(invoke: Invoke, orphan: str) -> None:
    assert json.loads(invoke("repair", "--force", "--json").stdout)["orphan_storage"] == [orphan]


# -- errors ---------------------------------------------------------------------------------


def test_unknown_ref_is_not_found(invoke: Invoke, base: str) -> None:
    for command in (["layer", "inspect"], ["layer", "rm"], ["layer", "changes"]):
        result = invoke(*command, "nosuchlayer", expect=3)
        assert "'nosuchlayer'" in one_error_line(result)
        assert result.stdout == ""


def test_bad_tar_is_invalid(invoke: Invoke) -> None:
    result = invoke("layer", "apply", "-", input=b"this is not a tar" * 100, expect=2)
    one_error_line(result)


def test_missing_tar_file_is_not_found(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("layer", "apply", str(tmp_path / "missing.tar"), expect=3)
    assert "missing.tar" in one_error_line(result)


def test_bad_config_names_file_and_key(config: Path, tmp_path: Path) -> None:
    config.write_text('[storage]\ndrvier = "vfs"\n')
    result = CliRunner().invoke(cli, ["--config", str(config), "--root", str(tmp_path), "info"])
    assert result.exit_code == 2
    assert one_error_line(result) == f"{config}: unknown key 'storage.drvier'"


def test_missing_config_file_is_invalid(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--config", str(tmp_path / "none.toml"), "layer", "ls"])
    assert result.exit_code == 2
    assert "none.toml" in one_error_line(result)


def test_unknown_driver_is_invalid(store_args: list[str]) -> None:
    args = [*store_args[:-1], "nosuchdriver", "info"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert "nosuchdriver" in one_error_line(result)


def test_no_traceback_without_debug(invoke: Invoke) -> None:
    assert "Traceback" not in invoke("layer", "inspect", "nosuch", expect=3).stderr


def test_debug_traceback(store_args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["--debug", *store_args, "layer", "inspect", "nosuch"])
    assert result.exit_code == 3
    lines = result.stderr.splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert "NotFound" in result.stderr
    assert lines[-1] == "laminae: error: layer 'nosuch': no such layer"


def test_unexpected_error_is_one_line_and_exit_1(
    invoke: Invoke, monkeypatch: pytest.MonkeyPatch, store_args: list[str]
) -> None:
    def broken(self: laminae.Store) -> None:
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(laminae.Store, "info", broken)
    result = invoke("info", expect=1)
    assert one_error_line(result) == "RuntimeError: something broke"
    debug = CliRunner().invoke(cli, ["--debug", *store_args, "info"])
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr and "RuntimeError" in debug.stderr


def test_usage_errors_keep_clicks_exit_code(invoke: Invoke) -> None:
    assert invoke("layer", "frobnicate", expect=2).stdout == ""
    invoke("layer", "ls", "--kind", "nosuch", expect=2)
    invoke("--storage-opt", "novalue", "info", expect=2)
    invoke("layer", "create", "--label", "=v", expect=2)


def test_storage_opt_reaches_the_driver(invoke: Invoke) -> None:
    result = invoke("--storage-opt", "nosuchoption=1", "info", expect=None)
    assert result.exit_code == 2
    assert "nosuchoption" in one_error_line(result)


def test_export_refuses_a_terminal(store_args: list[str], base: str) -> None:
    result = run_in_pty([*store_args, "layer", "export", "base"])
    assert result.returncode == 2
    assert result.stdout.splitlines() == [
        "laminae: error: refusing to write a tar to a terminal: redirect stdout or use -o FILE"
    ]


# -- the installed script -------------------------------------------------------------------


def script_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("LAMINAE_")}


def run_script(
    args: Sequence[str], *, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(SCRIPT), *args], input=input, capture_output=True, env=script_env(), check=False
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


def run_in_pty(args: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run the script with stdout on a terminal; its stdout and stderr read back together."""
    return terminal.run_in_pty(
        [str(SCRIPT), *args], env={**script_env(), "COLUMNS": "200", "TERM": "dumb"}
    )


def test_script_apply_ls_inspect_rm(store_args: list[str], tmp_path: Path) -> None:
    applied = run_script([*store_args, "layer", "apply", "--name", "base", "-"], input=BASE_TAR)
    assert applied.returncode == 0, applied.stderr
    layer_id = applied.stdout.strip()
    assert layer_id == digest(BASE_TAR)
    listed = run_script([*store_args, "layer", "ls", "--json"])
    assert [item["id"] for item in json.loads(listed.stdout)] == [layer_id]
    plain = run_script([*store_args, "layer", "ls"])
    assert plain.stdout.split("\t")[:2] == [layer_id, "committed"]
    shown = run_script([*store_args, "layer", "inspect", "base", "--json"])
    assert json.loads(shown.stdout)["names"] == ["base"]
    removed = run_script([*store_args, "layer", "rm", "base"])
    assert (removed.returncode, removed.stdout) == (0, layer_id + "\n")


def test_script_table_on_a_terminal(store_args: list[str], base: str) -> None:
    result = run_in_pty([*store_args, "layer", "ls"])
    assert result.returncode == 0, result.stdout
    header, *rows = [line for line in result.stdout.splitlines() if line.strip(" -─")]
    assert header.split() == ["ID", "KIND", "PARENT", "NAMES", "SIZE", "CREATED", "MOUNTS"]
    # Ids are cut to 12 digits in a table, as docker does.
    assert rows[0].split()[:2] == [base.removeprefix("sha256:")[:12], "committed"]


def test_script_errors(store_args: list[str], config: Path, tmp_path: Path) -> None:
    missing = run_script([*store_args, "layer", "inspect", "nosuch"])
    assert missing.returncode == 3
    assert one_error_line(missing) == "layer 'nosuch': no such layer"
    bad_tar = run_script([*store_args, "layer", "apply", "-"], input=b"\x00garbage" * 200)
    assert bad_tar.returncode == 2
    one_error_line(bad_tar)
    config.write_text("[storage]\ndriver = 5\n")
    bad_config = run_script([*store_args, "info"])
    assert bad_config.returncode == 2
    assert "'storage.driver'" in one_error_line(bad_config)
    debug = run_script(["--debug", *store_args, "info"])
    assert debug.returncode == 2
    # The cause (cattrs' exception group) is part of the traceback.
    assert "Exception Group Traceback (most recent call last):" in debug.stderr
    assert "InvalidArgument" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("laminae: error: ")


def test_script_version_and_help() -> None:
    assert run_script(["--version"]).stdout.startswith("laminae, version ")
    assert "layer" in run_script(["--help"]).stdout


@pytest.mark.root
def test_script_mount_read_unmount(store_args: list[str], base: str, tmp_path: Path) -> None:
    mounted = run_script([*store_args, "layer", "mount", "base"])
    assert mounted.returncode == 0, mounted.stderr
    path = Path(mounted.stdout.strip())
    try:
        assert (path / "etc" / "hostname").read_bytes() == b"box\n"
        shown = json.loads(run_script([*store_args, "layer", "inspect", "base", "--json"]).stdout)
        assert (shown["mount_count"], shown["mount_point"]) == (1, str(path))
    finally:
        unmounted = run_script([*store_args, "layer", "unmount", "base"])
    assert unmounted.returncode == 0, unmounted.stderr
    shown = json.loads(run_script([*store_args, "layer", "inspect", "base", "--json"]).stdout)
    assert (shown["mount_count"], shown["mount_point"]) == (0, None)
    again = run_script([*store_args, "layer", "unmount", "base"])
    assert again.returncode == 5
    assert "'base'" in one_error_line(again)


@pytest.mark.root
def test_mount_write_changes(invoke: Invoke, base: str) -> None:
    invoke("layer", "create", "--parent", "base", "work")
    path = Path(invoke("layer", "mount", "work").stdout.strip())
    try:
        (path / "new").write_bytes(b"data")
        (path / "etc" / "gone").unlink()
    finally:
        invoke("layer", "unmount", "work", "--force")
    lines = invoke("layer", "changes", "work").stdout.splitlines()
    # Whether /etc itself shows as changed is the change walker's business, not the CLI's.
    assert [line for line in lines if line != "C /etc"] == ["D /etc/gone", "A /new"]


@pytest.mark.root
def test_mount_readonly(invoke: Invoke, base: str) -> None:
    invoke("layer", "create", "--parent", "base", "work")
    path = Path(invoke("layer", "mount", "--readonly", "work").stdout.strip())
    try:
        with pytest.raises(OSError, match="Read-only"):
            (path / "new").write_bytes(b"data")
    finally:
        invoke("layer", "unmount", "work")


def test_json_converter_writes_paths_enums_and_datetimes() -> None:
    value = {"p": Path("/a/b"), "k": laminae.LayerKind.VIEW, "t": datetime(2026, 1, 2, 3, 4, 5)}
    assert json.loads(_cli._json().dumps(value)) == {
        "p": "/a/b",
        "k": "view",
        "t": "2026-01-02T03:04:05",
    }


def test_script_is_quiet_when_the_reader_goes_away(store_args: list[str]) -> None:
    big = make_tar({"big": os.urandom(4 << 20)})
    assert (
        run_script([*store_args, "layer", "apply", "--name", "big", "-"], input=big).returncode == 0
    )
    process = subprocess.Popen(
        [str(SCRIPT), *store_args, "layer", "export", "big"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=script_env(),
    )
    assert process.stdout is not None and process.stderr is not None
    assert len(process.stdout.read(10)) == 10
    process.stdout.close()  # like `| head -c 10`
    with process.stderr:
        errors = process.stderr.read()
    assert process.wait() == 1
    assert errors == b""
