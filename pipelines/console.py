"""What an ``msmae`` command prints: the run's own lines, not the libraries' chatter.

A training run used to print a few hundred lines for a few dozen epochs: Ray Data's
``Dataset … execution finished`` per dataset and epoch, "Progress bars disabled" from each split
coordinator, a harmless ``PreemptionWatcher`` error line from Ray Train's controller, deprecation
warnings raised inside Ray, MLflow's notes on every model it saves or loads, ANSI colour codes in
a log file. Quiet mode (the default; ``--verbose`` turns it off) removes them in two layers:

1. the libraries' own switches, set before they start (``configure``): Ray Data's logging
   config (``RAY_DATA_LOGGING_CONFIG``, for the driver and the workers of a Ray it starts),
   Ray's driver log level (``ray_log_level``), ``RAY_COLOR_PREFIX=0`` when output is not a
   terminal, MLflow's log level and artifact progress bars, ``warnings`` filters;
2. for what has no switch (a C++ log line, a warning raised inside a Ray actor, lines forwarded
   from a cluster this process did not start) a line filter on ``sys.stdout``/``sys.stderr``
   (``LineFilter``, rules in ``QUIET_DROP``). It also takes Ray's ``(RayTrainWorker pid=…)``
   prefix off the epoch lines, so the user's progress stands out, and strips ANSI codes when
   the stream is not a terminal (verbose or not).

Only whole known lines are dropped; an error, a warning not listed here, and the project's own
lines (``[pretrain] epoch …``, ``== summary ==``, ``error: …``) always pass.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

RAY_DATA_LOGGING = Path(__file__).with_name("ray_data_logging.yaml")

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# "(RayTrainWorker pid=123)" or "(SplitCoordinator pid=4, ip=10.0.0.2)": a line Ray forwarded from a worker.
RAY_PREFIX = re.compile(r"^\((?P<who>[^()]*pid=[^()]*)\) (?P<msg>.*)$", re.DOTALL)
# The project's own stage lines (rank 0's epoch lines, tracking notes): shown without Ray's prefix.
OWN_WORKER_LINE = re.compile(r"^\[(pretrain|finetune|segment)\] ")

# Known-harmless lines, dropped in quiet mode; each with why it is harmless.
QUIET_DROP: tuple[tuple[str, re.Pattern], ...] = (
    ("Ray Data's one line per dataset execution (one per split and epoch)",
     re.compile(r"Dataset \S+ execution finished in [\d.]+ seconds")),
    ("Ray Data saying the progress bars this project turned off are off",
     re.compile(r"Progress bars (for operators )?disabled\. To enable")),
    ("Ray's ERROR-level note that an actor's constructor arguments sit in the object store (ray-project/ray#53727), "
     "not an error, on two actors: Ray Train's controller's own PreemptionWatcher (restarted by Ray if it ever fails) "
     "and a Ray Data scoring actor of `msmae predict`, whose constructor arguments (the model's URI, "
     "the tracking URI) stay referenced for the whole job",
     re.compile(r"core_worker\.cc:\d+: Actor with class name: '(PreemptionWatcher|MapWorker\(MapBatches\(\w+\)\))' "
                r".* has constructor arguments in the object store")),
    ("a deprecation raised inside Ray's own code (Ray Train's DatasetManager), nothing this project calls",
     re.compile(r"RayDeprecationWarning: ")),
    ("Ray's token-auth notice for the local, loopback-only cluster this command starts",
     re.compile(r"Token authentication is enabled for this Ray cluster")),
    ("MLflow asking for type hints on the pyfunc's predict, when the class is defined (raised under MLflow's own "
     "'once' filter, which warnings.filterwarnings cannot reach; KNOWN_WARNINGS covers the other places it is raised)",
     re.compile(r"UserWarning: Add type hints to the `predict` method")),
    ("MLflow's advice on the pyfunc wrapper this project logs as an object on purpose (pipelines/serve/registry.py: "
     "an empty MSMAEPyfunc whose weights are artifacts loaded with weights_only)",
     re.compile(r"Passing a Python object as `python_model` causes it to be serialized using CloudPickle")),
    ("MLflow's own echo of a registration the run reports itself ('registered NAME version N')",
     re.compile(r"^(Successfully registered model '.*'\.|Created version '\d+' of model '.*'\.)$")),
    ("MLflow's artifact download bar (also switched off by MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR)",
     re.compile(r"Downloading artifacts: +\d+%")),
)
KNOWN_WARNINGS = (  # (category, message regex) of warnings.filterwarnings, quiet mode only
    (UserWarning, r".*Add type hints to the `predict` method"),  # MLflow, on every load of a pyfunc without type hints
)


def is_noise(line: str) -> bool:
    """Whether a line (ANSI codes already stripped) is one of ``QUIET_DROP``."""
    return any(pattern.search(line) for _, pattern in QUIET_DROP)


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


class LineFilter(io.TextIOBase):
    """A text stream in front of another: in quiet mode drops ``QUIET_DROP`` lines and unprefixes the
    project's worker lines; strips ANSI codes when the target is not a terminal.

    Lines are held until their newline (a line can arrive in pieces, from several threads: Ray
    prints forwarded worker output from a thread of its own). A piece holding a carriage return
    and no newline is a progress bar redrawing in place and is written at once. The source line a
    Python warning prints after the dropped warning (``  self.x = x``) is dropped with it.
    """

    def __init__(self, target, quiet: bool = True) -> None:
        super().__init__()
        self.target = target
        self.quiet = quiet
        self._buffer = ""
        self._lock = threading.Lock()
        self._skip_source_of: str | None = None  # the origin of a dropped warning, whose source line follows
        self._dropped_redraw = False  # a dropped progress bar: the newline that ends it is dropped too

    # -- the stream interface -------------------------------------------------------------------
    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            self._buffer += text
            while "\n" in self._buffer:
                line, self._buffer = self._buffer.split("\n", 1)
                shown = self.rewrite(line)
                if shown is not None:
                    self.target.write(shown + "\n")
            if "\r" in self._buffer:
                shown = self.rewrite(self._buffer, partial=True)
                self._buffer = ""
                if shown is not None:
                    self.target.write(shown)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(ValueError, OSError):  # a closed target (a test runner's stream) after its command
            self.target.flush()

    def drain(self) -> None:
        """Write out a last line without its newline (at the end of a command)."""
        with self._lock:
            rest, self._buffer = self._buffer, ""
        shown = self.rewrite(rest) if rest else None
        if shown:
            self.target.write(shown)
        self.flush()

    def isatty(self) -> bool:
        return bool(getattr(self.target, "isatty", lambda: False)())

    def fileno(self) -> int:
        return self.target.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.target, "encoding", None) or "utf-8"

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return getattr(self.target, "errors", None)

    @property
    def buffer(self):
        return self.target.buffer  # click writes bytes there; those never carry Ray's lines

    def __getattr__(self, name: str):
        if name == "target":  # not set yet (never recurse)
            raise AttributeError(name)
        return getattr(self.target, name)  # anything else a library asks of sys.stdout (reconfigure, mode, ...)

    # -- the rules ------------------------------------------------------------------------------
    def rewrite(self, line: str, partial: bool = False) -> str | None:
        """The line as shown (None: dropped)."""
        if not self.isatty():
            line = strip_ansi(line)
        if not self.quiet:
            return line
        plain = strip_ansi(line)
        forwarded = RAY_PREFIX.match(plain)
        who, message = (forwarded["who"], forwarded["msg"]) if forwarded else ("", plain)
        skip_source, self._skip_source_of = self._skip_source_of, None
        dropped_redraw, self._dropped_redraw = self._dropped_redraw, False
        if dropped_redraw and not partial and not plain.strip("\r"):
            return None
        if skip_source is not None and who == skip_source and message.startswith("  "):
            return None
        if is_noise(message):
            if "Warning: " in message and not partial:
                self._skip_source_of = who
            self._dropped_redraw = partial
            return None
        if forwarded and OWN_WORKER_LINE.match(message):
            return message
        return line


def _filters() -> list[LineFilter]:
    return [s for s in (sys.stdout, sys.stderr) if isinstance(s, LineFilter)]


@contextlib.contextmanager
def filtered_streams() -> Iterator[None]:
    """``sys.stdout``/``sys.stderr`` behind a ``LineFilter`` for the block (already so: left as they are).

    ``msmae``'s entry point installs the filters for the whole process (``install``), so Ray's
    output after the command returns is filtered too; an in-process caller (a test's CliRunner)
    gets them for the one command."""
    if _filters():
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = LineFilter(saved[0]), LineFilter(saved[1])
    try:
        yield
    finally:
        for stream in _filters():
            stream.drain()
        sys.stdout, sys.stderr = saved


def install() -> None:
    """Put the process's ``sys.stdout``/``sys.stderr`` behind ``LineFilter``s for good (the CLI's entry point)."""
    if not isinstance(sys.stdout, LineFilter):
        sys.stdout = LineFilter(sys.stdout)
    if not isinstance(sys.stderr, LineFilter):
        sys.stderr = LineFilter(sys.stderr)


_verbose = False


def configure(verbose: bool) -> None:
    """Quiet (the default) or verbose output for this process, set before Ray or MLflow start.

    Quiet: the libraries' own switches (environment variables a user already set are kept), the
    ``warnings`` filters, and the line filters' rules. Verbose: everything as the libraries print
    it (ANSI codes still stripped off a non-terminal)."""
    global _verbose
    _verbose = verbose
    for stream in _filters():
        stream.quiet = not verbose
    if verbose:
        return
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray colours worker prefixes unless told not to
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))  # read when ray.data is imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # "Creating initial MLflow database tables..."
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def verbose() -> bool:
    return _verbose


def ray_log_level() -> int:
    """The level of Ray's own logger in this (driver) process: ``ray.init(logging_level=...)``."""
    return logging.INFO if _verbose else logging.WARNING
