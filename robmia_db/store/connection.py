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

from robmia_db.errors import StoreError, StoreLockedError, UnfinishedStoreError
from robmia_db.store import schema

DEFAULT_TIMEOUT_S = 15.0
# New stores are written in the oldest on-disk format that holds everything we use (lists, JSON, HUGEINT,
# TIMESTAMPTZ all exist in it), so DuckDB 1.x clients open them; DuckDB 2.x's default format they refuse.
STORAGE_VERSION = "v1.0.0"
_configured_timeout_s: float | None = None  # set once per process by the CLI's --timeout
_LOCK_HOLDER = re.compile(r"Conflicting lock is held in (?P<program>.*?) \(PID (?P<pid>\d+)\)")


def set_default_timeout(seconds: float | None) -> None:
    """The CLI's `--timeout`: how long every store open waits for a busy store (None = the defaults)."""
    global _configured_timeout_s
    _configured_timeout_s = seconds


def _timeout(given: float | None, default: float) -> float:
    if given is not None:
        return given
    return _configured_timeout_s if _configured_timeout_s is not None else default


def resolved(db_path: str | Path) -> Path:
    """The store's real path: a symlink and its target are one store (one run lock, one checkpoint folder)."""
    return Path(db_path).expanduser().resolve()


def checkpoint_dir(db_path: str | Path) -> Path:
    """Checkpoints live beside the store: `robmia.duckdb` -> `robmia.checkpoints/`."""
    path = resolved(db_path)
    return path.with_name(path.stem + ".checkpoints")


def _holder_from_error(message: str) -> str | None:
    match = _LOCK_HOLDER.search(message)
    if not match or int(match.group("pid")) == os.getpid():
        return None
    program = Path(match.group("program")).name
    return f"process {match.group('pid')} ({program})"


def _holders(path: Path, message: str) -> str:
    """Who holds the store, naming only other processes (never the process that is waiting)."""
    holders = [h for h in (_holder_from_error(message),) if h]
    if _run_lock_is_held(path) and _run_lock_pid(path) not in (None, os.getpid()):
        holders.append(_run_lock_holder(path))
    return ", ".join(holders) or "another process"


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Could not set lock" in text or "Conflicting lock" in text)


def _settings(con: duckdb.DuckDBPyConnection, threads: int | None, memory_limit: str | None) -> None:
    con.execute(f"SET threads = {int(threads or min(2, os.cpu_count() or 1))}")
    # DuckDB draws its own bar on long queries, into our one-line messages and progress display
    con.execute("SET enable_progress_bar = false")
    if memory_limit:
        con.execute(f"SET memory_limit = '{memory_limit}'")


def _run_lock_pid(db_path: Path) -> int | None:
    try:
        return int(json.loads(db_path.with_name(db_path.name + ".lock").read_text()).get("pid"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


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


def _user_tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' AND table_type = 'BASE TABLE'"
    ).fetchall()
    return {row[0] for row in rows}


def _missing_views(con: duckdb.DuckDBPyConnection) -> list[str]:
    rows = con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' AND table_type = 'VIEW'"
    ).fetchall()
    present = {row[0] for row in rows}
    return [view for view in schema.PUBLIC_VIEWS if view not in present]


def _check_kind(con: duckdb.DuckDBPyConnection, path: Path, version: int, read_only: bool) -> None:
    """Refuse a foreign DuckDB file; finish (write) or explain (read) a store left half-created."""
    if version > schema.SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}, newer than this robmia-db ({schema.SCHEMA_VERSION})"
        )
    if version == 0:
        tables = _user_tables(con)
        if tables - {"schema_version"}:
            raise StoreError(
                f"{path} is not a robmia-db store (a DuckDB file with other tables and no schema version); "
                "refusing to touch it: choose another --db"
            )
        if read_only:
            raise UnfinishedStoreError(
                f"{path} is not a robmia-db store yet (an empty DuckDB file, as an interrupted store creation "
                "leaves); any write command finishes it (`robmia-db run SPEC` or `robmia-db import FILE`)"
            )
    elif read_only and version == schema.SCHEMA_VERSION:
        missing = _missing_views(con)
        if missing:
            raise StoreError(
                f"{path} lacks the view {missing[0]} (dropped?); a write command recreates the views "
                "(`robmia-db run SPEC` or `robmia-db score`)"
            )


def connect(
    db_path: str | Path,
    *,
    read_only: bool,
    timeout_s: float | None = None,
    threads: int | None = None,
    memory_limit: str | None = None,
    create: bool = False,
    wait_forever: bool = False,
    on_wait=None,
) -> duckdb.DuckDBPyConnection:
    """Open the store, retrying while another process holds it; migrate the schema on write opens.

    `wait_forever` (with `on_wait(message)` called once per timeout period) is for writes that must not
    be lost, such as a finished model: a reader that holds the file delays it, never discards it.
    """
    path = Path(db_path)  # as the user gave it, for messages; DuckDB opens the resolved file
    real = resolved(db_path)
    timeout_s = _timeout(timeout_s, DEFAULT_TIMEOUT_S)
    if not path.exists() and not create:
        raise StoreError(f"no store at {path} (create one with `robmia-db run SPEC` or `robmia-db import`)")
    if path.exists() and not path.is_file():
        raise StoreError(
            f"{path} is not a store file ({'a folder' if path.is_dir() else 'not a regular file'})"
        )
    if create:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the folder of {path}: {exc.strerror or exc}") from None
        if not path.exists():
            _create(real)
    deadline = time.monotonic() + timeout_s
    delay = 0.02
    while True:
        try:
            con = duckdb.connect(str(real), read_only=read_only)
            break
        except duckdb.IOException as exc:
            if not _is_lock_error(exc):
                raise StoreError(f"cannot open {path}: {str(exc).splitlines()[0]}") from exc
            if time.monotonic() >= deadline:
                holder = _holders(real, str(exc))
                if not wait_forever:
                    raise StoreLockedError(
                        f"{path} is locked by {holder}; waited {timeout_s:g} s (retry, or raise --timeout)"
                    ) from exc
                (on_wait or _print_wait)(f"waiting for {holder} to release {path}; nothing is lost meanwhile")
                deadline = time.monotonic() + max(timeout_s, 1.0)
            time.sleep(delay)
            delay = min(delay * 1.5, 0.25)
        except duckdb.Error as exc:
            raise StoreError(f"cannot open {path}: {str(exc).splitlines()[0]}") from exc
    try:
        _settings(con, threads, memory_limit)
        version = schema.current_version(con)
        _check_kind(con, path, version, read_only)
        if not read_only:
            schema.migrate(con)
        elif version < schema.SCHEMA_VERSION:
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


def _print_wait(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@contextlib.contextmanager
def reading(
    db_path: str | Path, timeout_s: float | None = None, **kwargs
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short read-only session; closes (and so releases the file) on exit."""
    con = connect(db_path, read_only=True, timeout_s=timeout_s, **kwargs)
    try:
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def writing(
    db_path: str | Path, timeout_s: float | None = None, **kwargs
) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short write session: open, yield, close. Callers wrap their changes in one transaction."""
    con = connect(db_path, read_only=False, timeout_s=_timeout(timeout_s, 60.0), create=True, **kwargs)
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
        rollback(con)
        raise
    try:
        con.execute("COMMIT")
    except duckdb.Error as exc:  # disk full, I/O error: the transaction is gone, nothing of it stored
        rollback(con)
        raise StoreError(
            f"could not write the store, nothing of this write was kept: {_first_line(exc)}"
        ) from exc


def rollback(con: duckdb.DuckDBPyConnection) -> None:
    """Roll back if a transaction is still open (a failed COMMIT has already ended it)."""
    with contextlib.suppress(duckdb.Error):
        con.execute("ROLLBACK")


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0]


def _run_lock_is_held(db_path: Path) -> bool:
    lock_path = db_path.with_name(db_path.name + ".lock")
    if not lock_path.is_file():
        return False
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
    """Hold `<db>.lock` for a whole run; the OS releases it if the process dies (kill -9 included).

    The lock sits beside the resolved store, so `--db link.duckdb` and `--db target.duckdb` share it.
    """
    path = resolved(db_path)
    lock_path = path.with_name(path.name + ".lock")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if lock_path.exists() and not lock_path.is_file():
            raise StoreError(f"cannot lock {path}: {lock_path} is not a file (remove it)")
        handle = open(lock_path, "a+")
    except OSError as exc:
        raise StoreError(f"cannot lock {path}: {lock_path}: {exc.strerror or exc}") from None
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
