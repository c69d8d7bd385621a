"""The direct lane: the hottest routes answered by their handler at once, past FastAPI's machinery.

Under a surge the front door's CPU is the platform's bottleneck, and most of a status read's Python time
went to the layers around the handler, not to the handler: Starlette's exception middleware, FastAPI's
router and exit stack, dependency solving for the path and header parameters, and response encoding
(py-spy on an API process at 60 reads/s: the handler was 28% of it). A route handed to
``serve_directly`` is answered by a plain ``handler(request) -> Response`` from inside our own
middleware (traces, metrics, logs, body limits and admission all still apply: ``DirectLane`` is the
innermost of them), and every other request goes on to FastAPI as before.

The route stays declared on its router, parameters and all: it is the OpenAPI document's operation
(the contract does not change), and it answers when no lane is installed (a router mounted alone). It
should call the same handler, so the two answers cannot drift.

Routing is FastAPI's: a request takes the lane only when the route it matches first, in the app's
order, is a direct one, so a route declared earlier keeps its paths.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

from fastapi import APIRouter
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from services.kernel import errors

Handler = Callable[[Request], Awaitable[Response]]
_HANDLER = "bubuh_direct_handler"


def serve_directly(router: APIRouter, handler: Handler) -> None:
    """The route last declared on ``router`` is answered by ``handler`` in the app's direct lane."""
    route = router.routes[-1]
    if not isinstance(route, APIRoute):
        raise TypeError(f"not an API route: {route!r}")
    setattr(route, _HANDLER, handler)


def handler_of(route: APIRoute) -> Handler | None:
    return getattr(route, _HANDLER, None)


class DirectLane:
    """ASGI middleware: a request whose first matching route has a direct handler is answered by it
    (its ``BubuhError`` by ``answer_error``, as the app's exception handler would); any other request,
    and any other exception, goes on as if the lane were not there."""

    def __init__(self, app: ASGIApp, routers: Sequence[APIRouter],
                 answer_error: Callable[[Request, errors.BubuhError], Response]) -> None:
        self.app = app
        self._answer_error = answer_error
        routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]   # the app's order
        # each direct route with the routes before it, which win the paths they share with it
        self._direct = [(route, handler, routes[:i]) for i, route in enumerate(routes)
                        if (handler := handler_of(route)) is not None]
        self._methods = {m for route, _, _ in self._direct for m in route.methods or ()}

    def _route_for(self, scope: Scope) -> tuple[Scope, Handler] | None:
        for route, handler, earlier in self._direct:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                if any(other.matches(scope)[0] is Match.FULL for other in earlier):
                    return None
                return child_scope, handler
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = (self._route_for(scope) if scope["type"] == "http" and scope["method"] in self._methods
                 else None)
        if found is None:
            await self.app(scope, receive, send)
            return
        child_scope, handler = found
        scope.update(child_scope)
        request = Request(scope, receive, send)
        try:
            response = await handler(request)
        except errors.BubuhError as exc:
            response = self._answer_error(request, exc)
        await response(scope, receive, send)
