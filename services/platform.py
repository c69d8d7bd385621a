"""The whole platform in one process, or one tier per process: which service runs what here.

``bubuh serve`` runs every service's HTTP routes and workers (the local all-in-one mode);
``--api`` and ``--workers`` pick a subset, which is how production runs a tier per deployment
and how the tests kill one service without the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable

import uvicorn

from services.kernel import http, http_protocol, inbox, logs, runtime
from services.kernel.dead_letter_sizes import DeadLetterSizes
from services.kernel.runtime import ConfigError, Runtime
from services.kernel.settings import Settings
from services.kernel.waiting import wait_or_stop
from services.notification import service as notification_service
from services.purchase import service as purchase_service
from services.quota import service as quota_service
from services.stamping import service as stamping_service

log = logs.get(__name__)

SERVICES = {
    "purchase": purchase_service,
    "quota": quota_service,
    "stamping": stamping_service,
    "notification": notification_service,
}


def parse_names(value: str) -> list[str]:
    if value in ("", "none"):
        return []
    names = list(SERVICES) if value == "all" else [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in SERVICES]
    if unknown:
        raise ConfigError(f"unknown service {', '.join(unknown)}: choose from {', '.join(SERVICES)}, all or none")
    return names


async def serve(settings: Settings, api: list[str], workers: list[str],
                on_ready: Callable[[], None] | None = None) -> None:
    for name in dict.fromkeys(api + workers):
        # what a service refuses in its settings is said before a connection is tried (seconds, with SCRAM)
        check = getattr(SERVICES[name], "check", None)
        if check:
            check(settings, worker=name in workers)
    if api:
        runtime.check_port_free(settings.http_host, settings.http_port, shared=settings.http_reuse_port)
    if settings.metrics_port and (not api or settings.http_reuse_port):
        runtime.check_port_free(settings.http_host, settings.metrics_port, "BUBUH_METRICS_PORT")
    rt = await runtime.start(settings, client_id="bubuh-" + "-".join(sorted(set(api) | set(workers))))
    tasks: list[runtime.Task] = [rt.channels.run]
    try:
        for name in workers:
            tasks += await SERVICES[name].workers(rt)
            tasks.append(inbox.Pruner(await rt.pool(name), name, settings.inbox_retention_s).run)
        if workers:
            tasks.append(DeadLetterSizes(settings, workers).run)
        if api:
            routers = [await SERVICES[name].router(rt) for name in api]
            tasks.append(_http_task(rt, routers, settings.http_port, shared=settings.http_reuse_port))
            tasks += rt.background
            if settings.http_reuse_port and settings.metrics_port:
                # the shared port answers from any member: this member's own metrics are here
                tasks.append(_http_task(rt, [], settings.metrics_port))
        elif settings.metrics_port:
            # a worker-only process still shows its metrics (lag, outcomes) and a liveness probe
            tasks.append(_http_task(rt, [], settings.metrics_port))
    except BaseException:
        await rt.close()
        await rt.producer.stop()
        raise

    async def ready_when_loaded(stop: asyncio.Event) -> None:
        await wait_or_stop(rt.channels.loaded, stop)
        log.info("platform ready", api=api, workers=workers,
                 http=f"http://{settings.http_host}:{settings.http_port}" if api else None)
        if on_ready:
            on_ready()

    await runtime.run_until_stopped(rt, tasks + [ready_when_loaded])


def _shared_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening socket other processes of the API bind too (SO_REUSEPORT): the kernel spreads
    new connections over the members, so several interpreters serve one port."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def _http_task(rt: Runtime, routers, port: int, shared: bool = False) -> runtime.Task:
    app = http.create_app("Bubuh", routers, default_max_body_bytes=rt.settings.http_max_body_bytes,
                          keepalive_requests=rt.settings.http_keepalive_requests,
                          ticket_key=rt.settings.platform_key(), caller=rt.channels.channel_of,
                          door_busy_file=rt.settings.door_busy_file)

    async def run_http(stop: asyncio.Event) -> None:
        await wait_or_stop(rt.channels.loaded, stop)   # authenticate only once the channel view is whole
        # log_config=None: uvicorn's records reach the root handler (kernel/logs.py), in the platform's format
        # http: httptools with a bounded request head (kernel/http_protocol.py), not uvicorn's h11
        config = uvicorn.Config(app, host=rt.settings.http_host, port=port, log_level="warning", log_config=None,
                                access_log=False, lifespan="off", timeout_keep_alive=30, backlog=4096,
                                http=http_protocol.BoundedHead)
        server = uvicorn.Server(config)
        server.install_signal_handlers = lambda: None
        sockets = [_shared_socket(rt.settings.http_host, port, config.backlog)] if shared else None
        serving = asyncio.create_task(server.serve(sockets=sockets))
        await _wait_either(stop, serving)
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(serving, 10)

    return run_http


async def _wait_either(stop: asyncio.Event, task: asyncio.Task) -> None:
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([stopper, task], return_when=asyncio.FIRST_COMPLETED)
    stopper.cancel()
