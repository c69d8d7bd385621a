"""A hypothesis-driven PDF mutator against stamp intake and public verification on the running
platform: truncation, bit flips, a stream that inflates to hundreds of megabytes, deep nesting, a
huge array, thousands of form fields, over a plain letter and an applicant-signed one.

Every outcome is a 2xx, a coded 4xx, or a 503 with Retry-After, within the route's budget; and no
process of the platform (the API process, its fork server and document children) ever holds more
than 1 GiB resident, the deployment's limit per process.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import time
import zlib
from pathlib import Path

import httpx
import hypothesis
import pikepdf
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st

from loadtests import corpus
from services.kernel import errors
from services.operator import process_tree
from tests.flows import auth, stamp_meta
from tests.platform import PlatformProcess, add_channel

CODES = {e.code for e in errors.catalogue()}
EXAMPLES = 30
ROUTE_BUDGET_S = 40.0          # the sandbox's wall-clock limit (30 s) plus the request around it
GIB = 1024 ** 3


@functools.cache
def _seeds() -> tuple[bytes, ...]:
    return corpus.a4_text(7), corpus.presigned(7).data


@functools.cache
def _zeros_deflated(size: int) -> bytes:
    return zlib.compress(b"\0" * size, 9)


def _with_inflating_stream(seed: bytes, inflated: int) -> bytes:
    """The document plus one Flate stream (a second content stream) that inflates to ``inflated`` bytes."""
    pdf = pikepdf.open(io.BytesIO(seed))
    bomb = pikepdf.Stream(pdf, _zeros_deflated(inflated))
    bomb.Filter = pikepdf.Name.FlateDecode
    page = pdf.pages[0]
    page.obj.Contents = pikepdf.Array([page.obj.Contents, pdf.make_indirect(bomb)])
    out = io.BytesIO()
    pdf.save(out, compress_streams=False, stream_decode_level=pikepdf.StreamDecodeLevel.none)
    return out.getvalue()


def _with_huge_array(seed: bytes, n: int) -> bytes:
    head, sep, tail = seed.rpartition(b"trailer")
    extra = b"999 0 obj\n[" + b"0 " * n + b"]\nendobj\n"
    return head + extra + sep + tail


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    seed = draw(st.sampled_from(_seeds()))
    kind = draw(st.sampled_from(["truncate", "flip", "inflate", "nest", "array", "fields", "as-is"]))
    if kind == "truncate":
        return kind, seed[:draw(st.integers(0, len(seed) - 1))]
    if kind == "flip":
        data = bytearray(seed)
        for _ in range(draw(st.integers(1, 64))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] ^= 1 << draw(st.integers(0, 7))
        return kind, bytes(data)
    if kind == "inflate":
        return kind, _with_inflating_stream(seed, draw(st.sampled_from([64, 256, 600])) * 1024 * 1024)
    if kind == "nest":
        return kind, corpus.deeply_nested(draw(st.sampled_from([1_000, 50_000, 500_000])))
    if kind == "array":
        return kind, _with_huge_array(seed, draw(st.sampled_from([10_000, 1_000_000])))
    if kind == "fields":
        return kind, corpus.form_with_fields(draw(st.sampled_from([500, 4000, 8000])))
    return kind, seed


def _peak_rss(pids: list[int]) -> dict[int, int]:
    """VmHWM (peak resident set) of each process still alive, in bytes."""
    out = {}
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[pid] = int(line.split()[1]) * 1024
        except OSError:
            pass
    return out


def _check(route: str, kind: str, r: httpx.Response, elapsed: float) -> str | None:
    where = f"{route} {kind} -> {r.status_code} in {elapsed:.1f} s"
    if elapsed > ROUTE_BUDGET_S:
        return f"{where}: over the budget"
    if r.status_code < 300:
        return None
    if r.status_code == 503 and "Retry-After" in r.headers:
        return None
    if 400 <= r.status_code < 500:
        try:
            if r.json().get("code") in CODES:
                return None
        except ValueError:
            pass
    return f"{where}: {r.text[:200]}"


def _run(base_url: str, channel: dict, pid: int) -> tuple[list[str], list[str], dict[int, int]]:
    problems: list[str] = []
    seen: list[str] = []
    peaks: dict[int, int] = {}

    @hypothesis.settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                         suppress_health_check=list(HealthCheck))
    @hypothesis.given(sample=mutated())
    def one(sample: tuple[str, bytes]) -> None:
        kind, data = sample
        seen.append(kind)
        with httpx.Client(base_url=base_url, timeout=120) as api:
            started = time.monotonic()
            r = api.post("/v1/stamps", headers=auth(channel), files={"file": ("f.pdf", data, "application/pdf")},
                         data={"meta": json.dumps(stamp_meta("fuzz"))})
            problems.append(_check("intake", kind, r, time.monotonic() - started) or "")
            started = time.monotonic()
            r = api.post("/v1/verify", files={"file": ("f.pdf", data, "application/pdf")})
            problems.append(_check("verify", kind, r, time.monotonic() - started) or "")
        for p, rss in _peak_rss([pid, *process_tree.descendants([pid])]).items():
            peaks[p] = max(peaks.get(p, 0), rss)
    one()
    return [p for p in problems if p], seen, peaks


async def test_mutated_pdfs_get_coded_answers_within_budget_and_bounded_memory(settings):
    front = await PlatformProcess(settings, api="all", workers="none", name="fuzz-front",
                                  BUBUH_VERIFY_RATE_BURST="1000", BUBUH_VERIFY_RATE_PER_CLIENT_PER_S="100").start()
    try:
        channel = add_channel(settings)
        problems, seen, peaks = await asyncio.to_thread(_run, f"http://127.0.0.1:{settings.http_port}", channel,
                                                        front.proc.pid)
    finally:
        await front.stop()
    assert len(seen) == EXAMPLES and len(set(seen)) >= 4, seen
    assert problems == [], "\n".join(problems[:20])
    assert len(peaks) >= 3, f"the platform's process tree was not observed: {peaks}"
    over = {p: rss for p, rss in peaks.items() if rss > GIB}
    assert not over, f"processes over 1 GiB resident: {over}"
