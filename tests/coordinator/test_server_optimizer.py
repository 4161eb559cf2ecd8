"""Server optimizers: sgd by hand; adam and yogi against Flower's own FedAdam / FedYogi strategies
over three rounds; checkpoint round trip; argument errors naming the plan key."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedYogi

from coordinator.server_optimizer import build_server_optimizer
from fedsilo.errors import ConfigError


def test_sgd_is_x_plus_lr_delta_in_each_dtype():
    x = {"w": np.array([1.0, 2.0], dtype=np.float32), "n": np.array([5], dtype=np.int64)}
    d = {"w": np.array([0.5, -1.0], dtype=np.float32), "n": np.array([2], dtype=np.int64)}
    opt = build_server_optimizer("sgd", 0.5, None)
    out = opt.step(x, d)
    assert opt.name == "sgd" and out["w"].dtype == np.float32 and out["n"].dtype == np.int64
    assert out["w"].tolist() == [1.25, 1.5] and out["n"].tolist() == [6]
    assert x["w"].tolist() == [1.0, 2.0]  # inputs untouched
    assert opt.state_dict() == {}


def _reply(arrays):
    """A train reply as a SuperNode would send it (built from metadata: no running app needed)."""
    md = Metadata(run_id=1, message_id="m", src_node_id=1, dst_node_id=0, reply_to_message_id="i", group_id="1",
                  created_at=0.0, ttl=1e9, message_type="train")
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                          "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, metadata=md)


def _flower_rounds(strategy, x0, deltas):
    """Drive Flower's strategy: one reply per round carrying global + delta (weight 1, so Flower's
    FedAvg step returns it unchanged and its pseudo-gradient is (x + d) - x). Returns the states and
    the pseudo-gradients Flower saw."""
    x, states, seen = dict(x0), [], []
    for rnd, d in enumerate(deltas, start=1):
        strategy.current_arrays = dict(x)  # what configure_train records before sending the round
        local = {k: x[k] + d[k] for k in x}
        seen.append({k: local[k] - x[k] for k in x})
        arrays, _ = strategy.aggregate_train(rnd, [_reply(local)])
        x = {k: a.numpy() for k, a in arrays.items()}
        states.append(x)
    return states, seen


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-6)])
@pytest.mark.parametrize("name, flower_cls, args, lr", [
    ("adam", FedAdam, {}, 0.1), ("adam", FedAdam, {"beta1": 0.8, "beta2": 0.95, "tau": 1e-2}, 0.3),
    ("yogi", FedYogi, {}, 0.01), ("yogi", FedYogi, {"beta1": 0.5, "beta2": 0.9, "tau": 0.1}, 1.0)])
def test_adaptive_optimizers_match_flower_over_three_rounds(name, flower_cls, args, lr, dtype, rtol):
    rs = np.random.RandomState(3)
    x0 = {"w": rs.randn(4, 3).astype(dtype), "b": rs.randn(5).astype(dtype)}
    deltas = [{k: (rs.randn(*v.shape) * 0.3).astype(dtype) for k, v in x0.items()} for _ in range(3)]
    flower = flower_cls(eta=lr, beta_1=args.get("beta1", 0.9), beta_2=args.get("beta2", 0.99), tau=args.get("tau", 1e-3))
    expected, seen = _flower_rounds(flower, x0, deltas)
    opt = build_server_optimizer(name, lr, args)
    x = dict(x0)
    for want, d in zip(expected, seen):
        x = opt.step(x, d)
        for k in x0:
            assert x[k].dtype == dtype
            np.testing.assert_allclose(x[k], want[k], rtol=rtol, atol=0)
        x = {k: want[k].astype(dtype) for k in x0}  # continue from Flower's state, as Flower does


@pytest.mark.parametrize("name", ["adam", "yogi"])
def test_state_dict_round_trip_reproduces_the_next_step(name):
    rs = np.random.RandomState(4)
    x = {"w": rs.randn(6).astype(np.float32), "n": np.array([3], dtype=np.int64)}
    steps = [{"w": rs.randn(6).astype(np.float32), "n": np.array([1], dtype=np.int64)} for _ in range(3)]
    a = build_server_optimizer(name, 0.2, {"beta1": 0.7})
    for d in steps[:2]:
        x = a.step(x, d)
    state = a.state_dict()
    assert set(state) == {"step", "m/w", "v/w"} and all(isinstance(v, np.ndarray) for v in state.values())
    assert int(state["step"]) == 2
    b = build_server_optimizer(name, 0.2, {"beta1": 0.7})
    b.load_state_dict(state)
    out_a, out_b = a.step(x, steps[2]), b.step(x, steps[2])
    for k in out_a:
        np.testing.assert_array_equal(out_a[k], out_b[k])
    fresh = build_server_optimizer(name, 0.2, {"beta1": 0.7}).step(x, steps[2])
    assert not np.array_equal(fresh["w"], out_a["w"])  # the state matters, so the round trip was a real check


def test_malformed_or_mismatched_state_is_refused():
    with pytest.raises(ConfigError, match="malformed"):
        build_server_optimizer("adam", 0.1, None).load_state_dict({"m/w": np.zeros(2)})
    with pytest.raises(ConfigError, match="keeps no state"):
        build_server_optimizer("sgd", 0.1, None).load_state_dict({"step": np.array(1)})
    opt = build_server_optimizer("yogi", 0.1, None)
    opt.load_state_dict({"step": np.array(1), "m/other": np.zeros(2), "v/other": np.zeros(2)})
    with pytest.raises(ConfigError, match="does not match"):
        opt.step({"w": np.zeros(2)}, {"w": np.ones(2)})
    with pytest.raises(ConfigError, match="tensor names and shapes"):
        build_server_optimizer("sgd", 1.0, None).step({"w": np.zeros(2)}, {"w": np.zeros(3)})


@pytest.mark.parametrize("name, lr, args, key", [
    ("adamw", 1.0, None, "federation.server_optimizer.name"), ("sgd", 0.0, None, "federation.server_lr"),
    ("sgd", float("nan"), None, "federation.server_lr"), ("sgd", 1.0, {"momentum": 0.9}, "federation.server_optimizer.args.momentum"),
    ("adam", 1.0, {"beta1": 1.0}, "federation.server_optimizer.args.beta1"),
    ("adam", 1.0, {"beta2": -0.1}, "federation.server_optimizer.args.beta2"),
    ("yogi", 1.0, {"tau": 0}, "federation.server_optimizer.args.tau"), ("yogi", 1.0, {"tau": True}, "federation.server_optimizer.args.tau"),
    ("yogi", 1.0, {"eta_l": 0.1}, "federation.server_optimizer.args.eta_l")])
def test_bad_config_names_the_plan_key(name, lr, args, key):
    with pytest.raises(ConfigError, match=f"plan key '{key}'"):
        build_server_optimizer(name, lr, args)
