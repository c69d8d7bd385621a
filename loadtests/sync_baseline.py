"""The synchronous baseline of the deadline day (issue 12, point 5): a central issuer's design.

The same engine, key and PAdES level as the platform's stamping workers (``signer_config`` from the
same settings, the stack's TSA and revocation data at B-LT), behind a plain HTTP endpoint that stamps
*inside* the request and answers with the stamped PDF: one uvicorn process per core, no Kafka, no
database, nothing durable. A request that is not answered is simply lost; the caller's timeout (the
deadline-day driver uses 30 s) is the only queue it has.

    python -m loadtests.sync_baseline --port 8090      # then POST /stamp (multipart: file, meta)

It is a measuring instrument for ``loadtests/deadline_day.py``, never part of the platform.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402
from fastapi import FastAPI, File, Form, UploadFile  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402

from services.kernel.errors import BubuhError  # noqa: E402
from services.kernel.settings import Settings  # noqa: E402
from services.stamping.serial import MAX_NODE, SerialIssuer  # noqa: E402
from services.stamping.service import signer_config  # noqa: E402
from services.stamping.signing.engine import StampingEngine  # noqa: E402
from services.stamping.signing.request import StampRequest  # noqa: E402

_state: dict = {}


@contextlib.asynccontextmanager
async def _lifespan(_app: FastAPI):
    settings = Settings()
    # built off the event loop: the engine runs its own (pyHanko's signer is async underneath)
    _state["engine"] = await asyncio.to_thread(StampingEngine, signer_config(settings), settings.public_url)
    _state["serials"] = SerialIssuer(secrets.randbelow(MAX_NODE + 1))
    yield
    _state.clear()


app = FastAPI(title="bubuh synchronous baseline (a measuring instrument)", lifespan=_lifespan)


@app.get("/healthz")
def healthz() -> dict:
    return {"status": "ok", "level": _state["engine"].level}


@app.post("/stamp")
def stamp(file: UploadFile = File(...), meta: str = Form(...)) -> Response:   # noqa: B008 (FastAPI's idiom)
    """Stamp in the request, on one of the server's threads: the engine signs one stamp at a time per
    process (its lock), so concurrent requests wait for it, as they would at a central issuer."""
    m = json.loads(meta)
    request = StampRequest(_state["serials"].next(), int(m.get("page", 1)),
                           (float(m["llx"]), float(m["lly"]), float(m["urx"]), float(m["ury"])))
    try:
        out = _state["engine"].stamp(file.file.read(), request)
    except BubuhError as exc:
        return JSONResponse({"code": exc.code.code, "detail": exc.detail}, status_code=exc.code.http_status)
    return Response(out, media_type="application/pdf", headers={"X-Stamp-SN": request.sn})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8090)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: one per core)")
    args = p.parse_args(argv)
    uvicorn.run("loadtests.sync_baseline:app", host=args.host, port=args.port, workers=args.workers,
                log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
