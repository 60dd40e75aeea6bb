"""Where laminae's image import or pull spends its time: py-spy over one run, every thread.

Same setup as ``images.py`` (a fresh ext4 filesystem, the benchmark image, for ``pull`` a local
docker-registry it was pushed to, a cold page cache, a fresh ``laminae_once.py`` process), with
the process under ``py-spy record --threads --idle`` (sampling, so the run is hardly slowed;
every thread is seen, idle ones too: a thread waiting on a queue or in ``read`` is part of
the wall time). Then, per thread, the samples and the frames they were in (own time, the
innermost frame; and in which laminae function, the innermost ``laminae`` frame), so the
split between the main thread (applying tars), the decompressors, the fetchers and waiting
shows.

py-spy comes from PyPI (``pip install py-spy``); it is looked for next to this Python, then
on PATH.

Run as root: ``.venv/bin/python benchmarks/profile_image.py [--case import|pull]
[--scale 1.0] [--rate 250] [--top 12] [--save FILE] [--jobs N]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from image_import import LAMINAE_ONCE, write_case_image
from measure import run_measured
from peers import private_host_paths
from registry_server import RegistryServer
from rich.console import Console
from scratch_fs import GIB, drop_caches, enter_private_mount_namespace, require_root, scratch_ext4


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=("import", "pull"), default="import")
    parser.add_argument("--scale", type=float, default=1.0, help="the image's scale")
    parser.add_argument("--driver", default="overlay")
    parser.add_argument("--jobs", default="", help="laminae's jobs (default: its own)")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--top", type=int, default=12, help="frames per thread")
    parser.add_argument("--save", type=Path, metavar="FILE", help="keep py-spy's raw stacks")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--image-gib", type=int, default=8)
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 8:
        parser.error("--scale must be in (0, 8]")
    return args


def py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    return found


def _frame_name(frame: str) -> str:
    # py-spy's raw frames read "function (path/module.py:line)"; keep function and file.
    function, _, where = frame.partition(" (")
    return f"{function} ({where.rsplit('/', 1)[-1].split(':')[0]}" + ")"


def _thread_group(frame: str) -> str:
    """The thread a stack is in, from py-spy's first frame ``thread (TID): NAME``, with the
    numbers and digests dropped (``ThreadPoolExecutor-0_2`` -> ``ThreadPoolExecutor``,
    ``decompress sha256:...`` -> ``decompress``), so that alike threads are counted
    together."""
    if not frame.startswith("thread ("):
        return "(unnamed)"
    name = frame.partition("): ")[2] or frame
    return re.sub(r"-\d+(_\d+)?$", "", name.split(" ")[0])


def summarize(raw: Path, console: Console, top: int) -> None:
    """Per thread: samples, innermost frames, innermost laminae frames."""
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    in_laminae: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        name = _thread_group(frames[0])
        totals[name] += count
        threads[name][_frame_name(frames[-1])] += count
        ours = [f for f in frames if "(laminae/" in f or "/laminae/" in f]
        threads_key = _frame_name(ours[-1]) if ours else "(outside laminae)"
        in_laminae[name][threads_key] += count
    grand = sum(totals.values())
    console.print(f"{grand:,} samples over {len(totals)} thread name(s)")
    for name, samples in totals.most_common():
        console.rule(f"{name}: {samples:,} samples ({samples / grand:.0%} of all)")
        console.print("  innermost frame:")
        for frame, count in threads[name].most_common(top):
            console.print(f"    {count / samples:6.1%}  {frame}")
        console.print("  innermost laminae frame:")
        for frame, count in in_laminae[name].most_common(top):
            console.print(f"    {count / samples:6.1%}  {frame}")


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root(("docker-registry",) if args.case == "pull" else ())
    spy = py_spy()
    enter_private_mount_namespace(Path(__file__).resolve(), argv)
    console = Console() if Console().is_terminal else Console(width=160)
    with tempfile.TemporaryDirectory(prefix="laminae-profile-") as tmp:
        raw = args.save or Path(tmp, "stacks.txt")
        with (
            scratch_ext4(args.workdir, args.image_gib * GIB) as mnt,
            private_host_paths(mnt / "host-paths"),
        ):
            image, _ = write_case_image(console, mnt / "images", args.scale)
            root, runroot = mnt / "laminae-store", mnt / "laminae-run"
            once = [sys.executable, str(LAMINAE_ONCE), args.case, str(root), str(runroot)]
            if args.case == "import":
                once += [args.driver, str(image.layout), image.tag, args.jobs]
                registry = None
            else:
                registry = RegistryServer(mnt / "registry").__enter__()
            try:
                if registry is not None:
                    reference = registry.push(image.reference, "bench:1", mnt / "push-scratch")
                    once += [args.driver, reference, args.jobs]
                drop_caches()
                record = [spy, "record", "--threads", "--idle", "--nonblocking", "--format", "raw"]
                record += ["--rate", str(args.rate), "--output", str(raw), "--", *once]
                measured = run_measured(record)
            finally:
                if registry is not None:
                    registry.stop()
        if measured.returncode != 0:
            console.print(f"[red]{args.case} failed[/] ({measured.returncode}):\n{measured.stderr}")
            return 1
        # py-spy shares the process's stdout and writes its own lines there too.
        line = next(x for x in measured.stdout.splitlines() if x.startswith('{"seconds"'))
        report = json.loads(line)
        console.print(
            f"{args.case} under py-spy: store call {report['seconds']:.2f} s, whole process "
            f"{measured.seconds:.2f} s; {image.describe()}"
        )
        summarize(raw, console, args.top)
        if args.save:
            console.print(f"raw stacks kept in {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
