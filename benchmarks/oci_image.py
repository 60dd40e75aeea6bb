"""Deterministic multi-layer OCI images (image layouts) for the import and mount benchmarks.

An image is written as an OCI image layout: ``oci-layout``, ``index.json`` naming the image by
its tag (``org.opencontainers.image.ref.name``), and ``blobs/sha256/`` holding the manifest,
the config (with ``rootfs.diff_ids``) and gzip-compressed layer tars. Every byte follows from
fixed seeds (gzip headers carry no name and mtime 0), so every run of every tool reads the same
image, and the tree the layers make together is known in advance: :class:`ImageModel` applies
the layers' entries, whiteouts and opaque directories the way the image-spec says, and its
summary is what an unpacked image must hold.

Two images:

- :func:`write_benchmark_image`: eight layers in a realistic mix: a 30,000-file base (with
  symlinks and a few larger libraries), then layers that add packages, rewrite files, white out
  files and whole directories, make directories opaque, add a large file and hard links, delete
  the large file again, and a last layer with one directory.
- :func:`write_stack_image`: ``depth`` tiny layers of one file each, for deep-stack mounts.

``python oci_image.py DIR [--scale F] [--depth N]`` writes one by hand.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import stat
import sys
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
from layer_tars import MIB, OTHER_UID, Entry, TarWriter, TreeSummary, summarize_entries

__all__ = [
    "ImageLayer",
    "ImageModel",
    "OciImage",
    "oci_platform",
    "write_benchmark_image",
    "write_oci_archive",
    "write_stack_image",
]

REF_NAME = "org.opencontainers.image.ref.name"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
INDEX_TYPE = "application/vnd.oci.image.index.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
_CREATED = "2023-11-14T22:13:20Z"
"""The layers' MTIME as a date, for the config's ``created`` and ``history``."""
_GZIP_LEVEL = 6
"""gzip's default, and what image builders use."""


def oci_platform() -> dict[str, str]:
    """This machine's platform in OCI terms, so that tools filtering by platform accept it."""
    machine = platform.machine()
    arch = {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)
    return {"architecture": arch, "os": "linux"}


@attrs.frozen
class ImageLayer:
    """One layer blob of an image."""

    digest: str
    """sha256 of the gzip blob, as the manifest names it."""
    diff_id: str
    size: int
    """Bytes of the gzip blob."""
    tar_size: int
    """Bytes of the uncompressed tar."""
    entries: int
    description: str


@attrs.frozen
class OciImage:
    """An image layout written by this module."""

    layout: Path
    tag: str
    manifest_digest: str
    config_digest: str
    layers: list[ImageLayer]
    tree: TreeSummary
    """What the layers make together, applied in order to an empty directory."""

    @property
    def reference(self) -> str:
        """The image as skopeo names it: ``oci:LAYOUT:TAG``."""
        return f"oci:{self.layout}:{self.tag}"

    @property
    def compressed_bytes(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def tar_bytes(self) -> int:
        return sum(layer.tar_size for layer in self.layers)

    def blob(self, digest: str) -> Path:
        algorithm, _, encoded = digest.partition(":")
        return self.layout / "blobs" / algorithm / encoded

    def describe(self) -> str:
        return (
            f"{len(self.layers)} layers, {self.tree.files:,} files and {self.tree.dirs:,} dirs "
            f"in the end; {self.tar_bytes / MIB:,.1f} MiB of tars, "
            f"{self.compressed_bytes / MIB:,.1f} MiB gzipped"
        )


class ImageModel:
    """The tree that layers make together, entry by entry, as the image-spec applies them.

    An entry replaces what was at its path (a directory replacing a directory keeps the
    children; anything else replacing a directory drops them); a whiteout deletes a path and
    everything below it; an opaque marker deletes everything below a directory that the
    layers underneath put there. The layers write the opaque marker right after the
    directory's own entry, before its new children, so "underneath" is "so far".
    """

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def add(self, entry: Entry) -> None:
        old = self._entries.get(entry.path)
        if old is not None and stat.S_ISDIR(old.st_mode) and not stat.S_ISDIR(entry.st_mode):
            self._drop_below(entry.path)
        self._entries[entry.path] = entry

    def whiteout(self, path: str) -> None:
        old = self._entries.pop(path, None)
        if old is not None and stat.S_ISDIR(old.st_mode):
            self._drop_below(path)

    def opaque(self, directory: str) -> None:
        self._drop_below(directory)

    def _drop_below(self, directory: str) -> None:
        prefix = directory + "/"
        for path in [p for p in self._entries if p.startswith(prefix)]:
            del self._entries[path]

    def get(self, path: str) -> Entry | None:
        return self._entries.get(path)

    def paths(self, prefix: str = "") -> list[str]:
        """Every path under ``prefix`` (non-directories only), sorted."""
        return sorted(
            p
            for p, e in self._entries.items()
            if p.startswith(prefix) and not stat.S_ISDIR(e.st_mode)
        )

    def summary(self) -> TreeSummary:
        return summarize_entries(self._entries.values())


class _LayerWriter(TarWriter):
    """A layer tar that also tells the image's model what it does, and writes every parent
    directory of what it touches (as image builders do), with the attributes it has."""

    def __init__(self, out: Any, model: ImageModel) -> None:
        super().__init__(out, on_entry=model.add)
        self.model = model
        self._dirs: set[str] = set()

    def parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            name = "/".join(parts[:depth])
            if name in self._dirs:
                continue
            old = self.model.get(name)
            if old is not None and stat.S_ISDIR(old.st_mode):
                self.directory(name, uid=old.uid, mode=stat.S_IMODE(old.st_mode))
            else:
                self.directory(name)

    def directory(self, name: str, *, uid: int = 0, mode: int = 0o755) -> None:
        self._dirs.add(name)
        super().directory(name, uid=uid, mode=mode)

    def put(
        self, name: str, content: bytes | memoryview, *, uid: int = 0, mode: int = 0o644
    ) -> None:
        self.parents(name)
        self.file(name, [content], len(content), uid=uid, mode=mode)

    def link(self, name: str, target: str) -> None:
        self.parents(name)
        self.symlink(name, target)

    def whiteout(self, name: str) -> None:
        self.parents(name)
        super().whiteout(name)
        self.model.whiteout(name)

    def opaque(self, directory: str) -> None:
        super().opaque(directory)
        self.model.opaque(directory)


class _GzipBlob:
    """A file-like sink that gzips what it is given into ``path`` and hashes the blob."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "wb", buffering=MIB)  # noqa: SIM115 (closed in close())
        # wbits 31: a gzip container; zlib writes mtime 0 and no file name, so it is stable.
        self._zlib = zlib.compressobj(_GZIP_LEVEL, zlib.DEFLATED, 31)
        self._sha = hashlib.sha256()
        self.size = 0

    def _emit(self, data: bytes) -> None:
        if data:
            self._file.write(data)
            self._sha.update(data)
            self.size += len(data)

    def write(self, data: bytes | memoryview) -> int:
        self._emit(self._zlib.compress(data))
        return len(data)

    def close(self) -> str:
        self._emit(self._zlib.flush())
        self._file.close()
        return f"sha256:{self._sha.hexdigest()}"


class _Content:
    """File content: windows of a text-like pool (words from a fixed vocabulary), which gzip
    squeezes about as much as it does a real root filesystem."""

    def __init__(self, rng: random.Random, pool_bytes: int = 4 * MIB) -> None:
        letters = "abcdefghijklmnopqrstuvwxyz_"
        vocabulary = ["".join(rng.choices(letters, k=rng.randint(2, 10))) for _ in range(4096)]
        words: list[str] = []
        length = 0
        while length < pool_bytes:
            word = rng.choice(vocabulary)
            words.append(word)
            length += len(word) + 1
        self._pool = memoryview(" ".join(words).encode()[:pool_bytes])
        self._rng = rng

    def take(self, size: int) -> memoryview:
        """``size`` bytes from a random offset (``size`` at most the pool's)."""
        offset = self._rng.randrange(len(self._pool) - size + 1)
        return self._pool[offset : offset + size]


def _write_json_blob(layout: Path, document: dict[str, Any]) -> tuple[str, int]:
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).write_bytes(data)
    return digest, len(data)


LayerContent = Callable[[_LayerWriter], None]
"""Writes one layer's entries."""


def write_image(layout: Path, tag: str, layers: Sequence[tuple[str, LayerContent]]) -> OciImage:
    """Write an image layout at ``layout`` (a new or empty directory) from ``layers``, base
    first: each a description and a function that writes the layer's entries."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    model = ImageModel()
    written: list[ImageLayer] = []
    for index, (description, content) in enumerate(layers):
        partial = blobs / f"layer-{index}.partial"
        sink = _GzipBlob(partial)
        tar = _LayerWriter(sink, model)
        content(tar)
        diff_id = tar.finish()
        digest = sink.close()
        partial.rename(blobs / digest.split(":", 1)[1])
        written.append(ImageLayer(digest, diff_id, sink.size, tar.size, tar.entries, description))
    config_digest, config_size = _write_json_blob(
        layout,
        {
            **oci_platform(),
            "created": _CREATED,
            "config": {
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "Cmd": ["/usr/bin/app"],
                "WorkingDir": "/app",
            },
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in written]},
            "history": [
                {"created": _CREATED, "created_by": layer.description} for layer in written
            ],
        },
    )
    manifest_digest, manifest_size = _write_json_blob(
        layout,
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": config_size},
            "layers": [
                {"mediaType": LAYER_TYPE, "digest": layer.digest, "size": layer.size}
                for layer in written
            ],
        },
    )
    index_document = {
        "schemaVersion": 2,
        "mediaType": INDEX_TYPE,
        "manifests": [
            {
                "mediaType": MANIFEST_TYPE,
                "digest": manifest_digest,
                "size": manifest_size,
                "platform": oci_platform(),
                "annotations": {REF_NAME: tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(index_document, sort_keys=True, indent=2) + "\n")
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    return OciImage(layout, tag, manifest_digest, config_digest, written, model.summary())


def _count(n: int, scale: float) -> int:
    return max(1, round(n * scale))


def write_benchmark_image(layout: Path, *, scale: float = 1.0, tag: str = "bench") -> OciImage:
    """The realistic mix: eight layers on a base of 30,000 files (times ``scale``)."""
    rng = random.Random(3)
    content = _Content(rng)
    base_dirs = _count(300, scale)
    small = 8 * 1024

    def leaf(i: int) -> str:
        return f"usr/{('lib', 'share', 'include')[i % 3]}/p{i:03d}"

    def base(tar: _LayerWriter) -> None:
        for name in ("bin", "lib", "sbin"):
            tar.link(name, f"usr/{name}")
        for i in range(base_dirs):
            tar.parents(f"{leaf(i)}/x")
            for f in range(100):
                uid = OTHER_UID if rng.random() < 0.05 else 0
                tar.put(f"{leaf(i)}/f{f:02d}", content.take(rng.randint(0, small)), uid=uid)
        for f in range(_count(200, scale)):
            tar.put(f"usr/bin/tool{f:03d}", content.take(rng.randint(small, 4 * small)), mode=0o755)
        for f in range(_count(20, scale)):
            tar.link(f"usr/bin/alias{f:02d}", f"tool{f:03d}")
        for f in range(_count(100, scale)):
            tar.put(f"etc/conf{f:02d}.conf", content.take(rng.randint(0, 2048)))
        for k in range(8):
            size = max(64 * 1024, round(2 * MIB * scale))
            chunks = [content.take(min(MIB, size - done)) for done in range(0, size, MIB)]
            tar.parents(f"usr/lib/big/lib{k}.so")
            tar.file(f"usr/lib/big/lib{k}.so", chunks, size, uid=0, mode=0o755)

    base_files: list[str] = []

    def packages(tar: _LayerWriter) -> None:
        base_files.extend(tar.model.paths("usr/"))
        for d in range(_count(50, scale)):
            for f in range(100):
                tar.put(f"opt/pkg{d:02d}/f{f:02d}", content.take(rng.randint(0, small)))
        regular = [p for p in base_files if "/p" in p]
        rewritten = rng.sample(regular, _count(300, scale) + _count(50, scale))
        for path in rewritten[: _count(300, scale)]:
            tar.put(path, content.take(rng.randint(0, small)))
        for path in rewritten[_count(300, scale) :]:
            tar.put(path, content.take(rng.randint(0, 512)), mode=0o700)

    def cleanup(tar: _LayerWriter) -> None:
        dirs = rng.sample(range(base_dirs), min(base_dirs, 8))
        for i in dirs[:5]:
            tar.whiteout(leaf(i))
        for i in dirs[5:]:
            old = tar.model.get(leaf(i))
            assert old is not None
            tar.parents(f"{leaf(i)}/x")
            tar.opaque(leaf(i))
            for f in range(10):
                tar.put(f"{leaf(i)}/new{f}", content.take(rng.randint(0, small)))
        alive = [p for p in tar.model.paths("usr/") if "/f" in p and "/new" not in p]
        for path in rng.sample(alive, min(len(alive), _count(500, scale))):
            tar.whiteout(path)

    def dependencies(tar: _LayerWriter) -> None:
        for d in range(_count(30, scale)):
            for f in range(100):
                tar.put(f"app/node_modules/m{d:03d}/f{f:02d}", content.take(rng.randint(0, small)))
        size = max(MIB, round(32 * MIB * scale))
        tar.parents("app/data/blob.bin")
        chunks = [content.take(min(MIB, size - done)) for done in range(0, size, MIB)]
        tar.file("app/data/blob.bin", chunks, size, uid=OTHER_UID, mode=0o600)

    def config(tar: _LayerWriter) -> None:
        for path in rng.sample(tar.model.paths("etc/"), min(20, _count(100, scale))):
            tar.put(path, content.take(rng.randint(0, 2048)))
        tar.link("usr/bin/alias00", "tool001")

    def app(tar: _LayerWriter) -> None:
        for d in range(_count(5, scale)):
            for f in range(100):
                tar.put(f"app/src/s{d}/f{f:02d}.py", content.take(rng.randint(0, small)))
        for f in range(50):
            tar.parents(f"app/src/links/h{f:02d}")
            tar.hardlink(f"app/src/links/h{f:02d}", f"app/src/s0/f{f:02d}.py")

    def slimming(tar: _LayerWriter) -> None:
        tar.whiteout("app/data/blob.bin")
        modules = sorted({p.rsplit("/", 1)[0] for p in tar.model.paths("app/node_modules/")})
        gone = rng.sample(modules, len(modules) // 6)
        for directory in gone:
            tar.whiteout(directory)
        left = [p for p in tar.model.paths("app/node_modules/")]
        for path in rng.sample(left, min(len(left), _count(500, scale))):
            tar.whiteout(path)

    def metadata(tar: _LayerWriter) -> None:
        tar.parents("var/lib/bench/x")

    return write_image(
        layout,
        tag,
        [
            (f"base: {base_dirs * 100:,} small files, tools, symlinks, 8 libraries", base),
            ("packages: new files under opt/, base files rewritten and re-moded", packages),
            ("cleanup: files and whole dirs whited out, dirs made opaque", cleanup),
            ("dependencies: node_modules and one large file", dependencies),
            ("config: files in etc/ rewritten, a symlink re-pointed", config),
            ("app: source files and hard links", app),
            ("slimming: the large file and some modules whited out", slimming),
            ("metadata: one directory", metadata),
        ],
    )


def write_stack_image(layout: Path, depth: int, *, tag: str = "stack") -> OciImage:
    """``depth`` tiny layers, each adding one small file under ``stack/``."""

    def one(k: int) -> LayerContent:
        def content(tar: _LayerWriter) -> None:
            tar.put(f"stack/l{k:03d}", f"layer {k}\n".encode())

        return content

    return write_image(layout, tag, [(f"layer {k}", one(k)) for k in range(depth)])


def write_oci_archive(image: OciImage, path: Path) -> Path:
    """A tar of the layout (an "OCI archive"), the form ``ctr images import`` reads."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for top, dirnames, filenames in os.walk(image.layout):
            dirnames.sort()
            for name in sorted(filenames):
                full = Path(top, name)
                archive.add(full, arcname=str(full.relative_to(image.layout)), recursive=False)
    return path


def _blob_paths(layout: Path) -> Iterator[Path]:
    yield from sorted((layout / "blobs" / "sha256").iterdir())


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description="Write a benchmark OCI image layout.")
    parser.add_argument("layout", type=Path, help="a new or empty directory")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--depth", type=int, help="write the deep stack image instead")
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.depth is not None:
        image = write_stack_image(args.layout, args.depth, tag=args.tag or "stack")
    else:
        image = write_benchmark_image(args.layout, scale=args.scale, tag=args.tag or "bench")
    print(f"{image.reference}: {image.describe()}, in {time.perf_counter() - start:.1f} s")
    print(f"manifest {image.manifest_digest}")
    for layer in image.layers:
        print(
            f"  {layer.digest[:19]} {layer.tar_size / MIB:8.1f} MiB tar "
            f"{layer.size / MIB:7.1f} MiB gz {layer.entries:7,} entries  {layer.description}"
        )
    print(f"blobs: {len(list(_blob_paths(args.layout)))}; tree {image.tree}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
