#!/usr/bin/env python3
"""Build ``hello-image.oci.tar``: a small three-layer OCI image, byte for byte reproducible.

The image is an OCI image layout in a tar (skopeo's ``oci-archive:``) whose ``index.json``
names one image, ``hello``: an image index with a ``linux/amd64`` and a ``linux/arm64/v8``
manifest over the same three gzip layers, so it imports on either machine::

    base       a tiny distribution root: merged /usr (/bin a symlink to usr/bin), a /bin/hello
               shell script, /etc/os-release, /etc/passwd and /etc/group with root, /etc/issue,
               a sticky /tmp, an empty /var/lib/hello, the empty mount points an OCI runtime
               mounts on (/dev, /proc, /sys) and an empty /opt/host for tools from the host
    greetings  adds /usr/share/hello/greetings.txt and deletes /etc/issue (a whiteout)
    links      adds /usr/local/bin/greet, /usr/local/bin/hi as a hard link to it, and
               /etc/greetings as a symlink to ../usr/share/hello/greetings.txt

The image holds data and shell scripts only: there is no shell in it, so running a command in
it needs one from the host, bind-mounted on the empty ``/opt/host`` (the container tests put a
static busybox there). ``/dev``, ``/proc`` and ``/sys`` are in the base layer because crun and
runc create a missing mount point in the container's own layer, where ``container diff``
would show it as a change the command never made.

Everything is fixed: entries sorted, owned by 0:0 and dated 2024-01-01 00:00:00 UTC, the gzip
header without name or time at level 9, the JSON compact in a fixed key order. The same zlib
(the reference one, as Debian and Ubuntu ship it) gives the same bytes; another deflate
implementation, such as zlib-ng, compresses differently and ``--check`` says so.

The base layer is also written alone as ``hello-layer.tar.gz`` (the same blob), the layer
tar the README's Python example applies.

Usage::

    python3 examples/images/make-hello-image.py           # rewrite both files beside it
    python3 examples/images/make-hello-image.py --check   # exit 1 if a shipped one differs
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import sys
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

MTIME = 1704067200  # 2024-01-01T00:00:00Z
CREATED = "2024-01-01T00:00:00Z"
HERE = Path(__file__).resolve().parent
IMAGE = HERE / "hello-image.oci.tar"
BASE_LAYER = HERE / "hello-layer.tar.gz"
REF_NAME = "hello"
PLATFORMS: tuple[dict[str, str], ...] = (
    {"architecture": "amd64", "os": "linux"},
    {"architecture": "arm64", "os": "linux", "variant": "v8"},
)

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"

HELLO = b"""#!/bin/sh
# Greets whoever runs it; the greeting lives in /etc/hello.conf.
. /etc/hello.conf
echo "${GREETING:-hello} from a laminae layer"
"""

GREET = b"""#!/bin/sh
# Prints every greeting the image knows, one a line, with shell builtins only.
while read -r greeting; do
    echo "$greeting"
done < /etc/greetings
"""

# One entry of a layer: (path, kind, mode, content, or link target for "symlink"/"hardlink").
# Kinds: "dir", "file", "symlink", "hardlink"; a whiteout is an empty "file" named .wh.<name>.
Entry = tuple[str, str, int, bytes | str]


def _dirs(*paths: str) -> list[Entry]:
    return [(p, "dir", 0o755, b"") for p in paths]


LAYERS: tuple[tuple[str, list[Entry]], ...] = (
    (
        "base: a tiny root filesystem with /bin/hello",
        [
            ("bin", "symlink", 0o777, "usr/bin"),
            *_dirs("dev", "etc"),
            ("etc/group", "file", 0o644, b"root:x:0:\n"),
            ("etc/hello.conf", "file", 0o644, b"GREETING=hello\n"),
            ("etc/issue", "file", 0o644, b"hello \\n \\l\n"),
            ("etc/os-release", "file", 0o644, b'NAME="hello"\nID=hello\nVERSION_ID=1\n'),
            ("etc/passwd", "file", 0o644, b"root:x:0:0:root:/root:/bin/sh\n"),
            *_dirs("opt", "opt/host", "proc"),
            ("root", "dir", 0o700, b""),
            *_dirs("sys"),
            ("tmp", "dir", 0o1777, b""),
            *_dirs("usr", "usr/bin"),
            ("usr/bin/hello", "file", 0o755, HELLO),
            *_dirs("usr/share", "usr/share/doc", "usr/share/doc/hello"),
            ("usr/share/doc/hello/README", "file", 0o644, b"An example image for laminae.\n"),
            *_dirs("var", "var/lib", "var/lib/hello"),
        ],
    ),
    (
        "greetings: add /usr/share/hello/greetings.txt, delete /etc/issue",
        [
            *_dirs("etc"),
            ("etc/.wh.issue", "file", 0o644, b""),
            *_dirs("usr", "usr/share", "usr/share/hello"),
            ("usr/share/hello/greetings.txt", "file", 0o644, b"hello\nhallo\nbonjour\nhola\n"),
        ],
    ),
    (
        "links: /usr/local/bin/greet, hi (a hard link to it), /etc/greetings (a symlink)",
        [
            *_dirs("etc"),
            ("etc/greetings", "symlink", 0o777, "../usr/share/hello/greetings.txt"),
            *_dirs("usr", "usr/local", "usr/local/bin"),
            ("usr/local/bin/greet", "file", 0o755, GREET),
            ("usr/local/bin/hi", "hardlink", 0o755, "usr/local/bin/greet"),
        ],
    ),
)


def _info(name: str, mode: int) -> tarfile.TarInfo:
    """A tar header owned by root and dated :data:`MTIME`."""
    info = tarfile.TarInfo(name)
    info.mode = mode
    info.mtime = MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = "root"
    return info


def build_layer_tar(entries: Sequence[Entry]) -> bytes:
    """One uncompressed layer tar (its sha256 is the layer's DiffID), entries in path order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path, kind, mode, payload in sorted(entries, key=lambda e: e[0]):
            info = _info(path, mode)
            if kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif kind in ("symlink", "hardlink"):
                assert isinstance(payload, str)
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = payload
                tar.addfile(info)
            else:
                assert kind == "file" and isinstance(payload, bytes)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return out.getvalue()


def compress(data: bytes) -> bytes:
    """gzip ``data`` at level 9 with no file name and a zero time in the header."""
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz:
        gz.write(data)
    return out.getvalue()


def digest(data: bytes) -> str:
    """The OCI digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def encode(document: Mapping[str, Any]) -> bytes:
    """Compact JSON in the key order given, as the Go tools write it."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    """The descriptor of blob ``data``, with ``extra`` fields (platform, annotations)."""
    return {"mediaType": media_type, "digest": digest(data), "size": len(data), **extra}


def build_config(platform: Mapping[str, str], diff_ids: Sequence[str]) -> bytes:
    """The image config for ``platform``: runtime defaults, the DiffIDs and the history."""
    document = {
        "created": CREATED,
        "author": "laminae examples",
        **platform,
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello"],
            "Cmd": ["/bin/hello"],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": "hello",
                "org.opencontainers.image.description": "An example image for laminae",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": [
            {"created": CREATED, "created_by": f"make-hello-image.py # {comment}"}
            for comment, _ in LAYERS
        ],
    }
    return encode(document)


def build_image() -> tuple[bytes, bytes]:
    """The oci-archive's bytes, and the base layer blob (``hello-layer.tar.gz``)."""
    blobs: dict[str, bytes] = {}

    def add(data: bytes) -> bytes:
        blobs[digest(data)] = data
        return data

    tars = [build_layer_tar(entries) for _, entries in LAYERS]
    layers = [add(compress(tar)) for tar in tars]
    diff_ids = [digest(tar) for tar in tars]
    manifests = []
    for platform in PLATFORMS:
        config = add(build_config(platform, diff_ids))
        manifest = add(
            encode(
                {
                    "schemaVersion": 2,
                    "mediaType": MEDIA_MANIFEST,
                    "config": descriptor(MEDIA_CONFIG, config),
                    "layers": [descriptor(MEDIA_LAYER_GZIP, blob) for blob in layers],
                }
            )
        )
        manifests.append(descriptor(MEDIA_MANIFEST, manifest, platform=dict(platform)))
    index = add(encode({"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": manifests}))
    top = encode(
        {
            "schemaVersion": 2,
            "mediaType": MEDIA_INDEX,
            "manifests": [
                descriptor(MEDIA_INDEX, index, annotations={ANNOTATION_REF_NAME: REF_NAME})
            ],
        }
    )
    members: list[tuple[str, bytes | None]] = [
        ("blobs", None),
        ("blobs/sha256", None),
        *((f"blobs/sha256/{d.removeprefix('sha256:')}", blobs[d]) for d in sorted(blobs)),
        ("index.json", top),
        ("oci-layout", encode({"imageLayoutVersion": "1.0.0"})),
    ]
    return write_archive(members), layers[0]


def write_archive(members: Sequence[tuple[str, bytes | None]]) -> bytes:
    """A plain tar of ``members`` (``None``: a directory), in the order given."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            if data is None:
                info = _info(name, 0o755)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info = _info(name, 0o644)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) :data:`IMAGE` and :data:`BASE_LAYER`."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    archive, base = build_image()
    if args.check:
        status = 0
        for path, data in ((IMAGE, archive), (BASE_LAYER, base)):
            shipped = path.read_bytes() if path.exists() else None
            if shipped != data:
                print(
                    f"{path} differs from what {Path(__file__).name} builds (the gzip "
                    f"layers depend on the deflate implementation: zlib "
                    f"{zlib.ZLIB_RUNTIME_VERSION} here); rebuild it without --check",
                    file=sys.stderr,
                )
                status = 1
        if status:
            return status
    else:
        IMAGE.write_bytes(archive)
        BASE_LAYER.write_bytes(base)
    print(f"{IMAGE.name}: {len(archive)} bytes, {digest(archive)}")
    print(f"{BASE_LAYER.name}: {len(base)} bytes, {digest(base)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
