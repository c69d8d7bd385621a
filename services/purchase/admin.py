"""``bubuh channel ...``: the registry from the command line.

The change is committed with its outbox row; then the command publishes that row itself, so the
channel works at once even when no purchase service is running (the relay would otherwise do it).

A channel also has a door into Kafka: its own SASL/SCRAM credential, whose ACLs allow writing
``purchase.submitted`` and nothing else (``services/kernel/access.py``). ``add`` creates it,
``rotate-key`` replaces its password, ``suspend`` removes its ACLs and credential (the ACLs first: that
takes effect on connections already open), ``activate`` issues a new one. The password is printed once,
only after the broker accepts it; the admin principal's credential makes these changes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json

from services.kernel import access, migrations, runtime, topics
from services.kernel.outbox import Relay
from services.kernel.settings import Settings
from services.purchase import NAME
from services.purchase.registry import Registry, RegistryError


async def channel_command(settings: Settings, args) -> None:
    print(await channel_change(settings, args))


async def channel_change(settings: Settings, args) -> str:
    """The command's work, its output returned (what ``bubuh channel ...`` prints)."""
    pool = await runtime.connect_database(settings, NAME)
    try:
        await migrations.migrate_service(pool, settings, NAME)
        registry = Registry(pool, settings)
        try:
            out = await _dispatch(registry, args)
        except RegistryError as exc:
            raise runtime.ConfigError(str(exc)) from None
        if args.channel_command != "list":
            await _publish_now(settings, pool)
            out = _with_kafka_credential(out, args, await _kafka_door(settings, args))
        return out
    finally:
        await pool.close()


async def add_channel(settings: Settings, name: str, *, webhook: str = "", profile: str = "standard") -> dict:
    """``bubuh channel add NAME --json``, in process: the new channel's credentials."""
    args = argparse.Namespace(channel_command="add", name=name, webhook=webhook, profile=profile, json=True)
    return json.loads(await channel_change(settings, args))


async def _dispatch(registry: Registry, args) -> str:
    cmd = args.channel_command
    if cmd == "add":
        c = await registry.add(args.name, webhook_url=args.webhook, default_profile=args.profile)
        args._added_channel_id = c.channel_id
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


KAFKA_DOOR_COMMANDS = ("add", "rotate-key", "suspend", "activate")


async def _kafka_door(settings: Settings, args) -> tuple[str, str] | None:
    """Create, rotate or disable the channel's Kafka credential and ACLs (None: nothing to print)."""
    cmd = args.channel_command
    if cmd not in KAFKA_DOOR_COMMANDS or settings.kafka_security_protocol.upper() == "PLAINTEXT":
        return None
    channel_id = args.channel_id if cmd != "add" else args._added_channel_id

    def change() -> tuple[str, str] | None:
        admin = access.AccessAdmin(settings)
        user = access.channel_user(channel_id)
        if cmd == "suspend":
            admin.revoke_all(user)
            admin.disable_user(user)
            return None
        return access.create_principal(admin, settings, user, access.channel_bindings(settings, user))

    try:
        return await asyncio.to_thread(change)
    except (access.AccessError, ValueError) as exc:
        raise runtime.ConfigError(
            f"channel {channel_id} saved, but its Kafka credential was not changed ({exc}); "
            f"`bubuh channel {'suspend' if cmd == 'suspend' else 'rotate-key'} {channel_id}` tries again") from None


def _with_kafka_credential(out: str, args, credential: tuple[str, str] | None) -> str:
    if credential is None:
        return out
    user, password = credential
    if args.json:
        return json.dumps(json.loads(out) | {"kafka_username": user, "kafka_password": password,
                                             "kafka_sasl_mechanism": "SCRAM-SHA-512"})
    return (f"{out}\n  kafka (SASL/SCRAM-SHA-512, may write purchase.submitted only):\n"
            f"    username: {user}\n    password: {password}\nThe Kafka password is shown only now.")


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
