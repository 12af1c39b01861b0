"""The node's durable state: received instances, result objects waiting to be sent, and a ledger.

A hospital node is killed (power cut, OOM killer, an impatient ``kill -9``) and restarted, and its
destination goes down for hours. So every step is a file written whole (temp file, fsync, rename, fsync of
the folder) or a committed SQLite transaction, in an order that a crash between any two steps leaves
recoverable:

1. **receive**: the instance is written to ``incoming/<SOP Instance UID>.dcm``, then its ledger row
   (``received``) is committed, and only then is the C-STORE acknowledged.
2. **assess**: the result objects are written into ``outbox/<UID>/`` (a folder renamed into place whole),
   then the row becomes ``assessed``, then the incoming file is removed. Their UIDs are derived from the
   source UID, so assessing again after a crash makes the same instances, not new ones.
3. **send**: after the destination accepted every object the row becomes ``sent`` and the outbox folder is
   removed; a failed send sets the next attempt time (backoff) in the row.

The ledger keeps the rows of finished instances (bounded by ``keep_rows``), so an instance received again is
acknowledged and skipped, not assessed and sent again. ``pending`` (received + assessed, not yet sent) and
the bytes they hold are bounded: a full spool refuses new work instead of accepting and dropping it.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Spool", "SpoolItem", "atomic_write", "valid_uid"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: Rows of finished instances kept for duplicate detection (a few hundred bytes each).
KEEP_ROWS = 200_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,          -- received | assessed | sent | ignored
    received REAL NOT NULL,
    updated REAL NOT NULL,
    study TEXT,
    calling TEXT,
    bytes INTEGER NOT NULL DEFAULT 0,
    assess_attempts INTEGER NOT NULL DEFAULT 0,
    send_attempts INTEGER NOT NULL DEFAULT 0,
    next_try REAL NOT NULL DEFAULT 0,
    outcome TEXT,                 -- assessed | refused | ignored
    detail TEXT
);
CREATE INDEX IF NOT EXISTS items_state ON items (state, next_try);
CREATE INDEX IF NOT EXISTS items_updated ON items (updated);
"""

_PENDING = ("received", "assessed")


def valid_uid(uid: str | None) -> bool:
    """A DICOM UID (digits and dots, at most 64 characters): safe to use as a file name as it is."""
    return bool(uid) and len(uid) <= 64 and _UID.match(uid) is not None  # type: ignore[arg-type]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, tmp_dir: Path | None = None) -> None:
    """Write ``data`` to ``path`` so that a crash leaves either the old state or the whole new file."""
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f".{path.name}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class SpoolItem:
    """One ledger row as the worker and the sender see it."""

    uid: str
    state: str
    study: str | None
    send_attempts: int
    assess_attempts: int


class Spool:
    """The folders and the ledger under ``root`` (created if missing), with bounds on pending work."""

    def __init__(
        self,
        root: str | Path,
        *,
        max_pending: int = 1000,
        max_bytes: int = 4 << 30,
        min_free_bytes: int = 256 << 20,
        keep_rows: int = KEEP_ROWS,
    ) -> None:
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.outbox = self.root / "outbox"
        self.tmp = self.root / "tmp"
        for folder in (self.incoming, self.outbox, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self.max_pending = max_pending
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self.keep_rows = keep_rows
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            self.root / "ledger.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._in_flight: set[str] = set()  # UIDs being written by a C-STORE right now
        self._pending, self._bytes = self._count()
        self._finished_since_prune = 0

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def _count(self) -> tuple[int, int]:
        row = self._db.execute(
            "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM items WHERE state IN (?, ?)", _PENDING
        ).fetchone()
        return int(row[0]), int(row[1])

    @property
    def pending(self) -> int:
        """Instances acknowledged and not yet sent (received or assessed)."""
        with self._lock:
            return self._pending

    @property
    def pending_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def full_reason(self, incoming_bytes: int = 0) -> str | None:
        """Why new work cannot be taken now (None: it can): too many pending, too many bytes, disk full."""
        with self._lock:
            if self._pending + len(self._in_flight) >= self.max_pending:
                return f"{self._pending} instances pending (limit {self.max_pending})"
            if self._bytes + incoming_bytes > self.max_bytes:
                return f"{self._bytes >> 20} MiB pending (limit {self.max_bytes >> 20} MiB)"
        free = shutil.disk_usage(self.root).free
        if free - incoming_bytes < self.min_free_bytes:
            return f"{free >> 20} MiB free on the spool's disk (keeps {self.min_free_bytes >> 20} MiB)"
        return None

    def state(self, uid: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT state FROM items WHERE uid = ?", (uid,)).fetchone()
        return row[0] if row else None

    def item(self, uid: str) -> SpoolItem | None:
        with self._lock:
            row = self._db.execute(
                "SELECT uid, state, study, send_attempts, assess_attempts FROM items WHERE uid = ?", (uid,)
            ).fetchone()
        return SpoolItem(*row) if row else None

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM items GROUP BY state").fetchall()
        return {state: int(n) for state, n in rows}

    # ---- 1. receive ----------------------------------------------------------------------------------
    def incoming_path(self, uid: str) -> Path:
        return self.incoming / f"{uid}.dcm"

    def outbox_path(self, uid: str) -> Path:
        return self.outbox / uid

    def claim(self, uid: str) -> str | None:
        """Reserve ``uid`` for a C-STORE being received. Returns None when the caller should write it, or
        ``"duplicate"`` (already in the ledger) / ``"in progress"`` (another association is writing it)."""
        with self._lock:
            if uid in self._in_flight:
                return "in progress"
            if self.state(uid) is not None:
                return "duplicate"
            self._in_flight.add(uid)
            return None

    def release(self, uid: str) -> None:
        """Give up a claim (the write failed: the C-STORE is answered with a failure, the sender retries)."""
        with self._lock:
            self._in_flight.discard(uid)

    def store(self, uid: str, data: bytes, *, study: str | None, calling: str | None) -> Path:
        """Write a claimed instance durably and record it; after this returns, it may be acknowledged."""
        path = self.incoming_path(uid)
        try:
            atomic_write(path, data, self.tmp)
            now = time.time()
            with self._lock:
                self._db.execute(
                    "INSERT INTO items (uid, state, received, updated, study, calling, bytes) "
                    "VALUES (?, 'received', ?, ?, ?, ?, ?)",
                    (uid, now, now, study, calling, len(data)),
                )
                self._pending += 1
                self._bytes += len(data)
        finally:
            self.release(uid)
        return path

    # ---- restart ---------------------------------------------------------------------------------------
    def recover(self) -> dict[str, list[str]]:
        """After a stop or a crash: clear half-written temp files, adopt instances written but not yet in
        the ledger, drop leftovers of finished steps. Returns the UIDs to assess and to send."""
        with self._lock:
            for leftover in self.tmp.iterdir():
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
            states = dict(self._db.execute("SELECT uid, state FROM items").fetchall())
            now = time.time()
            for path in self.incoming.glob("*.dcm"):
                uid = path.stem
                state = states.get(uid)
                if state is None:  # renamed into place, crash before the ledger row: keep it, assess it
                    self._db.execute(
                        "INSERT INTO items (uid, state, received, updated, bytes) "
                        "VALUES (?, 'received', ?, ?, ?)",
                        (uid, now, now, path.stat().st_size),
                    )
                    states[uid] = "received"
                elif state != "received":  # assessed already: the source copy is no longer needed
                    path.unlink(missing_ok=True)
            for folder in self.outbox.iterdir():
                if states.get(folder.name) != "assessed":  # sent already, or never recorded as assessed
                    shutil.rmtree(folder, ignore_errors=True)
            for uid, state in list(states.items()):
                if state == "received" and not self.incoming_path(uid).is_file():
                    self._db.execute("DELETE FROM items WHERE uid = ?", (uid,))  # never written whole
                    del states[uid]
                if state == "assessed" and not self.outbox_path(uid).is_dir():
                    self._db.execute("UPDATE items SET state = 'received' WHERE uid = ?", (uid,))
                    states[uid] = "received"
            self._db.execute("UPDATE items SET next_try = 0 WHERE state = 'assessed'")
            self._pending, self._bytes = self._count()
            order = self._db.execute(
                "SELECT uid, state FROM items WHERE state IN (?, ?) ORDER BY received", _PENDING
            ).fetchall()
        return {
            "assess": [uid for uid, state in order if state == "received"],
            "send": [uid for uid, state in order if state == "assessed"],
        }

    # ---- 2. assess -------------------------------------------------------------------------------------
    def begin_assessment(self, uid: str) -> int:
        """Count an assessment attempt before it starts (committed), so an instance that kills the process
        every time is recognised after restarts instead of crashing the node forever. Returns the count."""
        with self._lock:
            self._db.execute(
                "UPDATE items SET assess_attempts = assess_attempts + 1, updated = ? WHERE uid = ?",
                (time.time(), uid),
            )
            row = self._db.execute("SELECT assess_attempts FROM items WHERE uid = ?", (uid,)).fetchone()
        return int(row[0]) if row else 0

    def put_results(self, uid: str, files: dict[str, bytes], *, outcome: str, detail: str) -> None:
        """Store the result objects of ``uid`` whole in its outbox folder, then mark it assessed."""
        staging = self.tmp / f"{uid}.{uuid.uuid4().hex}"
        staging.mkdir()
        size = 0
        for name, data in files.items():
            with open(staging / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            size += len(data)
        _fsync_dir(staging)
        target = self.outbox_path(uid)
        if target.exists():  # an earlier attempt's folder: same UIDs, same objects
            shutil.rmtree(target)
        os.replace(staging, target)
        _fsync_dir(self.outbox)
        with self._lock:
            old = self._db.execute("SELECT bytes FROM items WHERE uid = ?", (uid,)).fetchone()
            self._db.execute(
                "UPDATE items SET state = 'assessed', outcome = ?, detail = ?, bytes = ?, next_try = 0, "
                "updated = ? WHERE uid = ?",
                (outcome, detail, size, time.time(), uid),
            )
            self._bytes += size - (int(old[0]) if old else 0)
        self.incoming_path(uid).unlink(missing_ok=True)

    def finish_without_results(self, uid: str, *, outcome: str, detail: str) -> None:
        """An instance that gets no result objects (e.g. our own result sent back to us): done."""
        with self._lock:
            old = self._db.execute("SELECT bytes, state FROM items WHERE uid = ?", (uid,)).fetchone()
            self._db.execute(
                "UPDATE items SET state = 'ignored', outcome = ?, detail = ?, bytes = 0, updated = ? "
                "WHERE uid = ?",
                (outcome, detail, time.time(), uid),
            )
            if old and old[1] in _PENDING:
                self._pending -= 1
                self._bytes -= int(old[0])
        self.incoming_path(uid).unlink(missing_ok=True)
        self._maybe_prune()

    # ---- 3. send ---------------------------------------------------------------------------------------
    def result_files(self, uid: str) -> list[Path]:
        folder = self.outbox_path(uid)
        return sorted(folder.iterdir()) if folder.is_dir() else []

    def due(self, now: float | None = None, limit: int = 100) -> list[SpoolItem]:
        """Assessed instances whose next send attempt is due, oldest first."""
        now = time.time() if now is None else now
        with self._lock:
            rows = self._db.execute(
                "SELECT uid, state, study, send_attempts, assess_attempts FROM items "
                "WHERE state = 'assessed' AND next_try <= ? ORDER BY received LIMIT ?",
                (now, limit),
            ).fetchall()
        return [SpoolItem(*row) for row in rows]

    def next_due(self) -> float | None:
        """When the earliest waiting send is due (None: nothing waits)."""
        with self._lock:
            row = self._db.execute("SELECT MIN(next_try) FROM items WHERE state = 'assessed'").fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def mark_sent(self, uid: str) -> None:
        with self._lock:
            old = self._db.execute("SELECT bytes, state FROM items WHERE uid = ?", (uid,)).fetchone()
            self._db.execute("UPDATE items SET state = 'sent', updated = ? WHERE uid = ?", (time.time(), uid))
            if old and old[1] in _PENDING:
                self._pending -= 1
                self._bytes -= int(old[0])
        shutil.rmtree(self.outbox_path(uid), ignore_errors=True)
        self._maybe_prune()

    def mark_retry(self, uid: str, delay: float) -> int:
        """Record a failed send and when to try again; returns the number of failed attempts so far."""
        with self._lock:
            self._db.execute(
                "UPDATE items SET send_attempts = send_attempts + 1, next_try = ?, updated = ? WHERE uid = ?",
                (time.time() + delay, time.time(), uid),
            )
            row = self._db.execute("SELECT send_attempts FROM items WHERE uid = ?", (uid,)).fetchone()
        return int(row[0]) if row else 0

    def _maybe_prune(self) -> None:
        """Forget the oldest finished rows beyond ``keep_rows`` (checked every 1000 finished instances)."""
        with self._lock:
            self._finished_since_prune += 1
            if self._finished_since_prune < 1000:
                return
            self._finished_since_prune = 0
            self._db.execute(
                "DELETE FROM items WHERE state IN ('sent', 'ignored') AND uid NOT IN ("
                "SELECT uid FROM items WHERE state IN ('sent', 'ignored') ORDER BY updated DESC LIMIT ?)",
                (self.keep_rows,),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()
