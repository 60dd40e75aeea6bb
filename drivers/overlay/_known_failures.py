"""The conformance cases overlay cannot pass, and why: the driver's ``known_failures``.

One holds everywhere: a lower directory cannot be renamed without ``redirect_dir``, which
native changes rule out. The others hold only in a user namespace (rootless), where the
kernel refuses, before the driver sees anything:

* device nodes: ``mknod`` needs ``CAP_MKNOD`` in the initial user namespace (a ``0:0``
  whiteout is the one exception, since Linux 5.8);
* ``trusted.*`` xattrs: they need ``CAP_SYS_ADMIN`` in the initial user namespace;
* owners the namespace does not map: ``chown`` to an unmapped uid or gid is ``EINVAL``.
  ``unshare --map-root-user`` maps uid 0 alone; a subordinate range (``/etc/subuid``)
  usually maps 65536. Each case is listed with the highest id it gives a file, and is a
  known failure only where the namespace maps fewer ids than that.

The lists name the suite's test ids (API: never renamed) and the ids those tests use.
"""

from __future__ import annotations

from typing import Final

__all__ = ["known_failures", "mapped_ids"]

_EVERYWHERE: Final = {
    "mounts::test_rename_directory": "rename(2) of a directory that came from a lower layer "
    "fails with EXDEV under redirect_dir=nofollow, which native changes need (the kernel's "
    "overlayfs.rst, 'Renaming directories'; containerd's suite skips it for overlayfs); tools "
    "fall back to copying, as mv does",
}

_NO_MKNOD: Final = (
    "a user namespace cannot make device nodes (mknod needs CAP_MKNOD in the initial user "
    "namespace)"
)
_NO_TRUSTED: Final = (
    "a user namespace cannot set trusted.* xattrs (they need CAP_SYS_ADMIN in the initial "
    "user namespace)"
)
_IN_USER_NAMESPACE: Final = {
    "apply::test_devices": _NO_MKNOD,
    # Their layers hold device nodes.
    "diff::test_diff_round_trip": _NO_MKNOD,
    "diff::test_diff_is_deterministic": _NO_MKNOD,
    "apply::test_xattrs": _NO_TRUSTED,
    "apply::test_xattrs_in_child_layers": _NO_TRUSTED,
    # Its parent holds a device node and trusted.* xattrs.
    "crosscheck::test_an_untouched_child_has_no_changes": _NO_MKNOD,
}

# The highest uid or gid each case gives a file (tar headers, chown through a mount).
_IDS_USED: Final = {
    "apply::test_regular_files": 3_000_001,
    "apply::test_directories": 1001,
    "apply::test_symlinks": 2,
    "apply::test_fifos": 1,
    "apply::test_directory_takes_the_upper_attributes": 8,
    "layers::test_create_base": 2,
    "layers::test_create_snap": 2,
    "layers::test_create_from_template": 2,
    "mounts::test_chown": 1,
    "mounts::test_directory_permission_on_commit": 1,
    "mounts::test_permissions_and_owners_across_commit": 1001,
}


def _contiguous_from_zero(text: str) -> int:
    """How many ids, counting from 0, a ``uid_map``/``gid_map`` maps without a gap."""
    ranges = sorted(
        (int(fields[0]), int(fields[2]))
        for fields in (line.split() for line in text.splitlines())
        if len(fields) == 3
    )
    covered = 0
    for start, count in ranges:
        if start > covered:
            break
        covered = max(covered, start + count)
    return covered


def mapped_ids() -> int:
    """How many uids and gids, from 0 up, this process's user namespace maps."""
    counts = []
    for name in ("uid_map", "gid_map"):
        with open(f"/proc/self/{name}") as file:
            counts.append(_contiguous_from_zero(file.read()))
    return min(counts)


def known_failures(*, user_namespace: bool, ids: int) -> dict[str, str]:
    """The conformance cases this driver fails here, with the reason.

    :param user_namespace: the process runs in a user namespace (rootless).
    :param ids: how many ids, from 0, the namespace maps (see :func:`mapped_ids`).
    """
    failures = dict(_EVERYWHERE)
    if not user_namespace:
        return failures
    failures.update(_IN_USER_NAMESPACE)
    for case, highest in _IDS_USED.items():
        if highest >= ids:
            failures[case] = (
                f"the user namespace maps {ids} uid(s) and gid(s) from 0; the case gives files "
                f"id {highest}, and chown to an unmapped id is EINVAL"
            )
    return failures
