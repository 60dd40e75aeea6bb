"""Layer 1, the kernel: every Linux call laminae makes, as named Python functions.

The new mount API and the classic ``mount(2)``, loop devices, ``FICLONE`` and copies that keep
holes, ``statfs`` and filesystem magic numbers, extended attributes with names that are not
UTF-8, btrfs ioctls, and file locks. Nothing above this package calls ``ctypes`` or ``ioctl``.

May import: the standard library and :mod:`laminae._exceptions`. Driver authors reach these
through :mod:`laminae.driverkit`; the modules here are private. See docs/architecture.md.
"""
