"""`mim-scale monitor` turns Prometheus' lifecycle API (unauthenticated POST /-/quit, /-/reload) on only when
it listens on loopback."""

from __future__ import annotations

import sys

import pytest

from mim_scale import monitor
from mim_scale.errors import UserFacingError


def test_is_loopback():
    assert all(monitor.is_loopback(a) for a in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"))
    assert not any(monitor.is_loopback(a) for a in ("0.0.0.0", "", "::", "10.0.0.5", "head-0"))


@pytest.mark.parametrize("addr, lifecycle", [("127.0.0.1", True), ("0.0.0.0", False), ("10.1.2.3", False)])
def test_lifecycle_flag_only_on_loopback(tmp_path, monkeypatch, addr, lifecycle):
    seen: list[list[str]] = []

    class Exited:  # Prometheus "exits" at once: we only look at its command line
        returncode = 1

        def __init__(self, argv, **_):
            seen.append(argv)

        def poll(self):
            return 1

    monkeypatch.setattr(monitor.subprocess, "Popen", Exited)
    with pytest.raises(UserFacingError, match="prometheus exited"):
        monitor.start_local_prometheus(tmp_path, addr=addr, port=1, binary=sys.executable)
    (argv,) = seen
    assert f"--web.listen-address={addr}:1" in argv
    assert ("--web.enable-lifecycle" in argv) is lifecycle
