"""The errors laminae raises, one tree, named by whose fault they are.

::

    LaminaeError                  anything laminae raises on purpose
    ├── InvalidArgument           your input: a path, id, name, tar or config value (names it)
    ├── NotFound                  the id or name you gave does not exist
    ├── AlreadyExists             the id or name you gave is taken
    ├── FailedPrecondition        the store's state forbids it (a layer with children, mounted)
    ├── Unsupported               the driver does not have this capability
    ├── DriverUnavailable         the host or backing filesystem cannot run the driver
    ├── CorruptLayer              stored or received content does not match its digest
    ├── LimitExceeded             a hostile or oversized layer broke a configured limit
    │   (also an InvalidArgument: the tar is the bad input)
    ├── ParentsNeeded             (driver to store) a detached apply needs the parents' content
    ├── PermissionDenied          a registry refused the credentials (or gave none the right)
    ├── Unavailable               the outside world failed: a registry unreachable, a TLS
    │                             error, a server error; trying again later may work
    └── ResourceExhausted         the host ran out: a full disk or a quota (ENOSPC, EDQUOT);
                                  not an InvalidArgument, the input may be fine

Foreign exceptions (``OSError`` above all) are translated at one boundary,
:func:`map_os_errors`, which keeps the original as ``__cause__``.

Every error has an exit status for the CLI (``exit_code``), documented in README.md.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator
from typing import ClassVar

__all__ = [
    "AlreadyExists",
    "CorruptLayer",
    "DriverUnavailable",
    "FailedPrecondition",
    "InvalidArgument",
    "LaminaeError",
    "LimitExceeded",
    "NotFound",
    "ParentsNeeded",
    "PermissionDenied",
    "ResourceExhausted",
    "Unavailable",
    "Unsupported",
    "map_os_errors",
]


class LaminaeError(Exception):
    """Base of every error laminae raises on purpose."""

    exit_code: ClassVar[int] = 1


class InvalidArgument(LaminaeError, ValueError):
    """Bad input: the message names the input and what is wrong with it."""

    exit_code = 2


class NotFound(LaminaeError, LookupError):
    """The id or name given does not exist."""

    exit_code = 3


class AlreadyExists(LaminaeError):
    """The id or name given is already taken."""

    exit_code = 4


class FailedPrecondition(LaminaeError):
    """The store's state forbids the operation (children, mounts, wrong kind of layer)."""

    exit_code = 5


class Unsupported(LaminaeError):
    """The driver lacks the capability the operation needs."""

    exit_code = 6


class DriverUnavailable(LaminaeError):
    """The host or the backing filesystem cannot run this driver.

    :param reason: one line a user can act on ("not a btrfs filesystem: /var/lib/x").
    """

    exit_code = 7

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CorruptLayer(LaminaeError):
    """Content does not match its digest, or the store's records contradict the disk."""

    exit_code = 8


class LimitExceeded(InvalidArgument):
    """A layer broke a configured limit (size, entries, depth, header size)."""

    exit_code = 9


class ParentsNeeded(LaminaeError):
    """A driver's ``apply_detached`` (or ``settle``) cannot apply this tar without its parents'
    content: a root-level opaque marker, a hard link to a file the tar does not hold, a
    whiteout or an opaque marker in a directory the tar does not make first...

    Not an error of the tar: the store removes what was written and applies the tar with
    ``apply`` once the parents are complete. The message says what needed them.
    """


class PermissionDenied(LaminaeError):
    """A registry refused access: bad credentials, or none with the right to pull or push."""

    exit_code = 10


class Unavailable(LaminaeError):
    """The outside world failed: a registry is unreachable, TLS fails, a server errs (5xx)."""

    exit_code = 11


class ResourceExhausted(LaminaeError):
    """The host ran out of a resource: the filesystem is full or a quota is reached.

    Not an :class:`InvalidArgument`: code that catches bad input must not also catch a full
    disk, which frees space and retries where bad input would be rejected for good.
    """

    exit_code = 12


@contextlib.contextmanager
def map_os_errors(what: str) -> Iterator[None]:
    """Translate an ``OSError`` raised inside the block into the laminae tree.

    :param what: the operation and its input, as it should read in the message
        ("remove layer 3f2a..."). The original error stays reachable as ``__cause__``.
    """
    try:
        yield
    except LaminaeError:
        raise
    except OSError as exc:
        detail = exc.strerror or str(exc)
        message = f"{what}: {detail}"
        if exc.errno == errno.ENOENT:
            raise NotFound(message) from exc
        if exc.errno == errno.EEXIST:
            raise AlreadyExists(message) from exc
        if exc.errno in (errno.ENOTSUP, errno.ENOSYS):
            raise Unsupported(message) from exc
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            raise FailedPrecondition(message) from exc
        if exc.errno in (errno.EDQUOT, errno.ENOSPC):
            raise ResourceExhausted(message) from exc
        raise LaminaeError(message) from exc
