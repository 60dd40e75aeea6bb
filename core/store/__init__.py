"""Layer 4, the layer store: the graph, its records, and the layers on a driver.

``_graph`` (the SQLite graph: layers, names, mounts, images, containers), ``_records`` (the
record types handed to users) and ``_lookup`` (references to rows, rows to records);
``_staging`` (:class:`~laminae.store._staging.Staging`: a layer in, committed, and back out as
its tar: the one interface the image and container pipelines use), ``_mounts`` (mount counts
and the kernel's table), ``_recovery`` (check, repair, the sweep at open) and ``_layers``
(:class:`~laminae.store._layers.LayerStore`, the public face made of them).

May import: :mod:`laminae.driverkit`, :mod:`laminae.archive`, :mod:`laminae.kernel` and
:mod:`laminae._exceptions`. Private; users reach it through :class:`laminae.Store`. See
docs/architecture.md.
"""
