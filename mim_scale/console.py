"""What a person sees in the terminal: stage headers, one live progress line per stage, a summary table.

Quiet by default. The full story of every process goes to log files (the run folder's ``logs/``, named in
:mod:`mim_scale.rundir`); the terminal gets what a reader needs without scrolling back. ``--verbose`` (or
``MIM_SCALE_LOG=LEVEL`` in the environment) restores everything: every logger at that level on the terminal
and every worker's output streamed through Ray.

Known third-party noise is turned down where it is made, never by scraping printed text:

- Python loggers: ``ray`` (its own stderr handler) and DeepSpeed's ``DeepSpeed`` logger (its own stdout
  handler) send their records to the log file instead of the terminal; errors still reach the terminal.
- ``warnings``: routed to the log file (:func:`logging.captureWarnings`), so a library's deprecation warning
  is on record but not on screen.
- Ray workers: ``ray.init(log_to_driver=False)`` in quiet mode; each worker writes its own
  ``logs/rank-N.log`` (:mod:`mim_scale.launcher.ray_train`).

A failure is never quiet: :func:`error` writes to stderr, and the pre-training watcher
(:mod:`mim_scale.launcher.watch`) prints every worker failure with its traceback and the log file holding
the rest.

Progress (:class:`Progress`): a tqdm bar on a terminal; plain lines (no carriage returns), at most one per
``MIM_SCALE_PROGRESS_SECONDS`` (default 30) plus the last, when the output is not a terminal (CI, log files).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

VERBOSE_ENV = "MIM_SCALE_VERBOSE"  # "1": set by --verbose, read here and by child processes
LOG_ENV = "MIM_SCALE_LOG"  # the existing level variable: set means verbose at that level
PLAIN_SECONDS_ENV = "MIM_SCALE_PROGRESS_SECONDS"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# third-party loggers that write to the terminal through their own handlers (propagate=False)
_OWN_HANDLER_LOGGERS = ("ray", "DeepSpeed")
_CONSOLE_HANDLER = "mim-scale-console"


def verbose() -> bool:
    """True when the user asked for everything: ``--verbose`` or ``MIM_SCALE_LOG`` set."""
    return os.environ.get(VERBOSE_ENV) == "1" or bool(os.environ.get(LOG_ENV))


def log_level() -> int:
    """The level of the full logs (files, and the terminal in verbose mode): ``MIM_SCALE_LOG``, default INFO."""
    level = logging.getLevelName(os.environ.get(LOG_ENV, "INFO").upper())
    return level if isinstance(level, int) else logging.INFO


def is_tty(stream: IO | None = None) -> bool:
    stream = sys.stdout if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _terminal_columns(stream: IO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def setup(verbose_flag: bool = False) -> None:
    """Configure this process's logging for the command line (called once by ``mim-scale``).

    Verbose: every logger at :func:`log_level` on stderr, as before. Quiet: ``mim_scale`` warnings and errors
    on stderr, everything else only in the log files that :func:`log_to_file` opens; third-party loggers with
    their own terminal handlers and Python warnings are routed to those files."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    root = logging.getLogger()
    root.setLevel(log_level())
    if verbose():
        logging.basicConfig(level=log_level(), format=LOG_FORMAT)
        return
    if any(h.get_name() == _CONSOLE_HANDLER for h in root.handlers):
        return  # set up already (main() called again in one process)
    console = _StderrHandler()
    console.setLevel(logging.WARNING)
    console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    console.addFilter(_OursOrErrors())
    console.set_name(_CONSOLE_HANDLER)
    root.addHandler(console)
    logging.captureWarnings(True)  # warnings -> the "py.warnings" logger -> the log files, not the terminal
    quiet_third_party()


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record comes: a stream bound at set-up may be closed or
    replaced later (``mim-scale`` called in-process by a notebook or a test runner that captures stderr)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__/setStream assign it; sys.stderr stays the target
        pass


class _OursOrErrors(logging.Filter):
    """The quiet terminal shows our own warnings, and anybody's errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("mim_scale") or record.levelno >= logging.ERROR


class _ToFiles(logging.Filter):
    """On a third-party logger with its own terminal handler: every record goes to our log files, and only
    errors go on to that handler (the terminal)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "_mim_filed", False):  # seen by the logger's filter already (this is its handler's)
            return record.levelno >= logging.ERROR and _ACTIVE is None
        record._mim_filed = True
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)
        if record.levelno < logging.ERROR:
            return False
        if _ACTIVE is not None:  # an error while a bar is drawn: on its own line above the bar
            _ACTIVE.write(f"({record.name.split('.')[0]}) {record.getMessage()}")
            return False
        return True


_TO_FILES = _ToFiles()
_ACTIVE: Progress | None = None  # the progress bar on the terminal now, if any (third-party errors print above it)


def quiet_third_party() -> None:
    """Quiet mode: ``ray`` and ``DeepSpeed`` records below ERROR go to the log files, not the terminal.

    Both libraries give their logger its own terminal handler and stop propagation (Ray when it is imported,
    DeepSpeed when it is imported, with a warning about the accelerator it detects at that moment). Called at
    set-up and again once Ray is imported (:func:`mim_scale.ray_session.start_or_join`): a filter on the
    logger survives their setLevel and catches DeepSpeed's import-time warning; one on each handler catches
    what child loggers propagate."""
    if verbose():
        return
    for name in _OWN_HANDLER_LOGGERS:
        logger = logging.getLogger(name)
        # on the logger: its own records (DeepSpeed's, also before import); on its handlers: the records its
        # child loggers propagate to them (ray._private.worker & co.; a logger's filter sees only its own)
        for target in (logger, *logger.handlers):
            if _TO_FILES not in target.filters:
                target.addFilter(_TO_FILES)


class log_to_file:
    """Context manager: the full log of this process (every logger at :func:`log_level`) also goes to ``path``.

    Used for the run folder's ``logs/driver.log`` and the quickstart's log; the handler is removed on exit."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handler: logging.FileHandler | None = None

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(self.path, encoding="utf-8")
        handler.setLevel(log_level())
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root = logging.getLogger()
        self._root_level = root.level
        if root.level > log_level() or root.level == logging.NOTSET:
            root.setLevel(log_level())
        root.addHandler(handler)
        self._handler = handler
        return self.path

    def __exit__(self, *exc) -> None:
        if self._handler is not None:
            root = logging.getLogger()
            root.removeHandler(self._handler)
            if not any(isinstance(h, logging.FileHandler) for h in root.handlers):
                root.setLevel(self._root_level)
            self._handler.close()
            self._handler = None


def out(text: str = "", stream: IO | None = None) -> None:
    """One line for the reader, on stdout (or ``stream``), flushed at once."""
    stream = sys.stdout if stream is None else stream
    print(text, file=stream, flush=True)


def stage(n: int, total: int, text: str, stream: IO | None = None) -> None:
    """A stage header: ``[n/total] text``."""
    out(f"[{n}/{total}] {text}", stream)


def detail(text: str, stream: IO | None = None) -> None:
    """A line under the current stage header."""
    out(f"   {text}", stream)


def error(text: str) -> None:
    """A failure, on stderr: quiet mode never hides these."""
    print(text, file=sys.stderr, flush=True)


def table(rows: Iterable[tuple[str, str]], indent: int = 2) -> str:
    """Two aligned columns: a label and a value (paths, commands)."""
    rows = [(str(a), str(b)) for a, b in rows]
    width = max((len(a) for a, _ in rows), default=0)
    return "\n".join(f"{' ' * indent}{a:<{width}}  {b}" for a, b in rows)


def fmt_seconds(seconds: float | None) -> str:
    """``1:02:03`` / ``4:05`` for an ETA or a duration; ``?`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """One live progress line for a stage.

    On a terminal (quiet mode): a tqdm bar whose postfix carries the stage's figures (``update``). Elsewhere,
    and in verbose mode, where log lines stream past it: plain lines
    ``DESC n/total figures``, at most one per ``plain_every_s`` seconds, plus the last one; never a carriage
    return. ``write`` prints a line above the bar (failures, restarts) without breaking it."""

    def __init__(self, desc: str, total: int, unit: str = "step", stream: IO | None = None,
                 plain_every_s: float | None = None):
        self.desc, self.total, self.unit = desc, int(total), unit
        self.stream = sys.stdout if stream is None else stream
        self.tty = is_tty(self.stream) and not verbose()  # verbose: log lines stream by, a redrawn bar would tear
        self.plain_every_s = float(os.environ.get(PLAIN_SECONDS_ENV, "30")) if plain_every_s is None else plain_every_s
        self.n = 0
        self.text = ""
        self._last_plain: float | None = None
        self._plain_printed: tuple[int, str] | None = None
        self._bar = None
        self._drawn = False
        if self.tty:
            from tqdm import tqdm

            # a terminal that reports no width (a bare pseudo-terminal) would get an empty bar
            width = _terminal_columns(self.stream)
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self.stream, leave=True,
                             dynamic_ncols=width > 0, ncols=None if width > 0 else 120, nrows=None if width > 0 else 40,
                             bar_format="{desc} {bar:10} {n_fmt}/{total_fmt} {unit}s{postfix}")
            global _ACTIVE
            _ACTIVE = self

    def update(self, n: int | None = None, text: str | None = None) -> None:
        """Move to position ``n`` (absolute: a restart may go back) and/or show ``text`` beside it."""
        if (n is None or int(n) == self.n) and (text is None or text == self.text) and self._drawn:
            return  # nothing new to draw (the watcher polls twice a second)
        self._drawn = True
        if n is not None:
            self.n = int(n)
        if text is not None:
            self.text = text
        if self._bar is not None:
            self._bar.n = self.n
            self._bar.set_postfix_str(self.text, refresh=False)
            self._bar.refresh()
            return
        now = time.monotonic()
        if self._last_plain is None or now - self._last_plain >= self.plain_every_s:
            self._print_plain(now)

    def _print_plain(self, now: float) -> None:
        if self._plain_printed == (self.n, self.text):
            return
        print(f"{self.desc} {self.n}/{self.total} {self.unit}s {self.text}".rstrip(), file=self.stream, flush=True)
        self._last_plain, self._plain_printed = now, (self.n, self.text)

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None
        if self._bar is not None:
            self._bar.n = self.n
            self._bar.set_postfix_str(self.text, refresh=False)
            self._bar.close()
            self._bar = None
        elif self._plain_printed != (self.n, self.text):
            self._print_plain(time.monotonic())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
