"""Where laminae's vfs apply spends its time: cProfile over ``apply_layer`` of the small layer.

Same setup as ``apply_vfs.py`` case ``small`` (a fresh ext4 filesystem, the same tar, a cold
page cache, a fresh process), but the apply runs under :mod:`cProfile`, and the top entries
are printed by cumulative time and by own time. cProfile sees the main thread only and
roughly doubles the cost of Python-level calls, so read the shares, not the seconds.

Run as root: ``.venv/bin/python benchmarks/profile_apply.py [--scale 1.0] [--top 25]
[--case small] [--save FILE]``.
"""

from __future__ import annotations

import argparse
import json
import pstats
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from apply_vfs import APPLY_ONCE, CASES
from measure import run_measured
from rich.console import Console
from scratch_fs import (
    GIB,
    drop_caches,
    enter_private_mount_namespace,
    require_root,
    scratch_ext4,
)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="small")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the layer size")
    parser.add_argument("--top", type=int, default=25, help="entries per listing")
    parser.add_argument("--save", type=Path, metavar="FILE", help="keep the pstats dump here")
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    parser.add_argument("--image-gib", type=int, default=8)
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 16:
        parser.error("--scale must be in (0, 16]")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    require_root()
    enter_private_mount_namespace(Path(__file__).resolve(), argv)
    console = Console() if Console().is_terminal else Console(width=140)
    case = CASES[args.case]
    with tempfile.TemporaryDirectory(prefix="laminae-profile-") as tmp:
        dump = args.save or Path(tmp, "apply.pstats")
        with scratch_ext4(args.workdir, args.image_gib * GIB) as mnt:
            console.print(f"writing the {case.name} layer ({case.describe(args.scale)})")
            tar = case.write(mnt / f"{case.name}.tar", args.scale)
            drop_caches()
            root, runroot = mnt / "laminae-store", mnt / "laminae-run"
            argv_once = [sys.executable, str(APPLY_ONCE), str(root), str(runroot)]
            measured = run_measured([*argv_once, str(tar.path), tar.diff_id, str(dump)])
        if measured.returncode != 0:
            console.print(f"[red]apply failed[/] ({measured.returncode}):\n{measured.stderr}")
            return 1
        seconds = json.loads(measured.stdout)["seconds"]
        console.print(
            f"apply_layer under cProfile: {seconds:.2f} s, {tar.size / (1 << 20):,.0f} MiB tar, "
            f"{tar.entries:,} entries; peak RSS {measured.maxrss_kib / 1024:.1f} MiB"
        )
        for order in ("cumulative", "tottime"):
            console.rule(f"top {args.top} by {order}")
            stats = pstats.Stats(str(dump), stream=sys.stdout)
            stats.sort_stats(order).print_stats(args.top)
        sys.stdout.flush()
        if args.save:
            console.print(f"pstats dump kept in {args.save}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
