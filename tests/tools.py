"""The outside programs tests drive (skopeo, umoci, crun, runc, busybox, docker-registry).

scripts/test-all installs them all. On a developer machine without one, a test that needs it
is skipped; under ``CI=true`` it runs and fails, so CI never passes by skipping.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def needs(tool: str) -> pytest.MarkDecorator:
    """Mark a test that runs ``tool``: skipped without it, except under ``CI=true``."""
    return pytest.mark.skipif(
        shutil.which(tool) is None and os.environ.get("CI") != "true",
        reason=f"{tool} is not installed (scripts/test-all installs it)",
    )


def require_tool(name: str) -> str:
    """The path of tool ``name``; skip the test without it, or fail under ``CI=true``."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (scripts/test-all installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run_skopeo(*args: str) -> str:
    """``skopeo --insecure-policy ARGS`` (the host's policy.json is not the test's business);
    its stdout. Fails the test, with skopeo's stderr, when skopeo fails."""
    result = subprocess.run(
        [require_tool("skopeo"), "--insecure-policy", *args],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout
