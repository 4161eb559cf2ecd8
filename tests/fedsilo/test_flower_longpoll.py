"""Long polling in the SuperLink (fedsilo.flower_longpoll): held pulls, upload tracking, and the wiring into Flower."""

from __future__ import annotations

import subprocess
import sys
import threading
from types import SimpleNamespace

from flwr.proto.message_pb2 import ObjectTree

from fedsilo.flower_longpoll import Arrivals, Uploads, held, tracking_messages, tracking_objects


class FakeState:
    """What a pull handler reads: messages waiting per puller; counts its calls."""

    def __init__(self) -> None:
        self.waiting: list[str] = []
        self.calls = 0
        self.lock = threading.Lock()

    def pull(self, request=None):
        with self.lock:
            self.calls += 1
            taken, self.waiting = self.waiting, []
        return SimpleNamespace(messages_list=taken)


def _later(seconds: float, action) -> threading.Thread:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


def test_a_pull_that_finds_a_message_is_answered_at_once():
    state, arrivals = FakeState(), Arrivals()
    state.waiting = ["m1"]
    assert held(state.pull, arrivals, hold_s=30.0)(request=None).messages_list == ["m1"]
    assert state.calls == 1


def test_an_empty_pull_is_held_until_a_push_arrives():
    state, arrivals = FakeState(), Arrivals()

    def push():
        state.waiting = ["m1"]
        arrivals.bump()

    timer = _later(0.2, push)
    try:
        response = held(state.pull, arrivals, hold_s=30.0)(request=None)
    finally:
        timer.cancel()
    assert response.messages_list == ["m1"]
    assert state.calls == 2  # once before the hold, once when the push woke it


def test_a_pull_is_answered_empty_when_the_hold_ends():
    state, arrivals = FakeState(), Arrivals()
    response = held(state.pull, arrivals, hold_s=0.2)(request=None)
    assert response.messages_list == []
    assert state.calls == 2  # asked before the hold and once more at its end


def test_a_pull_waits_for_the_message_objects_and_is_not_asked_before():
    state, arrivals, uploads = FakeState(), Arrivals(), Uploads()
    state.waiting = ["m1"]  # stored, but its model is still being pushed
    uploads.stored("m1", 7, {"obj-a", "obj-b"})
    pull = held(state.pull, arrivals, ready=lambda request: not uploads.incomplete([request]), hold_s=30.0)

    def push_objects():
        for object_id in ("obj-a", "obj-b"):
            if uploads.object_stored(object_id):
                arrivals.bump()

    timer = _later(0.2, push_objects)
    try:
        response = pull(7)
    finally:
        timer.cancel()
    assert response.messages_list == ["m1"]
    assert state.calls == 1  # never asked while the objects were missing


def test_an_incomplete_message_is_answered_when_the_hold_ends():
    state, arrivals, uploads = FakeState(), Arrivals(), Uploads()
    state.waiting = ["m1"]
    uploads.stored("m1", 7, {"obj-a"})  # never completed (its sender died)
    response = held(state.pull, arrivals, ready=lambda request: not uploads.incomplete([request]), hold_s=0.2)(7)
    assert response.messages_list == ["m1"]  # the puller retries its objects, as without long polling
    assert state.calls == 1


def test_pulls_beyond_the_held_limit_are_answered_at_once():
    state, arrivals = FakeState(), Arrivals()
    slots = threading.BoundedSemaphore(1)
    slots.acquire()  # another pull holds the only slot
    response = held(state.pull, arrivals, hold_s=30.0, slots=slots)(request=None)
    assert response.messages_list == [] and state.calls == 2
    slots.release()  # and the wrapper did not release a slot it never took
    assert slots.acquire(blocking=False) and not slots.acquire(blocking=False)


def test_a_failed_pull_gives_its_slot_back():
    arrivals, slots = Arrivals(), threading.BoundedSemaphore(1)
    calls = []

    def pull(request=None):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("state gone")
        return SimpleNamespace(messages_list=[])

    timer = _later(0.1, arrivals.bump)
    try:
        try:
            held(pull, arrivals, hold_s=30.0, slots=slots)(request=None)
        except RuntimeError:
            pass
    finally:
        timer.cancel()
    assert slots.acquire(blocking=False)


def test_uploads_are_tracked_per_puller_and_forgotten_when_stale():
    now = [0.0]
    uploads = Uploads(stale_s=60.0, clock=lambda: now[0])
    uploads.stored("m1", 1, {"a", "b"})
    uploads.stored("m2", 2, {"b"})
    uploads.stored("m3", 3, set())  # nothing to come: never incomplete
    assert uploads.incomplete([1]) and uploads.incomplete([2]) and not uploads.incomplete([3])
    assert uploads.object_stored("b")  # completes m2
    assert uploads.incomplete([1]) and not uploads.incomplete([2])
    assert not uploads.object_stored("x")
    now[0] = 61.0
    assert not uploads.incomplete([1])


def test_pushed_messages_are_tracked_with_the_objects_still_to_come():
    uploads, arrivals = Uploads(), Arrivals()
    tree = ObjectTree(object_id="msg", children=[ObjectTree(object_id="rd", children=[ObjectTree(object_id="model")])])
    request = SimpleNamespace(messages_list=[SimpleNamespace(node=5)], message_object_trees=[tree])

    def push_messages(request, state, task):
        return SimpleNamespace(message_ids=["msg"], objects_to_push=["msg", "model", "elsewhere"])

    def push_object(request, state, task):
        return SimpleNamespace(stored=True)

    push = tracking_messages(push_messages, uploads, arrivals, lambda m: m.node, lambda req, resp: list(resp.message_ids))
    push(request, None, None)  # the runtime router passes the request by position
    assert arrivals.count == 1 and uploads.incomplete([5])
    objects = tracking_objects(push_object, uploads, arrivals)
    objects(SimpleNamespace(object_id="msg"), None, None)
    assert arrivals.count == 1 and uploads.incomplete([5])  # the model is still to come
    objects(request=SimpleNamespace(object_id="model"), state=None, task=None)  # the Fleet router, by name
    assert arrivals.count == 2 and not uploads.incomplete([5])


def test_a_message_not_stored_is_not_tracked():
    uploads, arrivals = Uploads(), Arrivals()
    request = SimpleNamespace(messages_list=[SimpleNamespace(node=5)], message_object_trees=[ObjectTree(object_id="msg")])
    push = tracking_messages(lambda request, state: SimpleNamespace(message_ids=[""], objects_to_push=["msg"]),
                             uploads, arrivals, lambda m: m.node, lambda req, resp: list(resp.message_ids))
    push(request=request, state=None)
    assert not uploads.incomplete([5]) and arrivals.count == 1


def test_install_wraps_the_handlers_flower_routes_to():
    """In a fresh interpreter, as in the SuperLink: Flower's routers must reach the handlers through the module
    attributes this replaces (a Flower release that binds them by name would silently turn long polling off)."""
    code = """
from fedsilo.flower_longpoll import install
trackers = install()
from flwr.superlink.servicer.fleet import fleet_handlers
from flwr.superlink.servicer.runtime import runtime_handlers
import importlib
import flwr.superlink.main as superlink_main
fleet_router = importlib.import_module("flwr.superlink.routers.fleet.router")  # the module (its package exports the APIRouter)
runtime_router = importlib.import_module("flwr.supercore.routers.runtime.router")
assert fleet_handlers.pull_messages.arrivals is trackers["to_nodes"]
assert runtime_handlers.pull_messages.arrivals is trackers["to_serverapp"]
assert fleet_router.fleet_handlers is fleet_handlers
assert superlink_main._RUNTIME_HANDLERS is runtime_handlers
import inspect
for name in ("pull_messages", "push_messages", "push_object"):
    assert f"fleet_handlers.{name}(" in inspect.getsource(fleet_router), name
    assert f"handlers.{name}(request, state, task)" in inspect.getsource(runtime_router), name
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_polling_loops_sleep_ends_at_a_push():
    arrivals = Arrivals()
    timer = _later(0.2, arrivals.bump)
    try:
        arrivals.sleep(30.0)  # returns at the push, not after 30 s (the test would time out)
    finally:
        timer.cancel()
    assert arrivals.count == 1


def test_a_push_between_a_loops_check_and_its_sleep_is_not_missed():
    arrivals = Arrivals()
    arrivals.sleep(0.0)
    arrivals.bump()  # lands after the loop checked, before it sleeps
    arrivals.sleep(30.0)  # returns at once
    assert arrivals.count == 1
