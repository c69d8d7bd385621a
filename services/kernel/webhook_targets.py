"""Which URLs may be webhook targets: the rule, checked where a channel registers a URL (the purchase
service's registry) and again on every connection the notification webhook sender opens
(``services/notification/targets.py`` holds that connector).

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
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx  # URLs are parsed as the webhook sender's HTTP client parses them

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


def ip_literal(host: str) -> IPAddress | None:
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
    literal = ip_literal(host.rstrip("."))
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
