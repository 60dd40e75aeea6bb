#!/usr/bin/env python3
"""Build ``hello-layer.tar.gz``: a small root-filesystem layer, byte for byte reproducible.

The layer looks like the base of a tiny distribution: merged ``/usr`` with ``/bin`` a
symlink, an executable script, a config file, a sticky ``/tmp`` and an empty state dir.
Every entry is owned by root and dated 2024-01-01 00:00:00 UTC; the gzip header carries no
name and no time, so the same Python builds the same bytes (the DiffID, of the tar itself,
depends on nothing but this file).

Usage::

    python3 examples/images/make-hello-layer.py           # rewrite the .tar.gz beside it
    python3 examples/images/make-hello-layer.py --check   # exit 1 if the shipped one differs
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

MTIME = 1704067200  # 2024-01-01T00:00:00Z
OUTPUT = Path(__file__).with_name("hello-layer.tar.gz")

HELLO = b"""#!/bin/sh
# Greets whoever runs it; the greeting lives in /etc/hello.conf.
. /etc/hello.conf
echo "${GREETING:-hello} from a laminae layer"
"""

# (path, kind, mode, content or link target); directories come before what they hold.
ENTRIES: list[tuple[str, str, int, bytes | str]] = [
    ("bin", "symlink", 0o777, "usr/bin"),
    ("etc", "dir", 0o755, b""),
    ("etc/hello.conf", "file", 0o644, b"GREETING=hello\n"),
    ("etc/os-release", "file", 0o644, b'NAME="hello"\nID=hello\nVERSION_ID=1\n'),
    ("tmp", "dir", 0o1777, b""),
    ("usr", "dir", 0o755, b""),
    ("usr/bin", "dir", 0o755, b""),
    ("usr/bin/hello", "file", 0o755, HELLO),
    ("usr/share", "dir", 0o755, b""),
    ("usr/share/doc", "dir", 0o755, b""),
    ("usr/share/doc/hello", "dir", 0o755, b""),
    ("usr/share/doc/hello/README", "file", 0o644, b"An example layer for laminae.\n"),
    ("var", "dir", 0o755, b""),
    ("var/lib", "dir", 0o755, b""),
    ("var/lib/hello", "dir", 0o755, b""),
]


def build_tar() -> bytes:
    """The uncompressed layer tar (its sha256 is the layer's DiffID)."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, kind, mode, payload in ENTRIES:
            info = tarfile.TarInfo(path)
            info.mode = mode
            info.mtime = MTIME
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind == "symlink":
                assert isinstance(payload, str)
                info.type = tarfile.SYMTYPE
                info.linkname = payload
                tar.addfile(info)
            else:
                assert isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def compress(data: bytes) -> bytes:
    """gzip ``data`` with no file name and a zero time in the header."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) :data:`OUTPUT`; print its DiffID and digest."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    tar = build_tar()
    blob = compress(tar)
    if args.check:
        shipped = gzip.decompress(OUTPUT.read_bytes())
        if shipped != tar:
            print(f"{OUTPUT} differs from what {Path(__file__).name} builds", file=sys.stderr)
            return 1
    else:
        OUTPUT.write_bytes(blob)
    print(f"diff_id sha256:{hashlib.sha256(tar).hexdigest()}")
    print(f"digest  sha256:{hashlib.sha256(blob).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
