"""The connector that holds the webhook sender to the target rule (``services/kernel/webhook_targets.py``).

The rule is checked at registration and again whenever the webhook sender's HTTP client opens a
connection: :class:`GuardedNetwork` sits under httpx, resolves the name once, checks every answer
and connects to a checked address itself, so the client never resolves again (DNS rebinding
between the check and the connect changes nothing). The URL, and with it the Host header and the
TLS server name, stay the original ones.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

import httpcore
import httpx

from services.kernel import errors
from services.kernel.webhook_targets import Resolver, Target, TargetRefused, ip_literal, resolve_checked

# --- the connector under the HTTP client ---------------------------------------------------------


class GuardedNetwork(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the check in front of every new connection.

    httpcore calls ``connect_tcp`` with the URL's host whenever it opens a connection (a reused
    keep-alive connection was checked when it opened). Here the name is resolved once, every
    answer is checked, and the inner backend is handed an IP address, so nothing resolves again.
    TLS is started by httpcore afterwards with the URL's host as server name (SNI and certificate)."""

    def __init__(self, resolver: Resolver, *, scheme: str, local_mode: bool,
                 inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._resolver = resolver
        self._scheme = scheme          # httpcore does not pass it down: one backend per scheme
        self._local_mode = local_mode
        self._inner = inner or httpcore.AnyIOBackend()

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options=None) -> httpcore.AsyncNetworkStream:
        if self._scheme == "http" and not self._local_mode:
            raise TargetRefused(errors.WEBHOOK_SCHEME_FORBIDDEN, "plain http: use https")
        name = host.lower().rstrip(".")
        target = Target(self._scheme, name, port, ip_literal(name))
        addresses = await resolve_checked(target, self._resolver, local_mode=self._local_mode)
        last: Exception | None = None
        for ip in addresses[:2]:                 # a second address if the first refuses, no more
            try:
                return await self._inner.connect_tcp(str(ip), port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    async def connect_unix_socket(self, path: str, timeout: float | None = None, socket_options=None):
        raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN, "unix sockets are not webhook targets")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _GuardedTransport(httpx.AsyncHTTPTransport):
    def __init__(self, network: GuardedNetwork, limits: httpx.Limits, ssl_context: ssl.SSLContext) -> None:
        super().__init__(verify=ssl_context, limits=limits, trust_env=False)
        # httpx does not take a network backend; httpcore's pool (public API) does. The pool httpx
        # built is replaced before any use; the webhook sender tests prove this one is the one used.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context, max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=network)


def guarded_client(resolver: Resolver, *, local_mode: bool, timeout: httpx.Timeout, limits: httpx.Limits,
                   headers: Mapping[str, str], inner: httpcore.AsyncNetworkBackend | None = None) -> httpx.AsyncClient:
    """The webhook sender's HTTP client: every new connection checked, redirects not followed, no proxy
    from the environment (a proxy would resolve the name itself, past the check). One TLS context
    (the system's trust store, certificates and names verified) for its transports: loading the store
    costs ~0.1 s of CPU each time."""
    tls = httpx.create_ssl_context()

    def transport(scheme: str) -> _GuardedTransport:
        return _GuardedTransport(GuardedNetwork(resolver, scheme=scheme, local_mode=local_mode, inner=inner),
                                 limits, tls)
    return httpx.AsyncClient(mounts={"http://": transport("http"), "https://": transport("https")},
                             transport=transport("https"), timeout=timeout, follow_redirects=False,
                             trust_env=False, headers=dict(headers))
