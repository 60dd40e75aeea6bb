"""Committing a container: its changes become a layer on its image, and a new image on top.

What ``docker commit`` does, with the same rules:

- the container keeps its own (active) layer, and may stay mounted and running: its changes
  are *copied* out as an OCI layer tar, which is applied as a new committed layer on the
  image's top layer (so the new layer has a recorded tar-split and exports to the very tar
  whose DiffID the config names);
- the new image's config is the parent's, with one more ``rootfs.diff_ids`` entry and one
  more ``history`` entry, and a new ``created``; the parent image is not touched;
- an unmodified container still gives a layer (the empty tar), so that ``diff_ids`` and the
  non-empty ``history`` entries keep matching one to one.

:meth:`laminae.Store.commit_container` runs the steps (diff, apply, record the image); this
module holds what they follow: the new image's config (:func:`commit_config`), and the
container's changes as ``docker diff`` lists them (:func:`with_parent_dirs`). It knows nothing
of the store.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from laminae.archive._changes import Change, ChangeKind
from laminae.images._image import ImageConfig, Platform, encode_json, parse_config
from laminae.store._records import Image

__all__ = [
    "COMMIT_CREATED_BY",
    "commit_config",
    "image_config",
    "with_parent_dirs",
]

COMMIT_CREATED_BY = "laminae container commit"
"""The ``created_by`` of the history entry a commit adds (``docker commit`` leaves it empty)."""


def _timestamp(when: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, as the Go tools write an image's ``created``."""
    return when.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def commit_config(
    parent: ImageConfig | None,
    base_diff_ids: tuple[str, ...],
    diff_id: str,
    *,
    created: datetime,
    message: str | None = None,
    author: str | None = None,
) -> bytes:
    """The config of an image that is ``parent`` plus one layer with DiffID ``diff_id``.

    Every field of ``parent`` is kept, in its order (unknown ones too); ``created`` is
    replaced, ``author`` too when given, and the layer is appended to ``rootfs.diff_ids``
    and ``history``.

    :param parent: the parent image's config; ``None`` for an image that has none (a
        container made with no image, or from an image recorded without a config): then
        a minimal config for this host is made.
    :param base_diff_ids: the DiffIDs of the parent image's layers, base first; used when
        there is no ``parent`` config.
    :returns: the new config's exact bytes (compact JSON, as the Go tools write).
    """
    stamp = _timestamp(created)
    data: dict[str, Any]
    if parent is not None:
        data = json.loads(parent.raw)
    else:
        host = Platform.host()
        data = {
            "architecture": host.architecture,
            "os": host.os,
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": list(base_diff_ids)},
            "history": [],
        }
    data["created"] = stamp
    if author is not None:
        data["author"] = author
    rootfs = dict(data["rootfs"])
    rootfs["diff_ids"] = [*rootfs["diff_ids"], diff_id]
    data["rootfs"] = rootfs
    entry: dict[str, Any] = {"created": stamp, "created_by": COMMIT_CREATED_BY}
    if author is not None:
        entry["author"] = author
    if message is not None:
        entry["comment"] = message
    history = data.get("history")
    data["history"] = [*(history if isinstance(history, list) else []), entry]
    return encode_json(data)


def with_parent_dirs(changes: Iterable[Change]) -> list[Change]:
    """``changes`` and every directory above one of them as modified, sorted by path.

    What ``docker diff`` shows (moby's ``ChangesDirs`` adds "the directory holding a change,
    even if it was not changed itself, to save and restore its permissions"), so the list
    is the same whichever driver found the changes. ``/`` itself is never listed.
    """
    listed = {change.path: change for change in changes}
    for path in list(listed):
        parent = path.rpartition("/")[0]
        while parent and parent not in listed:
            listed[parent] = Change(parent, ChangeKind.MODIFIED)
            parent = parent.rpartition("/")[0]
    return sorted(listed.values())


def image_config(image: Image) -> ImageConfig | None:
    """``image``'s parsed config, or ``None`` when it was recorded without one.

    :raises InvalidArgument: the stored config is malformed.
    """
    if image.config is None:
        return None
    return parse_config(image.config, what=f"config of image {image.id}")
