"""A local registry for the pull benchmark: Debian's docker-registry on 127.0.0.1.

The registry runs as a child of the benchmark with a config of its own (JSON, which is YAML)
and its storage under a directory the benchmark gives (the scratch filesystem, so that the
registry reads the blobs from the same cold disk for every client). Plain HTTP, anonymous,
request logging off (it would cost the registry CPU that the clients share). It is stopped by
its PID (SIGTERM, then SIGKILL), never by name. :meth:`RegistryServer.push` puts an OCI layout
into it once, with skopeo.
"""

from __future__ import annotations

import json
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from peers import skopeo_env

__all__ = ["RegistryServer", "free_port"]

_STARTUP_SECONDS = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RegistryServer:
    """A running docker-registry under ``directory``; a context manager.

    :ivar host: ``"127.0.0.1:PORT"``, as a reference names it.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.storage = directory / "storage"
        self.log = directory / "registry.log"
        self.config = directory / "config.yml"
        self._process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> None:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "http": {"addr": self.host, "secret": secrets.token_hex(16)},
        }
        self.config.write_text(json.dumps(config, indent=2))

    def __enter__(self) -> RegistryServer:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise RuntimeError("docker-registry is not installed (Debian: docker-registry)")
        self.storage.mkdir(parents=True)
        self._write_config()
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [binary, "serve", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        # The registry says nothing when it listens: poll /v2/ (bounded).
        deadline = time.monotonic() + _STARTUP_SECONDS
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise RuntimeError(f"docker-registry exited: {self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.host}/v2/", timeout=1.0):
                    return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"docker-registry did not answer on {self.host}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return " | ".join(text.strip().splitlines()[-lines:])

    def push(self, source: str, repository_tag: str, scratch: Path) -> str:
        """``skopeo copy SOURCE docker://HOST/REPOSITORY_TAG`` (blobs and manifest as they
        are, no recompression); the pushed reference ``HOST/REPOSITORY_TAG``.

        :raises RuntimeError: skopeo failed.
        """
        env, policy = skopeo_env(scratch)
        reference = f"{self.host}/{repository_tag}"
        argv = [
            "skopeo", "--policy", str(policy), "copy", "--quiet", "--dest-tls-verify=false",
            source, f"docker://{reference}",
        ]  # fmt: skip
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"pushing {source} failed: {done.stderr.strip()[-300:]}")
        return reference

    def stop(self) -> None:
        """Stop the registry by its PID (SIGTERM, then SIGKILL after 10 s)."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __exit__(self, *exc: object) -> None:
        self.stop()
