"""Bounded fuzzing of every HTTP route from the OpenAPI document the running platform serves
(schemathesis generates the requests, hypothesis drives them): no answer is a 500, a 503 always
carries Retry-After, and every 4xx is a coded error from the one catalogue.

Half of each operation's examples carry a channel's API key and half carry none, so both the
authenticated paths and the refusals are explored.
"""

from __future__ import annotations

import asyncio

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase

from services.kernel import errors
from tests.platform import add_channel

EXAMPLES_PER_OPERATION = 25
CODES = {e.code for e in errors.catalogue()}


def _fuzz(base_url: str, api_key: str) -> tuple[int, list[str]]:
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    problems: list[str] = []
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @hypothesis.given(case=operation.as_strategy(), authenticated=hypothesis.strategies.booleans())
        def run(case, authenticated: bool) -> None:
            nonlocal calls
            headers = {"Authorization": f"Bearer {api_key}"} if authenticated else {}
            response = case.call(base_url=base_url, headers=headers, timeout=60)
            calls += 1
            where = f"{case.method} {case.formatted_path} -> {response.status_code}"
            if response.status_code >= 500:
                if response.status_code != 503 or "Retry-After" not in response.headers:
                    problems.append(f"{where}: {response.text[:200]}")
            elif response.status_code >= 400:
                try:
                    code = response.json().get("code")
                except ValueError:
                    code = None
                if code not in CODES:
                    problems.append(f"{where}: not a coded error: {response.text[:200]}")
        run()
    return calls, problems


async def test_every_route_answers_generated_requests_without_a_500(platform, settings):
    channel = add_channel(settings)
    calls, problems = await asyncio.to_thread(_fuzz, f"http://127.0.0.1:{settings.http_port}", channel["api_key"])
    assert calls >= 100, f"only {calls} requests generated"
    assert problems == [], "\n".join(problems[:20])
