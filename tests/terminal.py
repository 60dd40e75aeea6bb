"""Running the installed ``laminae`` script with its output on a real pseudo-terminal."""

from __future__ import annotations

import os
import pty
import subprocess
from collections.abc import Mapping, Sequence


def run_in_pty(
    command: Sequence[str], *, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` with stdout and stderr on one terminal; what it wrote, read back."""
    leader, follower = pty.openpty()
    try:
        process = subprocess.Popen(
            list(command),
            stdout=follower,
            stderr=follower,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            chunks.append(chunk)
        code = process.wait()
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    output = b"".join(chunks).decode().replace("\r\n", "\n")
    return subprocess.CompletedProcess(list(command), code, output, "")
