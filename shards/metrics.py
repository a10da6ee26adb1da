"""Prometheus metrics of the shard builder (driver process only; labels are reason codes, never inputs).

* ``mim_shards_volumes_built_total``: volumes written to shards;
* ``mim_shards_volumes_rejected_total{reason}``: inputs not built, by reason code;
* ``mim_shards_bytes_written_total``: shard bytes written.

They live in their own registry (``REGISTRY``) so a build can expose them with
``prometheus_client.start_http_server(port, registry=REGISTRY)`` or write them to a text file.
"""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, write_to_textfile

REGISTRY = CollectorRegistry(auto_describe=True)
VOLUMES_BUILT = Counter("mim_shards_volumes_built", "Volumes written to shards", registry=REGISTRY)
VOLUMES_REJECTED = Counter(
    "mim_shards_volumes_rejected", "Inputs not built, by reason code", ["reason"], registry=REGISTRY
)
BYTES_WRITTEN = Counter("mim_shards_bytes_written", "Shard bytes written", registry=REGISTRY)


def write_textfile(path: Path) -> None:
    """Write the current values in the Prometheus text format (for node_exporter's textfile collector)."""
    write_to_textfile(str(path), REGISTRY)


def start_server(port: int, addr: str = "127.0.0.1") -> int:
    """Serve /metrics on ``addr:port`` for the life of the process; returns the bound port (``port=0``
    picks a free one)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=REGISTRY)
    return int(server.server_port)
