"""Store layer: opening the DuckDB file safely across processes.

DuckDB allows one writing process per file, and a writer blocks read-only opens elsewhere. So writers
(the runner, `score`, `import`) hold the file only for short transactions, and every open retries for a
while before giving up with an error that names the holder. A whole `run` additionally holds an advisory
run lock (`<db>.lock`, fcntl) so that two runs never train into the same store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from robmia_db.errors import StoreError, StoreLockedError
from robmia_db.store import schema

DEFAULT_TIMEOUT_S = 15.0
# New stores are written in the oldest on-disk format that holds everything we use (lists, JSON, HUGEINT,
# TIMESTAMPTZ all exist in it), so DuckDB 1.x clients open them; DuckDB 2.x's default format they refuse.
STORAGE_VERSION = "v1.0.0"
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.*?) \(PID (?P<pid>\d+)\)")


def checkpoint_dir(db_path: str | Path) -> Path:
    """Checkpoints live beside the store: `robmia.duckdb` -> `robmia.checkpoints/`."""
    path = Path(db_path)
    return path.with_name(path.stem + ".checkpoints")


def _holder_from_error(message: str) -> str:
    match = _LOCK_HOLDER.search(message)
    if not match:
        return "another process"
    program = Path(match.group("program")).name
    return f"process {match.group('pid')} ({program})"


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Could not set lock" in text or "Conflicting lock" in text)


def _settings(con: duckdb.DuckDBPyConnection, threads: int | None, memory_limit: str | None) -> None:
    con.execute(f"SET threads = {int(threads or min(2, os.cpu_count() or 1))}")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")


def _run_lock_holder(db_path: Path) -> str:
    info_path = db_path.with_name(db_path.name + ".lock")
    try:
        info = json.loads(info_path.read_text())
        return (
            f"a run by process {info.get('pid')} on {info.get('host')} since {info.get('started_at')}"
            f" ({info.get('command')})"
        )
    except (OSError, ValueError):
        return "another run"


def _create(path: Path) -> None:
    """Create an empty store file in the compatible format (kept by every later write to it).

    A short connection of its own: DuckDB refuses a second connection in one process whose configuration
    differs, so the store's usual connections carry no storage option.
    """
    try:
        duckdb.connect(str(path), config={"storage_compatibility_version": STORAGE_VERSION}).close()
    except duckdb.IOException as exc:
        if not _is_lock_error(exc):  # another process created it first: open it as usual
            raise StoreError(f"cannot create {path}: {str(exc).splitlines()[0]}") from exc


def connect(
    db_path: str | Path,
    *,
    read_only: bool,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    threads: int | None = None,
    memory_limit: str | None = None,
    create: bool = False,
) -> duckdb.DuckDBPyConnection:
    """Open the store, retrying while another process holds it; migrate the schema on write opens."""
    path = Path(db_path)
    if not path.exists() and not create:
        raise StoreError(f"no store at {path} (create one with `robmia-db run SPEC` or `robmia-db import`)")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            _create(path)
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(path), read_only=read_only)
            break
        except duckdb.IOException as exc:
            if not _is_lock_error(exc):
                raise StoreError(f"cannot open {path}: {str(exc).splitlines()[0]}") from exc
            if time.monotonic() >= deadline:
                holder = _holder_from_error(str(exc))
                if path.with_name(path.name + ".lock").exists() and _run_lock_is_held(path):
                    holder += f", {_run_lock_holder(path)}"
                raise StoreLockedError(
                    f"{path} is locked by {holder}; waited {timeout_s:g} s (retry, or raise --timeout)"
                ) from exc
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open {path}: {str(exc).splitlines()[0]}") from exc
    try:
        _settings(con, threads, memory_limit)
        version = schema.current_version(con)
        if version > schema.SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}, newer than this robmia-db ({schema.SCHEMA_VERSION})"
            )
        if not read_only:
            schema.migrate(con)
        elif version < schema.SCHEMA_VERSION:
            if version == 0:
                raise StoreError(f"{path} is not a robmia-db store (no schema_version table)")
            con.close()
            # an older store is migrated in a short write session, then reopened read-only
            connect(
                path, read_only=False, timeout_s=timeout_s, threads=threads, memory_limit=memory_limit
            ).close()
            return connect(
                path, read_only=True, timeout_s=timeout_s, threads=threads, memory_limit=memory_limit
            )
    except BaseException:
        con.close()
        raise
    return con


@contextlib.contextmanager
def reading(
    db_path: str | Path, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short read-only session; closes (and so releases the file) on exit."""
    con = connect(db_path, read_only=True, timeout_s=timeout_s, **kwargs)
    try:
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def writing(db_path: str | Path, timeout_s: float = 60.0, **kwargs) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short write session: open, yield, close. Callers wrap their changes in one transaction."""
    con = connect(db_path, read_only=False, timeout_s=timeout_s, create=True, **kwargs)
    try:
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


def _run_lock_is_held(db_path: Path) -> bool:
    lock_path = db_path.with_name(db_path.name + ".lock")
    try:
        with open(lock_path, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False
    except OSError:
        return False


@contextlib.contextmanager
def run_lock(db_path: str | Path, command: str | None = None) -> Iterator[None]:
    """Hold `<db>.lock` for a whole run; the OS releases it if the process dies (kill -9 included)."""
    path = Path(db_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreLockedError(
                f"{path} is being written by {_run_lock_holder(path)}; wait for it to finish or stop it"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(
            json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "command": command or " ".join(["robmia-db", *sys.argv[1:]]),
                }
            )
        )
        handle.flush()
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
