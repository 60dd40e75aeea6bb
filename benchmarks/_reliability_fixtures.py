"""What the reliability campaign works on: small layer tars whose trees it knows, OCI image
layouts of them, the signature of a layer tar, and foreign mounts a store must leave alone.

Layers are small on purpose (a few hundred files, about a megabyte), so that an import or an
apply takes a fraction of a second on a loaded host, a random kill lands in every step of it,
and re-exporting every committed layer after every kill stays cheap. Every byte follows from a
seed (gzip headers carry no name and mtime 0), so the DiffIDs are known before any import.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from collections.abc import Sequence
from pathlib import Path

import attrs
from oci_image import oci_platform

__all__ = [
    "COMMIT_DIR",
    "Foreign",
    "Layout",
    "TarSignature",
    "digest",
    "layer_tar",
    "signature",
    "write_layout",
]

MTIME = 1_700_000_000
COMMIT_DIR = "work"
"""The directory a committing victim writes its files into; its files hold their own names."""
_REF_NAME = "org.opencontainers.image.ref.name"

TarSignature = tuple[tuple[str, str, int, str], ...]
"""A layer tar's entries, sorted: (path, type, size, sha256 of the content)."""


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(prefix: str, files: int, seed: int, *, max_size: int = 8192) -> bytes:
    """A plain layer tar of ``files`` files of random sizes under ``prefix/dNN/``, with the
    directories above them; deterministic for a seed."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = sorted({f"{prefix}/d{i % 10:02d}" for i in range(files)})
        for path in [prefix, *dirs]:
            info = tarfile.TarInfo(path)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        for i in range(files):
            data = rng.randbytes(rng.randint(0, max_size))
            info = tarfile.TarInfo(f"{prefix}/d{i % 10:02d}/f{i:04d}")
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def signature(tar_bytes: bytes | io.BufferedIOBase) -> TarSignature:
    """The entries of a layer tar, order-free (see :data:`TarSignature`)."""
    stream = io.BytesIO(tar_bytes) if isinstance(tar_bytes, bytes) else tar_bytes
    entries = []
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            name = member.name.removeprefix("./").rstrip("/")
            content = b""
            if member.isfile():
                extracted = tar.extractfile(member)
                content = extracted.read() if extracted is not None else b""
            kind = "file" if member.isfile() else "dir" if member.isdir() else str(member.type)
            entries.append((name, kind, len(content), hashlib.sha256(content).hexdigest()))
    return tuple(sorted(entries))


@attrs.frozen
class Layout:
    """An OCI image layout written by :func:`write_layout`: ``oci:PATH:TAG``."""

    path: Path
    tag: str
    diff_ids: tuple[str, ...]
    layer_digests: tuple[str, ...]

    @property
    def reference(self) -> str:
        return f"oci:{self.path}:{self.tag}"

    def blob(self, blob_digest: str) -> Path:
        return self.path / "blobs" / "sha256" / blob_digest.removeprefix("sha256:")


def _encode(document: object) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode()


def _put(layout: Path, data: bytes) -> str:
    name = digest(data)
    path = layout / "blobs" / "sha256" / name.removeprefix("sha256:")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return name


def write_layout(
    layout: Path, tag: str, tars: Sequence[bytes], *, blobs: Sequence[bytes] | None = None
) -> Layout:
    """Write an image of ``tars`` (plain, base first; gzipped here) for this host's platform
    into a new layout, named ``tag`` in its index.

    :param blobs: the layer blobs to write instead of the gzipped tars (a hostile image: the
        config still names the tars' DiffIDs).
    """
    layout.mkdir(parents=True)
    (layout / "oci-layout").write_bytes(_encode({"imageLayoutVersion": "1.0.0"}))
    if blobs is None:
        blobs = [gzip.compress(t, compresslevel=6, mtime=0) for t in tars]
    layer_digests = [_put(layout, b) for b in blobs]
    diff_ids = [digest(t) for t in tars]
    config = _encode(
        {
            "created": "2023-11-14T22:13:20Z",
            **oci_platform(),
            "config": {"Env": ["PATH=/usr/bin:/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"layer {i}"} for i in range(len(tars))],
        }
    )
    config_digest = _put(layout, config)
    layer_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    manifest = _encode(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": layer_type, "digest": d, "size": len(b)}
                for d, b in zip(layer_digests, blobs, strict=True)
            ],
        }
    )
    manifest_digest = _put(layout, manifest)
    index = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": len(manifest),
                "annotations": {_REF_NAME: tag},
            }
        ],
    }
    (layout / "index.json").write_bytes(_encode(index))
    return Layout(layout, tag, tuple(diff_ids), tuple(layer_digests))


def _mount_points() -> set[str]:
    with open("/proc/self/mountinfo", "rb") as table:
        return {os.fsdecode(line.split()[4]) for line in table}


_PRECIOUS = b"not laminae's\n"


@attrs.define
class Foreign:
    """Mounts made beside a store, as another store or a user would make them: tmpfs and
    binds of a marked directory, each holding a file that must survive the campaign.

    :param source: the directory the binds show (made here, holding the marked file).
    """

    source: Path
    points: list[Path] = attrs.field(factory=list)

    @classmethod
    def make(cls, source: Path) -> Foreign:
        source.mkdir(parents=True)
        (source / "precious").write_bytes(_PRECIOUS)
        return cls(source)

    def bind(self, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "--bind", str(self.source), str(target)], check=True)
        self.points.append(target)

    def tmpfs(self, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "foreign", str(target)], check=True
        )
        self.points.append(target)
        (target / "precious").write_bytes(_PRECIOUS)

    def surround(self, root: Path, runroot: Path, elsewhere: Path) -> None:
        """Foreign mounts wherever a store of ``root`` and ``runroot`` might look: where its
        mounts and scratch directories go (one named like a storage id), and elsewhere."""
        self.bind(runroot / "mounts" / ("ab" * 32))
        self.tmpfs(runroot / "mounts" / "someone-elses")
        self.tmpfs(runroot / "tmp" / "0123456789abcdef")
        self.bind(runroot / "foreign-bind")
        self.bind(root / "tmp" / "scratch-lookalike")
        self.tmpfs(elsewhere / "mounts" / ("cd" * 32))
        self.bind(elsewhere / "tmp" / "00000000aaaaaaaa")

    def touched(self) -> list[str]:
        """The foreign mounts that are gone, or whose marked file is gone or changed."""
        mounted = _mount_points()
        lost = []
        for point in self.points:
            if str(point) not in mounted:
                lost.append(f"{point}: unmounted")
                continue
            try:
                intact = (point / "precious").read_bytes() == _PRECIOUS
            except OSError:
                intact = False
            if not intact:
                lost.append(f"{point}: its file is gone or changed")
        return lost

    def unmount(self) -> None:
        """Unmount them by path, last first (lazily if something still holds one)."""
        mounted = _mount_points()
        for point in reversed(self.points):
            if str(point) in mounted:
                done = subprocess.run(["umount", str(point)], check=False, capture_output=True)
                if done.returncode != 0:
                    subprocess.run(["umount", "-l", str(point)], check=False)
        self.points.clear()
