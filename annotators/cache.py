"""The response cache: every paid answer, kept by a content key, so nothing is asked twice.

The key is the sha256 of everything that shapes an answer (backend, model, prompt version,
rendered prompt, image sha256, generation and image-encoding parameters) and nothing else: no
API key, no base URL, no request id. A changed prompt gives a new key (so only it is re-asked);
a killed run finds every answer that arrived before the kill.

SQLite in WAL mode, one autocommit `INSERT OR IGNORE` per answer: several processes (dask
workers, two shells) can write at once, and each answer is on disk as soon as it arrives.
Only successes are stored; a failure is retried on the next run.

The same file keeps the open Batch API jobs (`batches` table): an uploaded input file, the
batch made from it and the keys it answers, written before the batch is polled, so that a
killed run resumes polling the same batch instead of paying for a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

from pipeline.core.errors import BadCacheError
from pipeline.core.params import CacheParams
from schemas import Response, Usage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    raw_text TEXT NOT NULL,
    backend TEXT NOT NULL,
    model TEXT NOT NULL,
    served_model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    latency_s REAL NOT NULL,
    attempts INTEGER NOT NULL,
    created_at REAL NOT NULL
)
"""
_BATCHES_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    input_file_id TEXT PRIMARY KEY,
    batch_id TEXT,
    base_url TEXT NOT NULL,
    keys TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL
)
"""
_SETUP_RETRY_S = 0.01  # pause between tries while another process sets the file up
_KEYS_PER_QUERY = 500  # keys per lookup query, below SQLite's bound on host parameters
_COLUMNS = ("key", "text", "raw_text", "backend", "model", "served_model", "prompt_tokens",
            "completion_tokens", "cost_usd", "latency_s", "attempts", "created_at")
_BATCH_COLUMNS = ("input_file_id", "batch_id", "base_url", "keys", "status", "created_at")


def cache_key(*, backend: str, model: str, prompt_version: str, prompt: str, image_sha256: str,
              generation: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of what shapes an answer. `generation` holds the sampling
    and image-encoding parameters (temperature, max_tokens, seed, image format, quality,
    detail); secrets never belong in it."""
    blob = json.dumps({"backend": backend, "model": model, "prompt_version": prompt_version,
                       "prompt": prompt, "image_sha256": image_sha256,
                       "generation": dict(generation)},
                      sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedAnswer:
    """A stored successful answer: the cleaned text, the model's raw text (re-cleaned on read,
    so that a cleaning fix applies without paying again) and what the call cost."""

    text: str
    raw_text: str
    backend: str
    model: str
    served_model: str
    usage: Usage
    cost_usd: float
    latency_s: float
    attempts: int


@dataclass(frozen=True)
class OpenBatch:
    """A Batch API job not yet collected: its input file, its batch (None when the run stopped
    between upload and creation) and the keys it answers (key -> re-ask number)."""

    input_file_id: str
    batch_id: Optional[str]
    keys: dict
    created_at: float


def cache_error(exc: sqlite3.Error, path: Path, busy_timeout_s: float) -> BadCacheError:
    """One line saying what is wrong with the cache file, from SQLite's error."""
    text = str(exc)
    name = getattr(exc, "sqlite_errorname", "") or ""
    fix = "move it away (the next run starts a new cache) or set annotate.cache.path"
    if name == "SQLITE_NOTADB" or "not a database" in text:
        message = f"not an SQLite database (corrupt, or another kind of file); {fix}"
    elif name.startswith("SQLITE_CORRUPT") or "malformed" in text:
        message = f"corrupt or truncated ({text}); {fix}"
    elif name.startswith("SQLITE_READONLY") or "readonly" in text:
        message = "cannot be written (a read-only file or folder)"
    elif name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in text:
        message = (f"busy: another process held it longer than annotate.cache.busy_timeout_s "
                   f"({busy_timeout_s:g} s)")
    elif name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        message = ("is a folder, not a file" if path.is_dir() else
                   "cannot be opened (its folder cannot be written, or it is not a file)")
    elif name.startswith("SQLITE_FULL") or "full" in text:
        message = "cannot be written: the disk is full"
    elif "no such column" in text or "no such table" in text:
        message = f"not a response cache (its tables differ: {text}); {fix}"
    else:
        message = f"cannot be used ({text})"
    return BadCacheError(message, path)


def _answer(row: Sequence) -> CachedAnswer:
    r = dict(zip(_COLUMNS, row))
    return CachedAnswer(
        text=r["text"], raw_text=r["raw_text"], backend=r["backend"], model=r["model"],
        served_model=r["served_model"],
        usage=Usage(prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"]),
        cost_usd=r["cost_usd"], latency_s=r["latency_s"], attempts=r["attempts"])


class ResponseCache:
    """Content-addressed store of successful answers in one SQLite file.

    Safe to share between threads of one process and between processes; picklable (it reopens
    its connection in the process that uses it).
    """

    def __init__(self, path: str | Path, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._conn: Optional[sqlite3.Connection] = None
        self._pid: Optional[int] = None

    @classmethod
    def from_params(cls, params: CacheParams) -> Optional["ResponseCache"]:
        """The cache `annotate.cache` asks for, checked (`check`), or None when it is
        disabled."""
        return cls(params.path, params.busy_timeout_s).check() if params.enabled else None

    def check(self) -> "ResponseCache":
        """Open the cache and read its tables, so that a cache file that is corrupt, truncated,
        a folder, another program's database, or that cannot be written stops a run at set-up
        as one `BadCacheError` naming the file, not in the middle of the run."""
        with self._lock:
            conn = self._connection()
            with self._guard():
                self._refuse_foreign(conn, set_up=True)
                conn.execute("SELECT key FROM responses LIMIT 1").fetchall()
            for where in (self.path, self.path.parent):
                if where.exists() and not os.access(where, os.W_OK):
                    what = "the file" if where == self.path else "its folder"
                    raise BadCacheError(f"cannot be written ({what} is read-only)", self.path)
        return self

    def _refuse_foreign(self, conn: sqlite3.Connection, set_up: bool = False) -> None:
        """Refuse, before anything is written to it, a database that holds tables but not the
        cache's (another program's file): the cache never changes a file it did not make.
        After set-up (`set_up`) both tables must be there."""
        tables = {row[0] for row in
                  conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and not set_up:
            return  # a new (or zero-byte) file: set up below
        for table, schema in (("responses", _COLUMNS), ("batches", _BATCH_COLUMNS)):
            if table not in tables and not set_up and table == "batches":
                continue  # a cache made before batch mode: the table is added
            have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
            missing = [c for c in schema if c not in have]
            if missing:
                what = (f"table {table} has no column {missing[0]}" if have else
                        f"no table {table}")
                raise BadCacheError(f"not a response cache ({what}); move it away or set "
                                    "annotate.cache.path", self.path)

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """SQLite and file-system errors as one `BadCacheError` naming the cache file."""
        try:
            yield
        except sqlite3.Error as exc:
            raise cache_error(exc, self.path, self.busy_timeout_s) from None
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise BadCacheError(f"cannot be created or opened ({reason})", self.path) from None

    def __getstate__(self) -> dict:
        return {"path": self.path, "busy_timeout_s": self.busy_timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["busy_timeout_s"])

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            with self._guard():
                if self.path.is_dir():
                    raise BadCacheError("is a folder, not a file", self.path)
                for folder in self.path.parents:
                    if folder.exists():
                        if not folder.is_dir():
                            raise BadCacheError(f"cannot be created: {folder} is a file, not "
                                                "a folder", self.path)
                        break
                self.path.parent.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s,
                                       isolation_level=None, check_same_thread=False)
                try:
                    conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                    self._refuse_foreign(conn)
                    self._set_up(conn)
                    # WAL + NORMAL: a committed answer survives a killed process (not a power
                    # cut).
                    conn.execute("PRAGMA synchronous = NORMAL")
                except BaseException:
                    conn.close()
                    raise
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """WAL mode and the table. Switching a new file to WAL takes an exclusive lock that
        SQLite does not wait for (busy_timeout does not apply), so two processes opening the
        same new cache retry here until `busy_timeout_s`."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(_SCHEMA)
                conn.execute(_BATCHES_SCHEMA)
                return
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() > deadline:
                    raise
                time.sleep(_SETUP_RETRY_S)

    def get(self, key: str) -> Optional[CachedAnswer]:
        with self._lock, self._guard():
            row = self._connection().execute(
                f"SELECT {', '.join(_COLUMNS)} FROM responses WHERE key = ?", (key,)).fetchone()
        return None if row is None else _answer(row)

    def get_many(self, keys: Sequence[str]) -> dict[str, CachedAnswer]:
        """The stored answers among `keys` (one query per chunk of keys, not one per key)."""
        found: dict[str, CachedAnswer] = {}
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), _KEYS_PER_QUERY):
            chunk = unique[start:start + _KEYS_PER_QUERY]
            with self._lock, self._guard():
                rows = self._connection().execute(
                    f"SELECT {', '.join(_COLUMNS)} FROM responses WHERE key IN "
                    f"({', '.join('?' * len(chunk))})", chunk).fetchall()
            found.update((row[0], _answer(row)) for row in rows)
        return found

    def put(self, key: str, response: Response, *, raw_text: Optional[str] = None,
            served_model: Optional[str] = None, replace: bool = False) -> bool:
        """Store a successful response (committed at once). A failed one is not stored, so it
        is asked again next run; returns whether a row was written. An existing key is kept
        unless `replace` (a stored answer that no longer passes cleaning)."""
        if response.status != "ok":
            return False
        verb = "INSERT OR REPLACE" if replace else "INSERT OR IGNORE"
        values = (key, response.text, raw_text if raw_text is not None else response.text,
                  response.backend, response.model, served_model or response.model,
                  response.usage.prompt_tokens, response.usage.completion_tokens,
                  response.cost_usd, response.latency_s, response.attempts, time.time())
        with self._lock, self._guard():
            cur = self._connection().execute(
                f"{verb} INTO responses ({', '.join(_COLUMNS)}) "
                f"VALUES ({', '.join('?' * len(_COLUMNS))})", values)
        return cur.rowcount > 0

    # -- open Batch API jobs ------------------------------------------------------------------

    def add_batch_file(self, input_file_id: str, base_url: str, keys: Mapping[str, int]) -> None:
        """Record an uploaded batch input file and the keys it asks (key -> re-ask number),
        before a batch is created from it."""
        with self._lock, self._guard():
            self._connection().execute(
                "INSERT OR REPLACE INTO batches (input_file_id, batch_id, base_url, keys, status, "
                "created_at) VALUES (?, NULL, ?, ?, 'open', ?)",
                (input_file_id, base_url, json.dumps(dict(keys), sort_keys=True), time.time()))

    def set_batch_id(self, input_file_id: str, batch_id: str) -> None:
        """Record the batch created from an input file (committed before any poll)."""
        with self._lock, self._guard():
            self._connection().execute(
                "UPDATE batches SET batch_id = ? WHERE input_file_id = ?",
                (batch_id, input_file_id))

    def open_batches(self, base_url: str) -> list["OpenBatch"]:
        """Batches of this server not yet collected, oldest first."""
        with self._lock, self._guard():
            rows = self._connection().execute(
                "SELECT input_file_id, batch_id, keys, created_at FROM batches "
                "WHERE status = 'open' AND base_url = ? ORDER BY created_at, input_file_id",
                (base_url,)).fetchall()
        return [OpenBatch(input_file_id=r[0], batch_id=r[1], keys=json.loads(r[2]),
                          created_at=r[3]) for r in rows]

    def close_batch(self, input_file_id: str, status: str) -> None:
        """Mark a batch collected (its answers are stored) or given up, with its final status."""
        with self._lock, self._guard():
            self._connection().execute(
                "UPDATE batches SET status = ? WHERE input_file_id = ?",
                (status, input_file_id))

    def __len__(self) -> int:
        with self._lock, self._guard():
            return self._connection().execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def __contains__(self, key: str) -> bool:
        return self.get(key) is not None

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> "ResponseCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
