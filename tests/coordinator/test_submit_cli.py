"""``fedsilo plan submit`` before and around Flower: what is sent, where, how the round table reads; bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from compliance.keys import generate_signer
from compliance.statements import SubmissionBundle
from coordinator.provision import parse_project, provision
from coordinator.submit import RoundTable, connection, load_submission, parse_progress
from fedsilo.errors import ConfigError
from fedsilo.flower_app import toml_string
from pipelines.plan import load_plan

REPO = Path(__file__).resolve().parents[2]
PLAN = REPO / "configs" / "plans" / "seg2d-basicunet-dp.yaml"


def fedsilo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsilo.cli", *args], capture_output=True, text=True, timeout=180)


@pytest.fixture
def key(tmp_path) -> Path:
    generate_signer(tmp_path / "keys", "r.jones", role="person")
    return tmp_path / "keys" / "r.jones.key"


def test_a_plan_yaml_is_signed_with_the_key_and_a_bundle_is_checked_before_sending(tmp_path, key):
    bundle, plan = load_submission(PLAN, key)
    assert plan.hash() == load_plan(PLAN).hash()
    statement = bundle.verify(plan.hash())
    assert statement["researcher"] == "r.jones" and bundle.plan_text == PLAN.read_text()
    path = tmp_path / "plan.submission.json"
    path.write_text(bundle.to_json())
    again, _ = load_submission(path, None)
    assert again == bundle
    # The plan edited after signing (one value): refused here, before anything is sent.
    raw = json.loads(path.read_text())
    raw["plan_yaml"] = raw["plan_yaml"].replace("rounds: 3", "rounds: 30")
    assert raw["plan_yaml"] != bundle.plan_text
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="the signature does not hold"):
        load_submission(path, None)


def test_an_unsigned_plan_or_a_signed_one_with_a_key_is_refused(tmp_path, key):
    with pytest.raises(ConfigError, match="is not signed: every site refuses an unsigned plan"):
        load_submission(PLAN, None)
    bundle, _ = load_submission(PLAN, key)
    path = tmp_path / "b.json"
    path.write_text(bundle.to_json())
    with pytest.raises(ConfigError, match="already signed"):
        load_submission(path, key)
    with pytest.raises(ConfigError, match="not a .key file"):
        load_submission(PLAN, key.with_suffix(".vkey"))


def test_the_bundle_survives_the_run_config_file():
    """Flower reads --run-config as TOML: the bundle text must come back byte for byte (quotes, newlines, non-ASCII, DEL)."""
    bundle = SubmissionBundle('name: "x"\n# Zürich \U0001f3e5 tab\there \x7f\\ end\n', b"note\n\n\xe2\x80\x94 sig\n", "r+1+AAA")
    text = bundle.to_json()
    assert tomllib.loads(f"submission = {toml_string(text)}\n")["submission"] == text
    assert SubmissionBundle.from_json(text, "x") == bundle


def test_progress_lines_and_the_round_table():
    row = {"event": "round", "round": 2, "replied": 2, "silos": 3, "seconds": 12.34,
           "sites": {"hospital1": {"train_loss": 0.5, "num_examples": 30, "dice": 0.8123, "epsilon": 2.5},
                     "hospital0": {"train_loss": 0.2, "num_examples": 10, "dice": 0.7, "epsilon": 3.25}}}
    assert parse_progress("INFO : fedsilo-progress " + json.dumps(row) + "\n") == row
    assert parse_progress("fedsilo-progress {not json") is None
    assert parse_progress("some other line") is None
    assert parse_progress('fedsilo-progress {"event": "failed", "reason": "r"}') == {"event": "failed", "reason": "r"}
    out = io.StringIO()
    table = RoundTable("dice", out)
    table.row(row)
    table.row({**row, "round": 3, "sites": {"hospital0": row["sites"]["hospital0"]}})
    header, first, second = out.getvalue().splitlines()
    assert header.split() == ["round", "silos", "train", "loss", "dice", "h0", "dice", "h1", "eps", "h0", "eps", "h1", "seconds"]
    # mean train loss weighted by examples: (0.2*10 + 0.5*30) / 40 = 0.425
    assert first.split() == ["2", "2/3", "0.425", "0.700", "0.812", "3.25", "2.50", "12.3"]
    assert second.split() == ["3", "2/3", "0.200", "0.700", "-", "3.25", "-", "12.3"]


def test_where_the_plan_goes(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="--superlink needs --ca"):
        connection("fed", superlink="10.0.0.1:9093")
    with pytest.raises(ConfigError, match="no CA certificate at"):
        connection("fed", superlink="10.0.0.1:9093", ca=tmp_path / "missing.crt")
    provision(parse_project({"federation": "fed", "coordinator": {"addresses": ["10.0.0.1"], "port": 9093}, "sites": ["hospital0"]}), tmp_path / "kits")
    conn = connection("fed", superlink="10.0.0.1:9093", ca=tmp_path / "kits" / "researcher" / "ca.crt")
    try:
        config = tomllib.loads((conn.flwr_home / "config.toml").read_text())
        assert config["superlink"]["fed"] == {"address": "10.0.0.1:9093", "root-certificates": str((tmp_path / "kits" / "researcher" / "ca.crt").resolve())}
    finally:
        conn.close()
    assert not conn.flwr_home.exists()
    with pytest.raises(ConfigError, match="kit of federation 'fed', not 'other'"):
        connection("other", kit=tmp_path / "kits" / "coordinator")
    with pytest.raises(ConfigError, match="has not been started"):
        connection("fed", kit=tmp_path / "kits" / "coordinator")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    with pytest.raises(ConfigError, match="no connection 'fed' in"):
        connection("fed")
    (tmp_path / "flwr").mkdir()
    (tmp_path / "flwr" / "config.toml").write_text('[superlink.fed]\naddress = "10.0.0.1:9093"\n')
    assert connection("fed").flwr_home == tmp_path / "flwr"


def test_submit_bad_input_is_one_line_exit_2(tmp_path, key):
    done = fedsilo("plan", "submit", str(PLAN), "--federation", "fed", "--superlink", "127.0.0.1:1", "--ca", "x.crt")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and "is not signed" in done.stderr


def test_submit_to_a_coordinator_that_is_not_there_fails_with_exit_2(tmp_path, key):
    provision(parse_project({"federation": "fed", "coordinator": {"addresses": ["127.0.0.1"], "port": 9093}, "sites": ["hospital0"]}), tmp_path / "kits")
    from fedsilo.processes import free_port

    done = fedsilo("plan", "submit", str(PLAN), "--key", str(key), "--federation", "fed", "--superlink", f"127.0.0.1:{free_port()}",
                   "--ca", str(tmp_path / "kits" / "researcher" / "ca.crt"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("fedsilo: error: the coordinator did not accept the run") and "fix:" in last
