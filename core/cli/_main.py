"""The ``laminae`` command: a thin layer of argument handling and printing over the API.

Every command opens the store the way :func:`open_store` does (flags over the
environment over ``storage.toml``), calls one or two API functions, and prints the result: a
rich table when stdout is a terminal, tab-separated lines otherwise, JSON with ``--json``.

An error prints exactly one line, ``laminae: error: <message>``, on stderr and exits with the
error's ``exit_code`` (``--debug`` prints the traceback first). The exit codes and the
configuration are documented in ``docs/cli.md``.

Defining the commands imports only click and attrs: the store, the image code, rich and cattrs
are imported inside the commands that use them, so that ``laminae --help`` starts as fast as
click allows and ``laminae layer ls`` pays for the store alone.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Concatenate, NoReturn, ParamSpec, TypeVar

import attrs
import click

from laminae._exceptions import CorruptLayer, InvalidArgument, LaminaeError, map_os_errors
from laminae._storeoptions import StoreOptions, key_values, store_options

if TYPE_CHECKING:
    from cattrs.preconf.json import JsonConverter

    from laminae._config import StoreConfig
    from laminae._store import Store
    from laminae.archive._changes import Change
    from laminae.archive._compression import Compression
    from laminae.driverkit._contract import Capabilities
    from laminae.store._records import DiffResult

__all__ = ["cli", "main"]

_P = ParamSpec("_P")
_R = TypeVar("_R")


# -- JSON -------------------------------------------------------------------------------------


@functools.cache
def _json() -> JsonConverter:
    """The converter behind every ``--json``: datetimes ISO-8601, paths as strings, enums by
    value (made on first use: cattrs is not needed without ``--json``)."""
    import types

    from cattrs.preconf.json import make_converter

    converter = make_converter()
    # The preconfigured converter already writes datetimes as ISO-8601 and enums by value.
    converter.register_unstructure_hook(Path, str)
    converter.register_unstructure_hook(types.MappingProxyType, dict)
    # Sets come out in a stable order, so that two runs give the same bytes.
    converter.register_unstructure_hook(
        frozenset, lambda value: sorted(converter.unstructure(item) for item in value)
    )
    return converter


# -- output -----------------------------------------------------------------------------------


def _stdout_is_terminal() -> bool:
    return sys.stdout.isatty()


def _plain(value: object) -> str:
    """One field of a tab-separated line: no tabs or newlines inside, ``-`` for nothing."""
    if value is None or (isinstance(value, str | list | tuple | frozenset | Mapping) and not value):
        return "-"
    if isinstance(value, datetime):
        text = value.isoformat()
    elif isinstance(value, Mapping):
        text = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
    elif isinstance(value, list | tuple | frozenset):
        text = ",".join(str(item) for item in value)
    else:
        text = str(value)
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _print_json(value: object, unstructure_as: Any = None) -> None:
    click.echo(_json().dumps(value, unstructure_as=unstructure_as, indent=2))


def _print_table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    """Rows as a rich table on a terminal, else one tab-separated line each (no header)."""
    if not _stdout_is_terminal():
        for row in rows:
            click.echo("\t".join(_plain(cell) for cell in row))
        return
    import rich.box
    import rich.console
    import rich.markup
    import rich.table

    cells = [[_terminal_cell(cell) for cell in row] for row in rows]
    table = rich.table.Table(box=rich.box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for index, column in enumerate(columns):
        last = index == len(columns) - 1
        # On a narrow terminal short columns keep their width and the last one folds, so
        # that no value is cut off.
        widest = max([len(column), *(len(row[index]) for row in cells)])
        table.add_column(
            column, no_wrap=not last, overflow="fold" if last else "ellipsis",
            min_width=min(widest, 20),
        )  # fmt: skip
    for row in cells:
        table.add_row(*(rich.markup.escape(cell) for cell in row))
    rich.console.Console().print(table)


def _terminal_cell(value: object) -> str:
    if isinstance(value, datetime):
        # Minutes in local time read better in a table; the full value is in --json.
        return value.astimezone().strftime("%Y-%m-%d %H:%M")
    return _plain(value)


def _flatten(value: object, prefix: str = "") -> list[tuple[str, object]]:
    # Nested records read as dotted keys ("capabilities.max_depth"), one per line.
    if isinstance(value, dict) and value and prefix != "labels":
        fields: list[tuple[str, object]] = []
        for key, item in value.items():
            fields.extend(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return fields
    return [(prefix, value)]


def _print_record(value: object) -> None:
    """One attrs value as ``key<TAB>value`` lines, or a two-column table on a terminal."""
    _print_table(("KEY", "VALUE"), _flatten(_json().unstructure(value)))


def _short(ref: str | None) -> str | None:
    """A layer id cut to 12 hex digits for tables on a terminal; full ids everywhere else."""
    if ref is None or not _stdout_is_terminal():
        return ref
    digits = ref.removeprefix("sha256:")
    return digits[:12] if len(digits) == 64 else ref


@contextlib.contextmanager
def _open_output(path: str) -> Iterator[BinaryIO]:
    """Stdout for ``-``, else a file that appears only if the block succeeds.

    (``click.open_file(atomic=True)`` renames the temporary file even when the block fails.)
    """
    if path == "-":
        sys.stdout.flush()
        yield sys.stdout.buffer
        return
    import tempfile

    target = Path(path)
    with map_os_errors(f"output file {path!r}"):
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # what open() would have made, not mkstemp's 0600
        with os.fdopen(fd, "wb") as out, map_os_errors(f"write {path!r}"):
            yield out
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# -- errors -----------------------------------------------------------------------------------


def _fail(exc: BaseException, code: int, debug: bool) -> NoReturn:
    if debug:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    message = str(exc) if isinstance(exc, LaminaeError) else f"{type(exc).__name__}: {exc}"
    # Exactly one line, whatever the message holds.
    message = " ".join(message.split("\n")) or type(exc).__name__
    click.echo(f"laminae: error: {message}", err=True)
    raise click.exceptions.Exit(code)


_IMAGE, _CONTAINER, _BUNDLE = "laminae.cli._image", "laminae.cli._container", "laminae.cli._bundle"

_LAZY_COMMANDS: Mapping[str, tuple[str, str]] = {
    "bundle": (_BUNDLE, "Mount CONTAINER and write an OCI runtime bundle for it in DIR."),
    "container": (_CONTAINER, "Create, list, mount, diff, commit and export containers."),
    "driver": ("laminae.cli._driver", "Start a storage driver distribution of your own."),
    "image": (_IMAGE, "Import, export, list, inspect, tag and remove images."),
    "pull": (_IMAGE, "Pull an image from a registry: REF with or without docker://."),
    "push": (
        _IMAGE,
        "Push IMAGE to a registry: DEST, with or without docker:// (default: IMAGE's own name).",
    ),
    "snapshotter": (
        "laminae.snapshotter._command",
        "Serve a store to containerd as a proxy snapshotter (docs/containerd.md).",
    ),
    "unbundle": (
        _BUNDLE,
        "Unmount the container of the bundle in DIR and remove what `laminae bundle` wrote.",
    ),
}
"""Commands defined in another module, loaded when named, and the first paragraph of their
help, which ``laminae --help`` lists without loading them (tests/test_api.py checks that it is
the command's own). The image commands need the image pipeline, the container and bundle
commands theirs; the layer commands should wait for none of them."""


class _LaminaeGroup(click.Group):
    """The top group: turns every error below it into one line on stderr and an exit code."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_LAZY_COMMANDS})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _LAZY_COMMANDS:
            return super().get_command(ctx, cmd_name)
        module = _LAZY_COMMANDS[cmd_name][0]
        command = getattr(importlib.import_module(module), cmd_name)
        assert isinstance(command, click.Command), f"{module}.{cmd_name} is a click command"
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # click's own listing asks every command for its short help, which would load every
        # lazy module (and the store and image code they use) to print one line each.
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(name) for name in names)
        rows = []
        for name in names:
            if name in _LAZY_COMMANDS:
                # A stand-in with the command's help, shortened as the command's own would be.
                command = click.Command(name, help=_LAZY_COMMANDS[name][1])
            else:
                command = self.commands[name]
            if not command.hidden:
                rows.append((name, command.get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            try:
                return super().invoke(ctx)
            finally:
                # Close the store here, not after click's own handling, so that an error
                # while closing is reported like any other.
                ctx.close()
        except (click.exceptions.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as exc:
            broken_pipe = _broken_pipe(exc)
            if broken_pipe is not None:
                # The reader went away (`laminae layer ls | head -1`): not an error worth a
                # line. Click's own handling exits 1 quietly and silences the final flush.
                raise broken_pipe from None
            if isinstance(exc, LaminaeError):
                _fail(exc, exc.exit_code, debug)
            _fail(exc, 1, debug)  # anything unexpected is still one line


def _broken_pipe(exc: BaseException) -> BrokenPipeError | None:
    """The ``BrokenPipeError`` behind ``exc`` (the API keeps it as ``__cause__``), if any."""
    current: BaseException | None = exc
    while current is not None:
        if isinstance(current, BrokenPipeError):
            return current
        current = current.__cause__
    return None


# -- arguments --------------------------------------------------------------------------------


class _LazyChoice(click.Choice[str]):
    """A ``click.Choice`` whose values are asked for when a command parses or shows its
    options, not when it is defined: the values are an enum's, and importing the enum's module
    (the store's records, the compression codecs) would make every ``--help`` pay for it.

    :param values: returns the choices, importing what it needs.
    """

    def __init__(self, values: Callable[[], Iterable[str]]) -> None:
        # Not click.Choice.__init__: it would set the choices, which are read only on demand.
        self.case_sensitive = True
        self._values = values

    @functools.cached_property
    def choices(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(self._values())


def _with_store(command: Callable[Concatenate[Store, _P], _R]) -> Callable[_P, _R]:
    """Call ``command(store, ...)`` with the store opened from the global options."""

    @functools.wraps(command)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        ctx = click.get_current_context()
        settings = ctx.find_object(StoreOptions)
        assert settings is not None, "the top group sets it"
        # Closed by _LaminaeGroup.invoke when the command is done.
        return command(ctx.find_root().with_resource(settings.open()), *args, **kwargs)

    return wrapper


_json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON.")


# -- commands ---------------------------------------------------------------------------------


@click.group(cls=_LaminaeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@store_options
@click.option("--debug", is_flag=True, help="Print the traceback of an error.")
@click.version_option(package_name="laminae")
@click.pass_context
def cli(
    ctx: click.Context,
    root: Path | None,
    runroot: Path | None,
    driver: str | None,
    config_path: Path | None,
    storage_opts: dict[str, str],
    debug: bool,
) -> None:
    """Store container-image layers through pluggable storage drivers."""
    ctx.obj = StoreOptions(root, runroot, driver, config_path, storage_opts)


@cli.command()
@_json_option
@_with_store
def info(store: Store, as_json: bool) -> None:
    """Show the store: where it is, its driver and what it holds."""
    result = store.info()
    if as_json:
        _print_json(result)
    else:
        _print_record(result)


@attrs.frozen
class _DriverStatus:
    """One row of ``laminae drivers``; ``unavailable`` is the probe's reason, ``None`` if usable;
    ``selected_by`` says why the store would open with this driver, ``None`` for the others."""

    name: str
    priority: int
    origin: str
    capabilities: Capabilities
    home: Path
    unavailable: str | None
    selected_by: str | None = None


def _selection(
    settings: StoreOptions, config: StoreConfig, root: Path, statuses: Sequence[_DriverStatus]
) -> tuple[str | None, str]:
    """The driver the store at ``root`` opens with, and why: the order ``open_store`` follows
    (a name given, else the one that made the store, else the first usable by priority)."""
    from laminae.store._graph import recorded_driver

    graph = root / "graph.db"
    try:
        recorded = recorded_driver(graph)
    except LaminaeError as exc:  # a damaged graph: the listing still helps
        recorded, unreadable = None, f" ({exc})"
    else:
        unreadable = ""
    explicit, why = settings.driver, "--driver"
    if explicit is None and config.driver is not None:
        explicit, why = config.driver, config.driver_setting or "the configuration"
    if explicit is not None:
        if recorded is not None and recorded != explicit:
            why += f"; but the store was made by {recorded!r} and will not open with it"
        return explicit, why + unreadable
    if recorded is not None:
        return recorded, f"made the store ({graph})"
    usable = [s.name for s in statuses if s.unavailable is None]
    if config.driver_priority:
        chosen = next((name for name in config.driver_priority if name in usable), None)
        return chosen, f"{config.source}: storage.driver_priority{unreadable}"
    return (usable[0] if usable else None), f"priority: the highest usable{unreadable}"


@cli.command()
@_json_option
@click.pass_obj
def drivers(settings: StoreOptions, as_json: bool) -> None:
    """List drivers, their probes and the one the store uses.

    The last column says why that one: --driver, $LAMINAE_DRIVER, storage.toml, the store's
    own record, or priority. Works without a store: nothing is created, the probe only looks.
    """
    from laminae.driverkit._plugins import available_drivers, broken_plugins

    config = settings.config()
    root = (settings.root or config.graphroot).absolute()
    statuses = []
    for entry in sorted(available_drivers().values(), key=lambda e: (-e.priority, e.name)):
        options = dict(config.driver_options.get(entry.name, {}))
        if entry.name == (settings.driver or config.driver):
            options.update(settings.storage_opts)
        # The driver's home inside a store is <root>/<driver name> (Store.driver_home).
        home = root / entry.name
        statuses.append(
            _DriverStatus(
                entry.name,
                entry.priority,
                entry.origin,
                entry.capabilities,
                home,
                entry.probe(home, options),
            )
        )
    selected, why = _selection(settings, config, root, statuses)
    statuses = [attrs.evolve(s, selected_by=why) if s.name == selected else s for s in statuses]
    # A plugin that failed to load is listed, not fatal: the other drivers still work.
    broken = broken_plugins()
    if as_json:
        # As dicts: cattrs would resolve the annotations, and Capabilities is not imported
        # at module level (see the module docstring).
        _print_json(
            [attrs.asdict(status, recurse=False) for status in statuses]
            + [{**attrs.asdict(plugin), "broken": True} for plugin in broken]
        )
        return
    _print_table(
        ("DRIVER", "PRIORITY", "ORIGIN", "PROBE", "SELECTED BY"),
        [
            *(
                (s.name, s.priority, s.origin, s.unavailable or "ok", s.selected_by)
                for s in statuses
            ),
            *((p.name, "-", p.origin, f"broken: {p.error}", None) for p in broken),
        ],
    )


@cli.group()
def layer() -> None:
    """Create, import, inspect, mount and remove layers."""


@layer.command("create")
@click.option("--parent", metavar="REF", help="Committed layer to start from.")
@click.option(
    "--view", is_flag=True, help="Read-only view of the parent instead of a writable layer."
)
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", callback=key_values)
@click.argument("key", required=False)
@_with_store
def layer_create(
    store: Store,
    parent: str | None,
    view: bool,
    labels: dict[str, str],
    key: str | None,
) -> None:
    """Create an active (writable) layer, or a view with --view; print its id."""
    click.echo(store.create_layer(key, parent, view=view, labels=labels or None).id)


@layer.command("apply")
@click.option("--parent", metavar="REF", help="Committed layer the tar applies onto.")
@click.option("--name", "names", multiple=True, help="Name for the layer; repeatable.")
@click.option("--diff-id", metavar="DIGEST", help="Expected DiffID (uncompressed digest).")
@click.option("--digest", metavar="DIGEST", help="Expected digest of the file as given.")
@click.argument("tar", type=click.Path(dir_okay=False, allow_dash=True, path_type=str))
@_with_store
def layer_apply(
    store: Store,
    parent: str | None,
    names: tuple[str, ...],
    diff_id: str | None,
    digest: str | None,
    tar: str,
) -> None:
    """Import a layer tar (plain, gzip or zstd; - for stdin); print its id (the ChainID)."""
    source: BinaryIO | Path = sys.stdin.buffer if tar == "-" else Path(tar)
    result = store.apply_layer(source, parent, diff_id=diff_id, digest=digest, names=names)
    click.echo(result.id)


def _layer_kinds() -> list[str]:
    from laminae.store._records import LayerKind

    return [kind.value for kind in LayerKind]


@layer.command("ls")
@click.option("--kind", type=_LazyChoice(_layer_kinds), help="Only layers of this kind.")
@_json_option
@_with_store
def layer_ls(store: Store, kind: str | None, as_json: bool) -> None:
    """List layers: id, kind, parent, names, size, created, mount count."""
    from laminae.store._records import Layer, LayerKind

    layers = store.layers(kind=LayerKind(kind) if kind else None)
    if as_json:
        _print_json(layers, list[Layer])
        return
    _print_table(
        ("ID", "KIND", "PARENT", "NAMES", "SIZE", "CREATED", "MOUNTS"),
        (
            (
                _short(item.id),
                item.kind.value,
                _short(item.parent),
                item.names,
                item.size,
                item.created,
                item.mount_count,
            )
            for item in layers
        ),
    )


@layer.command("inspect")
@click.argument("ref")
@_json_option
@_with_store
def layer_inspect(store: Store, ref: str, as_json: bool) -> None:
    """Show everything the store knows about one layer."""
    result = store.layer(ref)
    if as_json:
        _print_json(result)
    else:
        _print_record(result)


@layer.command("rm")
@click.argument("refs", metavar="REF...", nargs=-1, required=True)
@_with_store
def layer_rm(store: Store, refs: tuple[str, ...]) -> None:
    """Remove layers, in the order given; print each id removed. Stops at the first error."""
    for ref in refs:
        layer_id = store.layer(ref).id
        store.remove_layer(ref)
        click.echo(layer_id)


@layer.command("mount")
@click.argument("ref")
@click.option("--readonly", is_flag=True, help="Mount read-only (committed layers always are).")
@_with_store
def layer_mount(store: Store, ref: str, readonly: bool) -> None:
    """Mount a layer and print the path; the mount stays until `layer unmount`."""
    click.echo(str(store.mount(ref, readonly=readonly)))


@layer.command("unmount")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Unmount whatever the count says.")
@_with_store
def layer_unmount(store: Store, ref: str, force: bool) -> None:
    """Release one mount of a layer; the last one really unmounts."""
    store.unmount(ref, force=force)


def _change_line(change: Change) -> str:
    """``A path`` (added), ``C path`` (changed) or ``D path`` (deleted), as ``docker diff``."""
    from laminae.archive._changes import ChangeKind

    letters = {ChangeKind.ADDED: "A", ChangeKind.MODIFIED: "C", ChangeKind.DELETED: "D"}
    return f"{letters[change.kind]} {change.path}"


@layer.command("changes")
@click.argument("ref")
@_json_option
@_with_store
def layer_changes(store: Store, ref: str, as_json: bool) -> None:
    """List what a layer changed against its parent: A added, C changed, D deleted."""
    from laminae.archive._changes import Change

    changes = store.changes(ref)
    if as_json:
        _print_json(changes, list[Change])
        return
    for change in changes:
        click.echo(_change_line(change))


def _compressions() -> list[str]:
    from laminae.archive._compression import Compression

    return [compression.value for compression in Compression]


def _tar_output_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``-o/--output`` and ``--compression``, for the commands that write a layer tar."""
    command = click.option(
        "--compression", type=_LazyChoice(_compressions), default="none", show_default=True
    )(command)
    return click.option(
        "-o",
        "--output",
        type=click.Path(dir_okay=False, allow_dash=True, path_type=str),
        default="-",
        show_default=True,
        help="File to write; - for stdout.",
    )(command)


@layer.command("export")
@click.argument("ref")
@click.option(
    "--changes",
    is_flag=True,
    help="Write a committed layer's changes as a new tar, not the tar it came from.",
)
@_tar_output_options
@_with_store
def layer_export(store: Store, ref: str, changes: bool, output: str, compression: str) -> None:
    """Write a layer as an OCI layer tar: a committed layer's own tar (checked against its
    DiffID), an active layer's or a view's changes.

    With -o FILE, print the DiffID, the digest of what was written and its size.
    """
    from laminae.store._records import LayerKind

    if not changes and store.layer(ref).kind is LayerKind.COMMITTED:
        _write_tar(
            output, compression, lambda out, how: store.export_layer(ref, out, compression=how)
        )
    else:
        _write_tar(output, compression, lambda out, how: store.diff(ref, out, compression=how))


def _write_tar(
    output: str, compression: str, write: Callable[[BinaryIO, Compression], DiffResult]
) -> None:
    """Run ``write`` into ``output`` (``-o``; never a terminal); with a file, print what
    was written."""
    if output == "-" and _stdout_is_terminal():
        raise InvalidArgument(
            "refusing to write a tar to a terminal: redirect stdout or use -o FILE"
        )
    from laminae.archive._compression import Compression

    with _open_output(output) as out:
        result = write(out, Compression(compression))
    if output != "-":
        _print_table(("DIFF ID", "DIGEST", "SIZE"), [(result.diff_id, result.digest, result.size)])


@cli.command()
@click.option(
    "--content",
    is_flag=True,
    help="Also re-derive every committed layer's DiffID from its files (reads every layer).",
)
@_json_option
@_with_store
def check(store: Store, content: bool, as_json: bool) -> None:
    """Look for orphans, missing storage, stale mounts and interrupted operations (and, with
    --content, changed layer files); exit 8 if any is found.

    Layers nothing holds are listed as notes, not problems.
    """
    report = store.check(content=content)
    if as_json:
        _print_json(report)
    else:
        for line in (*report.problems(), *(f"note: {n}" for n in report.notes())):
            click.echo(line)
    if not report.ok:
        count = len(report.problems())
        if report.graph_damage:
            # repair refuses a damaged graph: what it says of the layers cannot be trusted
            raise CorruptLayer(f"{count} problem(s) found; restore graph.db from a backup")
        if report.content_mismatch:
            raise CorruptLayer(
                f"{count} problem(s) found; no repair restores a layer's files: re-import "
                "the images that use the layers listed, or remove them"
            )
        raise CorruptLayer(f"{count} problem(s) found; `laminae repair` fixes them")


@cli.command()
@click.option(
    "--force",
    is_flag=True,
    help="Also remove storage no layer owns and layers nothing holds (kept otherwise).",
)
@_json_option
@_with_store
def repair(store: Store, force: bool, as_json: bool) -> None:
    """Fix what `check` finds; print one line per thing fixed or removed, and what was kept."""
    fixed = store.repair(force=force)
    if as_json:
        _print_json(fixed)
    else:
        for line in (*fixed.problems(), *fixed.notes()):
            click.echo(line)


def main(args: Sequence[str] | None = None) -> NoReturn:
    """Run ``laminae`` with ``args`` (default: ``sys.argv[1:]``) and exit."""
    cli.main(args, prog_name="laminae")
    sys.exit(0)  # click exits itself; this keeps the NoReturn promise for the type checker
