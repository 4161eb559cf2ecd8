"""Long polling in the SuperLink (fedsilo.flower_longpoll): held pulls, upload tracking, and the wiring into Flower."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
from flwr.proto.message_pb2 import ObjectTree

from fedsilo.flower_longpoll import Arrivals, Uploads, held, tracking_messages, tracking_objects


class FakeState:
    """What a pull handler reads: messages waiting per puller; counts its calls and notes when the first came."""

    def __init__(self) -> None:
        self.waiting: list[str] = []
        self.calls = 0
        self.lock = threading.Lock()
        self.asked = threading.Event()

    def pull(self, request=None):
        with self.lock:
            self.calls += 1
            taken, self.waiting = self.waiting, []
        self.asked.set()
        return SimpleNamespace(messages_list=[_message(m) for m in taken])


def _message(message_id: str):
    return SimpleNamespace(metadata=SimpleNamespace(message_id=message_id), id=message_id)


def _ids(response) -> list[str]:
    return [m.id for m in response.messages_list]


def _after_first_pull(state: FakeState, action) -> threading.Thread:
    """Run ``action`` once the pull has been asked (and found nothing), from another thread."""

    def run():
        state.asked.wait(30)
        time.sleep(0.05)  # the pull is now waiting (or about to: a push before its wait is not missed either)
        action()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _later(seconds: float, action) -> threading.Thread:
    timer = threading.Timer(seconds, action)
    timer.start()
    return timer


#: A hold far longer than any of these tests should take: a pull that returns well before it was woken.
LONG_HOLD_S = 30.0
WOKEN_WITHIN_S = 10.0


def test_a_pull_that_finds_a_message_is_answered_at_once():
    state, arrivals = FakeState(), Arrivals()
    state.waiting = ["m1"]
    assert _ids(held(state.pull, arrivals, hold_s=LONG_HOLD_S)(request=None)) == ["m1"]
    assert state.calls == 1


def test_an_empty_pull_is_held_until_a_push_arrives():
    state, arrivals = FakeState(), Arrivals()

    def push():
        state.waiting = ["m1"]
        arrivals.bump()

    _after_first_pull(state, push)
    started = time.monotonic()
    response = held(state.pull, arrivals, hold_s=LONG_HOLD_S)(request=None)
    assert time.monotonic() - started < WOKEN_WITHIN_S  # woken by the push, not at the hold's end
    assert _ids(response) == ["m1"]
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
    asked_while_incomplete = []

    def pull(request):
        asked_while_incomplete.append(uploads.incomplete([request]))
        return state.pull(request)

    def push_objects():
        for object_id in ("obj-a", "obj-b"):
            time.sleep(0.05)
            if uploads.object_stored(object_id):
                arrivals.bump()

    thread = threading.Thread(target=push_objects, daemon=True)
    thread.start()
    started = time.monotonic()
    response = held(pull, arrivals, ready=lambda request: not uploads.incomplete([request]), uploads=uploads, hold_s=LONG_HOLD_S)(7)
    assert time.monotonic() - started < WOKEN_WITHIN_S
    assert _ids(response) == ["m1"]
    assert asked_while_incomplete == [False]  # asked once, when the last object was in


def test_an_incomplete_message_is_answered_when_the_hold_ends_and_then_forgotten():
    state, arrivals, uploads = FakeState(), Arrivals(), Uploads()
    state.waiting = ["m1"]
    uploads.stored("m1", 7, {"obj-a"})  # never completed (its sender died mid-push)
    pull = held(state.pull, arrivals, ready=lambda request: not uploads.incomplete([request]), uploads=uploads, hold_s=0.2)
    assert _ids(pull(7)) == ["m1"]  # the puller retries its objects, as without long polling
    assert state.calls == 1
    assert not uploads.incomplete([7])  # its next pulls are not held back by it
    state.waiting = ["m2"]
    assert _ids(pull(7)) == ["m2"] and state.calls == 2


def test_pulls_beyond_the_held_limit_are_answered_at_once():
    state, arrivals = FakeState(), Arrivals()
    slots = threading.BoundedSemaphore(1)
    slots.acquire()  # another pull holds the only slot
    response = held(state.pull, arrivals, hold_s=LONG_HOLD_S, slots=slots)(request=None)
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
        with pytest.raises(RuntimeError):
            held(pull, arrivals, hold_s=LONG_HOLD_S, slots=slots)(request=None)
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
    started = time.monotonic()
    try:
        arrivals.sleep(LONG_HOLD_S)
    finally:
        timer.cancel()
    assert time.monotonic() - started < WOKEN_WITHIN_S
    assert arrivals.count == 1


def test_a_push_between_a_loops_check_and_its_sleep_is_not_missed():
    arrivals = Arrivals()
    arrivals.sleep(0.0)
    arrivals.bump()  # lands after the loop checked, before it sleeps
    started = time.monotonic()
    arrivals.sleep(LONG_HOLD_S)  # returns at once
    assert time.monotonic() - started < WOKEN_WITHIN_S
    assert arrivals.count == 1


def test_installed_handlers_hold_on_flowers_own_request_types(monkeypatch):
    """install() over stand-ins for Flower's handlers (its state needs a running SuperLink), called with Flower's own
    protobuf requests and responses: a SuperNode's pull waits for the ServerApp's message to arrive whole, and the
    ServerApp's pull for the silo's reply to arrive whole. monkeypatch puts Flower's handlers back afterwards."""
    from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse, PushMessagesRequest, PushMessagesResponse
    from flwr.proto.message_pb2 import Message as MessageProto, Metadata, PushObjectRequest, PushObjectResponse
    from flwr.proto.node_pb2 import Node
    from flwr.proto.runtime_pb2 import (PullAppMessagesRequest, PullAppMessagesResponse, PushAppMessagesRequest,
                                        PushAppMessagesResponse)
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    from fedsilo import flower_longpoll

    stored: dict[str, MessageProto] = {}  # what Flower's state holds: message id -> message
    objects: set[str] = set()  # objects pushed so far
    asked = []

    def take(match) -> list:
        taken = [m for m in stored.values() if match(m)]
        for m in taken:
            del stored[m.metadata.message_id]
        return taken

    def fleet_pull(request, state, store):
        asked.append(("node", request.node.node_id, {"ins", "model"} <= objects))
        return PullMessagesResponse(messages_list=take(lambda m: m.metadata.dst_node_id == request.node.node_id))

    def runtime_pull(request, state, task):
        asked.append(("serverapp", tuple(request.message_ids), {"rep", "update"} <= objects))
        return PullAppMessagesResponse(messages_list=take(lambda m: m.metadata.reply_to_message_id in request.message_ids))

    def runtime_push(request, state, task):
        for m in request.messages_list:
            stored[m.metadata.message_id] = m
        return PushAppMessagesResponse(message_ids=[m.metadata.message_id for m in request.messages_list],
                                       objects_to_push=["ins", "model"])

    def fleet_push(request, state):
        m = request.messages_list[0]
        stored[m.metadata.message_id] = m
        return PushMessagesResponse(results={m.metadata.message_id: 0}, objects_to_push=["rep", "update"])

    def push_object(request, state, task=None):
        objects.add(request.object_id)
        return PushObjectResponse(stored=True)

    for module, name, fake in ((fleet_handlers, "pull_messages", fleet_pull), (runtime_handlers, "pull_messages", runtime_pull),
                               (runtime_handlers, "push_messages", runtime_push), (fleet_handlers, "push_messages", fleet_push),
                               (runtime_handlers, "push_object", push_object), (fleet_handlers, "push_object", push_object)):
        monkeypatch.setattr(module, name, fake)
    flower_longpoll.install(hold_s=LONG_HOLD_S)

    def pushed_later(push):
        thread = threading.Thread(target=lambda: (time.sleep(0.2), push()), daemon=True)
        thread.start()
        return thread

    # Down: the ServerApp pushes a message for node 5 (positional request, as the runtime router passes it).
    instruction = MessageProto(metadata=Metadata(message_id="ins", dst_node_id=5))
    runtime_handlers.push_messages(PushAppMessagesRequest(
        messages_list=[instruction], message_object_trees=[ObjectTree(object_id="ins", children=[ObjectTree(object_id="model")])]),
        None, None)
    pushed_later(lambda: [runtime_handlers.push_object(PushObjectRequest(object_id=o), None, None) for o in ("ins", "model")])
    started = time.monotonic()
    got = fleet_handlers.pull_messages(request=PullMessagesRequest(node=Node(node_id=5)), state=None, store=None)
    assert time.monotonic() - started < WOKEN_WITHIN_S
    assert [m.metadata.message_id for m in got.messages_list] == ["ins"]
    assert asked == [("node", 5, True)]  # not asked while the model was still coming

    # Up: node 5 replies (keyword request, as the Fleet router passes it); the ServerApp waits for it whole.
    asked.clear()
    reply = MessageProto(metadata=Metadata(message_id="rep", reply_to_message_id="ins"))
    fleet_handlers.push_messages(request=PushMessagesRequest(
        messages_list=[reply], message_object_trees=[ObjectTree(object_id="rep", children=[ObjectTree(object_id="update")])]),
        state=None)
    pushed_later(lambda: [fleet_handlers.push_object(request=PushObjectRequest(object_id=o), state=None) for o in ("rep", "update")])
    started = time.monotonic()
    got = runtime_handlers.pull_messages(PullAppMessagesRequest(message_ids=["ins"]), None, None)
    assert time.monotonic() - started < WOKEN_WITHIN_S
    assert [m.metadata.message_id for m in got.messages_list] == ["rep"]
    assert asked == [("serverapp", ("ins",), True)]
