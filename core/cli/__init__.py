"""Layer 8, the ``laminae`` command: a thin layer of click commands over :class:`laminae.Store`.

Subcommand groups load on first use (``image``, ``container``, ``bundle``), so a command pays
only for what it runs. May import anything in laminae; nothing imports it. See
docs/architecture.md.
"""

from laminae.cli._main import cli, main

__all__ = ["cli", "main"]
