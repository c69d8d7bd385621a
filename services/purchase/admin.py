"""``bubuh channel ...``: the registry from the command line.

The change is committed with its outbox row; then the command publishes that row itself, so the
channel works at once even when no purchase service is running (the relay would otherwise do it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json

from services.kernel import migrations, runtime, topics
from services.kernel.outbox import Relay
from services.kernel.settings import Settings
from services.purchase import NAME
from services.purchase.registry import Registry, RegistryError


async def channel_command(settings: Settings, args) -> None:
    pool = await runtime.connect_database(settings, NAME)
    try:
        await migrations.migrate(pool, settings.schema(NAME), migrations.files_for(NAME))
        registry = Registry(pool, settings)
        try:
            out = await _dispatch(registry, args)
        except RegistryError as exc:
            raise runtime.ConfigError(str(exc)) from None
        if args.channel_command != "list":
            await _publish_now(settings, pool)
        print(out)
    finally:
        await pool.close()


async def _dispatch(registry: Registry, args) -> str:
    cmd = args.channel_command
    if cmd == "add":
        c = await registry.add(args.name, webhook_url=args.webhook, default_profile=args.profile)
        if args.json:
            return json.dumps({"channel_id": c.channel_id, "api_key": c.api_key, "hmac_secret": c.hmac_secret})
        return (f"channel {c.channel_id} ({args.name}) added\n  api key:     {c.api_key}\n"
                f"  hmac secret: {c.hmac_secret}\nKeep both: they are shown only now.")
    if cmd == "list":
        rows = await registry.list()
        if args.json:
            return json.dumps([{k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in r.items()}
                               for r in rows])
        lines = [f"{'channel':16} {'status':10} {'profile':9} {'version':7} name / webhook"]
        lines += [f"{r['channel_id']:16} {r['status']:10} {r['default_profile']:9} {r['version']:<7} "
                  f"{r['name']} {r['webhook_url']}" for r in rows]
        return "\n".join(lines)
    if cmd == "rotate-key":
        c = await registry.rotate_key(args.channel_id)
        return json.dumps({"channel_id": c.channel_id, "api_key": c.api_key}) if args.json else \
            f"channel {c.channel_id}: new api key {c.api_key} (the old one no longer works)"
    if cmd == "rotate-secret":
        c = await registry.rotate_secret(args.channel_id, dt.timedelta(hours=args.grace_hours))
        return json.dumps({"channel_id": c.channel_id, "hmac_secret": c.hmac_secret}) if args.json else \
            (f"channel {c.channel_id}: new hmac secret {c.hmac_secret} "
             f"(the previous one is accepted for {args.grace_hours:g} h)")
    if cmd == "set-webhook":
        await registry.set_webhook(args.channel_id, args.url)
        return json.dumps({"channel_id": args.channel_id, "webhook_url": args.url}) if args.json else \
            f"channel {args.channel_id}: webhook {args.url or '(none)'}"
    status = "suspended" if cmd == "suspend" else "active"
    await registry.set_status(args.channel_id, status)
    return json.dumps({"channel_id": args.channel_id, "status": status}) if args.json else \
        f"channel {args.channel_id}: {status}"


async def _publish_now(settings: Settings, pool) -> None:
    try:
        producer = await runtime.connect_kafka(settings, "bubuh-cli")
    except runtime.ConfigError as exc:
        import sys
        print(f"bubuh: saved, not yet published ({exc}); the purchase service publishes it when it runs",
              file=sys.stderr)
        return
    try:
        await topics.ensure(settings, (topics.CHANNEL,))
        while await Relay(pool, producer, settings, NAME).publish_due():
            pass
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
