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

from ._archive import ApplyResult, Limits, WhiteoutMode, apply_tar, write_changes_tar
from ._changes import Change, ChangeKind, naive_changes
from ._compression import Compression
from ._config import StoreConfig, load_config
from ._driver import (
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
from ._exceptions import (
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
from ._overlayformat import Unsettled, apply_tar_detached, settle_detached
from ._plugins import DriverEntry, DriverRegistry, available_drivers, hookimpl
from ._records import (
    CheckReport,
    Container,
    DiffResult,
    Image,
    Layer,
    LayerKind,
    StoreInfo,
    chain_id,
)
from ._store import Store, open_store

__all__ = [
    "AlreadyExists",
    "Applier",
    "ApplyResult",
    "Capabilities",
    "Change",
    "ChangeKind",
    "ChangeReporter",
    "CheckReport",
    "Committer",
    "Compression",
    "Container",
    "CorruptLayer",
    "DetachedApplier",
    "DiffResult",
    "Driver",
    "DriverEntry",
    "DriverRegistry",
    "DriverUnavailable",
    "FailedPrecondition",
    "Feature",
    "Image",
    "InvalidArgument",
    "LaminaeError",
    "Layer",
    "LayerKind",
    "LimitExceeded",
    "Limits",
    "MountSpec",
    "NotFound",
    "ParentsNeeded",
    "PermissionDenied",
    "QuotaSetter",
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
    "naive_changes",
    "open_store",
    "settle_detached",
    "tree_usage",
    "write_changes_tar",
]
