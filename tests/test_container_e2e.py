"""End to end: the example image, run by a real OCI runtime, diffed, committed and exported.

For each built-in driver (and for runc on overlay): import ``examples/images/hello-image.oci
.tar``, create a container, bundle it with the host's static busybox bound on ``/opt/host``,
and run a command with ``crun run`` (or ``runc run``) that writes a file and deletes one the
image has. Then the container's changes are exactly that file added, that file deleted and
their parent directories changed; a commit gives an image whose new container sees both; the
exported layer, applied by GNU tar (whiteouts removed by hand, as umoci does) onto a copy of
the image's tree, gives the container's tree; and umoci unpacks the committed image, exported
as an OCI layout, to the same tree.

Nothing here looks inside laminae: trees are read with ``os`` calls from real mounts, and the
runtime, GNU tar and umoci are the real programs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from tools import require_tool
from trees import read_tree

import laminae
from laminae.cli._main import cli
from laminae.containers._bundle import BindMount, make_bundle, remove_bundle
from laminae.kernel import _filesystems

pytestmark = pytest.mark.root

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "images" / "hello-image.oci.tar"
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: no libraries needed in the image
RUN_TIMEOUT = 120

NEW_FILE = "/var/lib/hello/greeting"  # its parent is in the image (empty)
GONE_FILE = "/etc/hello.conf"
SCRIPT = (
    f'echo "$GREETING from $(/opt/host/busybox hostname) in $PWD" > {NEW_FILE}'
    f" && /opt/host/busybox rm {GONE_FILE}"
)
GREETING = "hello from e2e in /\n"  # the image's Env and WorkingDir, the container's name

CGROUP2_SUPER_MAGIC = 0x63677270


def A(path: str) -> laminae.Change:
    return laminae.Change(path, laminae.ChangeKind.ADDED)


def C(path: str) -> laminae.Change:
    return laminae.Change(path, laminae.ChangeKind.MODIFIED)


def D(path: str) -> laminae.Change:
    return laminae.Change(path, laminae.ChangeKind.DELETED)


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[laminae.Store]:
    driver = request.param
    btrfs = driver == "btrfs"
    root = request.getfixturevalue("btrfs") / "store" if btrfs else tmp_path / "root"
    with laminae.open_store(root, runroot=tmp_path / "run", driver=driver) as s:
        yield s
        for layer in s.layers():
            if layer.mount_count:
                s.unmount(layer.id, force=True)


@pytest.fixture
def host_tools(tmp_path: Path) -> Path:
    """A directory holding a copy of the host's static busybox, to bind on /opt/host."""
    if not BUSYBOX.exists():
        require_tool("busybox")  # busybox-static: skips, or fails under CI=true
    tools = tmp_path / "host-tools"
    tools.mkdir()
    shutil.copy2(BUSYBOX, tools / "busybox")
    return tools


# --- the runtime --------------------------------------------------------------------------------


def _crun_refuses_this_cgroup_layout() -> bool:
    """Whether this host mounts cgroups "hybrid" with controllers on the v2 hierarchy.

    crun refuses that layout ("cgroups in hybrid mode not supported, drop all controllers from
    cgroupv2", src/libcrun/cgroup.c), whatever its cgroup manager; runc accepts it. Hosts
    that boot with pure v2 or pure v1 (every current distribution) never see this.
    """
    try:
        if _filesystems.statfs_type("/sys/fs/cgroup") != _filesystems.TMPFS_MAGIC:
            return False
        if _filesystems.statfs_type("/sys/fs/cgroup/unified") != CGROUP2_SUPER_MAGIC:
            return False
        return bool(Path("/sys/fs/cgroup/unified/cgroup.controllers").read_text().split())
    except OSError:
        return False


def run_bundle(runtime: str, bundle: Path, container_id: str, state: Path) -> None:
    """``<runtime> --root STATE run --bundle BUNDLE ID``, waited for; checks exit 0 and that
    no container is left in STATE (``run`` returns when the container's process is gone).
    """
    require_tool(runtime)
    command = [runtime, "--root", str(state), "run", "--bundle", str(bundle), container_id]
    if runtime == "crun" and _crun_refuses_this_cgroup_layout():
        # Hide the v2 hierarchy from crun only: in a mount namespace of its own, which still
        # sees the store's mounts (copied from ours), crun finds plain cgroup v1.
        command = [
            "unshare", "--mount", "--propagation", "private", "--",
            "sh", "-c", 'umount /sys/fs/cgroup/unified && exec "$@"', "sh", *command,
        ]  # fmt: skip
    try:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, (result.stdout, result.stderr)
        listed = subprocess.run(
            [runtime, "--root", str(state), "list", "--quiet"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert container_id not in listed.stdout.split()
    finally:
        # On a timeout or a failure, the container this test started goes, by its id.
        subprocess.run(
            [runtime, "--root", str(state), "delete", "--force", container_id],
            capture_output=True,
            timeout=30,
            check=False,
        )
        shutil.rmtree(state, ignore_errors=True)


def apply_with_gnu_tar(layer: Path, target: Path) -> None:
    """Extract OCI layer tar ``layer`` onto ``target`` with GNU tar, then apply its whiteouts.

    GNU tar knows nothing of whiteouts: it writes ``.wh.NAME`` as an empty file. As umoci's
    unpacker does, ``.wh.NAME`` removes NAME, and ``.wh..wh..opq`` empties its directory of
    what the layer below had; the markers themselves go.
    """
    subprocess.run(
        ["tar", "--numeric-owner", "-xpf", str(layer), "-C", str(target)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    with tarfile.open(layer) as tar:
        names = [m.name.removeprefix("./").rstrip("/") for m in tar.getmembers()]
    present = set(names)
    for name in names:
        parent, _, base = name.rpartition("/")
        if not base.startswith(".wh."):
            continue
        directory = target / parent
        (directory / base).unlink()
        if base == ".wh..wh..opq":
            for child in directory.iterdir():
                if f"{parent}/{child.name}".lstrip("/") not in present:
                    _remove(child)
        else:
            _remove(directory / base.removeprefix(".wh."))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def diff_lines(store: laminae.Store, ref: str) -> list[str]:
    """``laminae container diff REF``'s output, through the CLI."""
    where = ["--root", str(store.root), "--runroot", str(store.runroot)]
    result = CliRunner().invoke(
        cli, [*where, "--driver", store.driver_name, "container", "diff", ref]
    )
    assert result.exit_code == 0, result.output
    return result.output.splitlines()


# --- the test -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "runtime"),
    [("vfs", "crun"), ("overlay", "crun"), ("btrfs", "crun"), ("overlay", "runc")],
    indirect=["store"],
)
def test_run_diff_commit_export(
    store: laminae.Store, runtime: str, host_tools: Path, tmp_path: Path
) -> None:
    image = store.import_image(f"oci-archive:{EXAMPLE}:hello")
    box = store.create_container("hello", name="e2e")

    # Run: write a file, delete one the image has.
    made = make_bundle(
        store,
        "e2e",
        tmp_path / "bundle",
        runtime=runtime,
        args=["/opt/host/busybox", "sh", "-c", SCRIPT],
        mounts=[BindMount(host_tools, "/opt/host")],
    )
    run_bundle(runtime, made.directory, f"laminae-e2e-{box.id[:12]}", tmp_path / "state")
    remove_bundle(store, made.directory)
    assert store.layer(box.layer).mount_count == 0
    assert not made.directory.exists()

    # Diff: the file added, the file deleted, their parents changed, nothing else (not the
    # runtime's mount points, not /opt/host).
    expected = [C("/etc"), D(GONE_FILE), C("/var"), C("/var/lib"), C("/var/lib/hello"), A(NEW_FILE)]
    assert store.container_changes("e2e") == expected
    assert diff_lines(store, "e2e") == [
        "C /etc",
        f"D {GONE_FILE}",
        "C /var",
        "C /var/lib",
        "C /var/lib/hello",
        f"A {NEW_FILE}",
    ]

    # Commit: a second container from the new image sees the new file, not the deleted one.
    committed = store.commit_container("e2e", "hello-ran", message=f"ran busybox with {runtime}")
    assert committed.names == ("hello-ran:latest",)
    assert store.image(image.id).top_layer == image.top_layer  # the parent image untouched
    second = store.create_container("hello-ran", name="e2e-second")
    root = store.mount_container(second.id)
    try:
        assert (root / NEW_FILE.lstrip("/")).read_text() == GREETING
        assert not os.path.lexists(root / GONE_FILE.lstrip("/"))
        assert (root / "usr/share/hello/greetings.txt").exists()  # the image's files are there
    finally:
        store.unmount_container(second.id)

    # Export: the layer, applied by GNU tar onto a copy of the image, is the container's tree.
    layer_tar = tmp_path / "changes.tar"
    with open(layer_tar, "wb") as out:
        store.export_container("e2e", out)
    copy = tmp_path / "copy"
    view = store.create_layer(parent=image.top_layer, view=True)
    try:
        view_root = store.mount(view.id, readonly=True)
        subprocess.run(["cp", "-a", f"{view_root}/.", str(copy)], check=True, timeout=60)
    finally:
        store.unmount(view.id)
        store.remove_layer(view.id)
    apply_with_gnu_tar(layer_tar, copy)
    container_root = store.mount_container("e2e")
    try:
        want = read_tree(container_root)
    finally:
        store.unmount_container("e2e")
    assert read_tree(copy) == want
    assert want.entries[NEW_FILE.lstrip("/")].kind == "file"
    assert GONE_FILE.lstrip("/") not in want.entries

    # And umoci, unpacking the committed image from an OCI layout, agrees.
    layout = tmp_path / "layout"
    store.export_image("hello-ran", f"oci:{layout}:v1")
    unpacked = tmp_path / "umoci-bundle"
    subprocess.run(
        [require_tool("umoci"), "unpack", "--image", f"{layout}:v1", str(unpacked)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert read_tree(unpacked / "rootfs") == want

    store.remove_container("e2e-second")
    store.remove_container("e2e")
