"""A placeholder for a driver whose issue has not landed: registered, never usable.

It registers so that ``laminae drivers`` lists it and ``--laminae-driver NAME`` finds it, and
its probe always says why it cannot run, so a strict conformance run fails instead of
passing by skipping.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, NoReturn

from laminae import Capabilities, DriverUnavailable, MountSpec, Unsupported, Usage

__all__ = ["PendingDriver"]


class PendingDriver:
    """Base of the placeholders; subclasses set ``name`` and ``issue``."""

    name: ClassVar[str]
    issue: ClassVar[int]
    capabilities: ClassVar[Capabilities] = Capabilities()

    @classmethod
    def probe(cls, home: Path, options: Mapping[str, str]) -> None:
        raise DriverUnavailable(f"driver {cls.name!r} is not implemented yet (issue {cls.issue})")

    def __init__(self, home: Path, options: Mapping[str, str]) -> None:
        self._fail()

    def _fail(self) -> NoReturn:
        raise Unsupported(f"driver {self.name!r} is not implemented yet (issue {self.issue})")

    def create(self, id: str, parents: Sequence[str], writable: bool) -> None:
        self._fail()

    def remove(self, id: str) -> None:
        self._fail()

    def mounts(self, id: str, parents: Sequence[str], readonly: bool) -> list[MountSpec]:
        self._fail()

    def usage(self, id: str) -> Usage:
        self._fail()

    def layers(self) -> Iterable[str]:
        self._fail()

    def close(self) -> None:
        pass
