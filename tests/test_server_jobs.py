"""The job store: its change counter (in-process event streams and the worker thread wait on it instead
of polling SQLite), and its connections."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time

from openldm.server.jobs import JobStore


def test_every_write_bumps_the_counter_and_reads_do_not(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    versions = [store.changes.version]
    job, _ = store.submit("v1", "txt2img", {"prompt": "x"})
    versions.append(store.changes.version)
    store.get(job.id), store.position(job), store.counts(), store.preview(job.id)
    versions.append(store.changes.version)
    assert store.claim("w") is not None and store.claim("w") is None  # an empty claim writes nothing
    versions.append(store.changes.version)
    store.progress(job.id, 1, 2)
    store.add_output(job.id, "a.png", 1, "h")
    store.finish(job.id, "done")
    versions.append(store.changes.version)
    assert versions == [0, 1, 1, 2, 5], versions


def test_a_waiter_wakes_at_the_write_not_at_its_timeout(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit("v1", "txt2img", {"prompt": "x"})
    seen = store.changes.version
    writer = threading.Timer(0.05, store.progress, (job.id, 1, 2))

    async def wait() -> tuple[int, float]:
        start = time.perf_counter()
        writer.start()
        version = await store.changes.wait(seen, timeout=30)
        return version, time.perf_counter() - start

    version, waited = asyncio.run(wait())
    assert version == seen + 1 and waited < 10, f"woken after {waited:.2f} s"
    timed_out = asyncio.run(store.changes.wait(version, timeout=0.05))
    assert timed_out == version  # nothing changed: back after the timeout with the same version


def test_a_worker_thread_wakes_at_the_submit_not_at_its_timeout(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    seen = store.changes.version
    woken: list[tuple[int, float]] = []

    def wait() -> None:
        start = time.perf_counter()
        woken.append((store.changes.wait_blocking(seen, timeout=30), time.perf_counter() - start))

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(0.05)
    store.submit("v1", "txt2img", {"prompt": "x"})
    waiter.join(timeout=10)
    assert woken and woken[0][0] == seen + 1 and woken[0][1] < 10, woken
    start = time.perf_counter()
    assert store.changes.wait_blocking(seen + 1, timeout=0.05) == seen + 1  # nothing new: the timeout
    assert time.perf_counter() - start >= 0.04


def test_each_thread_keeps_one_connection_and_sees_the_others_commits(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit("v1", "txt2img", {"prompt": "x"})
    mine = store._connection()
    assert store._connection() is mine  # reused: opening one per call cost milliseconds
    theirs: list[object] = []

    def other_thread() -> None:
        theirs.append(store._connection())
        store.progress(job.id, 3, 20)

    thread = threading.Thread(target=other_thread)
    thread.start()
    thread.join()
    assert theirs[0] is not mine and store.get(job.id).step == 3
    store.close()
    assert store.get(job.id).step == 3 and store._connection() is not mine  # reopened after close


def test_a_failed_transaction_leaves_the_threads_connection_usable(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit("v1", "txt2img", {"prompt": "x"})
    with contextlib.suppress(RuntimeError), store._write() as db:
        db.execute("UPDATE jobs SET step = 5 WHERE id = ?", (job.id,))
        raise RuntimeError("the body failed")
    assert not store._connection().in_transaction and store.get(job.id).step == 0  # rolled back
    other = sqlite3.connect(tmp_path / "jobs.sqlite", timeout=0.1, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the lock: this thread's write times out
    store._connection().execute("PRAGMA busy_timeout = 50")
    with contextlib.suppress(sqlite3.OperationalError):
        store.progress(job.id, 1, 2)
    other.execute("ROLLBACK")
    store.progress(job.id, 2, 2)  # no transaction was left open on the connection
    assert store.get(job.id).step == 2


def test_a_store_from_before_the_extras_and_skip_columns_gets_them(tmp_path):
    path = tmp_path / "jobs.sqlite"
    db = sqlite3.connect(path)
    columns = ("seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, source TEXT NOT NULL, "
               "mode TEXT NOT NULL, hires INTEGER NOT NULL DEFAULT 0, model TEXT, params TEXT NOT NULL, "
               "inputs TEXT NOT NULL DEFAULT '{}', state TEXT NOT NULL DEFAULT 'queued', "
               "step INTEGER NOT NULL DEFAULT 0, total INTEGER NOT NULL DEFAULT 0, created REAL NOT NULL, "
               "started REAL, finished REAL, outputs TEXT NOT NULL DEFAULT '[]', error TEXT, "
               "cancel INTEGER NOT NULL DEFAULT 0, worker TEXT, attempts INTEGER NOT NULL DEFAULT 0, "
               "preview BLOB, model_hash TEXT")  # the first schema
    db.execute(f"CREATE TABLE jobs ({columns})")
    db.execute("INSERT INTO jobs (id, source, mode, params, created) VALUES ('old', 'v1', 'txt2img', "
               "'{\"prompt\": \"x\"}', 1.0)")
    db.commit()
    db.close()
    store = JobStore(path)
    job = store.claim("w")
    assert (job.id, job.extras, job.skip) == ("old", {}, False)
