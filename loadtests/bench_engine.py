"""How many stamps per second per core: pyHanko's documented path versus the engine.

Why a separate benchmark from the surge scenarios: signing is the CPU-bound heart of the
stamping tier, and capacity planning is "workers x stamps/s/core". This measures exactly
that, in one run, on this machine, for the cases that matter:

* paths: ``pyhanko-default`` (``signing/reference.py``) and ``engine`` (``signing/engine.py``);
* keys: ``rsa2048`` and ``p256`` (dev CA, PKCS#12, generated into a tmp dir);
* documents: ``a4-1page`` (a text letter) and ``scan-800k`` (an incompressible 800 KB scan);
* ``engine/rsa2048/a4-1page/2proc``: two worker processes at once, to see whether stamping
  scales with cores (it should: nothing is shared between processes).

One stamp at a time per process (as a worker does); latency per stamp is wall time, and a
single-threaded process uses one core, so stamps/s/core = stamps / wall seconds.

    python -m loadtests.bench_engine --out loadtests/results/engine.json [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadtests import corpus  # noqa: E402
from loadtests.readme import update_readme as readme_table  # noqa: E402
from services.stamping.serial import SerialIssuer  # noqa: E402
from services.stamping.signing import dev_ca  # noqa: E402
from services.stamping.signing.engine import SignerConfig, StampingEngine  # noqa: E402
from services.stamping.signing.reference import stamp_reference  # noqa: E402
from services.stamping.signing.request import StampRequest  # noqa: E402

VERIFY_BASE = "https://verify.bubuh.example"
BOX = (380.0, 60.0, 560.0, 140.0)
PATHS = ("pyhanko-default", "engine")
KEYS = ("rsa2048", "p256")
DOCUMENTS = ("a4-1page", "scan-800k")
TARGETS = {  # from the issue
    "engine_vs_default_a4_rsa2048": 20.0,
    "engine_vs_default_scan_rsa2048": 10.0,
    "two_proc_vs_one": 1.8,
}


def _document(name: str) -> bytes:
    return corpus.a4_text(1) if name == "a4-1page" else corpus.scan_800k(1)


def _dev_config(ca: dev_ca.DevCA) -> SignerConfig:
    return SignerConfig(p12_path=str(ca.p12_path), p12_password=ca.password)


def _engine_stamper(config: SignerConfig, node: int):
    issuer = SerialIssuer(node)
    engine = StampingEngine(config, VERIFY_BASE)
    return lambda data: engine.stamp(data, StampRequest(issuer.next(), 1, BOX))


def _stamper(path: str, ca: dev_ca.DevCA, node: int):
    if path == "engine":
        return _engine_stamper(_dev_config(ca), node)
    issuer = SerialIssuer(node)
    return lambda data: stamp_reference(data, StampRequest(issuer.next(), 1, BOX), ca.p12_path, ca.password,
                                        VERIFY_BASE)


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    if len(ordered) == 1:
        return ordered[0]
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def measure(stamp, data: bytes, iterations: int, warmup: int, min_seconds: float) -> dict:
    for _ in range(warmup):
        stamp(data)
    latencies = []
    cpu0, start = time.process_time(), time.perf_counter()
    while len(latencies) < iterations or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        stamp(data)
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    return {
        "stamps": len(latencies),
        "seconds": round(wall, 3),
        "stamps_per_s_per_core": round(len(latencies) / wall, 1),
        "cpu_stamps_per_s": round(len(latencies) / cpu, 1) if cpu else None,
        "p50_ms": round(_percentile(latencies, 0.50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 0.99) * 1000, 2),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2),
    }


def _worker(config: SignerConfig, data: bytes, node: int, seconds: float, barrier, results) -> None:
    stamp = _engine_stamper(config, node)
    for _ in range(30):
        stamp(data)
    barrier.wait()
    count, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        stamp(data)
        count += 1
    results.put((count, time.perf_counter() - start, time.process_time() - cpu0))


def measure_processes(config: SignerConfig, processes: int, seconds: float, data: bytes | None = None) -> dict:
    """``processes`` engines stamping ``data`` (the one-page letter by default) side by side for ``seconds``,
    each as a worker's signing child does: one engine, one key, one stamp at a time. With ``config`` at B-T
    and above each stamp fetches its time-stamp from ``config.tsa_url``, and B-LT embeds the revocation
    data, cached as the worker caches it: the engine at that level, the TSA's work included."""
    data = _document("a4-1page") if data is None else data
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(config, data, 100 + i, seconds, barrier, results))
             for i in range(processes)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=seconds * 10 + 120) for _ in procs]
    for p in procs:
        p.join()
    total = sum(c for c, _, _ in outcomes)
    wall = max(w for _, w, _ in outcomes)
    cpu = sum(c for _, _, c in outcomes)
    return {"processes": processes, "stamps": total, "seconds": round(wall, 3),
            "stamps_per_s": round(total / wall, 1),
            # < processes means the OS gave the workers less than a full core each (other load)
            "cores_used": round(cpu / wall, 2),
            "stamps_per_cpu_s": round(total / cpu, 1) if cpu else None}


def machine_facts() -> dict:
    from importlib.metadata import version


    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from cryptography.hazmat.backends.openssl.backend import backend

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "loadavg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pyhanko": version("pyhanko"),
        "cryptography": version("cryptography"),
        "openssl": backend.openssl_version_text(),
    }


def run(quick: bool) -> dict:
    plan = {  # iterations, warmup, minimum seconds per case
        "pyhanko-default": (8, 2, 1.0) if quick else (40, 3, 8.0),
        "engine": (200, 30, 1.0) if quick else (2000, 100, 8.0),
    }
    two_proc_seconds, rounds = (2.0, 1) if quick else (5.0, 3)
    machine = machine_facts()
    cases: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bubuh-bench-") as tmp:
        cas = {kt: dev_ca.dev_ca(tmp, kt) for kt in KEYS}
        docs = {name: _document(name) for name in DOCUMENTS}
        for path in PATHS:
            for kt in KEYS:
                stamp = _stamper(path, cas[kt], node=1)
                for doc in DOCUMENTS:
                    name = f"{path}/{kt}/{doc}"
                    print(f"  measuring {name} ...", file=sys.stderr, flush=True)
                    cases[name] = {"path": path, "key": kt, "document": doc,
                                   "document_bytes": len(docs[doc]), **measure(stamp, docs[doc], *plan[path])}
        one = "engine/rsa2048/a4-1page"
        print(f"  measuring {one}/1proc and /2proc ...", file=sys.stderr, flush=True)
        # The 1-process baseline for the scaling ratio is measured the same way as the 2-process
        # run, alternating, best of N: on a shared box a neighbour's burst hits one run, not all.
        runs: dict[int, list[dict]] = {1: [], 2: []}
        for _ in range(rounds):
            for n in (1, 2):
                runs[n].append(measure_processes(_dev_config(cas["rsa2048"]), n, two_proc_seconds))
        for n in (1, 2):
            best = max(runs[n], key=lambda r: r["stamps_per_s"])
            cases[f"{one}/{n}proc"] = {**best, "rounds": [r["stamps_per_s"] for r in runs[n]]}

    ratios = {}
    for kt in KEYS:
        for doc in DOCUMENTS:
            base = cases[f"pyhanko-default/{kt}/{doc}"]["stamps_per_s_per_core"]
            fast = cases[f"engine/{kt}/{doc}"]["stamps_per_s_per_core"]
            ratios[f"engine_vs_default/{kt}/{doc}"] = round(fast / base, 1)
    ratios["2proc_vs_1proc/engine/rsa2048/a4-1page"] = round(
        cases["engine/rsa2048/a4-1page/2proc"]["stamps_per_s"] / cases["engine/rsa2048/a4-1page/1proc"]["stamps_per_s"],
        2)
    one_proc, two_proc = cases["engine/rsa2048/a4-1page/1proc"], cases["engine/rsa2048/a4-1page/2proc"]
    if one_proc.get("stamps_per_cpu_s") and two_proc.get("stamps_per_cpu_s"):
        # what two processes would give with two idle cores: stamps per CPU-second must not drop
        ratios["2proc_vs_1proc_per_cpu_second/engine/rsa2048/a4-1page"] = round(
            two_proc["stamps_per_cpu_s"] / one_proc["stamps_per_cpu_s"], 2)
    targets = {
        "engine_vs_default/rsa2048/a4-1page >= 20": ratios["engine_vs_default/rsa2048/a4-1page"] >= 20,
        "engine_vs_default/rsa2048/scan-800k >= 10": ratios["engine_vs_default/rsa2048/scan-800k"] >= 10,
        "engine/rsa2048/a4-1page >= 200 stamps/s/core":
            cases["engine/rsa2048/a4-1page"]["stamps_per_s_per_core"] >= 200,
        "2proc_vs_1proc >= 1.8": ratios["2proc_vs_1proc/engine/rsa2048/a4-1page"] >= 1.8,
    }
    # one object per case at the top level, named <path>/<key>/<document>[/<n>proc]
    return {**cases, "ratios": ratios, "targets_met": targets, "machine": machine, "quick": quick,
            "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


README_BEGIN = "<!-- bench:engine:begin (make bench writes this table) -->"
README_END = "<!-- bench:engine:end -->"


def update_readme(readme: Path, table: str, generated_at: str) -> None:
    """Replace the table between the markers, so the README always shows the latest run."""
    readme_table(readme, table, generated_at, begin=README_BEGIN, end=README_END,
                 source="loadtests/results/engine.json")


def markdown(result: dict) -> str:
    rows = ["| case | stamps/s/core | p50 ms | p99 ms |", "|---|---:|---:|---:|"]
    for name, case in ((k, v) for k, v in result.items() if "/" in k):
        if "stamps_per_s_per_core" in case:
            rows.append(f"| `{name}` | {case['stamps_per_s_per_core']} | {case['p50_ms']} | {case['p99_ms']} |")
        else:
            rows.append(f"| `{name}` | {case['stamps_per_s']} stamps/s ({case['processes']} proc) | | |")
    rows += ["", "| ratio | value |", "|---|---:|"]
    rows += [f"| {name} | {value} |" for name, value in result["ratios"].items()]
    rows += ["", "| target | met |", "|---|---|"]
    rows += [f"| {name} | {'yes' if ok else 'NO'} |" for name, ok in result["targets_met"].items()]
    m = result["machine"]
    rows += ["", f"{m['cpu']}, {m['usable_cores']} usable cores, load {m['loadavg_at_start']}, "
                 f"Python {m['python']}, pyHanko {m['pyhanko']}, {m['openssl']}"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("loadtests/results/engine.json"))
    parser.add_argument("--quick", action="store_true", help="short runs (CI smoke), noisier figures")
    parser.add_argument("--readme", type=Path, help="also put the table into this README between the bench markers")
    args = parser.parse_args(argv)
    result = run(args.quick)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if args.readme:
        update_readme(args.readme, table, result["generated_at"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
