"""The example third-party driver, installed the way a user would install it.

``examples/laminae-blockfile`` is its own distribution. Here it goes into a fresh virtualenv
next to laminae's wheel (built once for the module), and ``laminae drivers`` must list it,
with the distribution it came from: the ``laminae.drivers`` entry point is all it takes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHECKOUT = Path(__file__).resolve().parents[1]
EXAMPLE = CHECKOUT / "examples" / "laminae-blockfile"


def _example_version() -> str:
    with open(EXAMPLE / "pyproject.toml", "rb") as f:
        version: str = tomllib.load(f)["project"]["version"]
    return version


def _run(
    argv: Sequence[str | Path], env: dict[str, str] | None = None, *, status: int = 0
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, env=env, check=False
    )
    assert proc.returncode == status, (
        f"{argv} exited {proc.returncode}, not {status}:\n{proc.stdout}{proc.stderr}"
    )
    return proc


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv holding laminae's wheel and the example driver, nothing else."""
    work = tmp_path_factory.mktemp("example-driver")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", CHECKOUT])
    (wheel,) = (work / "dist").glob("laminae-*.whl")
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", venv])
    # One pip call, so the example's "laminae" requirement is met by this wheel and never
    # looked up in an index.
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", wheel, EXAMPLE])
    return venv


@pytest.fixture
def laminae_cli(venv: Path, tmp_path: Path) -> list[str | Path]:
    """``laminae`` from the venv, on a store under ``tmp_path``, blind to the host's config."""
    config = tmp_path / "storage.toml"
    config.write_text("")
    return [
        venv / "bin" / "laminae",
        "--config",
        config,
        "--root",
        tmp_path / "root",
        "--runroot",
        tmp_path / "run",
    ]


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAMINAE_")}
    env["HOME"] = str(tmp_path)
    return env


def test_drivers_lists_blockfile_with_its_distribution(
    laminae_cli: list[str | Path], tmp_path: Path
) -> None:
    out = _run([*laminae_cli, "drivers"], _clean_env(tmp_path)).stdout
    rows = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert rows["blockfile"][1:3] == ["5", f"laminae-blockfile {_example_version()}"]
    assert rows["vfs"][2].startswith("laminae ")


def test_drivers_json_lists_blockfile_with_its_distribution(
    laminae_cli: list[str | Path], tmp_path: Path
) -> None:
    out = _run([*laminae_cli, "drivers", "--json"], _clean_env(tmp_path)).stdout
    entries = {entry["name"]: entry for entry in json.loads(out)}
    blockfile = entries["blockfile"]
    assert blockfile["origin"] == f"laminae-blockfile {_example_version()}"
    assert blockfile["priority"] == 5
    assert blockfile["capabilities"]["max_depth"] == 1000
    assert blockfile["capabilities"]["needs_root"] is True
    assert blockfile["home"] == str(tmp_path / "root" / "blockfile")
    if os.geteuid() == 0:
        assert blockfile["unavailable"] is None
    else:
        assert "needs root" in blockfile["unavailable"]
    assert entries["vfs"]["origin"].startswith("laminae ")
    assert not (tmp_path / "root").exists(), "listing drivers creates no store"


def test_blockfile_refuses_an_unknown_option_by_name(
    laminae_cli: list[str | Path], tmp_path: Path
) -> None:
    proc = _run(
        [*laminae_cli, "--driver", "blockfile", "--storage-opt", "sise=1G", "info"],
        _clean_env(tmp_path),
        status=2,
    )
    assert "'sise'" in proc.stderr
