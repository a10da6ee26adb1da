"""mim_scale.console: a live bar on a terminal, plain lines off one; logs routed to files at their source."""

from __future__ import annotations

import io
import logging
import os
import select

import pytest

from mim_scale import console
from pty_capture import screen_lines


def test_progress_off_a_terminal_is_plain_lines():
    stream = io.StringIO()
    progress = console.Progress("pretrain", 10, stream=stream, plain_every_s=3600)
    progress.update(text="starting Ray")
    for step in range(1, 11):
        progress.update(step, f"loss {1 / step:.3f}")
    progress.write("worker rank 1 failed: RuntimeError: boom")
    progress.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    # throttled: the first line, the failure, and the last position (never one line per update)
    assert lines == ["pretrain 0/10 steps starting Ray", "worker rank 1 failed: RuntimeError: boom",
                     "pretrain 10/10 steps loss 0.100"]


def test_progress_on_a_terminal_is_one_live_bar():
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    stream = os.fdopen(slave, "w", buffering=1)
    try:
        progress = console.Progress("pretrain", 10, stream=stream)
        assert progress.tty
        for step in range(1, 11):
            progress.update(step, f"loss {1 / step:.3f}")
        progress.write("restart 1: the worker group starts again from the step-5 checkpoint")
        progress.close()
        stream.flush()
        chunks = []
        while select.select([master], [], [], 0.5)[0]:  # everything written so far, in as many reads as it takes
            chunks.append(os.read(master, 1 << 16))
        raw = b"".join(chunks).decode()
    finally:
        stream.close()
        os.close(master)
    assert raw.count("\r") >= 10  # redrawn in place
    lines = screen_lines(raw)
    assert lines[0] == "restart 1: the worker group starts again from the step-5 checkpoint"
    assert lines[-1].startswith("pretrain ") and lines[-1].endswith("10/10 steps, loss 0.100")
    assert len(lines) == 2  # one bar, one message above it


def test_table_and_durations():
    assert console.table([("run", "/r"), ("checkpoint", "/r/c")]).splitlines() == ["  run         /r",
                                                                                 "  checkpoint  /r/c"]
    assert [console.fmt_seconds(s) for s in (None, 5, 65, 3725)] == ["?", "0:05", "1:05", "1:02:05"]


@pytest.fixture
def quiet_env(monkeypatch):
    monkeypatch.delenv(console.LOG_ENV, raising=False)
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    yield
    for name in console._OWN_HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            target.removeFilter(console._TO_FILES)


def test_third_party_records_go_to_the_log_file_not_the_terminal(quiet_env, tmp_path):
    terminal = io.StringIO()
    ray_logger = logging.getLogger("ray")
    own = logging.StreamHandler(terminal)  # what Ray installs when it is imported (propagate=False)
    ray_logger.addHandler(own)
    saved = ray_logger.propagate, ray_logger.level
    ray_logger.propagate = False
    ray_logger.setLevel(logging.INFO)
    try:
        console.quiet_third_party()
        with console.log_to_file(tmp_path / "driver.log") as path:
            logging.getLogger("ray._private.worker").info("Started a local Ray instance.")
            logging.getLogger("ray.auth").warning("Token authentication is enabled")
            logging.getLogger("ray.raylet").error("worker killed: out of memory")
        assert terminal.getvalue().splitlines() == ["worker killed: out of memory"]  # errors still show
        text = path.read_text()
        assert "Started a local Ray instance." in text and "Token authentication" in text
        assert text.count("out of memory") == 1
    finally:
        ray_logger.removeHandler(own)
        ray_logger.propagate, _ = saved
        ray_logger.setLevel(saved[1])


def test_verbose_is_the_flag_or_the_existing_log_variable(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    monkeypatch.delenv(console.LOG_ENV, raising=False)
    assert not console.verbose()
    monkeypatch.setenv(console.LOG_ENV, "DEBUG")
    assert console.verbose() and console.log_level() == logging.DEBUG


def test_the_quiet_terminal_handler_follows_the_current_stderr(monkeypatch, caplog):
    """`mim-scale` run in-process (a notebook, a test) under a stderr that is later closed: the console
    handler writes to the stderr of the moment, so a later warning neither errors nor goes missing."""
    first, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr("sys.stderr", first)
    handler = console._StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    first.close()
    monkeypatch.setattr("sys.stderr", later)
    handler.emit(logging.LogRecord("mim_scale.x", logging.WARNING, __file__, 1, "still shown", None, None))
    assert later.getvalue() == "still shown\n"
