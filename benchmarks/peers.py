"""The peers the benchmarks run against: Debian's podman, skopeo and containerd.

:func:`ensure_installed` installs the missing ones with ``apt-get`` (idempotent: nothing is
installed when the commands are there) and :func:`versions` says which versions ran.

Nothing here reads or writes the host's container configuration or state:

- **skopeo** and **podman** get every path on the command line or in files under the scratch
  directory: ``containers-storage:[DRIVER@ROOT+RUNROOT]`` names the driver and both roots,
  ``CONTAINERS_STORAGE_CONF`` points at an *empty* file (so a host's ``storage.conf`` does not
  apply; c/storage logs that the empty file names no driver, which the bracket does),
  ``--policy`` at an accept-anything policy, ``TMPDIR`` (where c/image stages blobs, else
  ``/var/tmp``) at the scratch filesystem. podman needs a ``storage.conf`` naming its roots
  (4.3 refuses to start without a runroot from one), so :class:`Podman` writes its own.
- **containerd** runs as a child of the benchmark with a private ``config.toml``: its root,
  state directory, temp directory and sockets under the scratch directory; the CRI plugin, the
  ``opt`` plugin (which would create ``/opt/containerd``) and the snapshotters the benchmarks
  do not use are disabled. It is stopped by its PID (SIGTERM, then SIGKILL), never by name.

Some host paths are written whatever the flags say (found with ``strace``): c/image keeps
root's blob-info cache in ``/var/lib/containers/cache`` (skopeo has no flag to move it), and
podman 4.3 creates ``/etc/cni/net.d/cni.lock`` (even with ``--network none``) and
``/dev/shm/libpod_lock``. :func:`private_host_paths` covers those directories with scratch
directories (a tmpfs for ``/dev/shm``) inside the benchmark's private mount namespace, so the
host's files are neither read nor written, and every skopeo run starts with an empty cache, as
a first pull does. containerd, with the config above, writes nothing outside its directories.

The benchmarks run in a private mount namespace, so whatever the peers mount dies with it; the
scratch helpers unmount it by path all the same before deleting the directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import attrs
from measure import Measured, run_measured
from scratch_fs import remove_tree, unmount_under

__all__ = [
    "Containerd",
    "Podman",
    "ensure_installed",
    "forget_peer_caches",
    "mount_described",
    "private_host_paths",
    "skopeo_copy",
    "skopeo_env",
    "versions",
]

PACKAGES = {
    "podman": "podman",
    "skopeo": "skopeo",
    "containerd": "containerd",
    "ctr": "containerd",
    "buildah": "buildah",
}
"""Command -> the Debian package that has it."""

_POLICY = {"default": [{"type": "insecureAcceptAnything"}]}

HOST_PATHS = ("/var/lib/containers", "/etc/cni/net.d", "/dev/shm")
"""Host directories the peers write to whatever their flags; covered while benchmarking."""
_covered: list[Path] = []
"""The scratch directories now mounted over :data:`HOST_PATHS` (empty when not covered)."""


@contextlib.contextmanager
def private_host_paths(scratch: Path) -> Iterator[None]:
    """Mount scratch directories over :data:`HOST_PATHS` for the duration (call it only in a
    private mount namespace). A missing host directory is created for the mount point and
    removed again afterwards."""
    created: list[Path] = []
    mounted: list[Path] = []
    try:
        for name in HOST_PATHS:
            path = Path(name)
            if not path.exists():
                path.mkdir(parents=True)
                created.append(path)
            if name == "/dev/shm":
                subprocess.run(
                    ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", name], check=True
                )
            else:
                private = scratch / name.strip("/").replace("/", "-")
                private.mkdir(parents=True)
                subprocess.run(["mount", "--bind", str(private), name], check=True)
                _covered.append(private)
            mounted.append(path)
        yield
    finally:
        _covered.clear()
        for path in reversed(mounted):
            subprocess.run(["umount", str(path)], check=True)
        for path in reversed(created):
            path.rmdir()


def forget_peer_caches() -> None:
    """Empty the covered host directories (never the host's own: only when covered)."""
    for private in _covered:
        for child in private.iterdir():
            remove_tree(child)


def ensure_installed(commands: Iterable[str]) -> list[str]:
    """Install the Debian packages of the ``commands`` that are not on PATH; returns the
    packages installed (none when everything is there).

    :raises RuntimeError: ``apt-get`` failed (its last lines are in the message).
    """
    missing = sorted({PACKAGES[c] for c in commands if shutil.which(c) is None})
    if not missing:
        return []
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {tail}")
    return missing


def _version(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError:
        return "not installed"
    return done.stdout.strip().partition("\n")[0] or "unknown"


def _package_version(package: str) -> str:
    done = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else "?"


def versions(commands: Iterable[str]) -> dict[str, str]:
    """``{command: "its --version line (Debian package version)"}``."""
    argv = {
        "podman": ["podman", "--version"],
        "skopeo": ["skopeo", "--version"],
        "containerd": ["containerd", "--version"],
        "ctr": ["ctr", "--version"],
    }
    return {
        c: f"{_version(*argv[c])} (deb {_package_version(PACKAGES[c])})"
        for c in sorted(set(commands))
    }


def skopeo_env(scratch: Path) -> tuple[dict[str, str], Path]:
    """Environment and ``--policy`` file for a skopeo that reads no host configuration."""
    scratch.mkdir(parents=True, exist_ok=True)
    empty = scratch / "storage.conf"
    empty.write_text("")
    policy = scratch / "policy.json"
    policy.write_text(json.dumps(_POLICY))
    tmp = scratch / "tmp"
    tmp.mkdir(exist_ok=True)
    # For docker:// sources: no registries.conf (mirrors, aliases) and no credentials of the
    # host's apply; the benchmark's registry is anonymous.
    registries = scratch / "registries.conf"
    registries.write_text("")
    auth = scratch / "auth.json"
    auth.write_text('{"auths": {}}')
    env = dict(
        os.environ,
        CONTAINERS_STORAGE_CONF=str(empty),
        CONTAINERS_REGISTRIES_CONF=str(registries),
        REGISTRY_AUTH_FILE=str(auth),
        TMPDIR=str(tmp),
    )
    return env, policy


def skopeo_copy(
    source: str,
    driver: str,
    root: Path,
    runroot: Path,
    name: str,
    scratch: Path,
    flags: Sequence[str] = (),
) -> Measured:
    """``skopeo copy [FLAGS] SOURCE containers-storage:[DRIVER@ROOT+RUNROOT]NAME``, timed,
    with an empty blob-info cache (see :func:`private_host_paths`); ``flags`` are copy's
    (``--src-tls-verify=false`` for a plain-HTTP registry)."""
    env, policy = skopeo_env(scratch)
    forget_peer_caches()
    destination = f"containers-storage:[{driver}@{root}+{runroot}]{name}"
    argv = ["skopeo", "--policy", str(policy), "copy", "--quiet", *flags, source, destination]
    return run_measured(argv, env=env)


@attrs.frozen
class Podman:
    """podman on a containers-storage of the benchmark's own (for checks and mounts)."""

    driver: str
    root: Path
    runroot: Path
    scratch: Path

    def _prepare(self) -> dict[str, str]:
        self.scratch.mkdir(parents=True, exist_ok=True)
        conf = self.scratch / "podman-storage.conf"
        conf.write_text(
            f'[storage]\ndriver = "{self.driver}"\n'
            f'graphroot = "{self.root}"\nrunroot = "{self.runroot}"\n'
        )
        (self.scratch / "tmp").mkdir(exist_ok=True)
        return dict(os.environ, CONTAINERS_STORAGE_CONF=str(conf), TMPDIR=str(self.scratch / "tmp"))

    def argv(self, *args: str) -> list[str]:
        return [
            "podman",
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
            "--tmpdir",
            str(self.scratch / "libpod-tmp"),
            *args,
        ]

    def measured(self, *args: str) -> Measured:
        return run_measured(self.argv(*args), env=self._prepare())

    def run(self, *args: str) -> str:
        """Run a podman command; its stdout. :raises RuntimeError: it failed."""
        done = subprocess.run(
            self.argv(*args), env=self._prepare(), capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()[-300:]}")
        return done.stdout.strip()

    @contextlib.contextmanager
    def image_mounted(self, name: str) -> Iterator[Path]:
        path = Path(self.run("image", "mount", name))
        try:
            yield path
        finally:
            self.run("image", "unmount", name)


def _containerd_config(base: Path) -> str:
    disabled = [
        "io.containerd.grpc.v1.cri",
        "io.containerd.internal.v1.opt",
        "io.containerd.snapshotter.v1.aufs",
        "io.containerd.snapshotter.v1.devmapper",
        "io.containerd.snapshotter.v1.zfs",
    ]
    return (
        "version = 2\n"
        f'root = "{base / "root"}"\n'
        f'state = "{base / "state"}"\n'
        f'temp = "{base / "tmp"}"\n'
        f"disabled_plugins = {json.dumps(disabled)}\n"
        f'[grpc]\n  address = "{base / "containerd.sock"}"\n'
        f'[ttrpc]\n  address = "{base / "containerd.sock.ttrpc"}"\n'
        '[debug]\n  address = ""\n'
        '[metrics]\n  address = ""\n'
    )


class Containerd:
    """A private containerd daemon under ``base``, for one run; a context manager.

    ``base`` is deleted (after unmounting whatever is mounted under it) when the daemon stops.
    """

    def __init__(self, base: Path, *, start_timeout: float = 30.0) -> None:
        self.base = base
        self.address = base / "containerd.sock"
        self._timeout = start_timeout
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Containerd:
        self.base.mkdir(parents=True)
        config = self.base / "config.toml"
        config.write_text(_containerd_config(self.base))
        with open(self.base / "containerd.log", "wb") as log:
            self._process = subprocess.Popen(
                ["containerd", "--config", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        # A daemon is ready when it answers; there is no readiness event to wait on.
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"containerd exited {self._process.returncode}: {self.log()}")
            done = subprocess.run(self.ctr_argv("version"), capture_output=True, check=False)
            if done.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"containerd did not answer within {self._timeout:.0f} s: {self.log()}")

    def log(self, lines: int = 5) -> str:
        try:
            text = (self.base / "containerd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def peak_rss_kib(self) -> int | None:
        """The daemon's own high-water mark (``VmHWM``) so far."""
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
        except FileNotFoundError:
            return None
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        return None

    def ctr_argv(self, *args: str, namespace: str = "bench") -> list[str]:
        return ["ctr", "--address", str(self.address), "--namespace", namespace, *args]

    def ctr(self, *args: str) -> str:
        """Run a ctr command against this daemon; its stdout. :raises RuntimeError: failed."""
        done = subprocess.run(self.ctr_argv(*args), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ctr {' '.join(args)}: {done.stderr.strip()[-300:]}")
        return done.stdout

    def ctr_measured(self, *args: str) -> Measured:
        return run_measured(self.ctr_argv(*args))

    def view_mounts(self, snapshotter: str, key: str, parent: str) -> list[Mapping[str, object]]:
        """Make a view of committed ``parent`` and return its mounts (containerd's JSON)."""
        out = self.ctr("snapshots", "--snapshotter", snapshotter, "view", "--mounts", key, parent)
        mounts: list[Mapping[str, object]] = json.loads(out)
        return mounts

    def stop(self) -> None:
        """Stop the daemon by its PID, unmount what is left under ``base``, delete ``base``."""
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        finally:
            unmount_under(self.base)
            remove_tree(self.base)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def mount_described(mounts: Sequence[Mapping[str, object]], target: Path) -> None:
    """Mount one mount as containerd describes it (``Type``, ``Source``, ``Options``), with
    ``mount(8)``; only what the checks need (a bind or an overlay)."""
    if len(mounts) != 1:
        raise RuntimeError(f"expected one mount, got {len(mounts)}")
    m = mounts[0]
    options = [str(o) for o in m.get("Options") or []]  # type: ignore[attr-defined]
    argv = ["mount", "-t", str(m["Type"]), "-o", ",".join(options), str(m["Source"]), str(target)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)[:200]}...: {done.stderr.strip()}")
