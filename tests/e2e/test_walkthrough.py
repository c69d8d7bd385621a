"""The README's walkthrough, end to end: `bubuh up`, `bubuh demo`, `bubuh down` leaves nothing running."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from services.kernel.door_pressure import autogroup_nice
from services.kernel.settings import REPO_ROOT, Settings
from services.operator import dss_validator, local_processes, process_tree
from tests.platform import env_for

# a value that shows whether it reaches each worker's autogroup without slowing the demo: at 10 (the
# workers' groups at a tenth of the weight) the test took 96 s on a busy CI box, against 34-39 s
WORKER_NICE = 1


def _run(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "services.operator.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _nices(pids) -> set[int]:
    """The nice values of every thread of ``pids`` (``/proc/<pid>/task/<tid>/stat``, field 19); a process
    that ends meanwhile is left out."""
    out = set()
    for pid in pids:
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                text = (task / "stat").read_text()
                out.add(int(text[text.rindex(")") + 2:].split()[16]))
        except FileNotFoundError:
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running: only its exit status is left
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().split(") ", 1)[1][0] != "Z"


def test_up_demo_down(settings, tmp_path, request):
    # at the platform's default level, B-LT, with the stack's test PKI (its signer, TSA, OCSP and CRLs)
    pki = Settings().pki_dir
    # the workers at a lower priority than the front door (BUBUH_LOCAL_WORKER_NICE; 0, equal, by default)
    env = env_for(settings, BUBUH_LOCAL_DIR=str(tmp_path), BUBUH_PADES_LEVEL="b-lt",
                  BUBUH_SIGNING_P12_PATH=str(pki / "signer.p12"), BUBUH_TRUST_ROOTS=str(pki / "trust-anchor.pem"),
                  BUBUH_LOCAL_WORKER_NICE=str(WORKER_NICE))
    keys = _run(env, "keys", "dev-ca", "--if-missing")   # what `make setup` does
    dss_validator.ensure()   # the demo's outside validator: built once for the suite, not per local dir
    (tmp_path / "dss").symlink_to(dss_validator.home())
    assert keys.returncode == 0 and (tmp_path / "keys" / "issuer-rsa2048.p12").exists()
    request.addfinalizer(lambda: _run(env, "down"))     # a failed assertion leaves no platform running
    up = _run(env, "up")
    assert up.returncode == 0, up.stderr
    # a process per tier, as production's pods (BUBUH_LOCAL_LAYOUT's default), the API and stamping one per core
    apis = tuple(f"api-{i}" for i in range(1, local_processes.api_members(Settings()) + 1))
    stampers = tuple(f"stamping-{i}" for i in range(1, local_processes.stamping_members(Settings()) + 1))
    names = (*apis, "purchase-1", "quota-1", "notification-1", *stampers)
    assert sorted(p.stem for p in (tmp_path / "run").glob("*.pid")) == sorted(names)
    pids = [int((tmp_path / "run" / f"{name}.pid").read_text()) for name in names]
    assert all(_alive(pid) for pid in pids)
    again = _run(env, "up")
    assert "already running" in again.stdout
    demo = _run(env, "demo")
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "-> 202" in demo.stdout
    assert '"status": "confirmed"' in demo.stdout
    assert "paid means credited: yes" in demo.stdout
    assert "stamped and verified: yes" in demo.stdout
    assert "PAdES level: B-LT " in demo.stdout
    # the outside validator's word, printed by the demo itself
    assert "default policy, this trust anchor only: " in demo.stdout
    assert "TOTAL_PASSED (PAdES-BASELINE-LT)" in demo.stdout, demo.stdout
    written = [ln.split(": ", 1)[1] for ln in demo.stdout.splitlines() if ln.startswith("== 6. the stamped PDF: ")]
    assert written and (tmp_path / "demo").exists() and open(written[0], "rb").read(5) == b"%PDF-"
    # the API's processes at nice 0, every thread and child of the workers (the signing children that made
    # the demo's stamp among them) at BUBUH_LOCAL_WORKER_NICE, and so is each worker's session (its autogroup:
    # a nice value alone weighs nothing against the other sessions, tests/unit/test_local_priority.py)
    autogroups = Path("/proc/sys/kernel/sched_autogroup_enabled")
    grouped = autogroups.exists() and autogroups.read_text().strip() == "1"
    for name, pid in zip(names, pids, strict=True):
        own = _nices([pid])
        children = _nices(process_tree.descendants([pid]))
        group = autogroup_nice(pid) if grouped else None
        if name.startswith("api-"):   # its verification children alone run lower (nice 10, SCHED_IDLE)
            assert own == {0} and children <= {0, Settings().verify_nice}, (name, own, children)
            assert group == (0 if grouped else None), (name, group)
        else:
            assert own | children == {WORKER_NICE}, (name, own, children)
            assert group == (WORKER_NICE if grouped else None), (name, group)
    signing = process_tree.descendants([pids[names.index("stamping-1")]])
    assert signing and _nices(signing) == {WORKER_NICE}
    down = _run(env, "down")
    assert down.returncode == 0 and "stopped" in down.stdout
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)
    assert _run(env, "status").returncode == 3
    # the JSON log of the run carries trace ids
    # (the demo's requests reach whichever API process the kernel gives their connection)
    log = "".join((tmp_path / "logs" / f"{name}.log").read_text() for name in apis)
    assert '"trace_id"' in log


async def test_reconcile_reports_a_clean_channel_and_a_missing_order(platform, api, channel, settings, tmp_path):
    import asyncio

    from tests.flows import order_body, post_until_accepted, wait_for
    from tests.platform import cli
    bodies = [order_body(quantity=q, account="rc") for q in (1, 2)]
    for b in bodies:
        await post_until_accepted(api, channel, b)
    csv_path = tmp_path / "orders.csv"
    rows = ["channel_order_id,account_id,quantity,amount"] + [
        f"{b['channel_order_id']},{b['account_id']},{b['quantity']},{b['amount']}" for b in bodies]
    csv_path.write_text("\n".join(rows) + "\n")

    async def clean():
        return (await asyncio.to_thread(cli, settings, "reconcile", str(csv_path), "--channel",
                                        channel["channel_id"], check=False)).returncode == 0
    await wait_for(clean, what="reconcile clean")
    csv_path.write_text("\n".join(rows + ["NEVER-PAID-HERE,rc,1,10000"]) + "\n")
    out = cli(settings, "reconcile", str(csv_path), "--channel", channel["channel_id"], "--json", check=False)
    assert out.returncode == 1
    import json
    report = json.loads(out.stdout)
    assert report["matched"] == 2 and [m["channel_order_id"] for m in report["missing"]] == ["NEVER-PAID-HERE"]
