"""``fedsilo plan keygen|sign|schema|validate``: the researcher's commands, through the real top-level CLI."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import yaml

from compliance.keys import read_vkey_file
from compliance.statements import SubmissionBundle
from fedsilo.cli import main
from fedsilo.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SEG3D = REPO / "configs" / "plans" / "seg3d-unet-dp.yaml"
RESEARCHER = "a.jones"


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def bad_input(capsys: pytest.CaptureFixture[str], *argv: object, needles: tuple[str, ...]) -> str:
    code, out, err = cli(capsys, *argv)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error: "), err
    assert "(fix: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    folder = tmp_path / "keys"
    code, out, err = cli(capsys, "plan", "keygen", "--researcher", RESEARCHER, "--out", folder)
    assert (code, err) == (0, "")
    vkey = read_vkey_file(folder / f"{RESEARCHER}.vkey")
    assert out.splitlines() == [f"researcher key {RESEARCHER} written to {folder} (public: {vkey.vkey()})",
                                f"fingerprint {vkey.fingerprint}: give it to the sites' officers to confirm out of band"]
    return folder


def test_keygen_writes_a_private_key_0600_and_its_vkey(keys: Path) -> None:
    assert sorted(p.name for p in keys.iterdir()) == [f"{RESEARCHER}.key", f"{RESEARCHER}.vkey"]
    assert stat.S_IMODE((keys / f"{RESEARCHER}.key").stat().st_mode) == 0o600
    assert (keys / f"{RESEARCHER}.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    vkey = read_vkey_file(keys / f"{RESEARCHER}.vkey")
    assert vkey.name == RESEARCHER and vkey.fingerprint.startswith("ed25519:")
    assert (keys / f"{RESEARCHER}.vkey").read_text().count("\n") == 1


def test_keygen_never_overwrites_a_key(keys: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = {p.name: p.read_bytes() for p in keys.iterdir()}
    bad_input(capsys, "plan", "keygen", "--researcher", RESEARCHER, "--out", keys,
              needles=(f"{RESEARCHER}.key exists; keys are never overwritten",))
    assert {p.name: p.read_bytes() for p in keys.iterdir()} == before


def test_sign_wants_a_dot_key_file(keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle.json"
    bad_input(capsys, "plan", "sign", SEG3D, "--key", keys / f"{RESEARCHER}.vkey", "--out", out,
              needles=(f"--key {keys / f'{RESEARCHER}.vkey'} is not a .key file", "fedsilo plan keygen"))
    bad_input(capsys, "plan", "sign", SEG3D, "--key", keys / "nobody.key", "--out", out,
              needles=(f"no key 'nobody' in {keys}", "nobody.key and nobody.vkey"))
    assert not out.exists()


def test_sign_refuses_a_private_key_others_can_read(keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (keys / f"{RESEARCHER}.key").chmod(0o644)
    bad_input(capsys, "plan", "sign", SEG3D, "--key", keys / f"{RESEARCHER}.key", "--out", tmp_path / "b.json",
              needles=("is readable by others (mode 644)", "chmod 600"))
    assert not (tmp_path / "b.json").exists()


def test_the_signed_bundle_verifies_and_names_the_researcher(keys: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipelines.plan import load_plan

    plan_hash = load_plan(SEG3D).hash()
    out = tmp_path / "bundle.json"
    code, stdout, err = cli(capsys, "plan", "sign", SEG3D, "--key", keys / f"{RESEARCHER}.key", "--out", out)
    assert (code, err) == (0, "")
    assert stdout == f"signed plan 'seg3d-unet-dp' ({plan_hash[:12]}) as {RESEARCHER}: {out}\n"

    text = out.read_text()
    assert json.loads(text)["format"] == "fedsilo-submission/v1"
    bundle = SubmissionBundle.from_json(text, str(out))
    assert bundle.plan_text == SEG3D.read_text()  # the plan as written, comments included
    vkey = read_vkey_file(keys / f"{RESEARCHER}.vkey")
    assert bundle.researcher_key == vkey.vkey()
    statement = bundle.verify(plan_hash)
    assert statement.kind == "plan-submission"
    assert (statement["plan"], statement["plan-name"], statement["researcher"]) == (plan_hash, "seg3d-unet-dp", RESEARCHER)
    assert statement.signer == vkey
    with pytest.raises(ConfigError, match="signed for another plan"):
        bundle.verify("0" * 64)


def test_plan_schema_is_the_committed_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reference = (REPO / "docs" / "plan-schema.md").read_text(encoding="utf-8")
    assert reference.startswith("#") and "federation" in reference
    code, out, err = cli(capsys, "plan", "schema")
    assert (code, err) == (0, "")
    assert out == reference
    target = tmp_path / "schema.md"
    code, out, err = cli(capsys, "plan", "schema", "--out", target)
    assert (code, out, err) == (0, f"plan schema reference written to {target}\n", "")
    assert target.read_text(encoding="utf-8") == reference


def _plan_with_federation(tmp_path: Path, **federation: object) -> Path:
    raw = yaml.safe_load(SEG3D.read_text())
    raw["federation"].update(federation)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_validate_checks_that_krum_has_enough_silos(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan_with_federation(tmp_path, min_silos=3, aggregation={"rule": "krum", "args": {"f": 2}})
    line = bad_input(capsys, "plan", "validate", plan, needles=("federation.min_silos",))
    assert "krum with these args needs at least 7 updates per round, min_silos is 3" in line
    assert "raise federation.min_silos to 7" in line

    plan = _plan_with_federation(tmp_path, min_silos=7, aggregation={"rule": "krum", "args": {"f": 2}})
    code, out, err = cli(capsys, "plan", "validate", plan)
    assert (code, err) == (0, "")
    assert out.startswith("OK: plan 'seg3d-unet-dp' (seg3d, UNet, 2 rounds, krum, DP epsilon 8.0), hash ")
