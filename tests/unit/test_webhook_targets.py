"""Webhook targets (issue 10): which URLs Bubuh calls, decided with a stub resolver.

No test here opens a socket: names are answered by ``StaticResolver`` without a fallback (no DNS),
and the connector's inner network backend is a recorder that refuses every connect.
"""

from __future__ import annotations

import httpcore
import pytest

from services.kernel import webhook_targets
from services.kernel.webhook_targets import StaticResolver, TargetRefused, check_registration
from services.notification import targets
from services.notification.targets import GuardedNetwork

PUBLIC = "8.8.8.8"          # a global address: answered by the stub, never connected to


def stub(**answers: str | list[str]) -> StaticResolver:
    return StaticResolver({name.replace("_", "."): [a] if isinstance(a, str) else a for name, a in answers.items()})


async def refused(url: str, resolver: StaticResolver | None = None, *, local_mode: bool = False) -> TargetRefused:
    with pytest.raises(TargetRefused) as caught:
        await check_registration(url, resolver or stub(), local_mode=local_mode)
    return caught.value


FORBIDDEN_LITERALS = {
    "https://127.0.0.1/hook": "loopback",
    "https://127.8.9.10:8443/": "loopback",
    "https://[::1]/": "loopback",
    "https://10.1.2.3/": "private",
    "https://172.16.0.1/": "private",
    "https://192.168.1.1/": "private",
    "https://100.64.0.1/": "carrier-grade NAT",
    "https://169.254.10.20/": "link-local",
    "https://169.254.169.254/latest/meta-data/": "metadata",
    "https://[fd00:ec2::254]/": "metadata",
    "https://[fe80::1]/": "link-local",
    "https://[fd12:3456::1]/": "private",
    "https://[::ffff:127.0.0.1]/": "loopback address (inside an IPv6 address)",
    "https://[::ffff:169.254.169.254]/": "metadata address (inside an IPv6 address)",
    "https://[::ffff:10.0.0.1]/": "private address (inside an IPv6 address)",
    "https://[64:ff9b::a9fe:a9fe]/": "metadata address (inside an IPv6 address)",     # NAT64 of 169.254.169.254
    "https://[2002:a00:1::]/": "private address (inside an IPv6 address)",            # 6to4 of 10.0.0.1
    "https://0.0.0.0/": "unspecified",
    "https://[::]/": "unspecified",
    "https://0.1.2.3/": "non-global",
    "https://224.0.0.1/": "multicast",
    "https://[ff02::1]/": "multicast",
    "https://240.0.0.1/": "reserved",
    "https://255.255.255.255/": "reserved",
}


@pytest.mark.parametrize("url", sorted(FORBIDDEN_LITERALS))
async def test_addresses_outside_the_public_internet_are_refused(url):
    e = await refused(url)
    assert e.code.code == "WEBHOOK_TARGET_FORBIDDEN" and FORBIDDEN_LITERALS[url] in e.detail


@pytest.mark.parametrize("url", ["http://2130706433/", "https://2130706433/", "https://0x7f.1/",
                                 "https://0x7f000001/", "https://0177.0.0.1/", "https://127.1/",
                                 "https://017700000001/", "https://10.1/", "https://1.2.3.04/",
                                 "https://hooks.example.0x7f/"])
async def test_numeric_hosts_other_than_dotted_quads_are_refused_not_parsed(url):
    e = await refused(url, local_mode=True)          # even in local mode: these are never parsed
    assert e.code.code == "WEBHOOK_TARGET_FORBIDDEN"


async def test_names_are_resolved_and_every_answer_must_be_public():
    resolver = stub(lo_example="127.0.0.1", private_example="10.9.8.7", meta_example="169.254.169.254",
                    mapped_example="::ffff:192.168.0.1", mixed_example=[PUBLIC, "10.0.0.1"],
                    good_example=[PUBLIC, "2001:4860:4860::8888"])
    for name, why in [("lo.example", "loopback"), ("private.example", "private"), ("meta.example", "metadata"),
                      ("mapped.example", "private"), ("mixed.example", "private")]:
        e = await refused(f"https://{name}/hooks", resolver)
        assert e.code.code == "WEBHOOK_TARGET_FORBIDDEN" and why in e.detail, (name, e)
    await check_registration("https://good.example:8443/hooks?x=1", resolver, local_mode=False)
    e = await refused("https://unknown.example/", resolver)        # no answer: nothing can be checked
    assert "does not resolve" in e.detail


async def test_http_is_refused_outside_local_mode_and_goes_to_loopback_only_inside_it():
    resolver = stub(good_example=PUBLIC, lo_example="127.0.0.1")
    for url in ("http://good.example/", "http://127.0.0.1:8000/", "http://lo.example/"):
        assert (await refused(url, resolver)).code.code == "WEBHOOK_SCHEME_FORBIDDEN"
    assert (await refused("http://good.example/", resolver, local_mode=True)).code.code == "WEBHOOK_SCHEME_FORBIDDEN"
    assert (await refused("ftp://good.example/", resolver, local_mode=True)).code.code == "WEBHOOK_SCHEME_FORBIDDEN"
    for url in ("http://127.0.0.1:8000/", "http://lo.example:8000/", "https://127.0.0.1/", "https://good.example/"):
        await check_registration(url, resolver, local_mode=True)
    # local mode opens loopback, nothing else
    assert "private" in (await refused("https://10.0.0.1/", resolver, local_mode=True)).detail


async def test_credentials_in_the_url_are_refused():
    e = await refused("https://user:pass@good.example/", stub(good_example=PUBLIC))
    assert e.code.code == "WEBHOOK_TARGET_FORBIDDEN" and "user:password" in e.detail


def test_the_hosts_setting_is_checked_like_dns_and_star_means_no_dns():
    r = StaticResolver.from_setting("a.example=8.8.8.8|9.9.9.9, b.example=10.0.0.1,*=")
    assert r.answers == {"a.example": ["8.8.8.8", "9.9.9.9"], "b.example": ["10.0.0.1"]} and r.fallback is None
    assert isinstance(StaticResolver.from_setting("a.example=8.8.8.8", webhook_targets.SystemResolver()).fallback,
                      webhook_targets.SystemResolver)
    with pytest.raises(ValueError):
        StaticResolver.from_setting("no-equals-sign")


# --- the connector: checked again at every connection, pinned to the checked address ------------------


class Recorder(httpcore.AsyncNetworkBackend):
    """The inner network backend: records what it was asked to connect to and connects to nothing."""

    def __init__(self) -> None:
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connects.append((host, port))
        raise httpcore.ConnectError("recorder: no sockets in unit tests")

    async def sleep(self, seconds):  # pragma: no cover - unused
        pass


class Rebinding(StaticResolver):
    """A name that answers a public address first (the registration) and then a forbidden one."""

    def __init__(self, first: str, then: str) -> None:
        super().__init__({})
        self.sequence = [first, then]

    async def resolve(self, host, port):
        self.asked.append(host)
        return [self.sequence[min(len(self.asked), 2) - 1]]


@pytest.mark.parametrize("then", ["10.0.0.7", "127.0.0.1", "169.254.169.254", "::ffff:172.16.0.1"])
async def test_a_name_that_rebinds_after_registration_is_refused_at_connect_and_nothing_connects(then):
    resolver = Rebinding(PUBLIC, then)
    await check_registration("https://rebind.example/hooks", resolver, local_mode=False)      # public: accepted
    inner = Recorder()
    network = GuardedNetwork(resolver, scheme="https", local_mode=False, inner=inner)
    with pytest.raises(TargetRefused) as caught:
        await network.connect_tcp("rebind.example", 443)
    assert caught.value.code.code == "WEBHOOK_TARGET_FORBIDDEN"
    assert resolver.asked == ["rebind.example", "rebind.example"] and inner.connects == []


async def test_the_connector_connects_to_the_address_it_checked_never_to_the_name():
    resolver = stub(good_example=[PUBLIC, "9.9.9.9"])
    inner = Recorder()
    network = GuardedNetwork(resolver, scheme="https", local_mode=False, inner=inner)
    with pytest.raises(httpcore.ConnectError):
        await network.connect_tcp("good.example", 443)
    # the checked addresses, as IP literals: the inner backend has nothing left to resolve
    assert inner.connects == [(PUBLIC, 443), ("9.9.9.9", 443)] and resolver.asked == ["good.example"]


async def test_the_connector_refuses_plain_http_outside_local_mode_and_unix_sockets():
    inner = Recorder()
    network = GuardedNetwork(stub(good_example=PUBLIC), scheme="http", local_mode=False, inner=inner)
    with pytest.raises(TargetRefused) as caught:
        await network.connect_tcp("good.example", 80)
    assert caught.value.code.code == "WEBHOOK_SCHEME_FORBIDDEN"
    with pytest.raises(TargetRefused):
        await network.connect_unix_socket("/var/run/docker.sock")
    assert inner.connects == []


async def test_the_client_the_dispatcher_uses_checks_every_connection(monkeypatch):
    """Through httpx itself (the dispatcher's client): the check is in the connection path, whatever
    httpx would have done with the URL; proxies from the environment are ignored."""
    import httpx
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")      # a proxy would resolve past the check
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    inner = Recorder()
    client = targets.guarded_client(stub(meta_example="169.254.169.254", good_example=PUBLIC), local_mode=False,
                                    timeout=httpx.Timeout(2), limits=httpx.Limits(max_connections=4), headers={},
                                    inner=inner)
    async with client:
        with pytest.raises(TargetRefused):
            await client.post("https://meta.example/latest/meta-data/", content=b"{}")
        with pytest.raises(TargetRefused):
            await client.post("http://meta.example/", content=b"{}")
        with pytest.raises(httpx.ConnectError):
            await client.post("https://good.example/", content=b"{}")
    assert inner.connects == [(PUBLIC, 443)]


async def test_a_registration_whose_name_never_answers_is_refused_in_bounded_time(monkeypatch):
    import asyncio

    class Hanging(StaticResolver):
        async def resolve(self, host, port):
            await asyncio.Event().wait()

    monkeypatch.setattr(webhook_targets, "REGISTRATION_RESOLVE_TIMEOUT_S", 0.1)
    e = await refused("https://slow.example/", Hanging({}))
    assert e.code.code == "WEBHOOK_TARGET_FORBIDDEN" and "does not resolve" in e.detail
