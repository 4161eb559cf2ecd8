"""Bad input: one line that says what and how to fix, exit code 2, no traceback, nothing left running."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SEG3D = REPO / "configs" / "plans" / "seg3d-unet-dp.yaml"


def fedsilo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsilo.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def assert_bad_input(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error:"), done.stderr
    for needle in needles:
        assert needle in lines[0]


def plan_with(tmp_path: Path, section: str, key: str, value) -> Path:
    raw = yaml.safe_load(SEG3D.read_text())
    raw[section][key] = value
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_network_outside_the_allow_list(tmp_path):
    assert_bad_input(fedsilo("plan", "validate", str(plan_with(tmp_path, "model", "network", "ResNet50"))), "model.network", "fix:")


@pytest.mark.parametrize("epsilon", [0, -1.5])
def test_epsilon_not_positive(tmp_path, epsilon):
    assert_bad_input(fedsilo("plan", "validate", str(plan_with(tmp_path, "privacy", "target_epsilon", epsilon))), "privacy.target_epsilon")


def test_demo_refuses_a_bad_plan_before_doing_anything(tmp_path):
    out = tmp_path / "run"
    assert_bad_input(fedsilo("demo", "--out", str(out), "--plan", str(plan_with(tmp_path, "privacy", "target_epsilon", 0))), "target_epsilon")
    assert not out.exists()


def test_demo_refuses_a_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert_bad_input(fedsilo("demo", "--out", str(tmp_path / "run"), "--port", str(port)), f"port {port}")


def test_demo_does_not_overwrite_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    assert_bad_input(fedsilo("demo", "--out", str(tmp_path)), "not an earlier demo run")
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_missing_site_folder(tmp_path):
    assert_bad_input(fedsilo("silo", "dataset", "list", "--site", str(tmp_path / "nowhere")), "no site folder", "fedsilo silo init")


def test_usage_errors_exit_2(tmp_path):
    assert_bad_input(fedsilo("demo", "--silos", "zero"))
    assert_bad_input(fedsilo("no-such-command"))
