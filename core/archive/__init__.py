"""Layer 2, OCI layer tars: reading, applying, writing and recording them.

The bounded tar framer, the safe extractor (whiteouts and opaque directories as the
image-spec says), the changes tar writer, tar-split records for exact re-export, compression,
the change list of a layer, and overlayfs's on-disk format for detached applies.

May import: :mod:`laminae.kernel` and :mod:`laminae._exceptions`. Private; the public names
are re-exported by :mod:`laminae.driverkit` and :mod:`laminae`. See docs/architecture.md.
"""
