"""btrfs for driver authors: subvolumes, snapshots, read-only flags and qgroups, by ioctl.

For a driver that keeps its layers on btrfs, as the built-in ``btrfs`` driver does: a layer
is a subvolume, a child a snapshot of its parent, a quota a qgroup limit. Every call takes
paths, opens what it needs and raises :class:`OSError` naming the path; no ``btrfs`` process
runs. Imported on its own (``from laminae.driverkit import btrfs``), so that
``import laminae.driverkit`` does not load it::

    from laminae.driverkit import btrfs

    btrfs.create_subvolume(f"{home}/{id}")
    btrfs.create_snapshot(f"{home}/{parent}", f"{home}/{child}", readonly=False)
    btrfs.set_readonly(f"{home}/{parent}", True)

See docs/architecture.md.
"""

from laminae.kernel._btrfs import (
    FIRST_FREE_OBJECTID,
    Item,
    Qgroup,
    QuotaStatus,
    Subvolume,
    create_snapshot,
    create_subvolume,
    delete_subvolume,
    get_readonly,
    is_subvolume,
    nested_subvolumes,
    qgroup_create,
    qgroup_destroy,
    qgroup_id,
    qgroup_limit,
    qgroups,
    quota_enable,
    quota_rescan,
    quota_rescan_wait,
    quota_status,
    set_readonly,
    subvolume_id,
    sync,
    tree_search,
    wait_subvolume_cleaned,
)

__all__ = [
    "FIRST_FREE_OBJECTID",
    "Item",
    "Qgroup",
    "QuotaStatus",
    "Subvolume",
    "create_snapshot",
    "create_subvolume",
    "delete_subvolume",
    "get_readonly",
    "is_subvolume",
    "nested_subvolumes",
    "qgroup_create",
    "qgroup_destroy",
    "qgroup_id",
    "qgroup_limit",
    "qgroups",
    "quota_enable",
    "quota_rescan",
    "quota_rescan_wait",
    "quota_status",
    "set_readonly",
    "subvolume_id",
    "sync",
    "tree_search",
    "wait_subvolume_cleaned",
]
