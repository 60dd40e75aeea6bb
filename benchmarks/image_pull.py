"""Pulling one multi-layer image from a local registry: laminae against skopeo and ctr.

The image (the same layout the import case reads) is pushed once, with skopeo, into a
docker-registry on 127.0.0.1 (:mod:`registry_server`), whose storage is on the benchmark's
filesystem. Then every client pulls it into a fresh store of its own on that filesystem, with
the page cache dropped before each run (so the registry, too, reads the blobs from disk):

- **laminae**: ``laminae_once.py pull`` in a fresh process: ``open_store``, then
  ``store.pull("127.0.0.1:PORT/REPO:1", registry=RegistryOptions(insecure_hosts=...))``,
  the product's own pull (manifest, config, every blob verified; blobs fetched ahead into
  spool files while earlier layers apply; every layer made durable before the commit).
- **skopeo**: ``skopeo copy --src-tls-verify=false docker://127.0.0.1:PORT/REPO:1
  containers-storage:[DRIVER@ROOT+RUNROOT]localhost/REPO:latest``, isolated as for the import
  (no host storage.conf, registries.conf or credentials; an empty blob-info cache).
- **ctr**: ``ctr images pull --plain-http --snapshotter SNAPSHOTTER REF`` against a fresh
  private containerd (which unpacks). In containerd 1.6 the client does the fetching (into
  the daemon's content store) and drives the unpacking: the table shows ctr's own peak RSS
  and the daemon's.
- a reference row: ``ctr content fetch --plain-http REF`` (content store only, no
  snapshot), which shows how containerd's time splits.

Each is timed as a whole process, and the ``sync -f`` after it is added, as for the import;
every result is checked file by file against the image's tree.
"""

from __future__ import annotations

from pathlib import Path

from image_import import ImportTool, ctr_tool, laminae_tool, run_tools, skopeo_tool
from oci_image import OciImage
from registry_server import RegistryServer
from report import Run
from rich.console import Console

__all__ = ["pull_tools", "run_pull_case"]


def pull_tools(
    reference: str, driver: str, unavailable: str | None, snapshotter: str, storage_driver: str
) -> list[ImportTool]:
    """laminae, skopeo and ctr pulling ``reference`` (``HOST/REPO:TAG`` on a plain-HTTP
    registry), and ctr's content-only fetch as a reference row."""
    fetch = ctr_tool(
        "ctr content fetch (content store only)",
        snapshotter,
        lambda _: ["content", "fetch", "--plain-http", reference],
        lambda _: reference,
        unpack=False,
    )
    return [
        laminae_tool(
            f"laminae {driver} pull",
            driver,
            lambda _: ["pull", reference],
            unavailable=unavailable,
        ),
        skopeo_tool(
            f"skopeo docker:// -> c/storage {storage_driver}",
            storage_driver,
            lambda _: f"docker://{reference}",
            ["--src-tls-verify=false"],
        ),
        ctr_tool(
            f"ctr pull -> containerd {snapshotter}",
            snapshotter,
            lambda _: ["images", "pull", "--plain-http", "--snapshotter", snapshotter, reference],
            lambda _: reference,
        ),
        fetch,
    ]


def run_pull_case(
    console: Console,
    mnt: Path,
    registry: RegistryServer,
    image: OciImage,
    repeat: int,
    driver: str,
    unavailable: str | None,
    snapshotter: str,
    storage_driver: str,
) -> tuple[str, list[ImportTool], list[Run]]:
    """Push ``image`` into ``registry`` once, then every client pulls it ``repeat`` times; the
    reference pulled, the tools and the runs."""
    reference = registry.push(image.reference, f"{image.tag}:1", mnt / "push-scratch")
    console.print(f"  pushed {image.reference} to {reference}")
    tools = pull_tools(reference, driver, unavailable, snapshotter, storage_driver)
    return reference, tools, run_tools(console, mnt, image, tools, repeat)
