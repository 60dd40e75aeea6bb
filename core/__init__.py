"""laminae: container-image layers on disk, through pluggable storage drivers.

A *store* is a root directory, a run directory, one driver and one graph of layers::

    import laminae

    with laminae.open_store("/var/lib/laminae", driver="vfs") as store:
        base = store.apply_layer("rootfs.tar.gz")             # committed, id = its ChainID
        work = store.create_layer("build-1", parent=base.id)  # active, writable
        path = store.mount("build-1")                         # a real mount, counted
        ...                                                   # write into path
        store.unmount("build-1")
        top = store.commit_layer("build-1")                   # committed, id = ChainID
        print([str(c) for c in store.changes(top.id)])

This namespace is for people using a store: :func:`open_store` and :class:`Store`, the
configuration, the records a store hands out (with the capabilities and usage its driver
reports), the errors, progress reporters, registry options and runtime bundles. Two more
namespaces serve other readers: :mod:`laminae.driverkit` for driver authors (the driver
contract, the plugin hook and the toolkit the built-in drivers are written with; ``pytest
--pyargs laminae.conformance --laminae-driver NAME`` checks a driver against the contract)
and :mod:`laminae.images` for image documents and references. Everything else is private.

Names resolve on first use (:pep:`562`), so ``import laminae`` costs next to nothing and a
program pays only for the parts it touches. Names that moved to :mod:`laminae.driverkit` or
:mod:`laminae.images` still resolve here for one release, with a :class:`DeprecationWarning`
that names the new home.
"""

import importlib as _importlib
import warnings as _warnings

# Not typing.TYPE_CHECKING: importing typing would be most of what `import laminae` costs.
# Type checkers take any TYPE_CHECKING as true; it is deleted at the end, being no public name.
TYPE_CHECKING = False
if TYPE_CHECKING:
    # What type checkers and editors see; at run time __getattr__ imports the same names on
    # first use (tests/test_api.py checks that both agree).
    from laminae._config import StoreConfig, load_config
    from laminae._exceptions import (
        AlreadyExists,
        CorruptLayer,
        DriverUnavailable,
        FailedPrecondition,
        InvalidArgument,
        LaminaeError,
        LimitExceeded,
        NotFound,
        PermissionDenied,
        ResourceExhausted,
        Unavailable,
        Unsupported,
    )
    from laminae._store import Store, open_store
    from laminae.archive._changes import Change, ChangeKind
    from laminae.archive._compression import Compression
    from laminae.archive._limits import DevicePolicy, Limits
    from laminae.containers._bundle import BindMount, Bundle, make_bundle, remove_bundle
    from laminae.driverkit._contract import Capabilities, Feature, Usage
    from laminae.driverkit._plugins import DriverEntry, available_drivers
    from laminae.images._credentials import RegistryOptions
    from laminae.images._progress import (
        JsonProgress,
        LineProgress,
        NullProgress,
        Progress,
        RichProgress,
    )
    from laminae.store._records import (
        CheckReport,
        Container,
        DiffResult,
        Image,
        Layer,
        LayerKind,
        StoreInfo,
        chain_id,
    )

if TYPE_CHECKING:
    # The moved names (see _MOVED), typed for as long as they resolve.
    from laminae.driverkit import Applier as Applier
    from laminae.driverkit import ApplyResult as ApplyResult
    from laminae.driverkit import ChangeReporter as ChangeReporter
    from laminae.driverkit import Committer as Committer
    from laminae.driverkit import DetachedApplier as DetachedApplier
    from laminae.driverkit import Driver as Driver
    from laminae.driverkit import DriverRegistry as DriverRegistry
    from laminae.driverkit import MountSpec as MountSpec
    from laminae.driverkit import ParentsNeeded as ParentsNeeded
    from laminae.driverkit import QuotaSetter as QuotaSetter
    from laminae.driverkit import Unsettled as Unsettled
    from laminae.driverkit import WhiteoutMode as WhiteoutMode
    from laminae.driverkit import apply_tar as apply_tar
    from laminae.driverkit import apply_tar_detached as apply_tar_detached
    from laminae.driverkit import hookimpl as hookimpl
    from laminae.driverkit import naive_changes as naive_changes
    from laminae.driverkit import settle_detached as settle_detached
    from laminae.driverkit import tree_usage as tree_usage
    from laminae.driverkit import write_changes_tar as write_changes_tar
    from laminae.images import Descriptor as Descriptor
    from laminae.images import ImageConfig as ImageConfig
    from laminae.images import ImageLocation as ImageLocation
    from laminae.images import ImageSink as ImageSink
    from laminae.images import ImageSource as ImageSource
    from laminae.images import Index as Index
    from laminae.images import Manifest as Manifest
    from laminae.images import Platform as Platform
    from laminae.images import Reference as Reference
    from laminae.images import local_name as local_name
    from laminae.images import parse_config as parse_config
    from laminae.images import parse_location as parse_location
    from laminae.images import parse_manifest as parse_manifest
    from laminae.images import parse_reference as parse_reference


def _names(module: str, names: str) -> dict[str, str]:
    return dict.fromkeys(names.split(), module)


_PUBLIC: dict[str, str] = {
    **_names("laminae._config", "StoreConfig load_config"),
    **_names(
        "laminae._exceptions",
        "AlreadyExists CorruptLayer DriverUnavailable FailedPrecondition InvalidArgument "
        "LaminaeError LimitExceeded NotFound PermissionDenied ResourceExhausted Unavailable "
        "Unsupported",
    ),
    **_names("laminae._store", "Store open_store"),
    **_names("laminae.archive._limits", "DevicePolicy Limits"),
    **_names("laminae.archive._changes", "Change ChangeKind"),
    **_names("laminae.archive._compression", "Compression"),
    **_names("laminae.containers._bundle", "BindMount Bundle make_bundle remove_bundle"),
    **_names("laminae.driverkit._contract", "Capabilities Feature Usage"),
    **_names("laminae.driverkit._plugins", "DriverEntry available_drivers"),
    **_names("laminae.images._credentials", "RegistryOptions"),
    **_names(
        "laminae.images._progress", "JsonProgress LineProgress NullProgress Progress RichProgress"
    ),
    **_names(
        "laminae.store._records",
        "CheckReport Container DiffResult Image Layer LayerKind StoreInfo chain_id",
    ),
}
"""Each public name and the module that defines it."""

_MOVED: dict[str, str] = {
    **_names(
        "laminae.driverkit",
        "Applier ApplyResult ChangeReporter Committer DetachedApplier Driver DriverRegistry "
        "MountSpec ParentsNeeded QuotaSetter Unsettled WhiteoutMode apply_tar apply_tar_detached "
        "hookimpl naive_changes settle_detached tree_usage write_changes_tar",
    ),
    **_names(
        "laminae.images",
        "Descriptor ImageConfig ImageLocation ImageSink ImageSource Index Manifest Platform "
        "Reference local_name parse_config parse_location parse_manifest parse_reference",
    ),
}
"""Names that were public here and live in another public namespace now, by their new home.

They resolve, with a :class:`DeprecationWarning`, for one release; then they are gone.
"""

_SUBPACKAGES = frozenset({"driverkit", "images"})
"""The other public namespaces, reachable as ``laminae.driverkit`` after ``import laminae``."""

__all__ = [
    "AlreadyExists",
    "BindMount",
    "Bundle",
    "Capabilities",
    "Change",
    "ChangeKind",
    "CheckReport",
    "Compression",
    "Container",
    "CorruptLayer",
    "DevicePolicy",
    "DiffResult",
    "DriverEntry",
    "DriverUnavailable",
    "FailedPrecondition",
    "Feature",
    "Image",
    "InvalidArgument",
    "JsonProgress",
    "LaminaeError",
    "Layer",
    "LayerKind",
    "LimitExceeded",
    "Limits",
    "LineProgress",
    "NotFound",
    "NullProgress",
    "PermissionDenied",
    "Progress",
    "RegistryOptions",
    "ResourceExhausted",
    "RichProgress",
    "Store",
    "StoreConfig",
    "StoreInfo",
    "Unavailable",
    "Unsupported",
    "Usage",
    "available_drivers",
    "chain_id",
    "load_config",
    "make_bundle",
    "open_store",
    "remove_bundle",
]


if not TYPE_CHECKING:
    # Hidden from type checkers, which see the imports above instead: to them a misspelt
    # name stays an error, not an attribute of type ``object``.

    def __getattr__(name: str) -> object:
        """Import a public name on first use (and keep it), or resolve a moved one with a
        warning.

        :raises AttributeError: ``name`` is none of them.
        """
        module = _PUBLIC.get(name)
        if module is not None:
            value = getattr(_importlib.import_module(module), name)
            globals()[name] = value  # the next lookup is a plain attribute
            return value
        home = _MOVED.get(name)
        if home is not None:
            # Not kept: every use warns, where it is (stacklevel 2 is the caller of getattr).
            _warnings.warn(
                f"laminae.{name} has moved: use {home}.{name} (laminae.{name} goes in the "
                "next release)",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(_importlib.import_module(home), name)
        if name in _SUBPACKAGES:
            return _importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*globals(), *__all__})


del TYPE_CHECKING
