"""fedsilo's Flower tuning: opt-in by environment, and what it changes in the loaded Flower modules."""

from __future__ import annotations

import subprocess
import sys

from fedsilo import flower_tuning
from fedsilo.round_bench import round_overhead


def test_off_unless_the_environment_asks(monkeypatch):
    monkeypatch.delenv(flower_tuning.ENV, raising=False)
    assert flower_tuning.poll_interval() is None
    assert flower_tuning.apply() is False
    for bad in ("", "fast", "0", "60"):
        monkeypatch.setenv(flower_tuning.ENV, bad)
        assert flower_tuning.poll_interval() is None
    env = flower_tuning.tuned_env({"PATH": "/bin"})
    assert env[flower_tuning.ENV] == str(flower_tuning.POLL_S) and env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == str(flower_tuning.POLL_S)


def test_the_superlinks_own_launcher_polls_slowly_while_its_serverapps_stay_tuned():
    env = flower_tuning.superlink_env({"PATH": "/bin"})
    assert env[flower_tuning.ENV] == str(flower_tuning.POLL_S)  # inherited by the ServerApps it launches
    assert float(env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"]) == flower_tuning.SUPERLINK_TASK_POLL_S >= 1.0


def test_apply_shortens_flowers_waits_in_a_fresh_process():
    # A fresh interpreter: the patch changes module state, which must not leak into other tests.
    code = (
        "import time\n"
        "from fedsilo import flower_tuning\n"
        "from flwr.supercore.inflatable import inflatable_utils as iu\n"
        "from flwr.supernode import start_client_internal as sci\n"
        "before = dict(iu.pull_objects.__kwdefaults__)\n"
        "assert before['initial_backoff'] == 1 and before['backoff_cap'] == 10, before\n"
        "assert flower_tuning.apply(0.1) is True\n"
        "after = iu.pull_objects.__kwdefaults__\n"
        "assert (after['initial_backoff'], after['backoff_cap']) == flower_tuning.PULL_BACKOFF_S, after\n"
        "assert iu.pull_and_inflate_object_from_tree.__kwdefaults__['initial_backoff'] == flower_tuning.PULL_BACKOFF_S[0]\n"
        "t = time.perf_counter(); sci.time.sleep(3); slept = time.perf_counter() - t\n"
        "assert slept < 1.0, slept\n"
        "assert sci.time.time() > 0 and sci.time.monotonic() > 0\n"
        "backoff = sci.time.sleep.__self__\n"
        "assert sci._pull_and_store_message.backoff is backoff and sci._push_messages.backoff is backoff\n"
        "from flwr.supernode.servicer.runtime import runtime_handlers as rh\n"
        "import flwr.supernode.main as supernode_main\n"
        "assert supernode_main._RUNTIME_HANDLERS is rh\n"  # the module whose handlers the ClientApp's pushes reach
        "pushed = backoff._sleep.__self__\n"
        "sci.time.sleep(0)\n"  # the loop's sleep has seen every push so far
        "import threading\n"
        "def client_pushes():\n    time.sleep(0.3)\n    try:\n        rh.push_object(None, None, None)\n    except Exception:\n        pass\n"
        "threading.Thread(target=client_pushes).start()\n"
        "backoff.interval = 30.0; t = time.perf_counter(); sci.time.sleep(30); woke = time.perf_counter() - t\n"
        "assert 0.2 < woke < 10, woke\n"  # the ClientApp's push (a handler call, failed or not) ends the SuperNode's wait
        "before = pushed.count\n"
        "try:\n    rh.push_messages(None, None, None)\nexcept Exception:\n    pass\n"
        "assert pushed.count == before + 1, 'a ClientApp reply does not reach the SuperNode loop'\n"
        "from flwr.supernode import fleet_http_connection as fhc\n"
        "from flwr.supercore import heartbeat\n"
        "assert fhc.HEARTBEAT_DEFAULT_INTERVAL == heartbeat.HEARTBEAT_DEFAULT_INTERVAL == flower_tuning.HEARTBEAT_S\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_launcher_refuses_what_is_not_a_flower_command():
    done = subprocess.run([sys.executable, "-m", "fedsilo.flower_tuning", "rm"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "not a Flower command" in done.stderr


def test_round_overhead_subtracts_the_slowest_silo_of_each_phase():
    row = {"seconds": 10.0, "aggregate_seconds": 0.5,
           "sites": {"a": {"train_seconds": 4.0, "eval_seconds": 1.0}, "b": {"train_seconds": 3.0, "eval_seconds": 2.0}}}
    split = round_overhead({**row, "evaluation": "in round"})  # a SecAgg+ round: evaluation inside the round
    assert split == {"wall": 10.0, "train": 4.0, "evaluate": 2.0, "aggregate": 0.5, "overhead": 3.5, "evaluate_inside": 2.0}


def test_round_overhead_of_a_round_evaluated_in_the_next_rounds_training_subtracts_the_silos_message_only():
    row = {"seconds": 10.0, "aggregate_seconds": 0.5, "evaluation": "with the next round's training", "final_evaluation_seconds": 1.5,
           "sites": {"a": {"train_seconds": 4.0, "eval_seconds": 1.0}, "b": {"train_seconds": 3.0, "eval_seconds": 2.0}}}
    split = round_overhead(row)
    assert split == {"wall": 10.0, "train": 4.0, "evaluate": 2.0, "aggregate": 0.5, "overhead": 5.5, "evaluate_inside": 0.0}


class _Clock:
    def __init__(self) -> None:
        self.now, self.slept = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_an_idle_supernode_polls_once_a_second_and_a_message_brings_the_tuned_interval_back():
    clock = _Clock()
    backoff = flower_tuning.IdleBackoff(0.1, idle_after_s=300, idle_poll_s=1.0, clock=clock.monotonic, sleep=clock.sleep)
    backoff.sleep(3)  # Flower's wait between two polls for messages
    backoff.sleep(0.5)  # its wait between two checks for a reply
    assert clock.slept == [0.1, 0.1]
    clock.now = 299.0
    backoff.sleep(3)
    assert clock.slept[-1] == 0.1
    clock.now = 300.0
    backoff.sleep(3)
    backoff.sleep(0.5)  # never longer than Flower's own wait
    assert clock.slept[-2:] == [1.0, 0.5]
    backoff.active()
    backoff.sleep(3)
    assert clock.slept[-1] == 0.1


def test_the_supernode_loop_reports_each_message_and_reply_to_the_backoff():
    from types import SimpleNamespace

    clock = _Clock()
    backoff = flower_tuning.IdleBackoff(0.1, idle_after_s=300, clock=clock.monotonic, sleep=clock.sleep)
    pulled = iter([None, 7])
    seen_inside: list[float] = []

    def push(**kw):  # the SuperNode waiting for the ClientApp's reply, then sending it
        seen_inside.append(backoff.last_active)
        clock.now = 900.0
        return "pushed"

    loop = SimpleNamespace(_pull_and_store_message=lambda **kw: next(pulled), _push_messages=push)
    flower_tuning._mark_activity(loop, backoff)
    clock.now = 400.0
    assert loop._pull_and_store_message(state=None) is None  # no message: still idle since 0
    assert backoff.last_active == 0.0
    assert loop._pull_and_store_message(state=None) == 7
    assert backoff.last_active == 400.0
    clock.now = 450.0
    assert loop._push_messages(state=None) == "pushed"
    assert seen_inside == [450.0]  # active on entry: waiting out a long training is not idleness
    assert backoff.last_active == 900.0  # and again once the reply has gone
