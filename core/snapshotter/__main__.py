"""``python -m laminae.snapshotter``: ``laminae-snapshotter`` without its console script."""

from laminae.snapshotter._command import main

main()
