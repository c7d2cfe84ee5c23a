"""Build leases across hosts, with real processes on SQLite and PostgreSQL.

The building process runs "on another host": as root it gets its own UTS namespace (``unshare --uts``) and
a host name of its own, so the registry reads it from the OS; otherwise ``AVP_HOSTNAME`` stands in. Leases
are short here (LEASE_S) so that waiting for one to expire stays quick; the waits poll the recorded lease
instead of sleeping a fixed time.
"""

import datetime as dt
import functools
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from pipeline import config, provenance
from pipeline.registry import (
    PG_WRITE_LOCK,
    BuildInProgress,
    LeaseLost,
    NotFound,
    Registry,
    RegistryError,
    _now,
    artifacts_table,
)

REPO = Path(__file__).resolve().parents[2]
LEASE_S, RENEW_S = 3.0, 0.3
OTHER_HOST = "avp-test-host-a"


@pytest.fixture
def cfg(registry_cfg):
    return registry_cfg


def _registry(cfg, lease_s=LEASE_S, renew_s=RENEW_S):
    return Registry.open(config.load({"home": cfg.home, "registry_url": cfg.registry_url,
                                      "registry.lease_s": lease_s, "registry.lease_renew_s": renew_s}, env={}))


@functools.lru_cache(maxsize=1)
def _can_unshare_uts() -> bool:
    """Root with a working ``unshare --uts`` (a container may forbid new namespaces)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "--uts", "hostname", OTHER_HOST], capture_output=True).returncode == 0


def _build_elsewhere(cfg, go_file):
    """A `held-build` worker on OTHER_HOST; returns once its builder has written into staging."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AVP_")}
    env.update(AVP_REGISTRY__LEASE_S=str(LEASE_S), AVP_REGISTRY__LEASE_RENEW_S=str(RENEW_S))
    cmd = [sys.executable, "-m", "tests.pipeline.registry_worker", "held-build", cfg.home, cfg.registry_url,
           str(go_file)]
    if _can_unshare_uts():
        cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', OTHER_HOST, *cmd]
    else:
        env["AVP_HOSTNAME"] = OTHER_HOST
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "STARTED", proc.stderr.read()
    return proc


def _freeze(proc, registry):
    """SIGSTOP the builder at a moment it holds no registry write lock. It renews its lease in short write
    transactions; frozen inside one it would block every writer until resumed (or, on PostgreSQL, until the
    server ends its idle transaction), which is not what these tests are about."""
    while True:
        proc.send_signal(signal.SIGSTOP)
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.01)
        if _write_lock_free(registry):
            return
        proc.send_signal(signal.SIGCONT)
        time.sleep(0.05)


def _write_lock_free(registry) -> bool:
    if registry.engine.dialect.name == "sqlite":
        db = sqlite3.connect(registry.engine.url.database, timeout=0.2, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            db.close()
    with registry.engine.connect() as conn:
        free = conn.execute(sa.text("SELECT pg_try_advisory_lock(:key)"), {"key": PG_WRITE_LOCK}).scalar()
        if free:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": PG_WRITE_LOCK})
        return free


def _rebuild(registry):
    def complete(staging, _record):
        Path(staging, "data.txt").write_text("complete")

    return registry.build("dataset", "victim", entry_point="tests:killed", config={"n": 1}, builder=complete)


def _row(registry, art_id):
    """The artifact's database row as it is now (what a reclaimer reads before taking over)."""
    with registry.engine.connect() as conn:
        return conn.execute(sa.select(artifacts_table).where(artifacts_table.c.id == art_id)).one()


def _wait_until_expired(registry, art_id):
    while True:
        lease_until = registry.get(art_id).lease_until
        if _now() > lease_until:
            return
        time.sleep(min(0.2, (lease_until - _now()).total_seconds() + 0.01))


def _assert_held_then_taken_over(registry, art):
    """The build on the other host is held while its lease runs, and taken over once it has expired."""
    staging = Path(art.meta["_staging"][0])
    assert _now() < registry.get(art.id).lease_until  # the lease was renewed moments ago
    assert registry.recover_stale() == []
    with pytest.raises(BuildInProgress, match=f"on {OTHER_HOST}"):
        _rebuild(registry)
    assert registry.get(art.id).state == "building" and Path(staging, "part-0").exists()

    _wait_until_expired(registry, art.id)
    [recovered] = registry.recover_stale()
    assert recovered.id == art.id and recovered.state == "aborted"
    assert f"lease of process {art.pid} on {OTHER_HOST} expired" in recovered.reason
    assert not staging.exists()
    rebuilt = _rebuild(registry)
    assert rebuilt.state == "succeeded" and rebuilt.version == art.version + 1
    assert Path(rebuilt.location, "data.txt").read_text() == "complete"


def test_frozen_build_on_another_host_is_taken_over_only_after_its_lease(cfg, tmp_path):
    go = tmp_path / "go"
    proc = _build_elsewhere(cfg, go)
    try:
        registry = _registry(cfg)
        [art] = registry.list("dataset", "victim")
        assert art.host == OTHER_HOST and art.host != provenance.host() and art.state == "building"
        _freeze(proc, registry)
        _assert_held_then_taken_over(registry, art)

        # The frozen builder wakes up and finishes: it finds its lease gone and publishes nothing.
        go.touch()
        proc.send_signal(signal.SIGCONT)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode != 0 and "LeaseLost" in err, err
        assert registry.get(art.id).state == "aborted"
        assert not Path(art.location).exists() and not Path(art.meta["_staging"][0]).exists()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait()


def test_killed_build_on_another_host_waits_for_its_lease(cfg, tmp_path):
    proc = _build_elsewhere(cfg, tmp_path / "go")
    proc.kill()
    proc.wait(timeout=30)
    registry = _registry(cfg)
    [art] = registry.list("dataset", "victim")
    # The pid is gone, but on another host a pid says nothing: only the lease decides.
    _assert_held_then_taken_over(registry, art)


def test_only_one_of_two_reclaimers_wins_and_the_owner_loses_its_lease(cfg):
    owner = _registry(cfg, lease_s=0.2, renew_s=0.1)
    art = owner.register("dataset", "victim", content_key="k", entry_point="tests:lease")
    _wait_until_expired(owner, art.id)
    first, second = _registry(cfg), _registry(cfg)
    row = _row(first, art.id)
    assert first._take_over(row, "test: first") is True
    assert second._take_over(row, "test: second") is False  # same observed row, already taken
    assert first.get(art.id).reason == "test: first"
    assert owner.renew_lease(art.id) is False
    assert [e["to_state"] for e in first.events(art.id)] == ["registered", "aborted"]


def test_a_renewed_lease_defeats_a_takeover_read_before_it(cfg):
    owner = _registry(cfg, lease_s=0.2, renew_s=0.1)
    art = owner.register("dataset", "victim", content_key="k", entry_point="tests:lease")
    _wait_until_expired(owner, art.id)
    reclaimer = _registry(cfg)
    row = _row(reclaimer, art.id)
    assert owner.renew_lease(art.id) is True  # the owner came back before anyone took over
    assert reclaimer._take_over(row, "test: stale read") is False
    assert reclaimer.get(art.id).state == "registered"


def test_registry_written_before_leases_still_opens_and_recovers(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    with sqlite3.connect(home / "registry.db") as db:
        db.executescript((Path(__file__).parent / "data" / "registry_before_leases.sql").read_text())
    cfg = config.load({"home": str(home)}, env={})
    registry = _registry(cfg)
    assert registry.get("log:log-0001").locations == ["/nowhere/log-0001"]
    assert registry.get(2).lease_until is None  # old rows keep what they had
    # Its old `building` row has no lease: last update + lease_s counts, long past.
    [recovered] = registry.recover_stale()
    assert recovered.ref == "dataset:fleet@v1" and "expired" in recovered.reason
    art = registry.build("dataset", "fleet", entry_point="tests:new", config={}, builder=lambda s, r: None)
    assert art.version == 2 and art.state == "succeeded" and art.lease_until is not None


def test_missing_lease_column_is_added_on_open(cfg):
    registry = _registry(cfg)
    with registry.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE artifacts DROP COLUMN lease_until"))
    reopened = _registry(cfg)
    assert "lease_until" in {c["name"] for c in sa.inspect(reopened.engine).get_columns("artifacts")}
    assert reopened.build("dataset", "fleet", entry_point="tests:new", config={},
                          builder=lambda s, r: None).lease_until is not None


def test_lease_must_be_renewed_before_it_expires(cfg):
    with pytest.raises(RegistryError, match=r"registry.lease_renew_s \(60.0\) must be above 0 and below registry.lease_s"):
        _registry(cfg, lease_s=60, renew_s=60)


@pytest.mark.parametrize("lease_s, timeout", [(12, "12s"), (0.2, "5s")])
def test_postgresql_ends_a_session_left_idle_in_its_transaction_for_a_lease(postgres_url, tmp_path, lease_s, timeout):
    # A frozen client inside a write transaction must not hold the registry's write lock forever, and a
    # short lease must not end a healthy session that paused between two statements (CI once lost one
    # after 200 ms while reflecting the table): the timeout is a lease, at least 5 s.
    cfg = config.load({"home": str(tmp_path / "home"), "registry_url": postgres_url}, env={})
    with _registry(cfg, lease_s=lease_s, renew_s=lease_s / 2).engine.connect() as conn:
        assert conn.execute(sa.text("SHOW idle_in_transaction_session_timeout")).scalar() == timeout
        conn.execute(sa.text("SELECT 1"))  # inside a transaction now
        time.sleep(1)  # five 0.2 s leases idle: the session survives
        assert conn.execute(sa.text("SELECT 2")).scalar() == 2


def test_postgresql_registry_reconnects_after_the_server_ended_its_session(postgres_server, postgres_url, tmp_path):
    # The server ends sessions (the idle timeout above, a restart, an administrator): the pool tests a
    # connection before handing it out and opens a new one instead of failing the next registry call.
    cfg = config.load({"home": str(tmp_path / "home"), "registry_url": postgres_url}, env={})
    registry = _registry(cfg)
    art = registry.register("dataset", "fleet", content_key="k", entry_point="tests:reconnect")
    with registry.engine.connect() as conn:
        backend = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()  # the pooled session
    with postgres_server.admin() as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", (backend,)).fetchone()[0] is True
    assert registry.get(art.id).ref == "dataset:fleet@v1"


# ------------------------------------------------------------- in one process: who may take over, and when
def _set(registry, art_id, **values):
    with registry.engine.begin() as conn:
        conn.execute(artifacts_table.update().where(artifacts_table.c.id == art_id).values(**values))


def _ended_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_build_whose_process_ended_on_this_host_is_recovered_at_once(cfg):
    registry = _registry(cfg)
    art = registry.register("dataset", "victim", content_key="k", entry_point="tests:lease")
    staging = Path(cfg.home, "staging-of-the-dead")
    staging.mkdir(parents=True)
    registry.transition(art.id, "building")
    registry.update_meta(art.id, _staging=[str(staging)])
    pid = _ended_pid()
    _set(registry, art.id, pid=pid)  # its lease is still running: only the ended process gives it away
    before = registry.get(art.id)
    [recovered] = registry.recover_stale()
    assert recovered.state == "aborted"
    assert recovered.reason == f"recovered: process {pid} on {provenance.host()} ended during the build"
    assert not staging.exists()
    [*_, taken] = registry.events(art.id)
    assert (taken["from_state"], taken["to_state"], taken["reason"]) == ("building", "aborted", recovered.reason)
    assert recovered.updated_at > before.updated_at


def test_a_live_process_on_this_host_keeps_its_build_unless_its_pid_was_reused(cfg):
    registry = _registry(cfg)
    mine = registry.register("dataset", "mine", content_key="k", entry_point="tests:lease")
    assert registry.recover_stale() == []  # this process, alive, started when recorded
    _set(registry, mine.id, pid_started=_row(registry, mine.id).pid_started - 100)  # same pid, another process
    [recovered] = registry.recover_stale()
    assert recovered.reason == f"recovered: process {os.getpid()} on {provenance.host()} ended during the build"


def test_a_start_time_never_recorded_counts_as_ended(cfg):
    registry = _registry(cfg)
    art = registry.register("dataset", "old", content_key="k", entry_point="tests:lease")
    _set(registry, art.id, pid=_ended_pid(), pid_started=0.0)
    assert [a.id for a in registry.recover_stale()] == [art.id]


def test_another_hosts_build_is_left_alone_while_its_lease_runs(cfg):
    registry = _registry(cfg)
    art = registry.register("dataset", "remote", content_key="k", entry_point="tests:lease")
    _set(registry, art.id, host="avp-elsewhere", pid=_ended_pid())  # that pid means nothing here
    assert registry.recover_stale() == [] and registry.get(art.id).state == "registered"


def test_a_lease_that_ends_exactly_now_has_expired(cfg):
    registry = _registry(cfg)
    art = registry.register("dataset", "edge", content_key="k", entry_point="tests:lease")
    row = _row(registry, art.id)
    assert registry._abandoned_because(row, row.lease_until).startswith(
        f"recovered: the lease of process {os.getpid()} on {provenance.host()} expired at ")
    assert registry._abandoned_because(row, row.lease_until - dt.timedelta(microseconds=1)) is None


def test_recovery_goes_on_past_a_live_build(cfg):
    registry = _registry(cfg)
    live = registry.register("dataset", "a-live", content_key="k", entry_point="tests:lease")
    stale = registry.register("dataset", "b-stale", content_key="k", entry_point="tests:lease")
    _set(registry, stale.id, lease_until=_now() - dt.timedelta(seconds=1))
    assert [a.id for a in registry.recover_stale()] == [stale.id]
    assert registry.get(live.id).state == "registered"


def test_a_takeover_touches_only_its_own_record(cfg):
    registry = _registry(cfg)
    first = registry.register("dataset", "first", content_key="k", entry_point="tests:lease")
    second = registry.register("dataset", "second", content_key="k", entry_point="tests:lease")
    expired = _now() - dt.timedelta(seconds=1)
    for art in (first, second):
        _set(registry, art.id, lease_until=expired)  # same state, same lease
    assert registry._take_over(_row(registry, first.id), "test: first only") is True
    assert (registry.get(first.id).state, registry.get(second.id).state) == ("aborted", "registered")


def test_renewing_touches_only_this_processs_record_on_this_host(cfg):
    registry = _registry(cfg)
    a = registry.register("dataset", "a", content_key="k", entry_point="tests:lease")
    b = registry.register("dataset", "b", content_key="k", entry_point="tests:lease")
    assert registry.renew_lease(a.id) is True
    _set(registry, a.id, host="avp-elsewhere")
    _set(registry, b.id, pid=_ended_pid())
    assert registry.renew_lease(a.id) is False and registry.renew_lease(b.id) is False


def test_a_build_longer_than_several_renewals_keeps_its_lease(cfg):
    registry = _registry(cfg, lease_s=0.5, renew_s=0.05)
    leases = []

    def slow(staging, record):
        leases.append(record.lease_until)
        time.sleep(1.0)  # about twenty renewals, two leases
        leases.append(registry.get(record.id).lease_until)
    assert registry.build("dataset", "slow", entry_point="tests:lease", config={}, builder=slow).state == "succeeded"
    assert leases[1] - leases[0] >= dt.timedelta(seconds=0.5)  # renewed while the builder worked


def test_a_takeover_between_two_renewals_is_caught_before_publishing(cfg):
    registry = _registry(cfg, lease_s=600, renew_s=300)  # the renewing thread does not wake during the build
    reclaimer = _registry(cfg)

    def taken_over(staging, record):
        Path(staging, "data.txt").write_text("x")
        assert reclaimer._take_over(_row(reclaimer, record.id), "test: taken over") is True
    with pytest.raises(LeaseLost, match=r"^dataset:victim@v1: another process took this build over after its "
                                        r"lease expired \(lease 600 s\); nothing was published$"):
        registry.build("dataset", "victim", entry_point="tests:lease", config={}, builder=taken_over)
    art = registry.get("dataset:victim@v1")
    assert (art.state, art.reason) == ("aborted", "test: taken over")  # the failure did not overwrite it
    assert not Path(art.location).exists()


def test_ids_up_to_the_databases_integer_limit(cfg):
    registry = _registry(cfg)
    row = dict(_row(registry, registry.register("dataset", "small", content_key="k", entry_point="t").id)._mapping)
    with registry.engine.begin() as conn:
        conn.execute(artifacts_table.insert().values(**{**row, "id": 2**31 - 1, "name": "big"}))
    assert registry.get(2**31 - 1).name == "big" and registry.get(str(2**31 - 1)).name == "big"
    with pytest.raises(NotFound, match=rf"^no artifact with id {2**31}$"):
        registry.get(2**31)  # refused before the query: PostgreSQL would reject the number itself
