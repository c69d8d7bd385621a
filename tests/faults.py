"""Database faults for chaos tests, produced the way production meets them, and always undone.

- ``read_only_failover(seconds)``: what a failover looks like from a client. The cluster is stopped,
  ``standby.signal`` is created in its data directory and it is started again: it comes back as a
  hot standby (reads work, every write fails with SQLSTATE 25006). After ``seconds`` it is promoted
  with ``pg_promote()`` (as the postgres superuser) and is a writable primary again, on a new timeline.
- ``cancel_storm(dsn, seconds, period)``: every ``period`` seconds, ``pg_cancel_backend`` on every
  backend of the platform under test (its database, ``application_name LIKE 'bubuh-%'``, and, when
  the platform's process ids are given, only connections that process owns), never this
  connection or the test's own.
- ``postgres_stopped(seconds)``: ``pg_ctlcluster stop -m fast``, then ``start`` after ``seconds``.

Each is an async context manager. Entering it applies the fault and returns once the fault is in
effect; the fault lasts ``seconds`` from then, whatever the body does (so load can run inside),
and leaving waits for the window to end. Leaving always restores a normal writable primary, also
when the body raised (then at once), and checks it: ``pg_is_in_recovery()`` is false and the
application's role can write. The yielded ``Fault`` records what was seen from the outside:
write probes from a direct connection every second, and for the storm every backend cancelled,
so a test can assert the fault was real before asserting the platform survived it.

They act on the Debian cluster that serves ``dsn``'s port (found with ``pg_lsclusters``), so they
need root or passwordless sudo to the postgres user, like ``deploy/local/postgres.sh``. While the
cluster is stopped, its ``start.conf`` says ``disabled`` so that another test session's
``stack.sh up`` cannot start it and end the fault early (that session's start fails instead); the
previous value is put back before the fault's own start, and by ``restore`` after any failure.
These faults take the whole cluster: other sessions using it meanwhile see them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg

from services.operator import process_tree

PROBE_APP = "faults-probe"          # never matches the platform's 'bubuh-%'
STORM_APP = "faults-cancel-storm"


class FaultError(RuntimeError):
    """A fault could not be produced, or the database could not be restored afterwards."""


# --- the cluster --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    version: str
    name: str
    port: int
    data_dir: Path
    log_file: Path | None
    config_dir: Path | None = None

    @property
    def standby_signal(self) -> Path:
        return self.data_dir / "standby.signal"


def _port_of(dsn: str) -> int:
    return urlsplit(dsn).port or 5432


def _as_postgres(*cmd: str) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return ["sudo", "-n", "-u", "postgres", *cmd]


def _as_root(*cmd: str) -> list[str]:
    return list(cmd) if os.geteuid() == 0 else ["sudo", "-n", *cmd]


def _run(cmd: list[str], timeout: float = 60, check: bool = True, stdin: str | None = None
         ) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and out.returncode != 0:
        raise FaultError(f"{' '.join(cmd)} failed ({out.returncode}): {(out.stderr or out.stdout).strip()}")
    return out


def clusters(attempts: int = 20) -> list[dict]:
    """Every local Debian cluster. Tests make clusters of their own (``stack.own_postgres``) and drop them,
    in parallel with this read: for a moment a cluster's configuration directory exists without its
    ``postgresql.conf`` settings, and ``pg_lsclusters`` fails on it as a whole ("Use of uninitialized value
    $data_directory", the outside CI of 5 December, one chaos test of 915). Read again then, for a few
    seconds: the other cluster is made or gone by then."""
    out = None
    for _ in range(attempts):
        out = _run(["pg_lsclusters", "--json"], timeout=30, check=False)
        if out.returncode == 0:
            return json.loads(out.stdout or "[]")
        time.sleep(0.25)
    raise FaultError(f"pg_lsclusters --json failed ({out.returncode}): {(out.stderr or out.stdout).strip()}")


def find_cluster(dsn: str) -> Cluster:
    """The local Debian cluster listening on ``dsn``'s port."""
    port = _port_of(dsn)
    for c in clusters():
        if int(c.get("port") or 0) == port:
            log = c.get("logfile")
            return Cluster(version=str(c["version"]), name=c["cluster"], port=port,
                           data_dir=Path(c.get("pgdata") or c["config"]["data_directory"]),
                           log_file=Path(log) if log else None,
                           config_dir=Path(c["configdir"]) if c.get("configdir") else None)
    raise FaultError(f"no local PostgreSQL cluster on port {port} (pg_lsclusters)")


def unavailable(dsn: str) -> str | None:
    """Why the faults cannot run here (a reason to skip), or None."""
    host = urlsplit(dsn).hostname or ""
    if host not in ("127.0.0.1", "localhost", "::1"):
        return f"the database at {host} is not a local cluster"
    if not shutil.which("pg_lsclusters") or not shutil.which("pg_ctlcluster"):
        return "needs Debian's postgresql-common (pg_lsclusters, pg_ctlcluster)"
    if os.geteuid() != 0 and _run(["sudo", "-n", "true"], check=False).returncode != 0:
        return "needs root or passwordless sudo to stop and start the cluster"
    try:
        find_cluster(dsn)
    except (FaultError, subprocess.SubprocessError, ValueError) as exc:
        return str(exc)
    return None


def _running(cluster: Cluster) -> bool:
    return any(c["cluster"] == cluster.name and str(c["version"]) == cluster.version and c.get("running")
               for c in clusters())


def _ctl(cluster: Cluster, action: str, *args: str) -> None:
    _run(_as_root("pg_ctlcluster", cluster.version, cluster.name, action, *args), timeout=90)


def _start(cluster: Cluster) -> bool:
    """Start the cluster; False when it was already running (someone else started it)."""
    out = _run(_as_root("pg_ctlcluster", cluster.version, cluster.name, "start"), timeout=90, check=False)
    if out.returncode == 0:
        return True
    if _running(cluster):
        return False
    raise FaultError(f"pg_ctlcluster start failed ({out.returncode}): {(out.stderr or out.stdout).strip()}")


# While a fault keeps the cluster stopped, starts by others are refused: another test session's
# ``stack.sh up`` (``postgres.sh start``) would otherwise start it within a second and the fault would
# not hold. ``pg_ctlcluster`` refuses to start a cluster whose start.conf says "disabled" (stop still
# works). The marker line lets ``restore`` undo it even after a run that was killed mid-fault.
_LOCK_MARK = "# tests/faults.py: starts refused during a fault; was: "


def _start_conf(cluster: Cluster) -> Path | None:
    return cluster.config_dir / "start.conf" if cluster.config_dir else None


def _write_config(path: Path, text: str) -> None:
    if os.geteuid() == 0:
        path.write_text(text)            # the file exists: owner and mode stay
    else:
        _run(["sudo", "-n", "-u", "postgres", "tee", str(path)], stdin=text)


def _lock_starts(cluster: Cluster) -> bool:
    path = _start_conf(cluster)
    if path is None or not path.exists():
        return False
    lines = path.read_text().splitlines()
    if any(line.startswith(_LOCK_MARK) for line in lines):
        return True
    active = [i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#")]
    previous = lines[active[-1]].strip() if active else "auto"
    if previous == "disabled":
        return False                     # disabled by its owner: not ours to touch
    kept = [line for i, line in enumerate(lines) if i not in active]
    _write_config(path, "\n".join(kept + [_LOCK_MARK + previous, "disabled"]) + "\n")
    return True


def _unlock_starts(cluster: Cluster) -> bool:
    """Undo ``_lock_starts`` (True when there was a lock to undo)."""
    path = _start_conf(cluster)
    if path is None or not path.exists():
        return False
    lines = path.read_text().splitlines()
    marks = [line for line in lines if line.startswith(_LOCK_MARK)]
    if not marks:
        return False
    previous = marks[-1][len(_LOCK_MARK):].strip() or "auto"
    kept = [line for line in lines if not line.startswith(_LOCK_MARK) and line.strip() != "disabled"]
    _write_config(path, "\n".join(kept + [previous]) + "\n")
    return True


def _superuser_sql(cluster: Cluster, sql: str, timeout: float = 70) -> str:
    out = _run(_as_postgres("psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-p", str(cluster.port),
                            "-d", "postgres", "-c", sql), timeout=timeout)
    return out.stdout.strip()


def _signal_exists(cluster: Cluster) -> bool:
    return _run(_as_postgres("test", "-e", str(cluster.standby_signal)), check=False).returncode == 0


def _create_signal(cluster: Cluster) -> None:
    _run(_as_postgres("touch", str(cluster.standby_signal)))


def _remove_signal(cluster: Cluster) -> None:
    _run(_as_postgres("rm", "-f", str(cluster.standby_signal)))


def _wait_accepting(cluster: Cluster, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        out = _run(_as_postgres("pg_isready", "-q", "-p", str(cluster.port)), check=False, timeout=15)
        if out.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise FaultError(f"cluster {cluster.version}/{cluster.name} does not accept connections")
        time.sleep(0.2)


def _in_recovery(cluster: Cluster) -> bool:
    return _superuser_sql(cluster, "SELECT pg_is_in_recovery()") == "t"


def _restore_sync(cluster: Cluster) -> list[str]:
    """Whatever state a fault left: a running, writable primary. Returns the steps taken."""
    steps: list[str] = []
    if _unlock_starts(cluster):
        steps.append("starts allowed again (start.conf)")
    if not _running(cluster):
        if _signal_exists(cluster):
            _remove_signal(cluster)          # never started as a standby: just take the flag away
            steps.append("removed standby.signal")
        # tolerant: a start the fault's own timeline began may be finishing at this moment
        steps.append("started" if _start(cluster) else "found started")
    _wait_accepting(cluster)
    if _in_recovery(cluster):
        if _superuser_sql(cluster, "SELECT pg_promote(true, 60)") != "t":
            raise FaultError("pg_promote() did not complete in 60 s")
        steps.append("promoted")
    if _in_recovery(cluster):
        raise FaultError("still in recovery after restore")
    if _signal_exists(cluster):              # a promoted server has removed it; a leftover would demote the next start
        _remove_signal(cluster)
        steps.append("removed leftover standby.signal")
    return steps


async def restore(dsn: str, cluster: Cluster | None = None) -> list[str]:
    """Make the cluster a normal writable primary again and prove it with a write as ``dsn``'s role."""
    cluster = cluster or await asyncio.to_thread(find_cluster, dsn)
    steps = await asyncio.to_thread(_restore_sync, cluster)
    await verify_primary(dsn)
    return steps


async def verify_primary(dsn: str, timeout: float = 30) -> None:
    """``pg_is_in_recovery()`` is false and ``dsn``'s role can write (retried until ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            conn = await asyncpg.connect(dsn, timeout=5, server_settings={"application_name": PROBE_APP})
            try:
                if await conn.fetchval("SELECT pg_is_in_recovery()"):
                    raise FaultError("pg_is_in_recovery() is true")
                await conn.execute("CREATE TEMP TABLE faults_verify (x int); INSERT INTO faults_verify VALUES (1)")
                return
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, FaultError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                raise FaultError(f"the database is not a writable primary after the fault: {exc!r}") from exc
            await asyncio.sleep(0.5)


# --- what the outside sees ----------------------------------------------------------------------------


async def probe_write(dsn: str) -> str:
    """One write from a fresh direct connection: ``"ok"``, the SQLSTATE it failed with, or why it
    could not connect (``"refused"``, ``"timeout"``, an exception name)."""
    try:
        conn = await asyncpg.connect(dsn, timeout=2, server_settings={"application_name": PROBE_APP})
    except asyncpg.PostgresError as exc:
        return exc.sqlstate or type(exc).__name__
    except ConnectionRefusedError:
        return "refused"
    except (TimeoutError, OSError, asyncpg.InterfaceError) as exc:
        return "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
    try:
        await conn.execute("CREATE TEMP TABLE faults_probe (x int); INSERT INTO faults_probe VALUES (1)", timeout=2)
        return "ok"
    except asyncpg.PostgresError as exc:
        return exc.sqlstate or type(exc).__name__
    except (TimeoutError, OSError, asyncpg.InterfaceError) as exc:
        return type(exc).__name__
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2)


@dataclass
class Fault:
    """What a fault did, as seen from outside the platform."""

    kind: str
    seconds: float
    began: float | None = None                       # monotonic: the fault in effect
    ended: float | None = None                       # monotonic: undone (promoted, started, storm over)
    steps: list[tuple[float, str]] = field(default_factory=list)      # (s since entering, what was done)
    probes: list[tuple[float, str]] = field(default_factory=list)     # (s since began, write outcome)
    after: str | None = None                         # the probe once restored: "ok"
    restored: list[str] = field(default_factory=list)
    interference: list[str] = field(default_factory=list)   # someone else started or changed the cluster
    # cancel storm only
    rounds: int = 0
    aimed: int = 0                                   # rounds fired at a backend running a statement
    cancelled: list[tuple[float, int, str, str]] = field(default_factory=list)  # (s, pid, application, state)
    storm_errors: list[str] = field(default_factory=list)
    active_hit: Counter = field(default_factory=Counter)   # statements running when a cancel was sent
    statements_cancelled: int | None = None          # "canceling statement due to user request" in the server log
    _t0: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def step(self, what: str) -> None:
        self.steps.append((round(time.monotonic() - self._t0, 2), what))

    def begin(self) -> None:
        self.began = time.monotonic()
        self.step("fault in effect")

    def end(self) -> None:
        self.ended = time.monotonic()
        self.step("fault over")

    def probed(self, outcome: str) -> None:
        self.probes.append((round(time.monotonic() - (self.began or self._t0), 2), outcome))

    def seen(self, outcome: str) -> int:
        """How many probes during the window had ``outcome``."""
        return sum(1 for _, o in self.probes if o == outcome)

    @property
    def held(self) -> bool:
        """No direct write succeeded during the window and nobody else undid the fault (another test
        session's ``stack.sh up`` starts a stopped cluster: these faults need the cluster to themselves)."""
        return self.seen("ok") == 0 and not self.interference

    @property
    def duration(self) -> float | None:
        return None if self.began is None or self.ended is None else round(self.ended - self.began, 2)

    def summary(self) -> dict:
        out = {"kind": self.kind, "seconds": self.seconds, "duration": self.duration, "steps": self.steps,
               "probes": dict(Counter(o for _, o in self.probes)), "after": self.after, "restored": self.restored,
               "interference": self.interference}
        if self.kind == "cancel_storm":
            out.update(rounds=self.rounds, aimed=self.aimed, cancelled=len(self.cancelled),
                       cancelled_by_state=dict(Counter(s for *_, s in self.cancelled)),
                       cancelled_by_application=dict(Counter(a for _, _, a, _ in self.cancelled)),
                       active_statements_hit=dict(self.active_hit.most_common(5)),
                       statements_cancelled=self.statements_cancelled, storm_errors=self.storm_errors[:5])
        return out


async def _probe_until(fault: Fault, dsn: str, seconds: float, every: float) -> None:
    """Probe a write every ``every`` seconds until ``seconds`` after the fault began."""
    assert fault.began is not None
    while True:
        left = fault.began + seconds - time.monotonic()
        if left <= 0:
            return
        fault.probed(await probe_write(dsn))
        await asyncio.sleep(min(every, max(0.0, fault.began + seconds - time.monotonic())))


@contextlib.asynccontextmanager
async def _window(fault: Fault, dsn: str, cluster: Cluster, timeline) -> AsyncIterator[Fault]:
    """Run ``timeline`` (which ends the fault) beside the body; restore and verify whatever happens."""
    task: asyncio.Task | None = None
    try:
        task = asyncio.create_task(timeline())
        yield fault
        await task                          # the window lasts its full length even if the body was quicker
    finally:
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        fault.restored = await restore(dsn, cluster)
        if fault.ended is None:
            fault.end()
        fault.after = await probe_write(dsn)
        fault.step(f"restored ({', '.join(fault.restored) or 'nothing to do'}); write probe: {fault.after}")
        fault.done.set()


# --- the faults ---------------------------------------------------------------------------------------


async def _stop_holding_starts(fault: Fault, cluster) -> None:
    """Refuse starts by other processes (start.conf), then stop the cluster (fast shutdown)."""
    if await asyncio.to_thread(_lock_starts, cluster):
        fault.step("starts by others refused (start.conf)")
    await asyncio.to_thread(_ctl, cluster, "stop", "-m", "fast")
    fault.step("stopped (fast)")


@contextlib.asynccontextmanager
async def read_only_failover(seconds: float = 20, *, dsn: str | None = None,
                             probe_every: float = 1.0) -> AsyncIterator[Fault]:
    """The cluster as a hot standby (read-only, writes fail with 25006) for ``seconds``, then promoted."""
    dsn = dsn or _default_dsn()
    cluster = await asyncio.to_thread(find_cluster, dsn)
    fault = Fault("read_only_failover", seconds)
    try:
        await _stop_holding_starts(fault, cluster)
        await asyncio.to_thread(_create_signal, cluster)
        fault.step(f"created {cluster.standby_signal}")
        await asyncio.to_thread(_unlock_starts, cluster)
        # from here on, whoever starts it starts a standby
        fault.step("started" if await asyncio.to_thread(_start, cluster) else "found started by another process")
        await asyncio.to_thread(_wait_accepting, cluster)
        if not await asyncio.to_thread(_in_recovery, cluster):
            raise FaultError(f"the cluster did not start as a standby ({fault.interference or 'no interference'})")
        fault.step("started as a hot standby: pg_is_in_recovery() = t")
    except BaseException:
        fault.restored = await restore(dsn, cluster)
        raise
    fault.begin()

    async def timeline():
        await _probe_until(fault, dsn, seconds, probe_every)
        if not await asyncio.to_thread(_in_recovery, cluster):
            fault.interference.append("no longer a standby at the end of the window")
        else:
            ok = await asyncio.to_thread(_superuser_sql, cluster, "SELECT pg_promote(true, 60)")
            fault.step(f"pg_promote() = {ok}")
        fault.end()

    async with _window(fault, dsn, cluster, timeline) as f:
        yield f


@contextlib.asynccontextmanager
async def postgres_stopped(seconds: float = 20, *, dsn: str | None = None,
                           probe_every: float = 1.0) -> AsyncIterator[Fault]:
    """The cluster stopped (``pg_ctlcluster stop -m fast``) for ``seconds``, then started."""
    dsn = dsn or _default_dsn()
    cluster = await asyncio.to_thread(find_cluster, dsn)
    fault = Fault("postgres_stopped", seconds)
    try:
        await _stop_holding_starts(fault, cluster)
    except BaseException:
        fault.restored = await restore(dsn, cluster)
        raise
    fault.begin()

    async def timeline():
        await _probe_until(fault, dsn, seconds, probe_every)
        if not await asyncio.to_thread(_running, cluster):
            await asyncio.to_thread(_unlock_starts, cluster)
            fault.step("started" if await asyncio.to_thread(_start, cluster) else "found started by another process")
        else:
            fault.interference.append("the cluster was started by another process during the window")
        await asyncio.to_thread(_wait_accepting, cluster)
        fault.end()

    async with _window(fault, dsn, cluster, timeline) as f:
        yield f


@contextlib.asynccontextmanager
async def cancel_storm(dsn: str | None = None, seconds: float = 20, period: float = 0.2, *,
                       pids: Iterable[int] = (), application: str = "bubuh-%",
                       aim: float = 0.0) -> AsyncIterator[Fault]:
    """``pg_cancel_backend`` on the platform's backends every ``period`` s for ``seconds``.

    Backends hit: in ``dsn``'s database, ``application_name LIKE application``, client backends, not
    this connection; with ``pids``, only connections whose client port belongs to those processes
    (or their children), so a platform of another test, or the test's own connections, are never hit.

    A cancel only cancels something when it reaches a backend in the middle of a statement (an idle
    one ignores it), and a platform that batches its work is mid-statement a small part of the time:
    fired blindly every 200 ms, a storm may cancel one or two statements in 20 s. With ``aim`` > 0,
    each round still fires once, at every matching backend, but waits up to ``aim`` seconds (polling
    every ~2 ms) for a moment when at least one of them is running a statement other than COMMIT.
    """
    dsn = dsn or _default_dsn()
    pids = tuple(pids)
    cluster = await asyncio.to_thread(find_cluster, dsn)
    fault = Fault("cancel_storm", seconds)
    log_from = _log_size(cluster)
    conn = await asyncpg.connect(dsn, timeout=5, server_settings={"application_name": STORM_APP})
    fault.begin()

    async def timeline():
        try:
            while time.monotonic() < fault.began + seconds:
                started = time.monotonic()
                try:
                    ports = await asyncio.to_thread(client_ports, pids, cluster.port) if pids else None
                    aim_until = started + aim
                    while True:
                        last_try = time.monotonic() >= aim_until
                        rows = await conn.fetch(_STORM_SQL, application, sorted(ports) if ports is not None else None,
                                                not last_try, timeout=5)
                        if rows and not last_try:
                            fault.aimed += 1
                        if rows or last_try:
                            break
                        await asyncio.sleep(0.002)
                    fault.rounds += 1
                    t = round(time.monotonic() - fault.began, 2)
                    fault.cancelled += [(t, r["pid"], r["application_name"], r["state"] or "")
                                        for r in rows if r["cancelled"]]
                    fault.active_hit.update(r["query"] for r in rows if r["cancelled"] and r["state"] == "active")
                except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
                    fault.storm_errors.append(repr(exc))
                await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))
        finally:
            fault.end()

    try:
        async with _window(fault, dsn, cluster, timeline) as f:
            yield f
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.close(), 2)
        pids_hit = {pid for _, pid, _, _ in fault.cancelled}
        fault.statements_cancelled = _count_cancelled_in_log(cluster, log_from, pids_hit)


# every matching backend, cancelled in one statement (one snapshot of pg_stat_activity); with $3,
# only when at least one of them is running a statement a cancel can interrupt (not a COMMIT, which
# holds interrupts off: most "active" backends a blind storm catches are committing)
_STORM_SQL = """
WITH targets AS (
    SELECT pid, application_name, state, left(query, 60) AS query FROM pg_stat_activity
    WHERE datname = current_database() AND application_name LIKE $1 AND backend_type = 'client backend'
      AND pid <> pg_backend_pid() AND ($2::int[] IS NULL OR client_port = ANY($2::int[])))
SELECT pid, application_name, state, query, pg_cancel_backend(pid) AS cancelled FROM targets
WHERE NOT $3::boolean OR EXISTS (SELECT 1 FROM targets WHERE state = 'active' AND query !~* '^\\s*(commit|end)\\M')
"""


def _default_dsn() -> str:
    from services.kernel.settings import Settings
    return Settings().database_url


# --- helpers: whose connections, and what the server logged -------------------------------------------


def client_ports(pids: Iterable[int], server_port: int) -> set[int]:
    """Local TCP ports of the connections to ``server_port`` that processes ``pids`` (or children) hold."""
    inodes: set[str] = set()
    for pid in {*pids, *process_tree.descendants(pids)}:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) > 9 and cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == server_port:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def _log_size(cluster: Cluster) -> int | None:
    try:
        return cluster.log_file.stat().st_size if cluster.log_file else None
    except OSError:
        return None


_CANCELLED_LINE = re.compile(r"\[(\d+)\] [^\n]*ERROR:  canceling statement due to user request")


def _count_cancelled_in_log(cluster: Cluster, offset: int | None, pids: set[int]) -> int | None:
    """Statements of ``pids`` the server reports as cancelled since ``offset`` (None: log unreadable)."""
    if offset is None or cluster.log_file is None:
        return None
    try:
        with open(cluster.log_file, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
    except OSError:
        return None
    return sum(1 for m in _CANCELLED_LINE.finditer(text) if int(m.group(1)) in pids)
