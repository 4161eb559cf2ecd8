"""The SuperLink's Control-API middlewares kept off Fleet and runtime requests (fedsilo.flower_http), against Flower's own."""

from __future__ import annotations

import subprocess
import sys

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from fedsilo.flower_http import CONTROL_ONLY, FLEET_EVENT_LOG, ControlOnly, gated


def _app(middleware: list) -> Starlette:
    async def endpoint(request):
        return PlainTextResponse(f"{request.url.path} answered")

    paths = ("/v1/fleet/pull-messages", "/v1/runtime/pull-messages", "/v1/control/list-runs")
    return Starlette(routes=[Route(p, endpoint, methods=["POST"]) for p in paths], middleware=middleware)


def _flower_stack() -> list:
    from flwr.superlink.main import _get_middleware

    return _get_middleware()


def test_flowers_stack_is_what_the_gate_expects_and_only_those_layers_are_gated():
    """A Flower release that renames, drops or adds a Control middleware fails here, not silently in production."""
    stack = _flower_stack()
    names = [getattr(m.cls, "__name__", "") for m in stack]
    assert set(CONTROL_ONLY) | {FLEET_EVENT_LOG} <= set(names)
    out = gated(stack)
    assert len(out) == len(stack)
    for before, after, name in zip(stack, out, names):
        if name in CONTROL_ONLY or name == FLEET_EVENT_LOG:
            assert after.cls is ControlOnly and after.args[0] is before.cls
        else:
            assert after is before  # node authentication, protobuf translation and error translation stay as they are
    assert [n for n in names if n.startswith("Control")] == [n for n in names if n in CONTROL_ONLY]  # no Control layer left ungated


@pytest.mark.parametrize("name", CONTROL_ONLY)
def test_each_gated_flower_middleware_passes_non_control_requests_on_untouched(name):
    """The premise of the gate, checked on Flower's own classes: outside /v1/control/ each answers exactly as the app."""
    (layer,) = [m for m in _flower_stack() if getattr(m.cls, "__name__", "") == name]
    with TestClient(_app([layer])) as client:
        for path in ("/v1/fleet/pull-messages", "/v1/runtime/pull-messages"):
            response = client.post(path, content=b"x")
            assert response.status_code == 200 and response.text == f"{path} answered"
            assert "cache-control" not in response.headers


def test_the_fleet_event_log_passes_requests_on_untouched_without_a_plugin():
    (layer,) = [m for m in _flower_stack() if getattr(m.cls, "__name__", "") == FLEET_EVENT_LOG]
    app = _app([layer])
    app.state.fleet_event_log_plugin = None
    with TestClient(app) as client:
        assert client.post("/v1/fleet/pull-messages", content=b"x").text == "/v1/fleet/pull-messages answered"


class Recording(BaseHTTPMiddleware):
    seen: list[str] = []

    async def dispatch(self, request, call_next):
        Recording.seen.append(request.url.path)
        response = await call_next(request)
        response.headers["x-recorded"] = "1"
        return response


def test_control_only_runs_its_middleware_for_control_requests_and_skips_it_for_the_rest():
    Recording.seen = []
    with TestClient(_app([Middleware(ControlOnly, Recording)])) as client:  # the lifespan goes through it too
        fleet = client.post("/v1/fleet/pull-messages", content=b"x")
        runtime = client.post("/v1/runtime/pull-messages", content=b"x")
        control = client.post("/v1/control/list-runs", content=b"x")
    assert fleet.text == "/v1/fleet/pull-messages answered" and "x-recorded" not in fleet.headers
    assert runtime.text == "/v1/runtime/pull-messages answered" and "x-recorded" not in runtime.headers
    assert control.text == "/v1/control/list-runs answered" and control.headers["x-recorded"] == "1"
    assert Recording.seen == ["/v1/control/list-runs"]


def test_a_fleet_event_log_with_a_plugin_still_sees_fleet_requests():
    from fedsilo.flower_http import _logged_fleet_request

    Recording.seen = []
    app = _app([Middleware(ControlOnly, Recording, applies=_logged_fleet_request)])
    with TestClient(app) as client:
        app.state.fleet_event_log_plugin = None
        client.post("/v1/fleet/pull-messages", content=b"x")
        app.state.fleet_event_log_plugin = object()  # a configured plugin
        client.post("/v1/fleet/pull-messages", content=b"x")
        client.post("/v1/runtime/pull-messages", content=b"x")
    assert Recording.seen == ["/v1/fleet/pull-messages"]


def test_install_gates_the_superlink_app_flower_builds():
    """In a fresh interpreter, as the SuperLink launcher does: Flower's create_app() picks up the gated stack."""
    code = (
        "from fedsilo import flower_http\n"
        "n = flower_http.install()\n"
        "assert flower_http.install() == n == 5, n\n"
        "from flwr.superlink.main import create_app\n"
        "app = create_app()\n"
        "gated = [m.args[0].__name__ for m in app.user_middleware if m.cls is flower_http.ControlOnly]\n"
        "assert sorted(gated) == sorted(flower_http.CONTROL_ONLY + (flower_http.FLEET_EVENT_LOG,)), gated\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
