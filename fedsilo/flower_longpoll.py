"""Long polling in Flower's SuperLink: a pull that would find nothing complete waits there until it would.

Flower 1.42's SuperNodes ask the SuperLink for messages, and its ServerApp asks for replies, by polling
(tuned to every tenth of a second, fedsilo.flower_tuning). Each request costs the SuperLink 10 to 25 ms
of CPU (its HTTP stack, node authentication, SQL state), and the SuperLink is one process. Traced during
a round's change-over (3 silos, demo model):

- the idle silos' and the ServerApp's polls were about 40 requests a second, most of what the SuperLink
  served, and each request that moved the round along waited 100 to 300 ms behind them;
- a message is pullable as soon as it is stored, before its objects (the model) are pushed, so every
  puller then asked for objects that were not there yet, retrying, while the pusher's own requests
  queued behind those retries.

Long polling (RFC 6202, section 2.2) removes both: a pull is held in the SuperLink until a message for
the puller is stored with all of its objects, or :data:`HOLD_S` passes, and is then answered as Flower
would answer it. A SuperNode's pull waits for the ServerApp's pushes; the ServerApp's pull for replies
waits for the SuperNodes' pushes. Clients need no change: a held pull is an ordinary slow answer, far
inside their HTTP timeout (Flower's: 30 s). A SuperNode does not pull while its ClientApp runs (it waits
for the reply locally), so holding its pull delays nothing it has to send; its heartbeats come from a
thread of their own. A message whose objects are still missing when the hold ends is answered as
before (the puller retries its objects), so a slow upload costs at most one hold.

Flower has no setting for this; :func:`install` wraps the SuperLink's message and object handlers,
which its routers call as module attributes, in the SuperLink process only
(``python -m fedsilo.flower_tuning flower-superlink ...``). At most :data:`MAX_HELD` pulls are held at
once; more are answered at once, as plain polls, so held pulls never take all of the worker threads
the SuperLink's other requests need (anyio's default: 40).

Known costs of holding: a pull answers (and Flower marks delivered) what it finds even if its client went
away during the hold (a handler cannot see the connection), so a SuperNode restarted within a hold of the
next message's arrival misses that message, as a silo that never answers does (the round goes on
without it after ``round_timeout_s``, and it takes part in the next); and the ServerApp's last check may
be held past its round timeout by up to :data:`HOLD_S`.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, Hashable, Iterable

#: Longest a pull is held, in seconds: an idle silo asks about every HOLD_S (plus the SuperNode's own pause)
#: instead of ten times a second, and a stopping SuperLink waits at most this long for its held requests.
HOLD_S = 2.0
#: Most pulls held at once (one per silo, plus the ServerApp's); the rest are answered at once.
MAX_HELD = 24
#: A message still missing objects after this long (its sender died mid-push) no longer holds its puller back.
STALE_S = 60.0


class Arrivals:
    """A count of completed pushes that a held pull can wait on."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self.count = 0
        self._slept_until = 0  # the count when sleep() last returned

    def bump(self) -> None:
        with self._changed:
            self.count += 1
            self._changed.notify_all()

    def wait_past(self, seen: int, timeout: float) -> None:
        """Return once the count differs from ``seen`` or ``timeout`` seconds pass."""
        with self._changed:
            self._changed.wait_for(lambda: self.count != seen, timeout=max(0.0, timeout))

    def sleep(self, seconds: float) -> None:
        """A sleep for one polling loop: ends early at a push since this last returned (one that lands between
        the loop's check and its sleep is not missed; at worst the loop checks once more for nothing)."""
        with self._changed:
            seen = self._slept_until
            self._changed.wait_for(lambda: self.count != seen, timeout=max(0.0, seconds))
            self._slept_until = self.count


class Uploads:
    """Messages stored in the SuperLink whose objects are still being pushed, keyed by who will pull them
    (a SuperNode's node id for an instruction, the instruction's id for a reply)."""

    def __init__(self, *, stale_s: float = STALE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._missing: dict[str, tuple[Hashable, set[str], float]] = {}  # message id -> (puller, objects to come, since)
        self.stale_s, self.clock = stale_s, clock

    def stored(self, message_id: str, puller: Hashable, missing: Iterable[str]) -> None:
        missing = set(missing)
        if message_id and missing:
            with self._lock:
                self._missing[message_id] = (puller, missing, self.clock())

    def object_stored(self, object_id: str) -> bool:
        """Count ``object_id`` as pushed; whether that completed a message."""
        completed = False
        with self._lock:
            for message_id, (_, objects, _) in list(self._missing.items()):
                objects.discard(object_id)
                if not objects:
                    del self._missing[message_id]
                    completed = True
        return completed

    def delivered(self, message_ids: Iterable[str]) -> None:
        """Forget messages a pull has answered with (whole or not: a puller is held back at most one hold by an
        upload that never finishes, e.g. from a sender that died mid-push)."""
        with self._lock:
            for message_id in message_ids:
                self._missing.pop(message_id, None)

    def incomplete(self, pullers: Iterable[Hashable]) -> bool:
        """Whether a message for any of ``pullers`` is still missing objects (stale ones forgotten)."""
        pullers = set(pullers)
        with self._lock:
            now = self.clock()
            for message_id, (_, _, since) in list(self._missing.items()):
                if now - since > self.stale_s:
                    del self._missing[message_id]
            return any(puller in pullers for puller, _, _ in self._missing.values())


def held(pull: Callable[..., Any], arrivals: Arrivals, *, ready: Callable[..., bool] = lambda *a, **k: True,
         uploads: Uploads | None = None, hold_s: float = HOLD_S, slots: threading.Semaphore | None = None) -> Callable[..., Any]:
    """``pull`` (a handler whose response has a ``messages_list``), held until ``ready(*args, **kwargs)`` and the
    pull finds something, asked again each time ``arrivals`` changes, for at most ``hold_s``; then asked once
    more and answered whatever it finds (and those messages forgotten by ``uploads``). The count is read before
    each check, so a push that lands between the check and the wait is not missed."""

    def answer(*args: Any, **kwargs: Any) -> Any:
        response = pull(*args, **kwargs)
        if uploads is not None and len(response.messages_list):
            uploads.delivered(m.metadata.message_id for m in response.messages_list)
        return response

    @functools.wraps(pull)
    def pull_held(*args: Any, **kwargs: Any) -> Any:
        seen = arrivals.count
        if ready(*args, **kwargs):
            response = answer(*args, **kwargs)
            if len(response.messages_list):
                return response
        if slots is not None and not slots.acquire(blocking=False):
            return answer(*args, **kwargs)
        try:
            deadline = time.monotonic() + hold_s
            while (remaining := deadline - time.monotonic()) > 0:
                arrivals.wait_past(seen, remaining)
                if arrivals.count == seen:  # the hold ended with nothing pushed
                    break
                seen = arrivals.count
                if ready(*args, **kwargs):
                    response = answer(*args, **kwargs)
                    if len(response.messages_list):
                        return response
            return answer(*args, **kwargs)
        finally:
            if slots is not None:
                slots.release()

    pull_held.arrivals = arrivals  # for tests: which pushes wake it
    return pull_held


def _request(args: tuple, kwargs: dict) -> Any:
    """The protobuf request of a handler call (the runtime router passes it by position, the Fleet one by name)."""
    return kwargs["request"] if "request" in kwargs else args[0]


def _tree_ids(tree) -> set[str]:
    """Every object id in a message's ObjectTree."""
    ids, stack = set(), [tree]
    while stack:
        node = stack.pop()
        ids.add(node.object_id)
        stack.extend(node.children)
    return ids


def tracking_messages(push: Callable[..., Any], uploads: Uploads, arrivals: Arrivals, puller: Callable[[Any], Hashable],
                      stored_ids: Callable[[Any, Any], list[str]]) -> Callable[..., Any]:
    """``push`` (a PushMessages handler), noting in ``uploads`` each stored message's objects still to come
    (``puller(message)`` will pull it; ``stored_ids(request, response)``: the ids it stored, "" for one it
    did not), and :func:`announcing` it on ``arrivals``."""

    def push_tracked(*args: Any, **kwargs: Any) -> Any:
        response = push(*args, **kwargs)
        request, to_come = _request(args, kwargs), set(response.objects_to_push)
        for message, tree, message_id in zip(request.messages_list, request.message_object_trees, stored_ids(request, response)):
            uploads.stored(message_id, puller(message), _tree_ids(tree) & to_come)
        return response

    return announcing(functools.wraps(push)(push_tracked), arrivals)


def tracking_objects(push: Callable[..., Any], uploads: Uploads, arrivals: Arrivals) -> Callable[..., Any]:
    """``push`` (a PushObject handler), bumping ``arrivals`` when the object completes a message in ``uploads``."""

    @functools.wraps(push)
    def push_tracked(*args: Any, **kwargs: Any) -> Any:
        response = push(*args, **kwargs)
        if getattr(response, "stored", True) and uploads.object_stored(_request(args, kwargs).object_id):
            arrivals.bump()
        return response

    return push_tracked


def announcing(push: Callable[..., Any], arrivals: Arrivals) -> Callable[..., Any]:
    """``push``, bumping ``arrivals`` once it has run (or failed: a waiter just checks again)."""

    @functools.wraps(push)
    def push_announced(*args: Any, **kwargs: Any) -> Any:
        try:
            return push(*args, **kwargs)
        finally:
            arrivals.bump()

    return push_announced


def install(*, hold_s: float = HOLD_S, max_held: int = MAX_HELD) -> dict[str, Any]:
    """Hold the SuperLink's pulls in this process: the Fleet API's (SuperNodes) until the ServerApp has pushed a
    message for the node with its objects, the runtime API's (ServerApp) until a SuperNode has pushed a
    reply with its objects. Returns the trackers, for tests."""
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    down, up = Uploads(), Uploads()
    to_nodes, to_serverapp = Arrivals(), Arrivals()
    slots = threading.BoundedSemaphore(max_held)
    runtime_handlers.push_messages = tracking_messages(
        runtime_handlers.push_messages, down, to_nodes, lambda m: m.metadata.dst_node_id,
        lambda request, response: list(response.message_ids))
    runtime_handlers.push_object = tracking_objects(runtime_handlers.push_object, down, to_nodes)
    fleet_handlers.push_messages = tracking_messages(
        fleet_handlers.push_messages, up, to_serverapp, lambda m: m.metadata.reply_to_message_id,
        lambda request, response: [m.metadata.message_id if m.metadata.message_id in response.results else ""
                                   for m in request.messages_list])
    fleet_handlers.push_object = tracking_objects(fleet_handlers.push_object, up, to_serverapp)
    fleet_handlers.pull_messages = held(
        fleet_handlers.pull_messages, to_nodes, hold_s=hold_s, slots=slots, uploads=down,
        ready=lambda *a, **k: not down.incomplete([_request(a, k).node.node_id]))
    runtime_handlers.pull_messages = held(
        runtime_handlers.pull_messages, to_serverapp, hold_s=hold_s, slots=slots, uploads=up,
        ready=lambda *a, **k: not up.incomplete(_request(a, k).message_ids))
    return {"down": down, "up": up, "to_nodes": to_nodes, "to_serverapp": to_serverapp}
