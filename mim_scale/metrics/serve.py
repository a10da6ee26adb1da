"""Serving a Prometheus registry on /metrics, and where a worker binds and is scraped (shared with the
shard builder's metrics)."""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import start_wsgi_server


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it and frees the port."""

    httpd: WSGIServer
    thread: threading.Thread
    addr: str

    @property
    def port(self) -> int:
        return int(self.httpd.server_port)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5.0)


def serve_registry(registry: CollectorRegistry, addr: str = "127.0.0.1", port: int = 0) -> tuple[MetricsServer, int]:
    """Serve ``registry`` on ``http://addr:port/metrics`` from a daemon thread.

    ``port=0`` binds an ephemeral port; the bound one is returned. Raises ``OSError`` naming the
    address when the port is taken.
    """
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics port must be in 0..65535, got {port}")
    try:
        httpd, thread = start_wsgi_server(int(port), addr=addr, registry=registry)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from exc
    server = MetricsServer(httpd=httpd, thread=thread, addr=addr)
    return server, server.port


def port_for_rank(base_port: int, rank: int) -> int:
    """``MetricsConfig.port`` semantics: worker ``rank`` listens on ``base_port + rank``; 0 stays ephemeral."""
    if base_port == 0:
        return 0
    port = base_port + rank
    if not 0 < port <= 65535:
        raise ValueError(f"metrics port {base_port} + rank {rank} = {port} is outside 1..65535")
    return port


def resolve_addr(addr: str, node_ip: str | None = None) -> str:
    """The address a worker's /metrics binds: ``metrics.addr`` as given, except ``"auto"`` (the default): the
    worker's Ray node IP when it runs on a Ray cluster it joined (``node_ip``), else loopback (a one-machine
    local cluster, or a run without Ray), so nothing listens beyond this machine unless the nodes must reach it."""
    if addr == "auto":
        return node_ip or "127.0.0.1"
    return addr


def target_for(addr: str, port: int) -> str:
    """``host:port`` that other machines use to scrape a server bound to ``addr``."""
    host = addr
    if addr in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    elif ":" in addr and not addr.startswith("["):
        host = f"[{addr}]"
    return f"{host}:{port}"

