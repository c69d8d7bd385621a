"""``bubuh``: run the platform, manage channels, reconcile, read the catalogues.

Every command that fails for a reason the operator can fix prints one line, ``bubuh: ...``, and
exits 2; nothing prints a traceback for bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from services.kernel import errors, event_loop, logs, topics
from services.kernel.runtime import ConfigError
from services.kernel.settings import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except Exception as exc:  # noqa: BLE001 - pydantic's message names the variable
        raise ConfigError(f"bad setting: {exc}".replace("\n", " ")) from None


def cmd_serve(args) -> None:
    if any(v == "all" or "stamping" in v.split(",") for v in (args.api, args.workers)):
        from services.stamping import sandbox
        sandbox.start_fork_server()     # it loads pyHanko and qpdf while this process loads the rest
    from services import platform

    s = _settings()
    logs.configure("bubuh", s.log_level, s.log_format)
    api, workers = platform.parse_names(args.api), platform.parse_names(args.workers)
    if not api and not workers:
        raise ConfigError("nothing to run: give --api and/or --workers")
    ready = None
    if args.ready_file:
        def ready() -> None:
            with open(args.ready_file, "w") as fh:
                fh.write("ready\n")
    event_loop.tune_gc(s.gc_gen0_threshold)
    event_loop.run(platform.serve(s, api, workers, on_ready=ready), s.event_loop)


def cmd_up(args) -> None:
    from services.operator import local_processes
    local_processes.up(_settings(), timeout=args.timeout)


def cmd_down(args) -> None:
    from services.operator import local_processes
    local_processes.down(_settings())


def cmd_status(args) -> None:
    from services.operator import local_processes
    sys.exit(0 if local_processes.status(_settings()) else 3)


def cmd_scrape_targets(args) -> None:
    from services.operator import local_processes
    s = _settings()
    for name, (job, port) in local_processes.metrics_targets(s).items():
        args = local_processes.processes(s)[name]
        print(job, f"{s.http_host}:{port}", name, args[args.index("--workers") + 1])


def cmd_channel(args) -> None:
    from services.purchase import admin
    asyncio.run(admin.channel_command(_settings(), args))


def cmd_reconcile(args) -> None:
    from services.purchase import reconciliation
    from services.quota import ledger

    async def compare() -> reconciliation.Report:    # each service reads its own tables
        s = _settings()
        orders = reconciliation.read_orders(args.orders)
        purchases = await reconciliation.purchases_of(s, args.channel)
        return reconciliation.compare(orders, purchases, await ledger.credits_of(s, args.channel))
    code = reconciliation.show(asyncio.run(compare()), args.channel, as_json=args.json)
    sys.exit(code)


def cmd_demo(args) -> None:
    from services.operator import walkthrough
    sys.exit(asyncio.run(walkthrough.run(_settings())))


def cmd_errors(args) -> None:
    if args.markdown:
        print(errors.markdown(), end="")
    else:
        for e in errors.catalogue():
            print(f"{e.code:24} {e.http_status}  {e.meaning}")


def cmd_topics(args) -> None:
    s = _settings()
    if args.markdown:
        print(topics.markdown(s), end="")
    else:
        for t in topics.ALL:
            print(f"{s.topic(t.name):28} key={t.key:22} {t.events}")


def cmd_keys(args) -> None:
    import base64
    import secrets

    if args.what == "platform":
        print(base64.urlsafe_b64encode(secrets.token_bytes(32)).decode())
        return
    if args.what in ("dev-pki", "serve-pki"):
        _dev_pki(args)
        return
    from services.stamping.signing import dev_ca

    s = _settings()
    out = args.out or str(s.keys_dir)
    for key_type in args.key_type:
        from pathlib import Path
        if args.if_missing and (Path(out) / f"issuer-{key_type}.p12").exists():
            continue
        ca = dev_ca.dev_ca(out, key_type)
        print(f"dev CA ({key_type}): issuer {ca.p12_path} (password {ca.password!r}), trust anchor {ca.ca_cert_pem}")
        print("  test keys only: never use them for real stamps")


def _password_from_env(name: str) -> str:
    """A password handed over in an environment variable (never on the command line: argv is visible
    to every process on the host)."""
    password = os.environ.get(name, "")
    if not password:
        raise ConfigError(f"--password-env {name}: the environment variable {name} is unset or empty")
    return password


def cmd_kafka(args) -> None:
    from services.kernel import access

    s = _settings()
    # before any connection: a missing password is the operator's mistake, not the broker's
    password = _password_from_env(args.password_env) if getattr(args, "password_env", None) else None
    try:
        admin = access.AccessAdmin(s)
        if args.kafka_command == "setup":
            asyncio.run(asyncio.wait_for(topics.ensure(s, as_admin=True), 60))
            print(f"kafka: {len(topics.ALL)} topics present on {s.kafka_bootstrap}")
            if not s.kafka_username:     # the local stack: the platform principal's credential goes to .local
                user, _ = access.setup_local_platform(admin, s)
                print(f"kafka: principal {user} (all services' rights) in {s.kafka_credentials_dir}/platform.json")
            return
        if args.kafka_command == "principal":
            user = access.service_user(args.service)
            credential = access.create_principal(admin, s, user, access.bindings_of(s, args.service), password)
            if password:
                print(f"kafka principal {user}: password from ${args.password_env} set, ACLs applied")
            else:
                print(f"kafka principal {user}: password {credential[1]}\nKeep it: it is shown only now.")
    except (access.AccessError, ValueError) as exc:
        raise ConfigError(str(exc)) from None


def _dev_pki(args) -> None:
    from pathlib import Path

    from services.stamping.signing import dev_pki

    root = Path(args.out) if args.out else dev_pki.default_root(_settings().local_dir)
    port = dev_pki.default_port()
    pki = dev_pki.existing(root)
    if args.what == "serve-pki":
        if pki is None:
            raise SystemExit(f"no PKI under {root}: run `bubuh keys dev-pki`")
        from services.stamping.signing import dev_pki_server

        dev_pki_server.serve(pki)
        return
    if args.if_missing and pki is not None:
        if pki.port != port:
            raise SystemExit(f"the PKI under {root} names port {pki.port}, BUBUH_LOCAL_PKI_PORT says {port}: "
                             "run `bubuh keys dev-pki` to make a new one (new keys), or use its port")
        return
    pki = dev_pki.generate(root, port)
    print(f"dev PKI: signer {pki.signer_p12} (password {dev_pki.P12_PASSWORD!r}), "
          f"trust anchor {pki.trust_anchor}, services at {pki.prefix} (TSA {pki.tsa_url})")
    print("  test keys only: never use them for real stamps")


def cmd_migrate(args) -> None:
    """Each service's schema migrated, as its processes do when they start: run once before a rollout whose
    migrations may outlast the startup probe (deploy/README.md, "PostgreSQL")."""
    import asyncio

    from services import platform
    from services.kernel import migrations, runtime
    s = _settings()
    names = platform.parse_names(args.services)

    async def run() -> None:
        for name in names:
            pool = await runtime.connect_database(s, name)
            try:
                applied = await migrations.migrate_service(pool, s, name)
            finally:
                await pool.close()
            print(f"{name} (schema {s.schema(name)}): {', '.join(applied) if applied else 'up to date'}", flush=True)
    asyncio.run(run())


def cmd_renew_timestamps(args) -> None:
    import asyncio

    from services.stamping import archive
    done = asyncio.run(archive.renew_stored(_settings(), args.within_days, dry_run=args.dry_run))
    due = [r for r in done if r.expires is not None and (r.renewed or args.dry_run)]
    failed = [r for r in done if r.error]
    for r in done:
        state = "renewed" if r.renewed else f"FAILED: {r.error}" if r.error else ("due" if r in due else "ok")
        print(f"{r.request_id}  time-stamp certificate expires {r.expires.isoformat() if r.expires else '-'}  {state}")
    print(f"{len(done)} stored stamps, {sum(r.renewed for r in done)} renewed"
          + (f", {len(due)} due (dry run)" if args.dry_run else "") + (f", {len(failed)} failed" if failed else ""))
    if failed:
        raise SystemExit(1)


def cmd_prune_uploads(args) -> None:
    import asyncio
    import time

    from services.stamping import uploads
    from services.stamping.service import documents
    s = _settings()
    shown = 0.0             # when progress was last printed: every 2 s, and at the end

    def progress(walked: int, total: int, deleted: int) -> None:
        nonlocal shown
        if time.monotonic() - shown >= 2 or walked >= total:
            shown = time.monotonic()
            print(f"  {walked} of {total} completed requests, {deleted} uploads deleted", flush=True)
    print(f"deleting the uploads of completed stamps from {s.documents_root}", flush=True)
    done = asyncio.run(uploads.prune(s, documents(s), progress=progress))
    print(f"{done.completed} completed requests, {done.deleted} uploads deleted")


def cmd_replay(args) -> None:
    from services.kernel import replay
    s = _settings()
    settler = None
    if args.topic == topics.NOTIFICATION_DLQ.name:   # abandoned deliveries: due again (the notification's code)
        from services.notification.deliveries import Redelivery
        settler = Redelivery(s)
    result = replay.run(s, args.topic, key=args.key, reason=args.reason, dry_run=args.dry_run,
                        from_start=args.from_start, settler=settler)
    sys.exit(0 if result.seen == 0 or result.replayed or args.dry_run else 1)


def cmd_trace(args) -> None:
    from services.operator.journey import command
    sys.exit(command.run(_settings(), args.id, as_json_output=args.json, follow=args.follow))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bubuh", description="Bubuh e-Meterai platform")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("serve", help="run services in the foreground (default: everything, one process)")
    sp.add_argument("--api", default="all", help="services whose HTTP routes to serve: all, none, or a list")
    sp.add_argument("--workers", default="all", help="services whose consumers/timers to run: all, none, or a list")
    sp.add_argument("--ready-file", help="write this file once ready (for scripts)")
    sp.set_defaults(func=cmd_serve)

    sp = sub.add_parser("up", help="start the platform in the background (local stack must be up)")
    sp.add_argument("--timeout", type=float, default=90)
    sp.set_defaults(func=cmd_up)
    sub.add_parser("down", help="stop the background platform").set_defaults(func=cmd_down)
    sub.add_parser("status", help="is the background platform running?").set_defaults(func=cmd_status)
    sub.add_parser("scrape-targets", help="each process of `bubuh up`: its Prometheus job, metrics address, "
                   "name and workers (deploy/local/ops.sh)").set_defaults(func=cmd_scrape_targets)

    sp = sub.add_parser("channel", help="manage distribution channels")
    csub = sp.add_subparsers(dest="channel_command", required=True)
    c = csub.add_parser("add", help="register a channel; prints its API key, HMAC secret and Kafka credential once")
    c.add_argument("name")
    c.add_argument("--webhook", default="", help="callback URL for notifications")
    c.add_argument("--profile", default="standard", help="default document profile: standard or cpns")
    c.add_argument("--json", action="store_true")
    c = csub.add_parser("list", help="list channels")
    c.add_argument("--json", action="store_true")
    for name, helptext in (("rotate-key", "issue a new API key and Kafka password (the old ones stop working)"),
                           ("rotate-secret", "issue a new HMAC secret (the old one works for a grace period)"),
                           ("suspend", "stop accepting the channel's requests; its Kafka credential and ACLs go"),
                           ("activate", "accept the channel's requests again; prints a new Kafka credential"),
                           ("set-webhook", "change (or with '' remove) the channel's callback URL")):
        c = csub.add_parser(name, help=helptext)
        c.add_argument("channel_id")
        if name == "set-webhook":
            c.add_argument("url")
        c.add_argument("--json", action="store_true")
        if name == "rotate-secret":
            c.add_argument("--grace-hours", type=float, default=24.0)
    sp.set_defaults(func=cmd_channel)

    sp = sub.add_parser("reconcile", help="compare a channel's paid orders (CSV) with what was credited")
    sp.add_argument("orders", help="CSV with header: channel_order_id,account_id,quantity,amount")
    sp.add_argument("--channel", required=True)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_reconcile)

    sub.add_parser("demo", help="walk through a purchase against the running platform").set_defaults(func=cmd_demo)

    sp = sub.add_parser("errors", help="the error-code catalogue")
    sp.add_argument("--markdown", action="store_true")
    sp.set_defaults(func=cmd_errors)
    sp = sub.add_parser("topics", help="the topic catalogue")
    sp.add_argument("--markdown", action="store_true")
    sp.set_defaults(func=cmd_topics)
    sp = sub.add_parser("keys", help="generate keys")
    sp.add_argument("what", choices=["platform", "dev-ca", "dev-pki", "serve-pki"],
                    help="platform: a new BUBUH_SECRET_KEY; dev-ca: a test CA and issuer (PKCS#12) for development; "
                         "dev-pki: a test PKI with CRLs, OCSP and a TSA (.local/pki); serve-pki: serve them on "
                         "127.0.0.1:$BUBUH_LOCAL_PKI_PORT (deploy/local/pki.sh runs it)")
    sp.add_argument("--out", help="dev-ca: where to write (default .local/keys); dev-pki: default .local/pki")
    sp.add_argument("--key-type", nargs="+", default=["rsa2048"], choices=["rsa2048", "p256"])
    sp.add_argument("--if-missing", action="store_true", help="dev-ca, dev-pki: keep an existing one")
    sp.set_defaults(func=cmd_keys)

    sp = sub.add_parser("migrate", help="apply what each service's schema lacks and exit (what a process does as it "
                                        "starts; run it first when a migration may outlast a startup probe)")
    sp.add_argument("--services", default="all", help="comma-separated services (default: all)")
    sp.set_defaults(func=cmd_migrate)
    sp = sub.add_parser("renew-timestamps",
                        help="add an archive time-stamp (PAdES B-LTA) to stored stamps whose last time-stamp's "
                             "certificate expires soon")
    sp.add_argument("--within-days", type=float, default=365.0,
                    help="renew when that certificate expires within this many days (default 365)")
    sp.add_argument("--dry-run", action="store_true", help="list what is due, change nothing")
    sp.set_defaults(func=cmd_renew_timestamps)

    sub.add_parser("prune-uploads", help="delete the uploads of completed stamps left on the document store "
                   "(kept by versions that did not delete them at completion); safe while the platform runs"
                   ).set_defaults(func=cmd_prune_uploads)

    sp = sub.add_parser("kafka", help="Kafka access, as the admin principal: topics, principals, ACLs")
    ksub = sp.add_subparsers(dest="kafka_command", required=True)
    ksub.add_parser("setup", help="create the topics; on the local stack also the platform principal "
                    "(credential in .local/kafka/credentials/platform.json); idempotent")
    k = ksub.add_parser("principal", help="create (or rotate) a service's principal with its ACLs; "
                        "prints a new password once, or sets the one given with --password-env")
    # services.kernel.access.principal_names() (not imported here: it loads the Kafka client)
    k.add_argument("service", choices=["platform", "api", "purchase", "quota", "stamping", "notification", "monitor"],
                   help="monitor: the consumer-lag exporter (describe topics and groups only)")
    k.add_argument("--password-env", metavar="NAME",
                   help="set the password held by environment variable NAME instead of generating one "
                   "(never on the command line); the same password again is harmless")
    sp.set_defaults(func=cmd_kafka)

    sp = sub.add_parser("replay", help="send dead-lettered records back to their source topic; on "
                        "notification.dead-letter, make abandoned deliveries due again")
    sp.add_argument("topic", help="a dead-letter topic, e.g. stamp.dead-letter")
    sp.add_argument("--key", help="only the entry with this key (a request id)")
    sp.add_argument("--reason", help="only entries with this reason code")
    sp.add_argument("--dry-run", action="store_true")
    sp.add_argument("--from-start", action="store_true", help="replay entries replayed before, too")
    sp.set_defaults(func=cmd_replay)

    sp = sub.add_parser("trace", help="the journey of one stamp request or purchase across the services: events "
                        "with topic, partition and offset, ledger transfers, deliveries, and where it is now")
    sp.add_argument("id", help="a stamp request id, a purchase id or an SN")
    sp.add_argument("--json", action="store_true", help="one JSON document (after --follow, the final one)")
    sp.add_argument("--follow", action="store_true",
                    help="keep reading until it reaches a terminal state (Ctrl-C stops)")
    sp.set_defaults(func=cmd_trace)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    # A command's stdout is its output (``--json`` is parsed by scripts): what the code under it logs goes to
    # stderr, warnings and worse (unconfigured, structlog prints every line to stdout). ``serve`` sets its own.
    logs.configure("bubuh", "warning")
    try:
        args.func(args)
    except ConfigError as exc:
        print(f"bubuh: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
