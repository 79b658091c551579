"""The store's engine and schema: opening SQLite (default, WAL) or PostgreSQL, the one ``metadata``
every table of the store is defined on, the ``counters`` table with the schema version, and the
base of the Store class (open, create and check the schema).

Every concern of the store (ingest.py, alerts.py, deployments.py) defines its tables on
``metadata`` here; Store.open creates them all.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any, Self

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, create_engine, event, inspect, select, text
from sqlalchemy.engine import Dialect, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError

from edgesmith.runtime.keys import edgesmith_home
from edgesmith.toolchain.errors import UserError

# Bumped only for a change an older store cannot take in place: nullable columns added since a store
# was made (devices.budget_*, shadow_windows.paired_*) are added when a monitor opens it (_add_new_columns).
SCHEMA_VERSION = 1
IN_CHUNK = 500  # keys per IN (...) clause, under every driver's parameter limit

metadata = MetaData()
# SQLite only autoincrements an INTEGER PRIMARY KEY; elsewhere a 64-bit id.
RowId = BigInteger().with_variant(Integer(), "sqlite")

counters = Table(
    "counters", metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)


def now_ms() -> int:
    return int(time.time() * 1000)


def default_url() -> str:
    return f"sqlite:///{edgesmith_home() / 'fleet' / 'monitor.db'}"


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL: readers (the HTTP view, `fleet status`) never block the ingest writer, nor it them.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def open_engine(url: str, create: bool) -> Engine:
    """An engine for ``url``; with ``create`` False a missing SQLite file is a UserError, not a new empty store."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise UserError(f"--db {url!r} is not a database URL; use e.g. sqlite:///fleet/monitor.db or "
                        "postgresql+psycopg://user:password@host/db") from None
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite:
        if not parsed.database or parsed.database == ":memory:":
            raise UserError("the monitor's store must be a file (sqlite:///path/monitor.db): an in-memory database "
                            "is not shared with `edgesmith fleet status`")
        path = Path(parsed.database)
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise UserError(f"there is no monitor store at {path}; start `edgesmith fleet monitor --db {url}` first, "
                            "or pass the --db the monitor uses")
    try:
        engine = create_engine(url)
    except (NoSuchModuleError, ModuleNotFoundError) as e:
        raise UserError(f"the database driver for {parsed.drivername} is not installed ({e}); install it, e.g. "
                        "`pip install edgesmith[postgres]` (psycopg) for postgresql+psycopg://") from None
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def dialect_insert(dialect: Dialect, table: Table) -> Any:
    """The dialect's INSERT for ``table``, which has ON CONFLICT (the SQLite and PostgreSQL dialects
    spell it the same way in SQLAlchemy)."""
    if dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        raise UserError(f"the monitor's store supports SQLite and PostgreSQL, not {dialect.name}")
    return insert(table)


def insert_ignore(dialect: Dialect, table: Table) -> Any:
    """INSERT that does nothing when the key exists (another monitor was first)."""
    return dialect_insert(dialect, table).on_conflict_do_nothing()


class StoreBase:
    """An engine and the store's schema; each concern adds its methods (ingest.py, alerts.py)."""

    COUNTERS: tuple[str, ...] = ("schema_version",)  # the rows of `counters` init_schema creates

    def __init__(self, engine: Engine):
        self.engine = engine

    @classmethod
    def open(cls, url: str, create: bool = True) -> Self:
        store = cls(open_engine(url, create))
        try:
            if create:
                store.init_schema()
            store.check_schema()
        except DBAPIError as e:
            raise UserError(f"cannot use the monitor store {store.engine.url.render_as_string()}: "
                            f"{str(e.orig).strip().splitlines()[0]}") from None
        return store

    def init_schema(self) -> None:
        # Monitors started together on a new store race between create_all's existence check and
        # its CREATE TABLE, table by table; the loser's next pass finds more of them there. With
        # ~20 tables a loser can lose again on a later one, so it retries, briefly and jittered.
        for attempt in range(20):
            try:
                metadata.create_all(self.engine)
                break
            except DBAPIError:
                if attempt == 19:
                    raise
                time.sleep(random.uniform(0.02, 0.1))
        self._add_new_columns()
        with self.engine.begin() as conn:
            for name in self.COUNTERS:  # another monitor may be creating them at the same time
                conn.execute(self._insert_ignore(counters).values(
                    name=name, value=SCHEMA_VERSION if name == "schema_version" else 0))

    def _add_new_columns(self) -> None:
        """Columns added to a table since a store was created (nullable, so rows it holds need no
        value): ALTER TABLE ... ADD COLUMN, the same on SQLite and PostgreSQL. Another monitor
        opening the store at the same time may add one first; its column is the same."""
        for table in metadata.sorted_tables:
            have = {c["name"] for c in inspect(self.engine).get_columns(table.name)}
            for column in table.columns:
                if column.name in have:
                    continue
                kind = column.type.compile(dialect=self.engine.dialect)
                try:
                    with self.engine.begin() as conn:
                        conn.execute(text(f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'))
                except DBAPIError:
                    if column.name not in {c["name"] for c in inspect(self.engine).get_columns(table.name)}:
                        raise

    def check_schema(self) -> None:
        with self.engine.connect() as conn:
            if not self.engine.dialect.has_table(conn, "counters"):
                raise UserError(f"{self.engine.url.render_as_string()} holds no monitor store; start "
                                "`edgesmith fleet monitor` with it first")
            version = conn.scalar(select(counters.c.value).where(counters.c.name == "schema_version"))
        if version != SCHEMA_VERSION:
            raise UserError(f"the monitor store {self.engine.url.render_as_string()} has schema version {version}, "
                            f"this edgesmith uses {SCHEMA_VERSION}; use a new --db")

    def _insert_ignore(self, table: Table) -> Any:
        return insert_ignore(self.engine.dialect, table)

    def counters(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {row.name: int(row.value) for row in conn.execute(select(counters))}
