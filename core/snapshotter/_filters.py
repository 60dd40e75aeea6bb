"""containerd's filter expressions, as its List (Walk) takes them, over snapshots.

The syntax is containerd's ``filters`` package::

    filter    := selector ("," selector)*          every selector must match
    selector  := fieldpath [op value]              no op: the field is present and not empty
    fieldpath := field ("." field)*
    field     := identifier | quoted
    op        := "==" | "!=" | "~="                equal, not equal, regular expression
    value     := quoted | characters up to "," or the end

A quoted field or value is in double or single quotes, with backslash escapes. Several filters
(the request's list) match a snapshot that any one of them matches. The fields of a snapshot
are ``name``, ``parent``, ``kind`` (``active``, ``view``, ``committed``) and ``labels.<key>``.

No library parses this syntax (it is containerd's own), so it is parsed here by hand.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import attrs

from laminae._exceptions import InvalidArgument
from laminae.snapshotter._table import Snapshot

__all__ = ["Filter", "matches_any", "parse_filter"]

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "/": "/"}


@attrs.frozen
class _Selector:
    fieldpath: tuple[str, ...]
    op: str | None
    value: str

    def matches(self, snapshot: Snapshot) -> bool:
        found = _field(snapshot, self.fieldpath)
        if self.op is None:
            return bool(found)
        if self.op == "==":
            return found == self.value
        if self.op == "!=":
            return found != self.value
        return found is not None and re.search(self.value, found) is not None


@attrs.frozen
class Filter:
    """One parsed filter: every selector must match."""

    selectors: tuple[_Selector, ...]

    def matches(self, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` matches every selector."""
        return all(selector.matches(snapshot) for selector in self.selectors)


def _field(snapshot: Snapshot, path: tuple[str, ...]) -> str | None:
    head, rest = path[0], path[1:]
    if head == "labels":
        return snapshot.labels.get(".".join(rest)) if rest else None
    if rest:
        return None
    fields: dict[str, Callable[[Snapshot], str | None]] = {
        "name": lambda s: s.name,
        "parent": lambda s: s.parent or "",
        "kind": lambda s: s.kind.value,
    }
    get = fields.get(head)
    return None if get is None else get(snapshot)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.at = 0

    def fail(self, why: str) -> InvalidArgument:
        return InvalidArgument(f"filter {self.text!r}: {why} at offset {self.at}")

    def skip_spaces(self) -> None:
        while self.at < len(self.text) and self.text[self.at].isspace():
            self.at += 1

    def peek(self, token: str) -> bool:
        self.skip_spaces()
        return self.text.startswith(token, self.at)

    def quoted(self) -> str:
        quote = self.text[self.at]
        self.at += 1
        out: list[str] = []
        while self.at < len(self.text):
            char = self.text[self.at]
            self.at += 1
            if char == quote:
                return "".join(out)
            if char == "\\":
                if self.at >= len(self.text):
                    break
                escaped = self.text[self.at]
                self.at += 1
                if escaped not in _ESCAPES:
                    raise self.fail(f"unknown escape \\{escaped}")
                char = _ESCAPES[escaped]
            out.append(char)
        raise self.fail("unterminated quoted string")

    def field(self) -> str:
        self.skip_spaces()
        if self.at < len(self.text) and self.text[self.at] in "\"'":
            return self.quoted()
        match = _IDENT.match(self.text, self.at)
        if match is None:
            raise self.fail("expected a field name")
        self.at = match.end()
        return match.group()

    def value(self) -> str:
        self.skip_spaces()
        if self.at < len(self.text) and self.text[self.at] in "\"'":
            return self.quoted()
        end = self.text.find(",", self.at)
        end = len(self.text) if end < 0 else end
        value = self.text[self.at : end].strip()
        if not value:
            raise self.fail("expected a value")
        self.at = end
        return value

    def selector(self) -> _Selector:
        path = [self.field()]
        while self.peek("."):
            self.at += 1
            path.append(self.field())
        for op in ("==", "!=", "~="):
            if self.peek(op):
                self.at += len(op)
                value = self.value()
                if op == "~=":
                    try:
                        re.compile(value)
                    except re.error as exc:
                        raise self.fail(f"bad regular expression {value!r}: {exc}") from None
                return _Selector(tuple(path), op, value)
        return _Selector(tuple(path), None, "")

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while self.peek(","):
            self.at += 1
            selectors.append(self.selector())
        self.skip_spaces()
        if self.at != len(self.text):
            raise self.fail("unexpected text")
        return Filter(tuple(selectors))


def parse_filter(text: str) -> Filter:
    """Parse one containerd filter expression.

    :raises InvalidArgument: ``text`` is not one (the message gives the offset).
    """
    return _Parser(text).parse()


def matches_any(filters: Sequence[Filter], snapshot: Snapshot) -> bool:
    """Whether ``snapshot`` matches one of ``filters`` (all snapshots match no filters)."""
    return not filters or any(f.matches(snapshot) for f in filters)
