"""A versioned artifact registry in the spirit of Uber's VerCD.

Every dataset, model, metrics report and serving package (and the logs and statistics around them) is an
*artifact*: ``kind:name@vN`` with a content key, a lifecycle state, the code version that built it
(git SHA + hash of uncommitted changes), its entry point and resolved config, parent artifacts, locations,
who/when, and the Airflow DAG/run when it ran under Airflow.

Lifecycle::

    registered -> building -> succeeded | failed | aborted
    succeeded -> deprecated -> end_of_life

``Registry.build`` is the one way stages publish: it reuses a succeeded artifact with the same content
key (a hash of the parents' versions, the entry point's code version and the resolved config), otherwise
writes into a staging folder, renames it into place and only then marks the record succeeded.

A build belongs to (host, pid, lease): the building process renews its lease from a daemon thread. A
killed build stays ``building`` until another process may declare it abandoned: at once when it ran on
the same host and its pid is gone, otherwise (any host) once its lease has expired. The takeover is one
conditional UPDATE, so of two reclaimers only one wins, and only the winner removes the build's files.

Write transactions are serialised: SQLite's take ``BEGIN IMMEDIATE``, PostgreSQL's a transaction-level
advisory lock, so concurrent processes queue instead of racing; a unique constraint on (kind, name,
version) backs that up on any database.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import psutil
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from pipeline import provenance
from pipeline.config import RegistryConfig, canonical_json
from pipeline.home import Home, check_name, is_url

KINDS = ("log", "dataset", "statistics", "validation", "model", "metrics", "package")
STATES = ("registered", "building", "succeeded", "failed", "aborted", "deprecated", "end_of_life")
TRANSITIONS = {
    "registered": {"building", "aborted"},
    "building": {"succeeded", "failed", "aborted"},
    "succeeded": {"deprecated"},
    "deprecated": {"end_of_life"},
    "failed": set(),
    "aborted": set(),
    "end_of_life": set(),
}
# States of an artifact withdrawn from use: never production, never a rollback target.
RETIRED = ("deprecated", "end_of_life")
# Key of the PostgreSQL advisory lock every registry write transaction takes (scoped to the database).
PG_WRITE_LOCK = 0x61767072  # "avpr"
# PostgreSQL ends a session left idle inside its transaction for a lease, but never sooner than this: a
# short lease (tests use 0.2 s) must not end a healthy session that paused between two statements on a
# loaded host. A frozen client then blocks writers a few seconds longer; no correctness rests on it.
PG_IDLE_IN_TRANSACTION_FLOOR_S = 5.0


class RegistryError(Exception):
    """Base for registry errors; the message says what is wrong and with which artifact."""


class NotFound(RegistryError):
    pass


class IllegalTransition(RegistryError):
    pass


class PromotionRefused(RegistryError):
    pass


class BuildInProgress(RegistryError):
    pass


class LeaseLost(RegistryError):
    """The build's lease expired and another process took the build over; nothing may be published."""


metadata = sa.MetaData()

artifacts_table = sa.Table(
    "artifacts", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("content_key", sa.String(64), nullable=False, index=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("git_sha", sa.String(64), nullable=False),
    sa.Column("diff_hash", sa.String(64), nullable=False),
    sa.Column("entry_point", sa.String(256), nullable=False),
    sa.Column("config", sa.Text, nullable=False),
    sa.Column("locations", sa.Text, nullable=False, default="[]"),
    sa.Column("meta", sa.Text, nullable=False, default="{}"),
    sa.Column("blessed", sa.Boolean, nullable=True),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("created_by", sa.String(128), nullable=False),
    sa.Column("created_at", sa.DateTime, nullable=False),
    sa.Column("updated_at", sa.DateTime, nullable=False),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("pid_started", sa.Float, nullable=False),
    # Until when (host, pid) owns a registered/building record; renewed while it builds. NULL in rows
    # written before leases existed: their updated_at + lease_s counts instead.
    sa.Column("lease_until", sa.DateTime, nullable=True),
    sa.Column("dag_id", sa.String(256), nullable=True),
    sa.Column("dag_run_id", sa.String(256), nullable=True),
    sa.UniqueConstraint("kind", "name", "version", name="uq_artifact_version"),
)

edges_table = sa.Table(
    "edges", metadata,
    sa.Column("child_id", sa.Integer, sa.ForeignKey("artifacts.id"), primary_key=True),
    sa.Column("parent_id", sa.Integer, sa.ForeignKey("artifacts.id"), primary_key=True),
)

events_table = sa.Table(
    "events", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("artifact_id", sa.Integer, sa.ForeignKey("artifacts.id"), nullable=False, index=True),
    sa.Column("from_state", sa.String(16), nullable=True),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("at", sa.DateTime, nullable=False),
    sa.Column("by", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
)

promotions_table = sa.Table(
    "promotions", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("namespace", sa.String(128), nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("major", sa.Integer, nullable=False),
    sa.Column("minor", sa.Integer, nullable=False),
    sa.Column("artifact_id", sa.Integer, sa.ForeignKey("artifacts.id"), nullable=False),
    # production: serving now; previous: was production, kept for rollback; rolled_back: withdrawn
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("promoted_at", sa.DateTime, nullable=False),
    sa.Column("promoted_by", sa.String(128), nullable=False),
    sa.UniqueConstraint("namespace", "name", "major", "minor", name="uq_promotion_version"),
)


# Sticky assignments (a log's split, a GeoSplit cell's split): decided once, never changed afterwards.
assignments_table = sa.Table(
    "assignments", metadata,
    sa.Column("ledger", sa.String(256), primary_key=True),
    sa.Column("key", sa.String(256), primary_key=True),
    sa.Column("value", sa.String(64), nullable=False),
    sa.Column("assigned_at", sa.DateTime, nullable=False),
)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


@dataclass
class Artifact:
    """One registry record, as plain data."""

    id: int
    kind: str
    name: str
    version: int
    content_key: str
    state: str
    git_sha: str
    diff_hash: str
    entry_point: str
    config: dict[str, Any]
    locations: list[str]
    meta: dict[str, Any]
    blessed: bool | None
    reason: str
    created_by: str
    created_at: dt.datetime
    updated_at: dt.datetime
    host: str
    pid: int
    dag_id: str | None
    dag_run_id: str | None
    lease_until: dt.datetime | None = None
    cached: bool = field(default=False, compare=False)  # True when build() reused it

    @property
    def ref(self) -> str:
        return f"{self.kind}:{self.name}@v{self.version}"

    @property
    def location(self) -> str:
        return self.locations[0] if self.locations else ""

    @classmethod
    def _from_row(cls, row: Any) -> "Artifact":
        m = row._mapping
        return cls(
            id=m["id"], kind=m["kind"], name=m["name"], version=m["version"], content_key=m["content_key"],
            state=m["state"], git_sha=m["git_sha"], diff_hash=m["diff_hash"], entry_point=m["entry_point"],
            config=json.loads(m["config"]), locations=json.loads(m["locations"]), meta=json.loads(m["meta"]),
            blessed=m["blessed"], reason=m["reason"], created_by=m["created_by"], created_at=m["created_at"],
            updated_at=m["updated_at"], host=m["host"], pid=m["pid"], dag_id=m["dag_id"],
            dag_run_id=m["dag_run_id"], lease_until=m["lease_until"],
        )


@dataclass
class Promotion:
    namespace: str
    name: str
    major: int
    minor: int
    artifact_id: int
    status: str
    promoted_at: dt.datetime
    promoted_by: str

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.name}/{self.major}.{self.minor}"


def parse_ref(ref: str) -> tuple[str | None, str, int | None]:
    """``kind:name@vN`` / ``kind:name`` / ``name@N`` -> (kind, name, version). Version None = latest."""
    kind, sep, rest = ref.partition(":")
    if not sep:
        kind, rest = None, ref
    name, sep, version = rest.partition("@")
    if kind is not None and kind not in KINDS:
        raise NotFound(f"unknown artifact kind {kind!r} in {ref!r}; kinds are {', '.join(KINDS)}")
    try:
        check_name(name, "artifact name")
        number = int(version.lstrip("v")) if sep else None
    except ValueError as exc:
        raise NotFound(f"bad artifact reference {ref!r}: expected kind:name@vN ({exc})") from None
    if number is not None and not 0 <= number < 2**31:  # the database's integer column
        raise NotFound(f"bad artifact reference {ref!r}: version {number} is out of range")
    return kind, name, number


def content_key(kind: str, name: str, parents: Sequence[Artifact], code_version: str,
                config: Any) -> str:
    """Hash of what determines an artifact: parents' versions and keys, code version, resolved config."""
    payload = {
        "kind": kind, "name": name, "code": code_version, "config": config,
        "parents": sorted((p.kind, p.name, p.version, p.content_key) for p in parents),
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def _process_started(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _engine_url(url: str) -> sa.URL:
    """``postgresql://`` means the psycopg (v3) driver the pipeline installs, not SQLAlchemy's psycopg2."""
    parsed = sa.make_url(url)
    return parsed.set(drivername="postgresql+psycopg") if parsed.drivername == "postgresql" else parsed


def _add_missing_columns(conn: sa.Connection) -> None:
    """Bring a registry created by older code up to the current tables: columns added since (always
    nullable) are added in place, so existing records stay as they are."""
    for table in metadata.sorted_tables:
        present = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                conn.execute(sa.text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} "
                                     f"{column.type.compile(conn.dialect)}"))


class Registry:
    """The registry over one database. ``home`` is where artifact folders are created."""

    def __init__(self, url: str, home: Home, lease_s: float = RegistryConfig.lease_s,
                 lease_renew_s: float = RegistryConfig.lease_renew_s):
        if not 0 < lease_renew_s < lease_s:
            raise RegistryError(f"registry.lease_renew_s ({lease_renew_s}) must be above 0 and below "
                                f"registry.lease_s ({lease_s}): a lease is renewed several times before it expires")
        self.url = _engine_url(url).render_as_string(hide_password=True)  # for messages: no password
        self.home = home
        self.lease_s = lease_s
        self.lease_renew_s = lease_renew_s
        connect_args: dict[str, Any] = {}
        if self.url.startswith("postgresql"):
            # A client frozen or cut off inside a transaction would hold the write lock for everyone: the
            # server ends such a session once it has sat idle in its transaction for a lease.
            idle_ms = int(max(lease_s, PG_IDLE_IN_TRANSACTION_FLOOR_S) * 1000)
            connect_args = {"options": f"-c idle_in_transaction_session_timeout={idle_ms}"}
        if url.startswith("sqlite"):
            connect_args = {"timeout": 120}
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.engine = sa.create_engine(_engine_url(url), connect_args=connect_args, future=True,
                                       pool_pre_ping=not url.startswith("sqlite"))
        if url.startswith("sqlite"):
            self._serialise_sqlite_writes()
        try:
            with self._tx() as conn:
                metadata.create_all(conn)
                _add_missing_columns(conn)
        except sa.exc.OperationalError as exc:  # unreachable server, read-only or missing database file
            raise RegistryError(f"cannot open the registry {self.url}: {exc.orig}") from None

    @classmethod
    def open(cls, cfg: Any) -> "Registry":
        """The registry a resolved ``PipelineConfig`` points at."""
        home = Home.from_config(cfg.home).ensure()
        return cls(home.registry_url(cfg.registry_url), home, lease_s=cfg.registry.lease_s,
                   lease_renew_s=cfg.registry.lease_renew_s)

    def _serialise_sqlite_writes(self) -> None:
        # pysqlite's default deferred transactions let two writers read the same max(version) and then
        # collide; BEGIN IMMEDIATE takes the write lock up front so they queue (busy timeout above).
        @sa.event.listens_for(self.engine, "connect")
        def _connect(dbapi_conn, _record):  # pragma: no cover - exercised via engine use
            dbapi_conn.isolation_level = None
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA foreign_keys=ON")

        @sa.event.listens_for(self.engine, "begin")
        def _begin(conn):  # pragma: no cover
            conn.exec_driver_sql("BEGIN IMMEDIATE")

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sa.Connection]:
        for attempt in range(20):
            try:
                with self.engine.begin() as conn:
                    if conn.dialect.name == "postgresql":  # SQLite's counterpart is BEGIN IMMEDIATE
                        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": PG_WRITE_LOCK})
                    yield conn
                return
            except OperationalError as exc:  # "database is locked" past the busy timeout
                if "locked" not in str(exc) or attempt == 19:
                    raise
                time.sleep(0.1 * (attempt + 1))

    # ---------------------------------------------------------------- queries
    def get(self, ref: str | int) -> Artifact:
        """An artifact by id or reference; ``kind:name`` means the latest succeeded version."""
        with self.engine.connect() as conn:
            t = artifacts_table
            if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
                if len(str(ref)) > 10 or not 0 <= int(ref) < 2**31:  # the database's integer column
                    raise NotFound(f"no artifact with id {ref}")
                row = conn.execute(sa.select(t).where(t.c.id == int(ref))).first()
                if row is None:
                    raise NotFound(f"no artifact with id {ref}")
                return Artifact._from_row(row)
            kind, name, version = parse_ref(ref)
            query = sa.select(t).where(t.c.name == name)
            if kind:
                query = query.where(t.c.kind == kind)
            if version is None:
                query = query.where(t.c.state == "succeeded")
            else:
                query = query.where(t.c.version == version)
            rows = conn.execute(query.order_by(t.c.version.desc())).all()
        if not rows:
            what = "succeeded version of" if version is None else "artifact"
            raise NotFound(f"no {what} {ref!r} in the registry ({self.url})")
        if kind is None and len({r._mapping["kind"] for r in rows}) > 1:
            raise NotFound(f"{ref!r} is ambiguous: name it with its kind, e.g. dataset:{name}")
        return Artifact._from_row(rows[0])

    def list(self, kind: str | None = None, name: str | None = None,
             state: str | None = None) -> list[Artifact]:
        t = artifacts_table
        query = sa.select(t)
        if kind:
            query = query.where(t.c.kind == kind)
        if name:
            query = query.where(t.c.name == name)
        if state:
            query = query.where(t.c.state == state)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(t.c.kind, t.c.name, t.c.version)).all()
        return [Artifact._from_row(r) for r in rows]

    def parents(self, artifact_id: int) -> list[Artifact]:
        return self._neighbours(artifact_id, upstream=True)

    def children(self, artifact_id: int) -> list[Artifact]:
        return self._neighbours(artifact_id, upstream=False)

    def _neighbours(self, artifact_id: int, upstream: bool) -> list[Artifact]:
        e, t = edges_table, artifacts_table
        mine, other = (e.c.child_id, e.c.parent_id) if upstream else (e.c.parent_id, e.c.child_id)
        query = sa.select(t).join(e, other == t.c.id).where(mine == artifact_id).order_by(t.c.id)
        with self.engine.connect() as conn:
            return [Artifact._from_row(r) for r in conn.execute(query).all()]

    def lineage(self, ref: str | int, direction: str = "up") -> list[tuple[int, Artifact]]:
        """Everything upstream (``up``) or downstream (``down``) of an artifact, breadth first, with depth."""
        if direction not in ("up", "down"):
            raise ValueError("direction must be 'up' or 'down'")
        start = self.get(ref)
        seen, out, frontier = {start.id}, [], [start]
        depth = 0
        while frontier:
            depth += 1
            nxt = []
            for art in frontier:
                for n in self._neighbours(art.id, upstream=direction == "up"):
                    if n.id not in seen:
                        seen.add(n.id)
                        out.append((depth, n))
                        nxt.append(n)
            frontier = nxt
        return out

    def events(self, artifact_id: int) -> list[dict[str, Any]]:
        ev = events_table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(ev).where(ev.c.artifact_id == artifact_id).order_by(ev.c.id)).all()
        return [dict(r._mapping) for r in rows]

    # ---------------------------------------------------------------- lifecycle
    def _set_state(self, conn: sa.Connection, art_id: int, to_state: str, reason: str = "",
                   **values: Any) -> None:
        t = artifacts_table
        row = conn.execute(sa.select(t.c.state, t.c.kind, t.c.name, t.c.version).where(t.c.id == art_id)).first()
        if row is None:
            raise NotFound(f"no artifact with id {art_id}")
        current = row.state
        if to_state not in TRANSITIONS.get(current, set()):
            allowed = ", ".join(sorted(TRANSITIONS[current])) or "none (final state)"
            raise IllegalTransition(
                f"{row.kind}:{row.name}@v{row.version} is {current}; it cannot become {to_state} "
                f"(allowed from {current}: {allowed})"
            )
        conn.execute(t.update().where(t.c.id == art_id).values(
            state=to_state, updated_at=_now(), **({"reason": reason} if reason else {}), **values))
        conn.execute(events_table.insert().values(
            artifact_id=art_id, from_state=current, to_state=to_state, at=_now(), by=provenance.user(),
            reason=reason))

    def transition(self, ref: str | int, to_state: str, reason: str = "", *, production: bool = False) -> Artifact:
        """Move an artifact along its lifecycle; an illegal move raises ``IllegalTransition``.

        Retiring (deprecating, ending the life of) an artifact that is production somewhere is refused
        unless ``production``: then each such promotion rolls back, in the same transaction, to its newest
        previous version that is still succeeded, or is left with no production version."""
        if to_state not in STATES:
            raise IllegalTransition(f"unknown state {to_state!r}; states are {', '.join(STATES)}")
        art = self.get(ref)
        serving = self.production_of(art.id) if to_state in RETIRED else []
        if serving and not production:
            labels = ", ".join(x.label for x in serving)
            raise PromotionRefused(f"{art.ref} is production as {labels}; retiring it needs the explicit "
                                   "production flag (avp registry ... --production), which rolls production back "
                                   "to the previous succeeded version")
        with self._tx() as conn:
            self._set_state(conn, art.id, to_state, reason)
            for promotion in serving:
                self._withdraw_production(conn, promotion.namespace, promotion.name, require_target=False)
        return self.get(art.id)

    def deprecate(self, ref: str | int, reason: str = "", *, production: bool = False) -> Artifact:
        return self.transition(ref, "deprecated", reason, production=production)

    def end_of_life(self, ref: str | int, reason: str = "", *, production: bool = False) -> Artifact:
        return self.transition(ref, "end_of_life", reason, production=production)

    def update_meta(self, ref: str | int, **meta: Any) -> Artifact:
        art = self.get(ref)
        with self._tx() as conn:
            t = artifacts_table
            current = json.loads(conn.execute(sa.select(t.c.meta).where(t.c.id == art.id)).scalar_one())
            current.update(meta)
            conn.execute(t.update().where(t.c.id == art.id).values(meta=canonical_json(current),
                                                                     updated_at=_now()))
        return self.get(art.id)

    def set_blessing(self, ref: str | int, blessed: bool, reasons: Iterable[str] = ()) -> Artifact:
        """Record the evaluation verdict on a model (only a blessed model may be promoted)."""
        art = self.get(ref)
        if art.state != "succeeded":
            raise IllegalTransition(f"{art.ref} is {art.state}; only a succeeded artifact can be blessed")
        with self._tx() as conn:
            t = artifacts_table
            conn.execute(t.update().where(t.c.id == art.id).values(blessed=bool(blessed), updated_at=_now()))
            conn.execute(events_table.insert().values(
                artifact_id=art.id, from_state=art.state, to_state=art.state, at=_now(), by=provenance.user(),
                reason=("blessed" if blessed else "not blessed") + (": " + "; ".join(reasons) if reasons else "")))
        return self.update_meta(art.id, blessing_reasons=list(reasons))

    # ---------------------------------------------------------------- registering and building
    def register(self, kind: str, name: str, *, content_key: str, entry_point: str,
                 config: Any = None, parents: Sequence[Artifact] = (), meta: dict | None = None) -> Artifact:
        """Create a new ``registered`` version (the next integer for kind/name)."""
        if kind not in KINDS:
            raise RegistryError(f"unknown artifact kind {kind!r}; kinds are {', '.join(KINDS)}")
        check_name(name, "artifact name")
        snap = provenance.snapshot()
        pid = os.getpid()
        for attempt in range(50):
            try:
                with self._tx() as conn:
                    t = artifacts_table
                    latest = conn.execute(sa.select(sa.func.max(t.c.version)).where(
                        t.c.kind == kind, t.c.name == name)).scalar()
                    now = _now()
                    art_id = conn.execute(t.insert().values(
                        kind=kind, name=name, version=(latest or 0) + 1, content_key=content_key,
                        state="registered", git_sha=snap["git_sha"], diff_hash=snap["diff_hash"],
                        entry_point=entry_point, config=canonical_json(config or {}),
                        meta=canonical_json(meta or {}), created_by=snap["user"],
                        created_at=now, updated_at=now, host=snap["host"], pid=pid,
                        pid_started=_process_started(pid), lease_until=self._lease_end(now),
                        dag_id=snap.get("airflow_dag_id"),
                        dag_run_id=snap.get("airflow_run_id"),
                    )).inserted_primary_key[0]
                    for p in parents:
                        conn.execute(edges_table.insert().values(child_id=art_id, parent_id=p.id))
                    conn.execute(events_table.insert().values(
                        artifact_id=art_id, from_state=None, to_state="registered", at=now, by=snap["user"],
                        reason=""))
                return self.get(art_id)
            except IntegrityError:  # another writer took this version number (non-SQLite databases)
                time.sleep(0.01 * (attempt + 1))
        raise RegistryError(f"could not allocate a version for {kind}:{name} after 50 attempts")

    def find_succeeded(self, kind: str, name: str, key: str) -> Artifact | None:
        t = artifacts_table
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t).where(
                t.c.kind == kind, t.c.name == name, t.c.content_key == key, t.c.state == "succeeded",
            ).order_by(t.c.version.desc())).first()
        return Artifact._from_row(row) if row else None

    # ---------------------------------------------------------------- leases
    def _lease_end(self, now: dt.datetime) -> dt.datetime:
        return now + dt.timedelta(seconds=self.lease_s)

    def renew_lease(self, art_id: int) -> bool:
        """Extend this process's lease on a registered/building record; False when it is no longer ours."""
        t = artifacts_table
        with self._tx() as conn:
            renewed = conn.execute(t.update().where(
                t.c.id == art_id, t.c.state.in_(("registered", "building")), t.c.host == provenance.host(),
                t.c.pid == os.getpid(),
            ).values(lease_until=self._lease_end(_now()))).rowcount
        return renewed == 1

    @contextlib.contextmanager
    def _holding_lease(self, art_id: int) -> Iterator[threading.Event]:
        """Renew the lease every ``lease_renew_s`` from a daemon thread; the event is set once it is lost."""
        lost, stop = threading.Event(), threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_renew_s):
                try:
                    if not self.renew_lease(art_id):
                        lost.set()
                        return
                except Exception:  # database briefly unreachable: retry until the lease itself runs out
                    continue

        thread = threading.Thread(target=renew, name=f"avp-lease-{art_id}", daemon=True)
        thread.start()
        try:
            yield lost
        finally:
            stop.set()
            thread.join()

    def _abandoned_because(self, row: Any, now: dt.datetime) -> str | None:
        """Why a registered/building record may be taken over, or None while its owner may still be at work."""
        m = row._mapping
        lease_until = m["lease_until"] or self._lease_end(m["updated_at"])
        if lease_until <= now:
            return (f"recovered: the lease of process {m['pid']} on {m['host']} expired at "
                    f"{lease_until:%Y-%m-%d %H:%M:%S} UTC without renewal")
        started = m["pid_started"]
        if m["host"] == provenance.host() and not (started > 0 and _process_started(m["pid"]) == started):
            return f"recovered: process {m['pid']} on {m['host']} ended during the build"
        return None

    def _take_over(self, row: Any, reason: str) -> bool:
        """Abort the record as it was read in ``row``: one conditional UPDATE that matches only while neither
        its state nor its lease has changed since, so of two reclaimers (or a reclaimer and an owner
        renewing) exactly one wins."""
        t, m = artifacts_table, row._mapping
        same_lease = t.c.lease_until.is_(None) if m["lease_until"] is None else t.c.lease_until == m["lease_until"]
        now = _now()
        with self._tx() as conn:
            won = conn.execute(t.update().where(t.c.id == m["id"], t.c.state == m["state"], same_lease).values(
                state="aborted", reason=reason, updated_at=now)).rowcount == 1
            if won:
                conn.execute(events_table.insert().values(
                    artifact_id=m["id"], from_state=m["state"], to_state="aborted", at=now, by=provenance.user(),
                    reason=reason))
        return won

    def recover_stale(self) -> list[Artifact]:
        """Abort ``building``/``registered`` records whose owner is gone (see ``_abandoned_because``) and remove
        their files. Files of a build whose owner may still be alive, on any host, are never touched."""
        t = artifacts_table
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(t).where(t.c.state.in_(("building", "registered")))).all()
        recovered = []
        for row in rows:
            reason = self._abandoned_because(row, _now())
            if reason is None or not self._take_over(row, reason):
                continue
            art = Artifact._from_row(row)
            for path in [*art.locations, *art.meta.get("_staging", [])]:
                _remove(self.home, path)
            recovered.append(self.get(art.id))
        return recovered

    def build(self, kind: str, name: str, *, entry_point: str, config: Any,
              builder: Callable[[str, Artifact], dict | None], parents: Sequence[Artifact] = (),
              code_modules: Sequence[str] = (), force: bool = False,
              say: Callable[[str], None] = lambda _msg: None) -> Artifact:
        """Build (or reuse) an artifact atomically.

        ``builder(staging_dir, record)`` writes the artifact's files into ``staging_dir`` and may return
        metadata to store. The folder is renamed to its final place and the record marked succeeded
        only after the builder returns; any exception marks it failed (aborted for an interrupt).
        ``code_modules`` are the modules the builder runs: their code and their project imports
        (``provenance.code_closure``) are part of the content key, and no other file is.
        """
        for p in parents:
            if p.state != "succeeded":
                raise RegistryError(f"parent {p.ref} is {p.state}; only succeeded artifacts can be built on")
        code = provenance.code_version(*code_modules)
        key = content_key(kind, name, parents, code, config)
        self.recover_stale()
        if not force:
            hit = self.find_succeeded(kind, name, key)
            if hit is not None:
                say(f"cache hit: {hit.ref} has the same content key ({key[:12]}); reusing it (--force rebuilds)")
                hit.cached = True
                return hit
        in_flight = [a for a in self.list(kind, name, "building") if a.content_key == key]
        if in_flight and not force:
            a = in_flight[0]
            raise BuildInProgress(f"{a.ref} with the same content key is being built by pid {a.pid} on {a.host}")
        art = self.register(kind, name, content_key=key, entry_point=entry_point, config=config,
                            parents=parents, meta={"code_version": code})
        final = self.home.artifact_dir(kind, name, art.version)
        staging = self.home.join("artifacts", kind, name, f".staging-v{art.version}-{uuid.uuid4().hex[:8]}")
        with self._tx() as conn:
            self._set_state(conn, art.id, "building", locations=canonical_json([final]),
                            meta=canonical_json({**art.meta, "_staging": [staging]}))
        say(f"building {art.ref} (content key {key[:12]})")
        fs = self.home.fs
        try:
            with self._holding_lease(art.id) as lease_lost:
                fs.makedirs(staging, exist_ok=True)
                extra = builder(staging, self.get(art.id)) or {}
                if lease_lost.is_set() or not self.renew_lease(art.id):
                    raise LeaseLost(f"{art.ref}: another process took this build over after its lease expired "
                                    f"(lease {self.lease_s:g} s); nothing was published")
            _rename(self.home, staging, final)
        except BaseException as exc:
            state = "aborted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "failed"
            with contextlib.suppress(Exception):
                with self._tx() as conn:
                    self._set_state(conn, art.id, state, reason=f"{type(exc).__name__}: {exc}"[:2000])
            _remove(self.home, staging)
            _remove(self.home, final)
            raise
        meta = {k: v for k, v in self.get(art.id).meta.items() if k != "_staging"}
        meta.update(extra)
        with self._tx() as conn:
            self._set_state(conn, art.id, "succeeded", meta=canonical_json(meta))
        say(f"published {art.ref} at {final}")
        return self.get(art.id)

    def record(self, kind: str, name: str, *, content_key: str, location: str, entry_point: str,
               meta: dict | None = None) -> Artifact:
        """Register something that already exists (a source drive log) as a succeeded artifact.

        Returns the existing record when one with the same content key is already succeeded.
        """
        hit = self.find_succeeded(kind, name, content_key)
        if hit is not None:
            return hit
        art = self.register(kind, name, content_key=content_key, entry_point=entry_point, meta=meta)
        with self._tx() as conn:
            self._set_state(conn, art.id, "building", locations=canonical_json([location]))
            self._set_state(conn, art.id, "succeeded")
        return self.get(art.id)

    def assignments(self, ledger: str) -> dict[str, str]:
        """Every value ``ledger`` holds (key -> value), read only."""
        a = assignments_table
        with self.engine.connect() as conn:
            return {r.key: r.value for r in conn.execute(sa.select(a.c.key, a.c.value).where(a.c.ledger == ledger))}

    def sticky_assign(self, ledger: str, keys: Sequence[str],
                      decide: Callable[[dict[str, str], list[str]], dict[str, str]]) -> dict[str, str]:
        """Values for ``keys`` from ``ledger``; keys seen for the first time get ``decide(existing, new)``.

        The read and the insert happen in one write transaction, so two concurrent runs cannot give one
        key two values; a value, once written, never changes.
        """
        a = assignments_table
        with self._tx() as conn:
            existing = {r.key: r.value for r in conn.execute(sa.select(a.c.key, a.c.value).where(a.c.ledger == ledger))}
            new = [k for k in dict.fromkeys(keys) if k not in existing]
            if new:
                decided = decide(dict(existing), new)
                now = _now()
                for key in new:
                    conn.execute(a.insert().values(ledger=ledger, key=key, value=decided[key], assigned_at=now))
                existing.update({k: decided[k] for k in new})
        return {k: existing[k] for k in keys}

    # ---------------------------------------------------------------- promotion
    def _is_blessed(self, art: Artifact) -> bool:
        if art.blessed:
            return True
        # A package inherits the verdict of the model it was built from.
        return art.kind == "package" and any(p.kind == "model" and p.blessed for p in self.parents(art.id))

    def promote(self, ref: str | int, namespace: str, name: str, major: int = 1, by: str | None = None) -> Promotion:
        """Make a blessed, succeeded model (or its package) production as ``namespace/name/major.minor``;
        ``by`` names who decided (an approver), else this process's user."""
        check_name(namespace, "namespace")
        check_name(name, "promotion name")
        art = self.get(ref)
        if art.kind not in ("model", "package"):
            raise PromotionRefused(f"{art.ref} is a {art.kind}; only models and packages can be promoted")
        if art.state != "succeeded":
            raise PromotionRefused(f"{art.ref} is {art.state}; only a succeeded artifact can be promoted")
        if not self._is_blessed(art):
            raise PromotionRefused(f"{art.ref} is not blessed by evaluation; an unblessed model cannot be promoted")
        p = promotions_table
        for attempt in range(50):
            try:
                with self._tx() as conn:
                    latest = conn.execute(sa.select(sa.func.max(p.c.minor)).where(
                        p.c.namespace == namespace, p.c.name == name, p.c.major == major)).scalar()
                    minor = 0 if latest is None else latest + 1
                    conn.execute(p.update().where(p.c.namespace == namespace, p.c.name == name,
                                                  p.c.status == "production").values(status="previous"))
                    conn.execute(p.insert().values(
                        namespace=namespace, name=name, major=major, minor=minor,
                        artifact_id=art.id, status="production", promoted_at=_now(),
                        promoted_by=by or provenance.user()))
                    conn.execute(events_table.insert().values(
                        artifact_id=art.id, from_state=art.state, to_state=art.state, at=_now(),
                        by=by or provenance.user(), reason=f"promoted to {namespace}/{name}/{major}.{minor}"))
                return self.production(namespace, name)
            except IntegrityError:
                time.sleep(0.01 * (attempt + 1))
        raise RegistryError(f"could not promote {art.ref}: too many concurrent promotions")

    def note(self, ref: str | int, reason: str, by: str | None = None) -> Artifact:
        """Record a decision about an artifact that changes nothing else (a rejected promotion, an approval
        that timed out) as an event on it, with who (``by``, else this process's user) and why."""
        art = self.get(ref)
        with self._tx() as conn:
            conn.execute(events_table.insert().values(
                artifact_id=art.id, from_state=art.state, to_state=art.state, at=_now(), by=by or provenance.user(),
                reason=reason))
        return art

    def promotions(self, namespace: str | None = None, name: str | None = None) -> list[Promotion]:
        p = promotions_table
        query = sa.select(p)
        if namespace:
            query = query.where(p.c.namespace == namespace)
        if name:
            query = query.where(p.c.name == name)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(p.c.id)).all()
        return [Promotion(**{k: v for k, v in r._mapping.items() if k != "id"}) for r in rows]

    def production(self, namespace: str, name: str) -> Promotion | None:
        current = [x for x in self.promotions(namespace, name) if x.status == "production"]
        return current[-1] if current else None

    def rollback(self, namespace: str, name: str) -> Promotion:
        """Withdraw the production version and restore the newest previous one that is still succeeded (a
        deprecated or end-of-life artifact never becomes production again)."""
        with self._tx() as conn:
            if not self._withdraw_production(conn, namespace, name, require_target=True):
                raise PromotionRefused(f"{namespace}/{name} has no production version to roll back")
        restored = self.production(namespace, name)
        assert restored is not None
        return restored

    def _withdraw_production(self, conn: sa.Connection, namespace: str, name: str, require_target: bool) -> bool:
        """Mark ``namespace/name``'s production version rolled back and restore the newest previous version whose
        artifact is succeeded; with none, ``require_target`` refuses, else no version is production. False
        when nothing was production."""
        p, t = promotions_table, artifacts_table
        rows = conn.execute(sa.select(p.c.id, p.c.artifact_id, p.c.status, p.c.major, p.c.minor, t.c.kind, t.c.name,
                                      t.c.version, t.c.state).join(t, p.c.artifact_id == t.c.id).where(
            p.c.namespace == namespace, p.c.name == name).order_by(p.c.id.desc())).all()
        current = [r for r in rows if r.status == "production"]
        if not current:
            return False
        previous = [r for r in rows if r.status == "previous"]
        targets = [r for r in previous if r.state == "succeeded"]
        if not targets and require_target:
            retired = ", ".join(f"{namespace}/{name}/{r.major}.{r.minor} ({r.kind}:{r.name}@v{r.version} is "
                                f"{r.state})" for r in previous)
            raise PromotionRefused(f"{namespace}/{name} has no previous version to roll back to"
                                   + (f" that is still succeeded: {retired}" if retired else ""))
        conn.execute(p.update().where(p.c.id == current[0].id).values(status="rolled_back"))
        if targets:
            conn.execute(p.update().where(p.c.id == targets[0].id).values(status="production"))
            # who rolled back, on the restored artifact's history (as promote records it on the promoted one)
            conn.execute(events_table.insert().values(
                artifact_id=targets[0].artifact_id, from_state=targets[0].state, to_state=targets[0].state,
                at=_now(), by=provenance.user(), reason=f"rolled back {namespace}/{name}: production again "
                                                        f"instead of {current[0].major}.{current[0].minor}"))
        return True

    def production_of(self, artifact_id: int) -> list[Promotion]:
        """The promotions that serve this artifact now (status production)."""
        return [x for x in self.promotions() if x.status == "production" and x.artifact_id == artifact_id]

def _rename(home: Home, src: str, dst: str) -> None:
    if is_url(home.root):
        home.fs.mv(src, dst, recursive=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        os.rename(src, dst)  # atomic on one filesystem; fails rather than merging into an existing folder


def _remove(home: Home, path: str) -> None:
    with contextlib.suppress(FileNotFoundError, OSError):
        if is_url(home.root):
            home.fs.rm(path, recursive=True)
        elif os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
