"""The job queue: one SQLite table (stdlib `sqlite3`, WAL) that the API, the workers and a restart share.

Each thread keeps its own connection and each call is one short transaction, so threads and worker
processes need no other locking: SQLite serialises the writers, and `claim` takes the oldest queued
job in one IMMEDIATE transaction.
A job's outputs are listed only after their files are complete (the worker writes them atomically).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATES = ("queued", "running", "done", "failed", "cancelled")
FINISHED = ("done", "failed", "cancelled")
MAX_ATTEMPTS = 2  # a job running when the server died is queued again once, then marked failed

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    source TEXT NOT NULL,
    mode TEXT NOT NULL,
    hires INTEGER NOT NULL DEFAULT 0,
    model TEXT,
    params TEXT NOT NULL,
    inputs TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'queued',
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    outputs TEXT NOT NULL DEFAULT '[]',
    error TEXT,
    cancel INTEGER NOT NULL DEFAULT 0,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    preview BLOB,
    model_hash TEXT,
    extras TEXT NOT NULL DEFAULT '{}',
    skip INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS options (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Job:
    """One row of the store, its JSON columns decoded."""

    id: str
    seq: int
    source: str  # "v1" or "a1111": which API submitted it
    mode: str
    hires: bool
    model: str | None
    params: dict[str, Any]
    inputs: dict[str, str]  # "image" / "mask" -> file name under the data folder's inputs/
    state: str
    step: int
    total: int
    created: float
    started: float | None
    finished: float | None
    outputs: list[dict[str, Any]]  # {"name", "seed", "networks", "warning"} per image, in order
    error: str | None
    cancel: bool
    worker: str | None
    attempts: int
    model_hash: str | None
    extras: dict[str, Any]  # what a run takes beside its settings: "controls" (ControlNet units), "x4"
    skip: bool  # A1111's skip: the running batch ends without its images, the next one starts

    @property
    def eta(self) -> float | None:
        """Seconds left, from the pace so far; None before the first step."""
        if self.state != "running" or not self.step or not self.started or not self.total:
            return None
        return (time.time() - self.started) / self.step * (self.total - self.step)


_COLUMNS = [name for name in Job.__dataclass_fields__]


def _job(row: sqlite3.Row) -> Job:
    values = {name: row[name] for name in _COLUMNS}
    for name in ("params", "inputs", "outputs", "extras"):
        values[name] = json.loads(values[name])
    for name in ("hires", "cancel", "skip"):
        values[name] = bool(values[name])
    return Job(**values)


def new_job_id() -> str:
    return uuid.uuid4().hex


_ADDED = {"extras": "TEXT NOT NULL DEFAULT '{}'", "skip": "INTEGER NOT NULL DEFAULT 0"}  # since the first


def _add_columns(db: sqlite3.Connection) -> None:
    """A store written before a column existed gets it, so an upgraded server keeps its queue."""
    have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    for name, kind in _ADDED.items():
        if name not in have:
            db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")


class Changes:
    """A counter the store bumps after each write, so that event streams in this process wait on it
    instead of polling SQLite. Writes from worker processes do not reach it: streams poll then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # for threads: the in-process worker
        self.version = 0
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = set()

    def bump(self) -> None:
        with self._lock:
            self.version += 1
            waiters, self._waiters = self._waiters, set()
            self._changed.notify_all()
        for loop, future in waiters:
            loop.call_soon_threadsafe(_resolve, future)

    def wait_blocking(self, seen: int, timeout: float) -> int:
        """`wait` for a thread: the version once it differs from `seen`, or after `timeout` seconds."""
        with self._lock:
            self._changed.wait_for(lambda: self.version != seen, timeout)
            return self.version

    async def wait(self, seen: int, timeout: float) -> int:
        """The version once it differs from `seen`, or after `timeout` seconds (a safety net)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if self.version != seen:
                return self.version
            self._waiters.add((loop, future))
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            with self._lock:
                self._waiters.discard((loop, future))
        return self.version


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


class QueueFull(Exception):
    """More jobs are waiting than the server's `max_queue`."""


class JobStore:
    """The queue and the record of every job, in `path` (created with its tables if missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.changes = Changes()
        self._local = threading.local()  # one connection per thread, kept open (see `_connect`)
        path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30)
        try:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer; kept in the file
            db.executescript(_SCHEMA)
            _add_columns(db)
        finally:
            db.close()

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened once. Opening one per call cost 0.3-2.6 ms here (closing
        the last connection checkpoints the WAL to disk), 40-100x a transaction on an open one, and a
        worker makes two such calls per sampling step."""
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=NORMAL")
            self._local.db = db
        return db

    @contextmanager
    def _connect(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:  # the body or the COMMIT (busy past the timeout): leave no transaction open
            try:
                if db.in_transaction:
                    db.execute("ROLLBACK")
            except sqlite3.Error:  # a connection that cannot roll back is dropped; the next call reopens
                self.close()
            raise

    def close(self) -> None:
        """Close this thread's connection (the others close with their threads)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    @contextmanager
    def _write(self, immediate: bool = False) -> Iterator[sqlite3.Connection]:
        """A write transaction; once it is committed, this process's event streams are woken."""
        with self._connect(immediate) as db:
            yield db
        self.changes.bump()

    # --- submitting and reading ----------------------------------------------------------------

    def submit(self, source: str, mode: str, params: dict[str, Any], *, model: str | None = None,
               hires: bool = False, inputs: dict[str, str] | None = None, max_queue: int | None = None,
               job_id: str | None = None, extras: dict[str, Any] | None = None) -> tuple[Job, int]:
        """Queue a job; (the job, its 0-based place in the queue). `QueueFull` past `max_queue`."""
        job_id = job_id or new_job_id()
        with self._write(immediate=True) as db:
            waiting = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued'").fetchone()[0]
            if max_queue is not None and waiting >= max_queue:
                raise QueueFull(f"the queue is full ({waiting} jobs waiting, limit max_queue={max_queue})")
            db.execute("INSERT INTO jobs (id, source, mode, hires, model, params, inputs, extras, created) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, source, mode, int(hires), model, json.dumps(params),
                        json.dumps(inputs or {}), json.dumps(extras or {}), time.time()))
        return self.get(job_id), waiting

    def get(self, job_id: str) -> Job | None:
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row is not None else None

    def glance(self, job_id: str) -> tuple[str, int] | None:
        """(state, length of the outputs column, which grows with each image) without decoding the
        row: what a waiter checks at a change to learn whether anything but the step moved."""
        with self._connect() as db:
            row = db.execute("SELECT state, length(outputs) FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (row[0], row[1]) if row is not None else None

    def position(self, job: Job) -> int | None:
        """How many queued jobs run before this one; None once it left the queue."""
        if job.state != "queued":
            return None
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?",
                              (job.seq,)).fetchone()[0]

    def list(self, state: str | None = None, offset: int = 0, limit: int = 50,
             source: str | None = None) -> tuple[list[Job], int]:
        """(a page of jobs, newest first, and how many match in all)."""
        where, args = [], []
        for column, value in (("state", state), ("source", source)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        with self._connect() as db:
            total = db.execute(f"SELECT COUNT(*) FROM jobs {clause}", args).fetchone()[0]
            rows = db.execute(f"SELECT * FROM jobs {clause} ORDER BY seq DESC LIMIT ? OFFSET ?",
                              [*args, limit, offset]).fetchall()
        return [_job(r) for r in rows], total

    def running(self) -> list[Job]:
        with self._connect() as db:
            rows = db.execute("SELECT * FROM jobs WHERE state = 'running' ORDER BY seq").fetchall()
        return [_job(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._connect() as db:
            rows = db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        return {state: 0 for state in STATES} | {state: n for state, n in rows}

    def preview(self, job_id: str) -> bytes | None:
        with self._connect() as db:
            row = db.execute("SELECT preview FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row is not None else None

    # --- cancelling ----------------------------------------------------------------------------

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one is flagged and stops before its next step."""
        with self._write(immediate=True) as db:
            db.execute("UPDATE jobs SET state = 'cancelled', finished = ?, cancel = 1 "
                       "WHERE id = ? AND state = 'queued'", (time.time(), job_id))
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ? AND state = 'running'", (job_id,))
        return self.get(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return self.requests(job_id)[0]

    def skip(self, job_id: str) -> None:
        """A1111's skip: the running job drops the batch it is on and goes on with the next."""
        with self._write() as db:
            db.execute("UPDATE jobs SET skip = 1 WHERE id = ? AND state = 'running'", (job_id,))

    def requests(self, job_id: str) -> tuple[bool, bool]:
        """(cancel, skip) asked for a running job: one read per step."""
        with self._connect() as db:
            row = db.execute("SELECT cancel, skip FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return (bool(row[0]), bool(row[1])) if row is not None else (False, False)

    def skipped(self, job_id: str) -> None:
        """The worker dropped its batch: the next skip request is for the next batch."""
        with self._write() as db:
            db.execute("UPDATE jobs SET skip = 0 WHERE id = ?", (job_id,))

    # --- the worker's side ---------------------------------------------------------------------

    def claim(self, worker: str) -> Job | None:
        """The oldest queued job, now running on `worker`; None when the queue is empty."""
        with self._connect(immediate=True) as db:
            row = db.execute("SELECT id FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = 'running', worker = ?, started = ?, attempts = attempts + 1, "
                       "step = 0 WHERE id = ?", (worker, time.time(), row[0]))
        self.changes.bump()
        return self.get(row[0])

    def progress(self, job_id: str, step: int, total: int, preview: bytes | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET step = ?, total = ?, preview = COALESCE(?, preview) WHERE id = ?",
                       (step, total, preview, job_id))

    def add_output(self, job_id: str, name: str, seed: int, model_hash: str, *, networks: str = "",
                   warning: str = "") -> None:
        """Record one finished image, its LoRA report and domain warning: called once its file is complete."""
        with self._write(immediate=True) as db:
            row = db.execute("SELECT outputs FROM jobs WHERE id = ?", (job_id,)).fetchone()
            output = {"name": name, "seed": seed, "networks": networks, "warning": warning}
            outputs = [*json.loads(row[0]), output]
            db.execute("UPDATE jobs SET outputs = ?, model_hash = ? WHERE id = ?",
                       (json.dumps(outputs), model_hash, job_id))

    def finish(self, job_id: str, state: str, error: str | None = None) -> None:
        with self._write() as db:
            db.execute("UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ?",
                       (state, error, time.time(), job_id))

    def recover(self) -> list[str]:
        """After a crash: jobs left running are queued again, or failed once they used their attempts."""
        with self._connect(immediate=True) as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state = 'running'").fetchall()
            for job_id, attempts in rows:
                if attempts >= MAX_ATTEMPTS:
                    db.execute("UPDATE jobs SET state = 'failed', finished = ?, error = ? WHERE id = ?",
                               (time.time(), f"the server stopped while this job ran ({attempts} times)",
                                job_id))
                else:
                    db.execute("UPDATE jobs SET state = 'queued', worker = NULL, step = 0, outputs = '[]' "
                               "WHERE id = ?", (job_id,))
        return [job_id for job_id, _ in rows]

    # --- options (the A1111 default model) -------------------------------------------------------

    def option(self, key: str) -> str | None:
        with self._connect() as db:
            row = db.execute("SELECT value FROM options WHERE key = ?", (key,)).fetchone()
        return row[0] if row is not None else None

    def set_option(self, key: str, value: str) -> None:
        with self._connect() as db:
            db.execute("INSERT OR REPLACE INTO options (key, value) VALUES (?, ?)", (key, value))
