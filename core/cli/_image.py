"""The image commands of ``laminae``: ``image import|export|ls|inspect|rm|tag``, ``pull``, ``push``.

They follow the conventions of :mod:`laminae.cli._main` (one error line and the error's exit code,
``--json`` on listings). The transfers (import, export, pull, push) share more flags:

- progress: rich bars on stderr when stderr is a terminal, else one plain line per finished
  layer; ``--quiet`` shows none; ``--json`` writes JSON lines on stdout (the events of
  :class:`laminae.images._progress.JsonProgress`, then one ``{"event": "result", ...}`` object);
- registry access: ``--insecure-registry HOST``, ``--creds USER[:PASS]``, ``--authfile``,
  ``--cert-dir``, as skopeo spells them.

The top group loads this module only when one of its commands runs (see
``_LaminaeGroup.get_command``), so the layer commands never pay for importing the registry
client.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import click

from laminae._exceptions import InvalidArgument, NotFound
from laminae._storeoptions import StoreOptions
from laminae.archive._compression import Compression
from laminae.cli._main import (
    _json_option,
    _print_json,
    _print_table,
    _short,
    _with_store,
)
from laminae.images._image import parse_config
from laminae.images._transports import ImageLocation, built_in_transports, parse_location

if TYPE_CHECKING:
    from laminae._store import Store
    from laminae.images._credentials import RegistryOptions
    from laminae.images._image import ImageConfig
    from laminae.images._progress import Progress
    from laminae.store._records import Image

__all__ = ["image", "pull", "push"]


# -- the flags every transfer shares ----------------------------------------------------------


@attrs.frozen
class _Transfer:
    """How a transfer reports (``quiet``, ``as_json``) and reaches registries."""

    quiet: bool
    as_json: bool
    registry: RegistryOptions

    @contextmanager
    def progress(self) -> Iterator[Progress]:
        """The reporter these flags ask for, closed when the transfer ends (or fails)."""
        from laminae.images._progress import JsonProgress, LineProgress, NullProgress

        reporter: Progress
        if self.quiet:
            reporter = NullProgress()
        elif self.as_json:
            reporter = JsonProgress(sys.stdout)
        elif sys.stderr.isatty():
            import rich.console

            from laminae.images._progress import RichProgress

            reporter = RichProgress(rich.console.Console(stderr=True))
        else:
            reporter = LineProgress(sys.stderr)
        try:
            yield reporter
        finally:
            reporter.close()

    def result(self, text: str, fields: dict[str, Any]) -> None:
        """The command's last line: ``text``, or with ``--json`` a result object of ``fields``."""
        if self.as_json:
            click.echo(json.dumps({"event": "result", **fields}))
        else:
            click.echo(text)


def _credentials(text: str | None) -> tuple[str, str] | None:
    """``USER:PASS`` as a pair; ``USER`` alone asks for the password on the terminal."""
    if text is None:
        return None
    user, colon, password = text.partition(":")
    if not user:
        # The value is not repeated: it may hold a password.
        raise InvalidArgument("--creds: expected USER[:PASS] with a user name before any ':'")
    if not colon:
        password = click.prompt(f"Password for {user}", hide_input=True, err=True)
    return user, password


def _registry_options(
    base: RegistryOptions | None,
    insecure: Sequence[str],
    creds: str | None,
    authfile: Path | None,
    cert_dir: Path | None,
) -> RegistryOptions:
    """The flags over ``base``, the config file's ``[registries]``: insecure hosts add up,
    the other flags replace the file's value."""
    from laminae.images._credentials import RegistryOptions

    base = base or RegistryOptions()
    return attrs.evolve(
        base,
        insecure_hosts=base.insecure_hosts | frozenset(insecure),
        credentials=_credentials(creds) or base.credentials,
        auth_file=authfile or base.auth_file,
        certs_dir=cert_dir or base.certs_dir,
    )


def _transfer_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the shared flags to ``command`` and hand it one ``transfer=_Transfer`` instead."""

    @functools.wraps(command)
    def wrapper(
        *args: Any,
        quiet: bool,
        as_json: bool,
        insecure: tuple[str, ...],
        creds: str | None,
        authfile: Path | None,
        cert_dir: Path | None,
        **kwargs: Any,
    ) -> None:
        settings = click.get_current_context().find_object(StoreOptions)
        assert settings is not None, "the top group sets it"
        file = settings.config().registries
        registry = _registry_options(file, insecure, creds, authfile, cert_dir)
        command(*args, transfer=_Transfer(quiet, as_json, registry), **kwargs)

    options = [
        click.option("-q", "--quiet", is_flag=True, help="No progress; print only the result."),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="JSON lines on stdout: progress events, then the result.",
        ),
        click.option(
            "--insecure-registry",
            "insecure",
            multiple=True,
            metavar="HOST[:PORT]",
            help="Reach this registry over plain HTTP; repeatable.",
        ),
        click.option("--creds", metavar="USER[:PASS]", help="Registry credentials."),
        click.option(
            "--authfile",
            type=click.Path(dir_okay=False, path_type=Path),
            help="auth.json to read credentials from.",
        ),
        click.option(
            "--cert-dir",
            type=click.Path(file_okay=False, path_type=Path),
            help="Directory of <host[:port]>/*.crt CA certificates.",
        ),
    ]
    decorated: Callable[..., None] = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated


_platform_option = click.option(
    "--platform", metavar="OS/ARCH[/VARIANT]", help="Image to pick from an index (default: host)."
)
_jobs_option = click.option(
    "--jobs",
    type=click.IntRange(min=1),
    help="Layers moved at once (default: the store's choice).",
)
_compression_option = click.option(
    "--compression",
    type=click.Choice([c.value for c in Compression]),
    help="Layer compression (default: what DEST wants, else gzip).",
)
_names_option = click.option(
    "--name", "names", multiple=True, help="Name for the image; repeatable."
)


def _locations_help(first: str) -> str:
    """``first``, then one line per built-in transport from the transport table (a plugin's
    transports would need the plugin manager, which a help text does not load)."""
    transports = built_in_transports().values()
    width = max(len(t.usage) for t in transports) + 2
    # "\b" keeps click from rewrapping the table.
    rows = "\n".join(f"  {t.usage:<{width}}{t.summary}" for t in transports)
    return f"{first}\n\n\b\n{rows}"


def _location(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> ImageLocation | None:
    # Parsed while click reads the arguments, so a bad location fails (exit 2, naming it)
    # before the store is opened or created.
    return None if value is None else parse_location(value)


def _image_result(verb: str, image: Image, transfer: _Transfer) -> None:
    # As `docker load` says it: "Loaded image: hello:latest", and the id for scripts.
    text = (
        f"{verb} image: {', '.join(image.names)} ({image.id})"
        if image.names
        else f"{verb} image ID: {image.id}"
    )
    fields = {"id": image.id, "names": list(image.names), "digest": image.manifest_digest}
    transfer.result(text, fields)


# -- image ------------------------------------------------------------------------------------


@click.group()
def image() -> None:
    """Import, export, list, inspect, tag and remove images."""


@image.command("import", help=_locations_help("Import an image from SOURCE. Locations:"))
@click.argument("source", callback=_location)
@_names_option
@_platform_option
@_jobs_option
@_transfer_options
@_with_store
def image_import(
    store: Store,
    source: ImageLocation,
    names: tuple[str, ...],
    platform: str | None,
    jobs: int | None,
    transfer: _Transfer,
) -> None:
    """Import an image from SOURCE; the help lists the locations."""
    with transfer.progress() as progress:
        result = store.import_image(
            source,
            names=names,
            platform=platform,
            registry=transfer.registry,
            progress=progress,
            jobs=jobs,
        )
    _image_result("Loaded", result, transfer)


@image.command("export", help=_locations_help("Write IMAGE to DEST; print its digest. Locations:"))
@click.argument("ref", metavar="IMAGE")
@click.argument("destination", metavar="DEST", callback=_location)
@_compression_option
@_jobs_option
@_transfer_options
@_with_store
def image_export(
    store: Store,
    ref: str,
    destination: ImageLocation,
    compression: str | None,
    jobs: int | None,
    transfer: _Transfer,
) -> None:
    """Write IMAGE to DEST; print its digest (the help lists the locations)."""
    with transfer.progress() as progress:
        digest = store.export_image(
            ref,
            destination,
            compression=Compression(compression) if compression else None,
            registry=transfer.registry,
            progress=progress,
            jobs=jobs,
        )
    _written("Exported", ref, destination, digest, transfer)


def _written(
    verb: str, ref: str, location: ImageLocation | str, digest: str, transfer: _Transfer
) -> None:
    transfer.result(
        f"{verb} {ref} to {location}: {digest}",
        {"image": ref, "destination": str(location), "digest": digest},
    )


@attrs.frozen
class _ImageRow:
    """One row of ``image ls``: ``size`` is the uncompressed bytes of all its layers."""

    id: str
    names: tuple[str, ...]
    digest: str | None
    created: Any  # datetime; Any keeps the JSON converter's own datetime hook
    size: int
    layers: int


def _layer_sizes(store: Store, item: Image) -> list[int]:
    return [layer.size or 0 for layer in store.image_layers(item.id)]


@image.command("ls")
@_json_option
@_with_store
def image_ls(store: Store, as_json: bool) -> None:
    """List images: id, names, created, size, layer count."""
    rows = []
    for item in store.images():
        sizes = _layer_sizes(store, item)
        rows.append(
            _ImageRow(
                item.id, item.names, item.manifest_digest, item.created, sum(sizes), len(sizes)
            )
        )
    if as_json:
        _print_json(rows, list[_ImageRow])
        return
    _print_table(
        ("ID", "NAMES", "CREATED", "SIZE", "LAYERS"),
        ((_short(r.id), r.names, r.created, r.size, r.layers) for r in rows),
    )


def _inspect_fields(item: Image, config: ImageConfig | None, size: int) -> dict[str, Any]:
    """``skopeo inspect``'s fields (``Names`` is docker's ``RepoTags``), from the stored image."""
    run = config.container_config if config is not None else {}
    return {
        "Id": item.id,
        "Names": list(item.names),
        "Digest": item.manifest_digest,
        "Created": config.created if config is not None else item.created.isoformat(),
        "Architecture": config.architecture if config is not None else None,
        "Os": config.os if config is not None else None,
        "Variant": config.variant if config is not None else None,
        "Layers": list(config.diff_ids) if config is not None else [],
        "TopLayer": item.top_layer,
        "Env": run.get("Env") or [],
        "Cmd": run.get("Cmd"),
        "Entrypoint": run.get("Entrypoint"),
        "WorkingDir": run.get("WorkingDir") or "",
        "User": run.get("User") or "",
        "Labels": run.get("Labels") or {},
        "Size": size,
    }


@image.command("inspect")
@click.argument("ref", metavar="IMAGE")
@_with_store
def image_inspect(store: Store, ref: str) -> None:
    """Print an image's identity and configuration as JSON (as `skopeo inspect` does)."""
    item = store.image(ref)
    config = None
    if item.config is not None:
        config = parse_config(item.config, what=f"config of image {item.id}")
    size = sum(_layer_sizes(store, item))
    click.echo(json.dumps(_inspect_fields(item, config, size), indent=2))


@image.command("rm")
@click.argument("refs", metavar="IMAGE...", nargs=-1, required=True)
@_with_store
def image_rm(store: Store, refs: tuple[str, ...]) -> None:
    """Remove images, in the order given. A name of an image with other names is only untagged.

    Prints "Untagged: NAME", "Deleted image: ID" and "Deleted layer: ID" for what went.
    Stops at the first error.
    """
    for ref in refs:
        before = store.image(ref)
        removed_layers = store.remove_image(ref)
        try:
            left: tuple[str, ...] | None = store.image(before.id).names
        except NotFound:
            left = None
        for name in before.names:
            if left is None or name not in left:
                click.echo(f"Untagged: {name}")
        if left is None:
            click.echo(f"Deleted image: {before.id}")
        for layer_id in removed_layers:
            click.echo(f"Deleted layer: {layer_id}")


@image.command("tag")
@click.argument("ref", metavar="IMAGE")
@click.argument("name")
@_with_store
def image_tag(store: Store, ref: str, name: str) -> None:
    """Give IMAGE one more NAME (":latest" added without a tag); a name moves from another image."""
    store.tag_image(ref, name)


# -- registry shortcuts -----------------------------------------------------------------------


@click.command()
@click.argument("reference", metavar="REF")
@_platform_option
@_jobs_option
@_transfer_options
@_with_store
def pull(
    store: Store,
    reference: str,
    platform: str | None,
    jobs: int | None,
    transfer: _Transfer,
) -> None:
    """Pull an image from a registry: REF with or without docker://."""
    with transfer.progress() as progress:
        result = store.pull(
            reference,
            platform=platform,
            registry=transfer.registry,
            progress=progress,
            jobs=jobs,
        )
    _image_result("Pulled", result, transfer)


def _registry_location(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> ImageLocation | None:
    # A registry reference, "docker://" optional, checked before the store is opened.
    if value is None:
        return None
    return parse_location(value if value.startswith("docker://") else f"docker://{value}")


@click.command()
@click.argument("ref", metavar="IMAGE")
@click.argument("destination", metavar="[DEST]", required=False, callback=_registry_location)
@_compression_option
@_jobs_option
@_transfer_options
@_with_store
def push(
    store: Store,
    ref: str,
    destination: ImageLocation | None,
    compression: str | None,
    jobs: int | None,
    transfer: _Transfer,
) -> None:
    """Push IMAGE to a registry: DEST, with or without docker:// (default: IMAGE's own name).

    Print the manifest digest.
    """
    target = str(destination) if destination is not None else f"docker://{ref}"
    with transfer.progress() as progress:
        digest = store.push(
            ref,
            target,
            compression=Compression(compression) if compression else None,
            registry=transfer.registry,
            progress=progress,
            jobs=jobs,
        )
    _written("Pushed", ref, target, digest, transfer)
