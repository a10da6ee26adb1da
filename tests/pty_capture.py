"""Run a command in a pseudo-terminal and keep what a person would have seen (tests of terminal output).

``run_in_pty`` gives the child a terminal of a fixed size (a bare pseudo-terminal reports 0 x 0, on which no
progress bar draws), collects every byte it writes, and ``screen_lines`` renders them as the lines left on
the screen: a carriage return overwrites the line, ANSI colour codes are dropped.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_in_pty(cmd: list[str], env: dict[str, str], *, cols: int = 120, rows: int = 40,
               timeout: float = 900.0, cwd: str | None = None) -> tuple[int, str]:
    """(exit status, everything the command wrote to its terminal, stdout and stderr together)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True,
                            start_new_session=True)
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                raise TimeoutError(f"{cmd[:3]} did not end within {timeout:.0f} s; output so far:\n"
                                   + b"".join(chunks).decode("utf-8", "replace")[-4000:])
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal is gone
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
    return proc.wait(timeout=60), b"".join(chunks).decode("utf-8", "replace")


def screen_lines(raw: str) -> list[str]:
    """The lines left on the screen: per line, the text after its last carriage return; colours removed."""
    lines = []
    for line in ANSI.sub("", raw).replace("\r\n", "\n").split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        lines.append(parts[-1].rstrip() if parts else "")
    while lines and not lines[-1]:
        lines.pop()
    return lines
