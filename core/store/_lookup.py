"""From references to rows, and from rows to records: how the store finds what users name.

A reference is an id, a unique prefix of one (``sha256:`` may be left out), or a name. Every
method of the store that takes a layer, an image or a container resolves it here, and every
record it hands out (:class:`~laminae.store._records.Layer`, ``Image``, ``Container``) is made
here from the graph's rows. Reads only: the caller holds the store lock when it must.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType
from typing import Any

from laminae._exceptions import InvalidArgument, NotFound
from laminae.store._graph import Graph, LayerRow
from laminae.store._records import ID_PREFIX, Container, Image, Layer, LayerKind, parse_time

__all__ = [
    "container_record",
    "image_layers",
    "image_record",
    "layer_record",
    "parent_storage_ids",
    "resolve_container",
    "resolve_image",
    "resolve_layer",
]


def resolve_layer(graph: Graph, ref: str) -> LayerRow:
    """The complete layer ``ref`` names: an id, a unique id prefix, or a name.

    :raises NotFound: nothing matches (an incomplete layer matches nothing).
    :raises InvalidArgument: ``ref`` is malformed or ambiguous.
    """
    if not isinstance(ref, str) or not ref or "\x00" in ref:
        raise InvalidArgument(f"layer reference {ref!r}: empty or not a string")
    row = graph.layer(ref)
    if row is None:
        named = graph.layer_for_name(ref)
        if named is not None:
            row = graph.layer(named)
    if row is None and ID_PREFIX.fullmatch(ref):
        matches = graph.match_prefix(ref.removeprefix("sha256:"))
        if len(matches) > 1:
            raise InvalidArgument(f"layer reference {ref!r}: ambiguous, give more digits")
        if matches:
            row = graph.layer(matches[0])
    if row is None or row.incomplete:
        raise NotFound(f"layer {ref!r}: no such layer")
    return row


def layer_record(graph: Graph, row: LayerRow) -> Layer:
    """The :class:`Layer` users see for ``row``, with its names and labels."""
    return Layer(
        id=row.id,
        parent=row.parent,
        kind=LayerKind(row.kind),
        storage_id=row.storage_id,
        diff_id=row.diff_id,
        digest=row.digest,
        size=row.size,
        names=graph.names(row.id),
        labels=MappingProxyType(graph.labels(row.id)),
        created=parse_time(row.created),
        updated=parse_time(row.updated),
        mount_count=row.mount_count,
        mount_point=Path(row.mount_point) if row.mount_point else None,
        depth=row.depth,
    )


def parent_storage_ids(graph: Graph, row: LayerRow) -> list[str]:
    """Storage ids of ``row``'s parents, immediate parent first: what a driver is given."""
    return [r.storage_id for r in graph.chain(row.id)[1:]]


def resolve_image(graph: Graph, ref: str) -> Any:
    """The ``images`` row ``ref`` names: an id, a unique id prefix, or a name ("x" is
    "x:latest").

    :raises NotFound: none does.
    :raises InvalidArgument: ``ref`` is empty or ambiguous.
    """
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument(f"image reference {ref!r}: empty or not a string")
    row = graph.image(ref) or graph.image(f"sha256:{ref}")
    if row is None:
        named = graph.image_for_name(ref)
        if named is None and ":" not in ref.rpartition("/")[2] and "@" not in ref:
            named = graph.image_for_name(f"{ref}:latest")
        if named is None and ID_PREFIX.fullmatch(ref):
            matches = graph.match_image_prefix(ref.removeprefix("sha256:"))
            if len(matches) > 1:
                raise InvalidArgument(f"image reference {ref!r}: ambiguous, give more digits")
            named = matches[0] if matches else None
        row = None if named is None else graph.image(named)
    if row is None:
        raise NotFound(f"image {ref!r}: no such image")
    return row


def image_record(graph: Graph, row: Any) -> Image:
    """The :class:`Image` users see for an ``images`` row, with its names."""
    return Image(
        id=row["id"],
        top_layer=row["top_layer"],
        names=graph.image_names(row["id"]),
        manifest_digest=row["manifest_digest"],
        config=row["config"],
        manifest=row["manifest"],
        created=parse_time(row["created"]),
    )


def image_layers(graph: Graph, row: Any) -> list[Layer]:
    """The layers of the image of ``images`` row ``row``, base first."""
    if row["top_layer"] is None:
        return []
    return [layer_record(graph, r) for r in reversed(graph.chain(row["top_layer"]))]


def resolve_container(graph: Graph, ref: str) -> Any:
    """The ``containers`` row ``ref`` names (id or name). :raises NotFound: none does."""
    if not isinstance(ref, str) or not ref:
        raise InvalidArgument(f"container reference {ref!r}: empty or not a string")
    row = graph.container(ref)
    if row is None:
        named = graph.container_for_name(ref)
        row = None if named is None else graph.container(named)
    if row is None:
        raise NotFound(f"container {ref!r}: no such container")
    return row


def container_record(row: Any) -> Container:
    """The :class:`Container` users see for a ``containers`` row."""
    return Container(
        id=row["id"],
        name=row["name"],
        image=row["image"],
        layer=row["layer"],
        created=parse_time(row["created"]),
    )
