"""containerd with laminae as its snapshotter, against containerd's own overlayfs snapshotter.

The same containerd (Debian's 1.6), the same local registry, the same fresh ext4 loop
filesystem; laminae serves its overlay driver through ``laminae snapshotter serve`` as the
proxy snapshotter ``laminae``. For each image and each run, alternating the two:

- **pull + unpack**: ``ctr images pull --plain-http --snapshotter S REF`` into a containerd
  started afresh (an empty content store and snapshotter), the page cache dropped first, and
  ``sync -f`` of the filesystem after it, timed as a whole;
- **run start**: ``ctr run --rm --snapshotter S REF ID busybox true`` (a host busybox bound
  in: the images hold no binaries), timed as a whole, three times, the median kept.

Images: the benchmark image of ``oci_image.py`` (eight layers, thousands of files) and a stack
of ``--depth`` one-file layers. Medians of ``--runs`` (at least 3); the ratio is laminae's
over overlayfs's.

Run as root: ``python benchmarks/containerd.py [--runs 3] [--scale 0.3] [--depth 50]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from oci_image import OciImage, write_benchmark_image, write_stack_image
from registry_server import RegistryServer
from rich.console import Console
from rich.table import Table
from scratch_fs import (
    GIB,
    drop_caches,
    enter_private_mount_namespace,
    remove_tree,
    require_root,
    scratch_ext4,
    unmount_under,
)

SNAPSHOTTERS = ("overlayfs", "laminae")
BUSYBOX = Path("/bin/busybox")


def _wait_for(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start within 60 s")
        time.sleep(0.02)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """Stop ``process`` by its PID: SIGTERM, then SIGKILL after 20 s."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def containerd(work: Path) -> Iterator[Path]:
    """A fresh containerd under ``work`` with ``laminae`` (overlay) as a proxy snapshotter
    beside its own overlayfs; yields its address. Stops both by PID, unmounts what is left."""
    work.mkdir(parents=True)
    processes: list[subprocess.Popen[bytes]] = []
    socket, address = work / "laminae.sock", work / "containerd.sock"
    try:
        serve = [sys.executable, "-m", "laminae.snapshotter", "serve", "--socket", str(socket)]
        serve += ["--root", str(work / "store"), "--runroot", str(work / "run")]
        serve += ["--driver", "overlay"]
        with (work / "snapshotter.log").open("wb") as log:
            processes.append(subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT))
        _wait_for(socket, processes[-1], "laminae snapshotter serve")
        config = work / "containerd.toml"
        config.write_text(
            f'version = 2\nroot = "{work}/root"\nstate = "{work}/state"\n'
            'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
            f'[grpc]\n  address = "{address}"\n[ttrpc]\n  address = "{address}.ttrpc"\n'
            f'[proxy_plugins.laminae]\n  type = "snapshot"\n  address = "{socket}"\n'
        )
        with (work / "containerd.log").open("wb") as log:
            processes.append(
                subprocess.Popen(
                    ["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
                )
            )
        _wait_for(address, processes[-1], "containerd")
        yield address
    finally:
        for process in reversed(processes):
            _stop(process)
        unmount_under(work)
        remove_tree(work)


def ctr(address: Path, *args: str) -> float:
    """Run ``ctr`` against ``address``; its wall time in seconds."""
    start = time.perf_counter()
    done = subprocess.run(
        ["ctr", "--address", str(address), *args], capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"ctr {' '.join(args)}: {done.stderr.strip()[-400:]}")
    return elapsed


def one_run(fs: Path, work: Path, snapshotter: str, reference: str) -> tuple[float, float]:
    """Pull + unpack, then the median of three run starts, with ``snapshotter``."""
    with containerd(work) as address:
        drop_caches()
        start = time.perf_counter()
        ctr(address, "images", "pull", "--plain-http", "--snapshotter", snapshotter, reference)
        subprocess.run(["sync", "-f", str(fs)], check=True)
        pull = time.perf_counter() - start
        starts = []
        for k in range(3):
            starts.append(
                ctr(
                    address,
                    "run",
                    "--rm",
                    "--snapshotter",
                    snapshotter,
                    "--mount",
                    f"type=bind,src={BUSYBOX},dst=/opt/busybox,options=rbind:ro",
                    reference,
                    f"bench-{k}",
                    "/opt/busybox",
                    "true",
                )
            )
        return pull, statistics.median(starts)


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=0.3)
    parser.add_argument("--depth", type=int, default=50)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("--runs: at least 3 (medians)")
    require_root(["containerd", "ctr", "runc", "skopeo", "docker-registry", "mkfs.ext4"])
    if not BUSYBOX.exists():
        raise SystemExit(f"{BUSYBOX} is missing (Debian: busybox-static)")
    enter_private_mount_namespace(Path(__file__), argv)
    console = Console()
    results: dict[str, dict[str, list[float]]] = {}
    with scratch_ext4(args.workdir, 16 * GIB) as fs, RegistryServer(fs / "registry") as registry:
        images: list[tuple[str, OciImage]] = [
            ("benchmark image", write_benchmark_image(fs / "bench", scale=args.scale)),
            (f"{args.depth} one-file layers", write_stack_image(fs / "stack", args.depth)),
        ]
        for name, image in images:
            reference = registry.push(image.reference, f"{image.tag}:1", fs / "skopeo")
            console.print(f"{name}: {image.describe()} -> {reference}")
            for run in range(args.runs):
                # Alternating, and the first of each pair changes every run.
                order = SNAPSHOTTERS if run % 2 == 0 else tuple(reversed(SNAPSHOTTERS))
                for snapshotter in order:
                    work = fs / f"run-{image.tag}-{run}-{snapshotter}"
                    pull, started = one_run(fs, work, snapshotter, reference)
                    row = results.setdefault(f"{name}|{snapshotter}", {"pull": [], "run": []})
                    row["pull"].append(pull)
                    row["run"].append(started)
                    console.print(
                        f"  run {run + 1} {snapshotter}: pull+unpack {pull:.2f} s, "
                        f"run start {started * 1000:.0f} ms"
                    )
    table = Table(title=f"containerd 1.6: laminae (overlay) vs overlayfs, medians of {args.runs}")
    for column in ("image", "pull+unpack overlayfs", "laminae", "ratio", "run start overlayfs",
                   "laminae", "difference"):  # fmt: skip
        table.add_column(column, justify="right" if column != "image" else "left")
    for name, _ in images:
        own, ours = results[f"{name}|overlayfs"], results[f"{name}|laminae"]
        pull_own, pull_ours = statistics.median(own["pull"]), statistics.median(ours["pull"])
        run_own, run_ours = statistics.median(own["run"]), statistics.median(ours["run"])
        table.add_row(
            name,
            f"{pull_own:.2f} s",
            f"{pull_ours:.2f} s",
            f"{pull_ours / pull_own:.2f}x",
            f"{run_own * 1000:.0f} ms",
            f"{run_ours * 1000:.0f} ms",
            f"{(run_ours - run_own) * 1000:+.0f} ms",
        )
    console.print(table)
    if args.json is not None:
        args.json.write_text(json.dumps({"runs": args.runs, "results": results}, indent=2))
    os.sync()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
