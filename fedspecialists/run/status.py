"""A run folder's ``status.json``: written atomically, with a heartbeat that says it is alive.

A live ServerApp rewrites the heartbeat every :data:`HEARTBEAT_S` seconds; a run whose process
died without writing its end (killed, out of memory, a SuperLink that stopped) stops beating.
:func:`read_status` reports such a run as ``interrupted`` the next time anything reads its
folder (the report, the sweep, a user's script), instead of ``running`` for ever.

``status.json`` keys: ``status`` (``running``, ``completed``, ``failed``; ``interrupted`` is only
ever *read*, never written), ``time`` (of the last change), ``heartbeat`` (Unix time, while
running), ``pid`` and ``host`` (of the ServerApp), ``last_round`` (the last checkpointed round),
and for a failure ``error`` and ``traceback``.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HEARTBEAT_S = 10.0
STALE_AFTER_S = 6 * HEARTBEAT_S  # a beat missed this long: the process is gone


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader (or a crash) never sees a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_status(run_dir: Path, now: float | None = None) -> dict[str, Any]:
    """``status.json`` of ``run_dir`` as the run really is: a ``running`` run whose heartbeat
    is older than :data:`STALE_AFTER_S` reads as ``interrupted`` (``stale_s`` says by how much).

    A folder without a readable ``status.json`` reads as ``{"status": "unknown"}``.
    """
    try:
        status = json.loads((Path(run_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {"status": "unknown"}
    if status.get("status") == "running":
        beat = status.get("heartbeat")
        age = (now or time.time()) - float(beat) if isinstance(beat, int | float) else None
        if age is None or age > STALE_AFTER_S:
            status = {**status, "status": "interrupted", "stale_s": age}
    return dict(status)


class StatusFile:
    """The writer of one run's ``status.json``, with a heartbeat thread while running."""

    KEPT = ("last_round", "resumed_after_round")  # carried from one status to the next

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "status.json"
        self._lock = threading.Lock()
        self._payload: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, status: str, **details: Any) -> None:
        """Write ``status`` (keeping :attr:`KEPT`); beat while ``running``, stop otherwise."""
        with self._lock:
            keep = {k: self._payload[k] for k in self.KEPT if k in self._payload}
            self._payload = {
                "status": status,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "pid": os.getpid(),
                "host": socket.gethostname(),
                **keep,
                **details,
            }
            self._write()
        if status == "running":
            self._start_beating()
        else:
            self._stop.set()

    def update(self, **details: Any) -> None:
        """Add ``details`` (for example ``last_round``) to the current status."""
        with self._lock:
            self._payload.update(details)
            self._write()

    def _write(self) -> None:
        if self._payload.get("status") == "running":
            self._payload["heartbeat"] = time.time()
        else:
            self._payload.pop("heartbeat", None)
        atomic_write(self.path, json.dumps(self._payload, indent=2).encode())

    def _start_beating(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="status-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with self._lock:
                if self._payload.get("status") != "running":
                    return
                try:
                    self._write()
                except OSError:  # the folder is gone: nobody is left to read a heartbeat
                    return
