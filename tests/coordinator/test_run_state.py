"""The coordinator's run state: atomic per-round snapshots that a resumed run checks before trusting."""

from __future__ import annotations

import json

import numpy as np
import pytest

from coordinator.run_state import POINTER, STATE_DIR, RunSnapshot, load_snapshot, save_snapshot
from coordinator.server_optimizer import build_server_optimizer
from fedsilo.errors import ConfigError, VerificationError


def _snapshot(round_: int, seed: int = 0) -> RunSnapshot:
    rs = np.random.RandomState(seed)
    model = {"conv.weight": rs.randn(4, 3).astype(np.float32), "conv.bias": rs.randn(4).astype(np.float32)}
    opt = build_server_optimizer("adam", 0.1, {})
    opt.step(model, {k: np.ones_like(v) for k, v in model.items()})
    return RunSnapshot(run_id="run-1", plan_hash="ab" * 32, round=round_, global_state=model, optimizer_state=opt.state_dict(),
                       rounds=[{"round": i} for i in range(1, round_ + 1)], node_site={7: "hospital0"}, witnessed_size={"hospital0": 12})


def test_round_trip_keeps_model_optimizer_and_bookkeeping(tmp_path):
    saved = save_snapshot(tmp_path, _snapshot(2))
    got = load_snapshot(tmp_path)
    assert (got.run_id, got.plan_hash, got.round) == ("run-1", "ab" * 32, 2)
    assert all(np.array_equal(got.global_state[k], saved.global_state[k]) for k in saved.global_state)
    assert got.optimizer_state.keys() == saved.optimizer_state.keys()
    resumed = build_server_optimizer("adam", 0.1, {})
    resumed.load_state_dict(got.optimizer_state)  # the resumed run continues Adam's moments, not from zero
    assert resumed.t == 1
    assert got.rounds == [{"round": 1}, {"round": 2}] and got.node_site == {7: "hospital0"} and got.witnessed_size == {"hospital0": 12}
    assert got.file_sha256 == saved.file_sha256 and got.model_sha256 == saved.model_sha256


def test_only_the_latest_rounds_are_kept_and_the_pointer_names_the_last(tmp_path):
    for r in range(1, 5):
        save_snapshot(tmp_path, _snapshot(r, seed=r))
    files = sorted(p.name for p in (tmp_path / STATE_DIR).glob("round-*.safetensors"))
    assert files == ["round-0003.safetensors", "round-0004.safetensors"]
    assert load_snapshot(tmp_path).round == 4
    assert not list((tmp_path / STATE_DIR).glob("*.tmp"))


def test_an_altered_state_file_is_refused(tmp_path):
    save_snapshot(tmp_path, _snapshot(1))
    path = tmp_path / STATE_DIR / "round-0001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="does not match the recorded"):
        load_snapshot(tmp_path)


def test_missing_or_foreign_state_is_a_one_line_error(tmp_path):
    with pytest.raises(ConfigError, match="holds no run state"):
        load_snapshot(tmp_path)
    (tmp_path / STATE_DIR).mkdir()
    (tmp_path / STATE_DIR / POINTER).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConfigError, match="is not a fedsilo run state"):
        load_snapshot(tmp_path)
    (tmp_path / STATE_DIR / POINTER).write_text(json.dumps({"format": "fedsilo-run-state/v1", "file": "../../etc/passwd", "sha256": "0"}))
    with pytest.raises(ConfigError, match="missing"):
        load_snapshot(tmp_path)
