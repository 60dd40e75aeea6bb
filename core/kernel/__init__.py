"""Layer 1, the kernel: every Linux call laminae makes, as named Python functions.

One module per concept:

``_syscalls``
    the ctypes plumbing the others share: libc, raw syscall numbers, ``OSError`` with paths.
``_mounts``
    ``mount(2)``, the new mount API, overlayfs and bind mounts, mount namespaces.
``_mountinfo``
    ``/proc/<pid>/mountinfo``, parsed: what is mounted where.
``_loop``
    loop devices: image files as block devices.
``_filecopy``
    ``FICLONE`` and copies of file data that keep holes.
``_filesystems``
    ``statfs`` and filesystem magic numbers, ``syncfs``.
``_paths``
    ``openat2`` with ``RESOLVE_*`` and ``renameat2(RENAME_NOREPLACE)``.
``_xattrs``
    extended attributes with names that are not UTF-8.
``_btrfs``
    btrfs ioctls: subvolumes, snapshots, qgroups.
``_locks``
    ``flock``: the store lock and claims on work in progress.

Nothing above this package calls ``ctypes`` or ``ioctl``. Failures are :class:`OSError` naming
the path; callers translate them at their boundary.

May import: the standard library, third-party packages and :mod:`laminae._exceptions`. Driver
authors reach these through :mod:`laminae.driverkit`; the modules here are private. See
docs/architecture.md.
"""
