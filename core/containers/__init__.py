"""Layer 6, containers: a writable layer on an image, its changes, its commit, its bundle.

Container records and configs, commit to a new image, and OCI runtime bundles for crun and
runc.

May import: :mod:`laminae.images` and everything below it. Private; users reach it through
:class:`laminae.Store` and the names :mod:`laminae` exports. See docs/architecture.md.
"""
