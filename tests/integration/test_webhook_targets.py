"""Webhook targets on the whole stack (issue 10): the CLI refuses them, the platform will not call them.

The platform runs as in production, a subprocess with local mode off; the receiver listens on
127.0.0.1 and counts connections. Names are answered by ``BUBUH_WEBHOOK_HOSTS`` (no DNS).
"""

from __future__ import annotations

import httpx

from tests.component.test_webhook_targets import RawReceiver
from tests.flows import auth, wait_for
from tests.integration.test_notification_support import publish, stamp_completed
from tests.platform import PlatformProcess, add_channel, cli


async def test_the_cli_refuses_forbidden_webhooks_with_the_code_and_the_fix(settings):
    strict = settings.model_copy(update={"webhook_local_mode": False, "webhook_hosts": "metadata.example="
                                         "169.254.169.254,shop.example=8.8.8.8,*="})
    channel = add_channel(strict, "strict")
    for url, code in [("https://169.254.169.254/latest/meta-data/", "WEBHOOK_TARGET_FORBIDDEN"),
                      ("https://metadata.example/", "WEBHOOK_TARGET_FORBIDDEN"),
                      ("https://[::ffff:10.0.0.1]/", "WEBHOOK_TARGET_FORBIDDEN"),
                      ("http://shop.example/hooks", "WEBHOOK_SCHEME_FORBIDDEN")]:
        bad = cli(strict, "channel", "set-webhook", channel["channel_id"], url, check=False)
        assert bad.returncode == 2 and code in bad.stderr, (url, bad.stderr)
    bad = cli(strict, "channel", "add", "hostile", "--webhook", "http://2130706433/", check=False)
    assert bad.returncode == 2 and "WEBHOOK_" in bad.stderr
    cli(strict, "channel", "set-webhook", channel["channel_id"], "https://shop.example/hooks")   # public: fine


async def test_a_platform_outside_local_mode_sends_nothing_to_loopback(settings):
    async with RawReceiver() as receiver:
        plain = f"http://127.0.0.1:{receiver.port}/hooks"
        named = f"https://hooks.example:{receiver.port}/hooks"
        # registered where local mode allowed it (or the registry was bypassed, as issue 10 did through
        # the channel topic): the dispatcher must still refuse
        registering = settings.model_copy(update={"webhook_hosts": "hooks.example=127.0.0.1,*="})
        a = add_channel(registering, "plain", webhook=plain)
        b = add_channel(registering, "named", webhook=named)
        proc = await PlatformProcess(settings, api="notification", workers="notification",
                                     BUBUH_WEBHOOK_LOCAL_MODE="false",
                                     BUBUH_WEBHOOK_HOSTS="hooks.example=127.0.0.1,*=").start()
        try:
            records = [stamp_completed(settings, a["channel_id"]), stamp_completed(settings, b["channel_id"])]
            await publish(settings, records)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=30) as api:
                async def attempted(channel, record):
                    r = await api.get("/v1/deliveries", params={"event_id": record.event_id}, headers=auth(channel))
                    found = r.json()["deliveries"]
                    return found and found[0]["attempts"] >= 1 and found[0]
                first = await wait_for(lambda: attempted(a, records[0]), timeout=30, what="the plain-http attempt")
                second = await wait_for(lambda: attempted(b, records[1]), timeout=30, what="the named attempt")
            assert first["last_error"].startswith("WEBHOOK_SCHEME_FORBIDDEN")
            assert second["last_error"] == "WEBHOOK_TARGET_FORBIDDEN: loopback address"
            assert receiver.connections == 0
            refused = [r for r in proc.log_records() if r.get("event") == "webhook target refused"]
            assert {r["code"] for r in refused} == {"WEBHOOK_SCHEME_FORBIDDEN", "WEBHOOK_TARGET_FORBIDDEN"}
        finally:
            await proc.stop()
