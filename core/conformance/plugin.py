"""The pytest plugin behind ``pytest --pyargs laminae.conformance --laminae-driver NAME``.

Inert until a driver is selected.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("laminae", "laminae conformance suite")
    group.addoption("--laminae-driver", metavar="NAME", default=None,
                    help="run the laminae conformance suite against driver NAME")
