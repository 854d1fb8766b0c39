"""Helpers for the real server binaries we launch (Triton, Tansu): logs and process groups."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

LOG_TAIL_BYTES = 6000


def log_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The end of a log file, for error messages that say why a server did not come up."""
    try:
        with path.open("rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            log_file.seek(max(0, log_file.tell() - max_bytes))
            return log_file.read().decode("utf-8", errors="replace")
    except OSError as error:
        return f"<no log at {path}: {error}>"


def signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Signals the process's whole group (started with start_new_session): no orphaned children."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)
