"""The SuperLink's Control-API middlewares kept off its Fleet and runtime requests.

Flower 1.42's SuperLink serves the Control, Fleet and runtime APIs from one FastAPI app behind eight
``BaseHTTPMiddleware`` layers (``flwr.superlink.main._get_middleware``). Four belong to the Control API
(:data:`CONTROL_ONLY`) and pass any request outside ``/v1/control/`` straight on, and the Fleet event log passes
every request on when no event-log plugin is configured (fedsilo configures none); yet each layer costs each
request a task, memory streams and events on the SuperLink's one event loop, and every message and object a round
moves is such a request. :class:`ControlOnly` runs a wrapped middleware only for the requests it acts on and hands
the rest to the next layer directly; what the middleware does to the requests it acts on is unchanged.
:func:`install` applies it in the SuperLink process only (``python -m fedsilo.flower_tuning flower-superlink``).
"""

from __future__ import annotations

from typing import Any, Callable

CONTROL_PREFIX = "/v1/control/"
FLEET_PREFIX = "/v1/fleet/"
#: Flower's Control API middlewares, by name: each passes a request outside CONTROL_PREFIX on untouched.
CONTROL_ONLY = ("ControlSensitiveResponseMiddleware", "ControlAuthenticationMiddleware", "ControlLicenseMiddleware",
                "ControlEventLogMiddleware")
#: Flower's Fleet event-log middleware: passes every request on untouched unless an event-log plugin is set.
FLEET_EVENT_LOG = "FleetEventLogMiddleware"


def _control_request(scope: dict) -> bool:
    return scope["type"] != "http" or scope["path"].startswith(CONTROL_PREFIX)


def _logged_fleet_request(scope: dict) -> bool:
    if scope["type"] != "http":
        return True
    app = scope.get("app")
    plugin = getattr(getattr(app, "state", None), "fleet_event_log_plugin", None) if app is not None else None
    return plugin is not None and scope["path"].startswith(FLEET_PREFIX)


class ControlOnly:
    """A pure ASGI layer: ``middleware`` for the requests ``applies(scope)`` picks (anything that is not an HTTP
    request, too), the next layer directly for the rest."""

    def __init__(self, app: Any, middleware: Callable[..., Any], *args: Any, applies: Callable[[dict], bool] = _control_request,
                 **kwargs: Any) -> None:
        self.app = app
        self.wrapped = middleware(app, *args, **kwargs)
        self.applies = applies

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if self.applies(scope):
            await self.wrapped(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def gated(stack: list) -> list:
    """Flower's middleware list with the Control-only ones (and the Fleet event log) behind :class:`ControlOnly`."""
    from starlette.middleware import Middleware

    out = []
    for layer in stack:
        name = getattr(layer.cls, "__name__", "")
        if name in CONTROL_ONLY:
            out.append(Middleware(ControlOnly, layer.cls, *layer.args, **layer.kwargs))
        elif name == FLEET_EVENT_LOG:
            out.append(Middleware(ControlOnly, layer.cls, *layer.args, applies=_logged_fleet_request, **layer.kwargs))
        else:
            out.append(layer)
    return out


def install() -> int:
    """Gate the SuperLink app's Control-only middlewares in this process; returns how many layers were gated."""
    import flwr.superlink.main as superlink_main

    current = superlink_main._get_middleware
    if getattr(current, "gated", False):
        return current.count
    count = sum(getattr(m.cls, "__name__", "") in (*CONTROL_ONLY, FLEET_EVENT_LOG) for m in current())

    def _get_middleware() -> list:
        return gated(current())

    _get_middleware.gated, _get_middleware.count = True, count
    superlink_main._get_middleware = _get_middleware
    return count
