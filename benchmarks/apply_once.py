"""The measured laminae side: apply one tar into a vfs store, print what it took as JSON.

Run by ``apply_vfs.py`` and ``profile_apply.py`` in a fresh process each time, so the peak
RSS the parent reads with ``wait4`` is this apply's alone. The clock covers
``store.apply_layer(tar_path)`` only: opening the tar, DiffID verification, ``syncfs`` and the
commit happen inside it; interpreter start-up, imports and ``open_store`` do not.

Usage: ``apply_once.py STORE_ROOT RUNROOT TAR DIFF_ID [PROFILE_OUT]``.
"""

from __future__ import annotations

import cProfile
import json
import sys
import time

import laminae


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        return 2
    root, runroot, tar, diff_id = argv[:4]
    profile_out = argv[4] if len(argv) == 5 else None
    profiler = cProfile.Profile() if profile_out else None
    with laminae.open_store(root, runroot=runroot, driver="vfs") as store:
        start = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        layer = store.apply_layer(tar, diff_id=diff_id)
        if profiler is not None:
            profiler.disable()
        seconds = time.perf_counter() - start
    if profiler is not None and profile_out:
        profiler.dump_stats(profile_out)
    json.dump({"seconds": seconds, "layer": layer.id, "size": layer.size}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
