"""Which URLs may be webhook targets, and the connector that holds the dispatcher to that answer.

A webhook URL is chosen by a channel, an outside organisation. Left unchecked it makes Bubuh a
proxy into its own network: loopback admin ports, private ranges, the cloud metadata service
(169.254.169.254, fd00:ec2::254). The rule:

- ``https://`` only. Local mode (``BUBUH_WEBHOOK_LOCAL_MODE``, for ``make run`` and the tests)
  also accepts loopback targets, and ``http://`` to loopback only.
- No ``user:password@``; the host is a name, a dotted-quad IPv4 or a bracketed IPv6 literal. The
  other numeric forms ``inet_aton`` accepts (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``)
  are refused rather than parsed: two parsers that disagree are how such checks are bypassed.
- Every address the name resolves to must be globally routable unicast; IPv6 forms that carry an
  IPv4 address (mapped, NAT64, 6to4) are judged by that IPv4 address.

The check runs at registration and again whenever the dispatcher's HTTP client opens a
connection: :class:`GuardedNetwork` sits under httpx, resolves the name once, checks every answer
and connects to a checked address itself, so the client never resolves again (DNS rebinding
between the check and the connect changes nothing). The URL, and with it the Host header and the
TLS server name, stay the original ones.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpcore
import httpx

from services.kernel import errors

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
REGISTRATION_RESOLVE_TIMEOUT_S = 10.0

_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}
_PRIVATE = [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")]
_SHARED = ipaddress.ip_network("100.64.0.0/10")          # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_COMPATIBLE = ipaddress.ip_network("::/96")              # deprecated IPv4-compatible IPv6
_NUMERIC_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|[0-9]+)$")
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD = re.compile(rf"^{_OCTET}(\.{_OCTET}){{3}}$")
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*\.?$")


class TargetRefused(Exception):
    """A webhook target Bubuh will not call. ``detail`` is our own wording, safe to show the channel."""

    def __init__(self, code: errors.ErrorCode, detail: str) -> None:
        super().__init__(f"{code.code}: {detail}")
        self.code = code
        self.detail = detail


class Unresolvable(Exception):
    """The name has no address (or the resolver failed); nothing was checked, nothing connected."""


class Resolver(Protocol):
    async def resolve(self, host: str, port: int) -> list[str]:
        """Every address ``host`` resolves to, as strings; raises on failure."""
        ...


class SystemResolver:
    """The operating system's resolver (getaddrinfo), asked once per call."""

    async def resolve(self, host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return [info[4][0] for info in infos]


class StaticResolver:
    """Fixed answers for some names (``BUBUH_WEBHOOK_HOSTS``, tests), the system's for the rest.

    The answers are checked exactly like DNS answers: this can point a name at an address, never
    past the rules."""

    def __init__(self, answers: Mapping[str, Iterable[str]], fallback: Resolver | None = None) -> None:
        self.answers = {name.lower().rstrip("."): list(addrs) for name, addrs in answers.items()}
        self.fallback = fallback
        self.asked: list[str] = []

    @classmethod
    def from_setting(cls, value: str, fallback: Resolver | None = None) -> StaticResolver:
        """``"name=addr[|addr...],name=addr"``; an entry ``*=`` means: no DNS for any other name."""
        answers: dict[str, list[str]] = {}
        for item in filter(None, (x.strip() for x in value.split(","))):
            name, sep, addrs = item.partition("=")
            name = name.strip()
            if not sep or not name:
                raise ValueError(f"BUBUH_WEBHOOK_HOSTS: {item!r} is not name=address")
            if name == "*":
                fallback = None
                continue
            answers.setdefault(name, []).extend(a.strip() for a in addrs.split("|") if a.strip())
        return cls(answers, fallback)

    async def resolve(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        found = self.answers.get(host.lower().rstrip("."))
        if found is not None:
            return list(found)
        if self.fallback is None:
            raise Unresolvable("no answer")
        return await self.fallback.resolve(host, port)


def resolver_for(hosts_setting: str) -> Resolver:
    return StaticResolver.from_setting(hosts_setting, SystemResolver()) if hosts_setting else SystemResolver()


# --- the rules --------------------------------------------------------------------------------


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: IPAddress, *, allow_loopback: bool = False) -> str | None:
    """Why Bubuh will not connect to ``ip`` (our wording), or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            ip = ipaddress.IPv6Address(str(ip).split("%", 1)[0])
        if ip.teredo is not None:
            return "Teredo address"
        inner = _embedded_ipv4(ip)
        if inner is not None:
            why = refusal(inner, allow_loopback=allow_loopback)
            return f"{why} (inside an IPv6 address)" if why else None
    if ip in _METADATA:
        return "cloud metadata address"
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_loopback:
        return None if allow_loopback else "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_multicast:
        return "multicast address"
    if ip in _SHARED:
        return "shared (carrier-grade NAT) address"
    if any(ip in n for n in _PRIVATE):
        return "private address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local:
        return "site-local address"
    if ip.is_reserved:
        return "reserved address"
    if ip.is_private or not ip.is_global:
        return "special-purpose (non-global) address"
    return None


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str          # lower case, no brackets, no trailing dot
    port: int
    literal: IPAddress | None


def _ip_literal(host: str) -> IPAddress | None:
    """The host as an IP address if it is one; refuses numeric forms other than a dotted quad."""
    if ":" in host:                                 # only a bracketed IPv6 literal gets here with ':'
        if "%" in host:
            raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN, "IPv6 zone identifiers are not accepted")
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN, "the host is not a valid IPv6 address") from None
    if _DOTTED_QUAD.match(host):
        return ipaddress.IPv4Address(host)
    labels = host.split(".")
    # what inet_aton (and browsers, for the last label) would read as a number: 2130706433, 0x7f.1,
    # 0177.0.0.1, 127.1, 1.2.3.04
    if _NUMERIC_PART.match(labels[-1]) or (len(labels) <= 4 and all(_NUMERIC_PART.match(x) for x in labels)):
        raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN,
                            "numeric host in a form other than a dotted quad (a.b.c.d, no leading zeros)")
    return None


def check_url(url: str, *, local_mode: bool) -> Target:
    """What can be decided from the URL alone (parsed as the HTTP client parses it)."""
    try:
        u = httpx.URL(url)
    except Exception:  # noqa: BLE001 - any parse failure: not a URL we can call
        raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN, "not a valid URL") from None
    if u.scheme not in ("https", "http"):
        raise TargetRefused(errors.WEBHOOK_SCHEME_FORBIDDEN, f"scheme {u.scheme or '(none)'!r}: use https")
    if u.scheme == "http" and not local_mode:
        raise TargetRefused(errors.WEBHOOK_SCHEME_FORBIDDEN, "plain http: use https")
    if u.userinfo:
        raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN, "user:password in the URL")
    host = u.host.lower()
    if not host:
        raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN, "no host")
    literal = _ip_literal(host.rstrip("."))
    if literal is None and not _HOST_NAME.match(host):
        raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN, "the host is not a valid DNS name")
    port = u.port or (443 if u.scheme == "https" else 80)
    target = Target(u.scheme, host.rstrip("."), port, literal)
    if literal is not None:
        check_address(target, literal, local_mode=local_mode)
    return target


def check_address(target: Target, ip: IPAddress, *, local_mode: bool) -> None:
    why = refusal(ip, allow_loopback=local_mode)
    if why is not None:
        raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN, why)
    if target.scheme == "http" and (not local_mode or refusal(ip) is None):
        # local mode's plain http is for receivers on this machine, never across a network
        raise TargetRefused(errors.WEBHOOK_SCHEME_FORBIDDEN, "plain http (local mode allows it to loopback only)")


def _parse_answer(answer: str) -> IPAddress:
    try:
        return ipaddress.ip_address(answer.split("%", 1)[0])
    except ValueError:
        raise Unresolvable(f"resolver answered {answer[:60]!r}") from None


async def resolve_checked(target: Target, resolver: Resolver, *, local_mode: bool) -> list[IPAddress]:
    """Every address of the target, all checked; raises TargetRefused if any one is refused."""
    if target.literal is not None:
        check_address(target, target.literal, local_mode=local_mode)
        return [target.literal]
    try:
        answers = await resolver.resolve(target.host, target.port)
    except TargetRefused:
        raise
    except Exception as exc:  # noqa: BLE001 - NXDOMAIN, SERVFAIL, timeout: the name has no usable answer
        raise Unresolvable(type(exc).__name__) from exc
    if not answers:
        raise Unresolvable("no addresses")
    addresses = list(dict.fromkeys(_parse_answer(a) for a in answers))
    for ip in addresses:          # one bad answer refuses the name: the client could pick any of them
        check_address(target, ip, local_mode=local_mode)
    return addresses


async def check_registration(url: str, resolver: Resolver, *, local_mode: bool) -> None:
    """For ``channel add --webhook`` and ``set-webhook``: the URL, and what its name resolves to now."""
    target = check_url(url, local_mode=local_mode)
    try:
        async with asyncio.timeout(REGISTRATION_RESOLVE_TIMEOUT_S):
            await resolve_checked(target, resolver, local_mode=local_mode)
    except (Unresolvable, TimeoutError):
        raise TargetRefused(errors.WEBHOOK_TARGET_FORBIDDEN,
                            f"{target.host} does not resolve, so its addresses cannot be checked") from None


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
        target = Target(self._scheme, name, port, _ip_literal(name))
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
    def __init__(self, network: GuardedNetwork, limits: httpx.Limits) -> None:
        super().__init__(limits=limits, trust_env=False)
        # httpx does not take a network backend; httpcore's pool (public API) does. The pool httpx
        # built is replaced before any use; the dispatcher tests prove this one is the one used.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(), max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry, network_backend=network)


def guarded_client(resolver: Resolver, *, local_mode: bool, timeout: httpx.Timeout, limits: httpx.Limits,
                   headers: Mapping[str, str], inner: httpcore.AsyncNetworkBackend | None = None) -> httpx.AsyncClient:
    """The dispatcher's HTTP client: every new connection checked, redirects not followed, no proxy
    from the environment (a proxy would resolve the name itself, past the check)."""
    def transport(scheme: str) -> _GuardedTransport:
        return _GuardedTransport(GuardedNetwork(resolver, scheme=scheme, local_mode=local_mode, inner=inner), limits)
    return httpx.AsyncClient(mounts={"http://": transport("http"), "https://": transport("https")},
                             transport=transport("https"), timeout=timeout, follow_redirects=False,
                             trust_env=False, headers=dict(headers))
