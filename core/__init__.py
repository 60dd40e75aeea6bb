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

Drivers implement :class:`Driver` and register through the ``laminae.drivers`` entry-point
group with :data:`hookimpl`; ``pytest --pyargs laminae.conformance --laminae-driver NAME``
checks one against the contract.
"""

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
    Unavailable,
    Unsupported,
)
from laminae._store import Store, open_store
from laminae.archive._apply import ApplyResult, Limits, WhiteoutMode, apply_tar, write_changes_tar
from laminae.archive._changes import Change, ChangeKind, naive_changes
from laminae.archive._compression import Compression
from laminae.archive._overlayformat import Unsettled, apply_tar_detached, settle_detached
from laminae.containers._bundle import BindMount, Bundle, make_bundle, remove_bundle
from laminae.driverkit._contract import (
    Applier,
    Capabilities,
    ChangeReporter,
    Committer,
    DetachedApplier,
    Driver,
    Feature,
    MountSpec,
    ParentsNeeded,
    QuotaSetter,
    Usage,
    tree_usage,
)
from laminae.driverkit._plugins import DriverEntry, DriverRegistry, available_drivers, hookimpl
from laminae.images._credentials import RegistryOptions
from laminae.images._image import (
    Descriptor,
    ImageConfig,
    ImageSink,
    ImageSource,
    Index,
    Manifest,
    Platform,
    parse_config,
    parse_manifest,
)
from laminae.images._progress import (
    JsonProgress,
    LineProgress,
    NullProgress,
    Progress,
    RichProgress,
)
from laminae.images._reference import Reference, local_name, parse_reference
from laminae.images._transports import ImageLocation, parse_location
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

__all__ = [
    "AlreadyExists",
    "Applier",
    "ApplyResult",
    "BindMount",
    "Bundle",
    "Capabilities",
    "Change",
    "ChangeKind",
    "ChangeReporter",
    "CheckReport",
    "Committer",
    "Compression",
    "Container",
    "CorruptLayer",
    "Descriptor",
    "DetachedApplier",
    "DiffResult",
    "Driver",
    "DriverEntry",
    "DriverRegistry",
    "DriverUnavailable",
    "FailedPrecondition",
    "Feature",
    "Image",
    "ImageConfig",
    "ImageLocation",
    "ImageSink",
    "ImageSource",
    "Index",
    "InvalidArgument",
    "JsonProgress",
    "LaminaeError",
    "Layer",
    "LayerKind",
    "LimitExceeded",
    "Limits",
    "LineProgress",
    "Manifest",
    "MountSpec",
    "NotFound",
    "NullProgress",
    "ParentsNeeded",
    "PermissionDenied",
    "Platform",
    "Progress",
    "QuotaSetter",
    "Reference",
    "RegistryOptions",
    "RichProgress",
    "Store",
    "StoreConfig",
    "StoreInfo",
    "Unavailable",
    "Unsettled",
    "Unsupported",
    "Usage",
    "WhiteoutMode",
    "apply_tar",
    "apply_tar_detached",
    "available_drivers",
    "chain_id",
    "hookimpl",
    "load_config",
    "local_name",
    "make_bundle",
    "naive_changes",
    "open_store",
    "parse_config",
    "parse_location",
    "parse_manifest",
    "parse_reference",
    "remove_bundle",
    "settle_detached",
    "tree_usage",
    "write_changes_tar",
]
