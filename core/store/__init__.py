"""Layer 4, the layer store: the graph, its records, and the layers on a driver.

The SQLite graph (layers, names, mounts, images, containers), the record types handed to
users, and :class:`~laminae.store._layers.LayerStore`: apply, commit, mount, diff, check and
repair, with the staging interface that the image and container pipelines use.

May import: :mod:`laminae.driverkit`, :mod:`laminae.archive`, :mod:`laminae.kernel` and
:mod:`laminae._exceptions`. Private; users reach it through :class:`laminae.Store`. See
docs/architecture.md.
"""
