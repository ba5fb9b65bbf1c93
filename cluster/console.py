"""A quiet console: progress bars and one line per stage on the terminal; Ray's own chatter in a log file.

What goes to the file instead of the terminal (everything else is printed as Ray would print it):
- lines that Ray's internal actors print (Ray Train's controller and placement-group cleaner, Serve's controller and
  proxies, Ray Data's stats actor): their "Failed to query Ray Train Controller actor state" retries alone ran to
  hundreds of lines in a demo;
- Python deprecation/future warnings raised inside third-party packages (site-packages), in the workers (as log
  lines) and in the driver (`warnings.showwarning`), with the source line Python prints under each;
- per-worker start-up notices of the libraries under our workers (Ray Train's process-group line, DeepSpeed's
  "Setting accelerator to CPU"), and Ray's own notices (log deduplication, token authentication).
Warnings raised by our own code, errors, tracebacks and everything our workers print still reach the terminal.

`install(path)` hooks the driver's copy of worker output (Ray's `WorkerStandardStreamDispatcher`, the mechanism
behind `log_to_driver`) and the driver's warnings; `redirect(path)` moves the file (each job points it at its run
directory). Both are no-ops when Ray's internals differ from the pinned version's: the output is then unfiltered,
never lost.
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from pathlib import Path
from typing import Any, TextIO

RAY_INTERNAL_ACTORS = re.compile(
    r"^(PlacementGroupCleaner|TrainController|TrainStateActor|SynchronizationActor|ServeController|ProxyActor"
    r"|ServeReplica:.*:.*_serve_.*|_StatsActor|StatsActor|AutoscalingRequester|DatasetStatsActor)")
NOISY_WARNING = re.compile(r"(site-packages|dist-packages)/.*: (DeprecationWarning|FutureWarning|"
                           r"PendingDeprecationWarning|RayDeprecationWarning)\b")
SOURCE_LINE = re.compile(r"^\s{2,}\S")  # the indented source line Python prints under a warning
# Notices printed inside our workers by the libraries under them, on every start of every worker.
NOISY_LINES = re.compile(r"Setting up process group for: |\[real_accelerator\.py:\d+:get_accelerator\] Setting "
                         r"accelerator to CPU|Ray deduplicates logs by default|"
                         r"Task ServeController\.graceful_shutdown failed")
SERVE_INFO = re.compile(r"^INFO \d{4}-\d\d-\d\d ")  # Serve replicas' access/lifecycle log lines (INFO level)

# Driver-side Ray loggers whose warnings are notices, not problems (token auth is on by default in Ray 2.60 and
# says so at every start): they go to the file too.
NOISY_LOGGERS = ("ray._private.authentication.authentication_token_setup",)

_lock = threading.Lock()
_state: dict[str, Any] = {"file": None, "path": None, "installed": False}


def _write(lines: list[str], origin: str) -> None:
    with _lock:
        f: TextIO | None = _state["file"]
        if f is None:
            return
        for line in lines:
            f.write(f"({origin}) {line}\n")
        f.flush()


def split_lines(lines: list[str], internal: bool, serve_replica: bool = False) -> tuple[list[str], list[str]]:
    """(kept, dropped) lines of one batch: all of an internal actor's, a Serve replica's INFO log lines, library
    notices, and third-party deprecation warnings with their source line."""
    if internal:
        return [], list(lines)
    kept: list[str] = []
    dropped: list[str] = []
    skip_source = False
    for line in lines:
        if NOISY_WARNING.search(line) or NOISY_LINES.search(line) or (serve_replica and SERVE_INFO.match(line)):
            dropped.append(line)
            skip_source = True
        elif skip_source and SOURCE_LINE.match(line):
            dropped.append(line)
        else:
            skip_source = False
            kept.append(line)
    return kept, dropped


def _handler(print_original: Any) -> Any:
    def handle(data: dict[str, Any]) -> None:
        name = data.get("actor_name") or data.get("task_name") or ""
        kept, dropped = split_lines(list(data.get("lines", [])), bool(RAY_INTERNAL_ACTORS.match(name)),
                                    serve_replica=name.startswith("ServeReplica:"))
        if dropped:
            _write(dropped, f"{name or 'worker'} pid={data.get('pid')}")
        if kept:
            print_original({**data, "lines": kept})

    return handle


def _showwarning(original: Any) -> Any:
    def show(message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        third_party = "site-packages" in filename or "dist-packages" in filename
        if third_party and issubclass(category, (DeprecationWarning, FutureWarning, PendingDeprecationWarning)):
            _write([warnings.formatwarning(message, category, filename, lineno, line).rstrip()], "driver")
            return
        original(message, category, filename, lineno, file, line)

    return show


class _FileHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _write([self.format(record)], record.name)


def quiet_loggers() -> None:
    """Route NOISY_LOGGERS to the file (call before `ray.init`: they speak during it)."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [_FileHandler()]
        logger.propagate = False


def redirect(path: str | Path) -> None:
    """Send the filtered chatter to `path` from now on (appending)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with _lock:
        if _state["path"] == p:
            return
        if _state["file"] is not None:
            _state["file"].close()
        _state["file"], _state["path"] = p.open("a", encoding="utf-8"), p


def install(path: str | Path) -> bool:
    """Filter this driver's console (idempotent); returns whether the Ray hook is in place."""
    redirect(path)
    if _state["installed"]:
        return True
    warnings.showwarning = _showwarning(warnings.showwarning)
    try:
        from ray._private import worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # another Ray layout: leave its output as it is
        return False
    names = [name for name, _ in dispatcher.handlers]
    if "ray_print_logs" not in names:  # log_to_driver is off, or Ray renamed its handler
        return False
    ignore_prefix = worker._should_ignore_worker_log_prefix(worker.global_worker)

    def print_original(data: dict[str, Any]) -> None:
        worker.print_to_stdstream(data, ignore_prefix=ignore_prefix)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _handler(print_original))
    _state["installed"] = True
    return True


def log_path() -> Path | None:
    return _state["path"]
