"""The store's database plumbing: URLs, engines with their connection settings, and the schema's revisions.

SQLite (the default, ``settings.database_url()``) and PostgreSQL are supported. A SQLite store is opened
read-only when its URL asks (``?mode=ro`` or ``?immutable=1``) or when its file or folder cannot be written
(a read-only mount, a container's non-root user): then it is only read, never migrated or switched to WAL.
The schema is created and changed only by the Alembic revisions in ``migrations/versions``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import re
import sqlite3
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, Connection, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError

from bcd_engine.errors import StoreError
from bcd_engine.files import atomic_path

SQLITE_BUSY_TIMEOUT_MS = 30_000
POSTGRES_CONNECT_TIMEOUT_S = 10
_PG_MIGRATION_LOCK_KEY = 0x62636431  # "bcd1": pg_advisory_xact_lock key held while migrating
ALEMBIC_INI = Path(__file__).with_name("alembic.ini")
# PostgreSQL error codes of a lost or refused connection besides class 08: the server was shut down
# (admin_shutdown, crash_shutdown) or is starting or stopping (cannot_connect_now).
_SERVER_GOING_AWAY = {"57P01", "57P02", "57P03"}


def normalize_url(url: str | URL) -> URL:
    """Parse ``url``; bare ``postgresql://`` / ``postgres://`` URLs get the psycopg 3 driver."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def mask_url(url: str | URL) -> str:
    """``url`` as text with its password replaced by ``***`` (also for URLs that do not parse)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", str(url))


def _sqlite_file(url: URL) -> tuple[Path | None, bool]:
    """(the database file, or None for an in-memory one; True when the URL asks for read-only) of a SQLite URL.

    Plain paths and SQLite URI filenames (``file:PATH?...&uri=true``) are both understood, and
    ``mode=ro`` / ``immutable=1`` count with or without ``uri=true``.
    """
    database = url.database or ""
    query = {key: str(value).lower() for key, value in url.query.items()}
    if database.startswith("file:"):
        database = urllib.parse.unquote(urllib.parse.urlsplit(database).path)
    if database in ("", ":memory:") or query.get("mode") == "memory":
        return None, False
    return Path(database), query.get("mode") == "ro" or query.get("immutable") in ("1", "true")


def _can_write(path: Path) -> bool:
    """Whether this process can change the database file and make its journal files beside it."""
    return os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)


def _read_only_url(path: Path) -> URL:
    """A read-only URL for the SQLite file at ``path``.

    ``immutable=1`` (SQLite takes no locks and reads no journal) when no one can be writing it: the
    file system is mounted read-only, or the folder cannot be written here and no writer holds the
    WAL's shared-memory file open; otherwise plain ``mode=ro``, which sees other processes' writes.
    """
    folder = path.parent
    immutable = bool(os.statvfs(folder).f_flag & os.ST_RDONLY) if hasattr(os, "statvfs") else False
    if not immutable and not os.access(folder, os.W_OK):
        immutable = not Path(f"{path}-shm").exists()
    query = {"mode": "ro", "uri": "true", **({"immutable": "1"} if immutable else {})}
    return URL.create("sqlite", database="file:" + urllib.parse.quote(str(path.absolute())), query=query)


def make_engine(url: URL) -> Engine:
    """An engine with the store's connection settings.

    SQLite: a busy timeout, foreign keys on, and BEGIN emitted by SQLAlchemy (``BEGIN IMMEDIATE``
    for writes, so writers queue on the lock instead of failing); the WAL journal is set once, by
    :func:`upgrade_schema` (it is kept in the file, and setting it writes).
    PostgreSQL: a connect timeout and pre-ping (dashboards hold engines for hours).
    JSON values are written with NaN/inf as null and numpy values as plain numbers.
    """
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, json_serializer=_dumps)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    connect_args: dict[str, Any] = {}
    if url.get_backend_name() == "postgresql" and "connect_timeout" not in url.query:
        connect_args["connect_timeout"] = POSTGRES_CONNECT_TIMEOUT_S
    return create_engine(url, json_serializer=_dumps, pool_pre_ping=True, connect_args=connect_args)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself (_sqlite_on_begin)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # A deferred transaction that reads and then writes fails at once with "database is locked"
    # when another process wrote in between; taking the write lock up front waits instead.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("bcd_write") else "BEGIN")


def _sqlite_pragma(conn: Connection, pragma: str) -> None:
    """Run ``PRAGMA <pragma>`` on the connection's SQLite handle directly, outside any transaction
    (inside one, SQLite ignores ``foreign_keys`` and refuses ``journal_mode = WAL``)."""
    cursor = conn.connection.cursor()
    try:
        cursor.execute(f"PRAGMA {pragma}")
    finally:
        cursor.close()


@contextmanager
def migration_transaction(conn: Connection) -> Iterator[None]:
    """One transaction on ``conn`` (not yet in one) to change the schema in.

    On SQLite foreign keys are off meanwhile and checked before the commit: a batch migration rebuilds
    a table by copying it and dropping the original, and with them on the drop would cascade-delete
    every row that refers to the table.
    """
    sqlite = conn.dialect.name == "sqlite"
    if sqlite:
        _sqlite_pragma(conn, "foreign_keys = OFF")
    try:
        with conn.begin():
            yield
            if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                raise StoreError("the migration would leave rows that refer to missing ones; nothing was changed")
    finally:
        if sqlite:
            _sqlite_pragma(conn, "foreign_keys = ON")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _dumps(value: Any) -> str:
    return json.dumps(_jsonable(value), default=str)


def one_line(exc: BaseException) -> str:
    """A database error as one line of at most 300 characters, without SQLAlchemy's background link."""
    cause = getattr(exc, "orig", None) or exc
    message = re.sub(r"\(Background on this error at: \S+\)", "", str(cause))
    message = " ".join(message.split()) or type(cause).__name__
    return message if len(message) <= 300 else message[:297] + "..."


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a lost or refused connection to a database server, which trying again may cure
    (a PostgreSQL restart: connection refused or reset, the server closed the connection, it is starting up).

    Never on SQLite: its "database is locked" has already waited out the busy timeout, and its other
    errors (a full disk, a corrupt file) do not pass by themselves.
    """
    if not isinstance(exc, DBAPIError) or isinstance(exc.orig, sqlite3.Error):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    # psycopg gives a connection that failed or broke no SQLSTATE; a refused query always has one.
    return isinstance(exc, OperationalError) and (
        sqlstate is None or sqlstate.startswith("08") or sqlstate in _SERVER_GOING_AWAY
    )


@functools.cache
def schema_script() -> ScriptDirectory:
    """The Alembic revisions of the store's schema."""
    return ScriptDirectory.from_config(Config(str(ALEMBIC_INI)))


@dataclass(frozen=True)
class StoreEngines:
    """The engines of one store: ``reader`` for reads, ``writer`` for writes (SQLite: ``BEGIN IMMEDIATE``).

    ``file`` is a SQLite store's database file (None otherwise); ``read_only`` whether it may only be read.
    """

    reader: Engine
    writer: Engine
    file: Path | None
    read_only: bool


def connect(raw_url: str, masked: str, *, create: bool) -> StoreEngines:
    """The engines for ``raw_url`` (``masked`` names it in errors); a SQLite file must exist unless ``create``.

    With ``create`` a writable SQLite store's own folder is made (not the ones above it). Nothing is read yet.
    """
    try:
        url = normalize_url(raw_url)
        path, asked_read_only = (None, False)
        if url.get_backend_name() == "sqlite":
            path, asked_read_only = _sqlite_file(url)
        read_only = False
        if path is not None:
            _refuse_empty_file(path)
            read_only = asked_read_only or (path.is_file() and not _can_write(path))
            if create and not read_only:
                # Only the file's own folder is created: a typo higher up should fail, not build a tree.
                path.parent.mkdir(exist_ok=True)
                if not path.is_file() and not os.access(path.parent, os.W_OK):
                    raise StoreError(f"there is no run store at {masked}, and its folder is read-only")
                if not path.is_file():
                    _create_sqlite_file(path)
            elif not path.is_file():
                made = "" if read_only else "; RunStore.open(url) (or any `python -m bcd_engine` command) creates it"
                raise StoreError(f"there is no run store at {masked} (no such file){made}")
            if read_only:
                url = _read_only_url(path)
        engine = make_engine(url)
    except (ImportError, OSError, SQLAlchemyError) as exc:
        raise StoreError(f"cannot open the run store at {masked}: {one_line(exc)}") from None
    return StoreEngines(engine, engine.execution_options(bcd_write=True), path, read_only)


def _refuse_empty_file(path: Path) -> None:
    """Raise :class:`StoreError` for a file of 0 bytes: bcd never makes one (:func:`_create_sqlite_file`), and
    SQLite would silently turn it into a new store."""
    if path.is_file() and path.stat().st_size == 0:
        raise StoreError(
            f"{path} is empty (0 bytes): it is not a bcd run store; delete it to start a new store "
            "there, or point BCD_DATABASE_URL at another file"
        )


def _create_sqlite_file(path: Path) -> None:
    """Create an empty SQLite database in WAL mode at ``path``, whole: it is made beside ``path`` and moved into
    place, so no process ever finds it at 0 bytes. One another process created meanwhile is kept."""
    with contextlib.suppress(FileExistsError), atomic_path(path, suffix=".new", replace=False) as tmp:
        database = sqlite3.connect(tmp)
        try:
            database.execute("PRAGMA journal_mode = WAL")  # writes the file's header
        finally:
            database.close()


def _refuse_foreign_database(engine: Engine, path: Path) -> None:
    """Raise :class:`StoreError` when the SQLite file at ``path`` (without bcd's schema) holds tables: it is another
    program's database, and nothing in it may be changed (a read only)."""
    with engine.connect() as conn:
        tables = sorted(set(inspect(conn).get_table_names()) - {"alembic_version"})
    if tables:
        raise StoreError(
            f"{path} is a SQLite database with other tables ({', '.join(tables[:5])}) and no bcd "
            "schema: it is not a bcd run store, and it was left unchanged; point BCD_DATABASE_URL "
            "at another file"
        )


def require_newest_schema(engines: StoreEngines, masked: str) -> None:
    """Raise :class:`StoreError` unless the schema is this bcd's newest (a read only)."""
    current, head = _revisions(engines.reader, masked)
    if current == head:
        return
    found = (
        "has no bcd schema" if current is None else f"has schema revision {current!r}, older than this bcd's {head!r}"
    )
    if engines.read_only:
        remedy = (
            "it is read-only, so it cannot be upgraded here: open a writable copy once with any "
            "`python -m bcd_engine` command and ship that copy"
        )
    else:
        remedy = (
            "open it once with RunStore.open(url) (or run any `python -m bcd_engine` command) to create or upgrade it"
        )
    raise StoreError(f"the run store at {masked} {found}; {remedy}")


def upgrade_schema(engines: StoreEngines, masked: str) -> None:
    """Bring the schema to the newest revision (SQLite: in WAL mode); only reads when it is there.

    A SQLite file without bcd's schema that holds other tables is refused before anything in it changes.

    The upgrade runs in one transaction that first takes a lock every other opener waits for
    (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory lock), then checks the revision again.
    """
    current, head = _revisions(engines.reader, masked)
    try:
        if engines.file is not None:
            if current is None:
                _refuse_foreign_database(engines.reader, engines.file)
            with engines.reader.connect() as conn:
                _sqlite_pragma(conn, "journal_mode = WAL")
        if current == head:
            return
        with engines.writer.connect() as conn, migration_transaction(conn):
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_MIGRATION_LOCK_KEY})
            if MigrationContext.configure(conn).get_current_revision() != head:
                config = Config(str(ALEMBIC_INI))
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
    except (SQLAlchemyError, CommandError, OSError) as exc:
        raise StoreError(f"cannot open the run store at {masked}: {one_line(exc)}") from None


def _revisions(engine: Engine, masked: str) -> tuple[str | None, str]:
    """(the database's schema revision or None, this bcd's newest); a read only.

    Raises :class:`StoreError` when the database cannot be read or is newer than this bcd.
    """
    script = schema_script()
    head = script.get_current_head()
    try:
        with engine.connect() as conn:
            current = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot open the run store at {masked}: {one_line(exc)}") from None
    if current is not None and current not in {r.revision for r in script.walk_revisions()}:
        raise StoreError(
            f"the run store at {masked} has schema revision {current!r}, newer than this "
            f"version of bcd knows (newest: {head!r}); upgrade bcd"
        )
    return current, head
