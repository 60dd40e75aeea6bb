"""Layer 2, OCI layer tars: reading, applying, writing and recording them.

One concept a module:

- ``_limits``: :class:`~laminae.archive._limits.Limits`, the bounds on a hostile tar.
- ``_tarheader`` and ``_tarstream``: the tar header format, and
  :class:`~laminae.archive._tarstream.TarReader`, the one bounded tar framer; every limit on a
  tar's structure is enforced there, whoever reads the tar.
- ``_tree``: :class:`~laminae.archive._tree.Tree`, a directory tree reached only through
  directory file descriptors (what the applier, the writer, tar-split replay and the bundle
  writer share).
- ``_whiteouts``, ``_layerxattrs`` and ``_lowers``: whiteouts and opaque directories in their
  OCI and overlayfs forms, which xattrs are a layer's content, and the lower trees below a
  layer read as overlayfs reads them.
- ``_apply``: the safe extractor (``apply_tar``), and its applier, a documented base class.
- ``_overlayformat``: an overlayfs layer dir applied before its parents are there, then settled.
- ``_write``: the changes tar writer (``write_changes_tar``).
- ``_tarsplit``: tar-split records for exact re-export.
- ``_compression`` and ``_changes``: layer compression, and the change list of a layer.

May import: :mod:`laminae.kernel` and :mod:`laminae._exceptions`. Private; the public names
are re-exported by :mod:`laminae.driverkit` and :mod:`laminae`. See docs/architecture.md.
"""
