"""laminae as a containerd snapshotter: ``containerd.services.snapshots.v1.Snapshots`` over
gRPC on a unix socket, for containerd's ``proxy_plugins`` (docs/containerd.md).

Layer 8, beside :mod:`laminae.cli`: it uses the store as any store user does, and the store
knows nothing of it. The modules, one concept each:

- :mod:`._table`: containerd's snapshot names and their layers (``snapshots.db``);
- :mod:`._filters`: containerd's filter expressions, for List;
- :mod:`._service`: what each call does, on the store and the table;
- :mod:`._server`: the gRPC service on the generated wire types (``_proto``, made by
  ``scripts/gen-proto``), and the error codes;
- :mod:`._command`: ``laminae snapshotter serve`` and ``laminae-snapshotter``.

grpcio and protobuf come with the ``laminae[containerd]`` extra; only :mod:`._server` needs
them.
"""

from laminae.snapshotter._command import main, snapshotter

__all__ = ["main", "snapshotter"]
