"""The verification flood of ``test_verify_flood.py``, in a process of its own: eight clients from
127.0.0.2 to 127.0.0.9 post the heaviest document verification still answers, in a loop, ignoring
Retry-After, until SIGTERM; then each finishes the request in hand and the counts of answers by
status are printed as JSON. Apart from the test, so the test's event loop (which times stamp intake)
does none of the flood's client work.

    python -m tests.chaos.verify_flooder http://127.0.0.1:PORT
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

import httpx

from loadtests import corpus


async def flood(base: str) -> dict[int, int]:
    heavy = corpus.form_with_fields(1500)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    answers: dict[int, int] = {}

    async def flooder(n: int) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=f"127.0.0.{n}")
        async with httpx.AsyncClient(base_url=base, timeout=120, transport=transport) as client:
            while not stop.is_set():
                r = await client.post("/v1/verify", files={"file": ("h.pdf", heavy, "application/pdf")})
                answers[r.status_code] = answers.get(r.status_code, 0) + 1

    print("flooding", flush=True)
    await asyncio.gather(*(flooder(n) for n in range(2, 10)))
    return answers


if __name__ == "__main__":
    print(json.dumps(asyncio.run(flood(sys.argv[1]))), flush=True)
