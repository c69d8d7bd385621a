"""Fixtures shared by every test tier: the real stack, started once per run, and isolation per test."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil

import asyncpg
import pytest
import structlog
from aiokafka.admin import AIOKafkaAdminClient

from services.kernel import kafka_auth, logs
from tests import platform as platform_processes
from tests import stack

# The suite is CPU-bound on two shared cores, so a test's cost to the run is its CPU, not its wall time:
# each report carries the CPU its phase used in the test process and in the processes it started and
# waited for (a platform and its fork server's children, a JVM, a `bubuh` command), and the summary
# lists the tests that used the most, beside pytest's slowest by wall time. A process counts when it is
# reaped: a module's shared platform lands on the test whose teardown stops it; a process not waited for
# (an orphaned grandchild) does not count.
CPU_SUMMARY = int(os.environ.get("BUBUH_TEST_CPU_SUMMARY", "15"))   # how many: all of them for a per-file sum


def _cpu_s() -> float:
    me, waited = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + waited.ru_utime + waited.ru_stime


_CPU_MARK = pytest.StashKey[float]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    item.stash[_CPU_MARK] = _cpu_s()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    now = _cpu_s()
    report.user_properties.append(("cpu_s", now - item.stash.get(_CPU_MARK, now)))
    item.stash[_CPU_MARK] = now


def pytest_terminal_summary(terminalreporter):
    cpu: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            for key, value in getattr(report, "user_properties", ()):
                if key == "cpu_s":
                    cpu[report.nodeid] = cpu.get(report.nodeid, 0.0) + value
    if not cpu:
        return
    terminalreporter.write_sep("=", f"most CPU, {CPU_SUMMARY} tests (in the test process and the processes it "
                                    f"waited for; all tests: {sum(cpu.values()):.0f} s)")
    for nodeid, seconds in sorted(cpu.items(), key=lambda kv: -kv[1])[:CPU_SUMMARY]:
        terminalreporter.write_line(f"{seconds:7.1f}s  {nodeid}")


@pytest.fixture(autouse=True)
def _suite_logging():
    """A test that reconfigures logging leaves the suite's as it found it. ``cli.main`` run in-process
    configures it on the ``sys.stderr`` pytest's capture gives the test, which is closed once the test ends,
    and a logger first used later in the same worker wrote to it: ``ValueError: I/O operation on closed
    file`` in an integration test that ran after tests/unit/test_kafka_cli.py (fresh-clone CI, 7 December
    23:39)."""
    before = structlog.get_config()["logger_factory"]
    yield
    if structlog.get_config()["logger_factory"] is not before:
        logs.configure("tests", level="warning", fmt="console")


@pytest.fixture(scope="session", autouse=True)
def _platform_logs(tmp_path_factory):
    """Platform processes keep their logs for a failing test's report, under pytest's temporary
    directory: pytest keeps the last three runs' and removes older ones."""
    platform_processes.LOG_ROOT = tmp_path_factory.mktemp("platform-logs")


@pytest.fixture(scope="session")
def local_stack():
    """Kafka + PostgreSQL from deploy/local (or the ones BUBUH_KAFKA_BOOTSTRAP / BUBUH_DATABASE_URL name)."""
    stack.stack_up()
    logs.configure("tests", level="warning", fmt="console")
    _dev_ca()
    return True


@pytest.fixture(scope="session")
def pki(local_stack):
    """The stack's test PKI (root, issuing CA, signer, OCSP, CRLs, TSAs), served while the stack runs."""
    from services.kernel.settings import Settings
    from services.stamping.signing import dev_pki

    found = dev_pki.existing(Settings().pki_dir)
    assert found is not None, "the stack makes the PKI (bubuh keys dev-pki) when it starts"
    return found


def _dev_ca() -> None:
    """The stamping workers sign with the dev CA's issuer key (as `make setup` makes it)."""
    from services.kernel.settings import Settings
    from services.stamping.signing import dev_ca
    where = Settings().keys_dir
    if not (where / "issuer-rsa2048.p12").exists():
        dev_ca.dev_ca(where, "rsa2048")


@pytest.fixture(scope="module")
def own_database(local_stack):
    """A PostgreSQL cluster of this module's own (``stack.own_postgres``), for ``@pytest.mark.own_database``."""
    if not stack.managed_postgres():
        pytest.skip("needs the local PostgreSQL (Debian's clusters) to make a cluster of its own")
    with stack.own_postgres() as url:
        yield url


def _shares_platform(request) -> bool:
    """``@pytest.mark.shared_platform`` (a module's tests, each with a channel of its own, on one platform);
    a test that also asks for ``platform_env`` gets a platform and settings of its own."""
    node = request.node
    return node.get_closest_marker("shared_platform") is not None and node.get_closest_marker("platform_env") is None


@contextlib.asynccontextmanager
async def _isolated(request):
    overrides = {}
    if request.node.get_closest_marker("own_database"):
        overrides["database_url"] = request.getfixturevalue("own_database")
    s = stack.isolated_settings(**overrides)
    await asyncio.to_thread(stack.grant_prefix, s)
    try:
        yield s
    finally:
        await _cleanup(s)
        with contextlib.suppress(Exception):
            await asyncio.to_thread(stack.revoke_prefix, s)


@pytest.fixture(scope="module")
async def module_settings(local_stack, request):
    async with _isolated(request) as s:
        yield s


@pytest.fixture
async def per_test_settings(local_stack, request):
    async with _isolated(request) as s:
        yield s


@pytest.fixture
def settings(request):
    """The test's isolated topics, schemas, consumer groups and port; the module's under ``shared_platform``.
    (A plain fixture that picks: an async fixture cannot ask for another while the loop runs.)"""
    return request.getfixturevalue("module_settings" if _shares_platform(request) else "per_test_settings")


async def _cleanup(s) -> None:
    # faust keeps a data directory per app id (the test's prefix): remove the test's own
    for leftover in (s.local_dir / "faust").glob(f"{s.topic_prefix}*") if s.topic_prefix else ():
        shutil.rmtree(leftover, ignore_errors=True)
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(s.database_url)
        try:
            for schema in await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname LIKE $1",
                                           s.schema_prefix + "%"):
                await conn.execute(f'DROP SCHEMA "{schema["nspname"]}" CASCADE')
        finally:
            await conn.close()
    with contextlib.suppress(Exception):
        admin = AIOKafkaAdminClient(**kafka_auth.aiokafka_options(s))
        await admin.start()
        try:
            names = [t for t in await admin.list_topics() if t.startswith(s.topic_prefix)]
            if names:
                await asyncio.wait_for(admin.delete_topics(names), 20)
        finally:
            await admin.close()


@pytest.fixture(scope="module")
async def module_platform(module_settings):
    from tests.platform import PlatformProcess
    proc = await PlatformProcess(module_settings).start()
    yield proc
    await proc.stop()


@pytest.fixture
async def per_test_platform(settings, request):
    from tests.platform import PlatformProcess
    marker = request.node.get_closest_marker("platform_env")
    proc = await PlatformProcess(settings, **(marker.kwargs if marker else {})).start()
    yield proc
    await proc.stop()


@pytest.fixture
def platform(settings, request):
    """The whole platform (all services, one process) on the test's isolated topics and schemas;
    ``@pytest.mark.platform_env(NAME=value)`` adds to its environment; under ``@pytest.mark.shared_platform``
    the module's one platform, which its tests share (each test keeps to a channel of its own)."""
    return request.getfixturevalue("module_platform" if _shares_platform(request) else "per_test_platform")


@pytest.fixture
async def api(platform, settings):
    import httpx
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as client:
        yield client


@pytest.fixture
def channel(settings, local_stack):
    from tests.platform import add_channel
    return add_channel(settings)
