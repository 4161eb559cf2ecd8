"""The ServerApp's run settings: a submitted bundle or a plan path, and defaults from the coordinator's state folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from compliance.keys import generate_signer
from compliance.statements import sign_submission
from coordinator.server_app import COORDINATOR_DIR_ENV, NODE_AUTH_ENV, read_submission, run_settings
from fedsilo.errors import ConfigError
from pipelines.plan import load_plan

PLAN = Path(__file__).resolve().parents[2] / "configs" / "plans" / "seg2d-basicunet-dp.yaml"


def _bundle(tmp_path: Path):
    text = PLAN.read_text(encoding="utf-8")
    plan = load_plan(PLAN)
    signer = generate_signer(tmp_path / "keys", "a.jones", role="person")
    return sign_submission(text, plan.hash(), plan.name, signer, "2026-11-27T00:00:00Z")


def test_defaults_come_from_the_coordinator_folder(tmp_path, monkeypatch):
    home = tmp_path / "coordinator"
    (home / "audit-keys").mkdir(parents=True)
    (home / "audit-trust").mkdir()
    (home / "sites").mkdir()
    monkeypatch.setenv(COORDINATOR_DIR_ENV, str(home))
    cfg = run_settings({"submission": "x", "out-dir": ""}, "42")
    assert cfg["out-dir"] == str(home / "runs" / "42")
    assert cfg["audit-key-dir"] == str(home / "audit-keys")
    assert cfg["witness-keys-dir"] == str(home / "audit-trust")
    assert cfg["node-keys-dir"] == str(home / "sites")  # each node's site is known by its key
    # A coordinator started with --insecure-dev: its SuperNodes use random keys, so none is told by its key.
    monkeypatch.setenv(NODE_AUTH_ENV, "0")
    assert "node-keys-dir" not in run_settings({"submission": "x"}, "42")
    # What the run config names wins over the defaults.
    assert run_settings({"out-dir": "/srv/run"}, "42")["out-dir"] == "/srv/run"


def test_without_the_folder_nothing_is_invented(tmp_path, monkeypatch):
    monkeypatch.delenv(COORDINATOR_DIR_ENV, raising=False)
    assert run_settings({"plan-path": "/p.yaml", "out-dir": ""}, "7") == {"plan-path": "/p.yaml"}


def test_a_submitted_bundle_text_is_read_and_verifies(tmp_path):
    bundle = _bundle(tmp_path)
    text, got = read_submission({"submission": bundle.to_json()})
    assert text == bundle.plan_text
    got.verify(load_plan(PLAN).hash())  # raises when the signature or plan text does not match


def test_a_plan_path_still_works_and_a_missing_plan_is_one_line(tmp_path):
    text, got = read_submission({"plan-path": str(PLAN)})
    assert got is None and text == PLAN.read_text(encoding="utf-8")
    with pytest.raises(ConfigError, match="no plan at"):
        read_submission({"plan-path": str(tmp_path / "missing.yaml")})
    with pytest.raises(ConfigError, match="not a fedsilo submission bundle"):
        read_submission({"submission": "{}"})


def test_resume_refuses_a_folder_without_run_state(tmp_path):
    from coordinator.server_app import read_resume

    (tmp_path / "plan.yaml").write_text("name: x\n")
    with pytest.raises(ConfigError, match="holds no run state"):
        read_resume(tmp_path)
    with pytest.raises(ConfigError, match="no run folder"):
        read_resume(tmp_path / "nowhere")


def test_resume_from_names_a_folder_or_a_run_id_under_the_coordinator(tmp_path, monkeypatch):
    from coordinator.server_app import resume_folder

    monkeypatch.delenv(COORDINATOR_DIR_ENV, raising=False)
    assert resume_folder(str(tmp_path / "run")) == tmp_path / "run"
    with pytest.raises(ConfigError, match="is a run id, but this coordinator has no state folder"):
        resume_folder("1234")
    monkeypatch.setenv(COORDINATOR_DIR_ENV, str(tmp_path))
    assert resume_folder("1234") == tmp_path / "runs" / "1234"


def test_plan_resume_refuses_what_is_not_a_run(tmp_path, capsys):
    from fedsilo.cli import main

    assert main(["plan", "resume", str(tmp_path), "--federation", "f"]) == 2
    err = capsys.readouterr().err
    assert "neither a run id nor a run folder with run state" in err and "Traceback" not in err
