"""``fedsilo silo officer|plan|policy|budget``: the hospital's governance commands, through the real top-level CLI.

Every test calls :func:`fedsilo.cli.main` in-process; bad input must give exit 2 and one line on stderr that
says what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from compliance import AuditLog, verify_log
from compliance.keys import read_vkey_file
from compliance.records import parse_time
from fedsilo.cli import main
from silo_agent.ledger import PrivacyLedger, Spend

REPO = Path(__file__).resolve().parents[2]
SEG3D = REPO / "configs" / "plans" / "seg3d-unet-dp.yaml"
OFFICER = "j.smith"
RESEARCHER = "a.jones"


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], *argv: object) -> str:
    code, out, err = cli(capsys, *argv)
    assert (code, err) == (0, ""), err
    return out


def bad_input(capsys: pytest.CaptureFixture[str], *argv: object, needles: tuple[str, ...] = (), fix: bool = True) -> str:
    """Run a command that must be refused as bad input; returns its one stderr line."""
    code, out, err = cli(capsys, *argv)
    assert code == 2, (out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error: "), err
    if fix:
        assert "(fix: " in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def audit_records(site: Path) -> list[dict]:
    with AuditLog.open(site / "audit", read_only=True) as log:
        return list(log.records())


def events(site: Path) -> list[str]:
    return [r["event"] for r in audit_records(site)]


def plan_hash(path: Path) -> str:
    from pipelines.plan import load_plan

    return load_plan(path).hash()


def list_rows(out: str) -> list[list[str]]:
    """`silo plan list` as rows of cells (the header dropped); cells are single words here."""
    lines = out.splitlines()
    assert lines[0].split() == ["hash", "name", "researcher", "status", "decided", "by", "on"]
    return [line.split() for line in lines[1:]]


def set_policy(site: Path, **values: object) -> None:
    raw = yaml.safe_load((site / "policy.yaml").read_text())
    raw.update(values)
    (site / "policy.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))


@pytest.fixture
def site(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    """A site folder for hospital0 with one officer."""
    root = tmp_path / "site"
    assert ok(capsys, "silo", "init", root, "--site", "hospital0") == f"site hospital0 ready at {root}\n"
    out = ok(capsys, "silo", "officer", "add", OFFICER, "--site", root)
    fingerprint = read_vkey_file(root / "officers" / f"{OFFICER}.vkey").fingerprint
    assert out == f"officer {OFFICER} added; key fingerprint {fingerprint}\n"
    return root


@pytest.fixture
def researcher_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    ok(capsys, "plan", "keygen", "--researcher", RESEARCHER, "--out", tmp_path / "researcher")
    return tmp_path / "researcher" / f"{RESEARCHER}.key"


def sign(capsys: pytest.CaptureFixture[str], plan: Path, key: Path, out: Path) -> Path:
    ok(capsys, "plan", "sign", plan, "--key", key, "--out", out)
    return out


def changed_plan(tmp_path: Path, rounds: int) -> Path:
    text = SEG3D.read_text()
    assert "  rounds: 2\n" in text
    path = tmp_path / f"seg3d-rounds{rounds}.yaml"
    path.write_text(text.replace("  rounds: 2\n", f"  rounds: {rounds}\n"))
    return path


@pytest.fixture
def imported(site: Path, researcher_key: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """The seg3d plan signed by the researcher and imported at the site; returns its hash."""
    bundle = sign(capsys, SEG3D, researcher_key, tmp_path / "seg3d.json")
    ok(capsys, "silo", "plan", "import", bundle, "--site", site)
    return plan_hash(SEG3D)


# --- the whole review, end to end ---------------------------------------------------------------------------


def test_import_review_approve_and_reject_end_to_end(site: Path, researcher_key: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    officer_fp = read_vkey_file(site / "officers" / f"{OFFICER}.vkey").fingerprint
    researcher_fp = read_vkey_file(researcher_key.with_suffix(".vkey")).fingerprint
    first = plan_hash(SEG3D)

    out = ok(capsys, "silo", "plan", "list", "--site", site)
    assert out == "no plans received yet\n"

    bundle = sign(capsys, SEG3D, researcher_key, tmp_path / "seg3d.json")
    out = ok(capsys, "silo", "plan", "import", bundle, "--site", site)
    assert out.startswith(f"plan 'seg3d-unet-dp' {first[:12]} from {RESEARCHER}: pending; ")
    assert (site / "plans" / f"{first}.yaml").read_text() == SEG3D.read_text()  # kept byte for byte

    assert list_rows(ok(capsys, "silo", "plan", "list", "--site", site)) == [
        [first[:12], "seg3d-unet-dp", RESEARCHER, "pending", "-", "-"]]

    out = ok(capsys, "silo", "plan", "show", first[:8], "--site", site)
    lines = out.splitlines()
    assert lines[0] == f"plan 'seg3d-unet-dp'  hash {first}"
    assert lines[1].startswith(f"submitted by: {RESEARCHER} (key {researcher_fp}, signed ")
    assert researcher_fp.startswith("ed25519:")
    assert lines[2] == "status: pending"
    assert "site policy: complies" in lines
    assert SEG3D.read_text().rstrip() in out  # the plan text as received, comments included
    assert lines[-1] == "(no plan approved here yet)"

    out = ok(capsys, "silo", "plan", "approve", first[:8], "--site", site, "--officer", OFFICER, "--days", "30")
    assert out.startswith(f"approved plan {first[:12]} at site hospital0 as {OFFICER}; expires ")
    rows = list_rows(ok(capsys, "silo", "plan", "list", "--site", site))
    decision = dict(line.split(" ", 1) for line in (site / "plans" / f"{first}.decision").read_text().split("\n\n")[0].splitlines()[1:])
    assert rows == [[first[:12], "seg3d-unet-dp", RESEARCHER, "approved", OFFICER, decision["time"][:10]]]
    lapse = parse_time(decision["expires"]) - parse_time(decision["time"])
    assert timedelta(days=30) - timedelta(minutes=10) < lapse <= timedelta(days=30)
    assert (decision["decision"], decision["officer"], decision["researcher-key"]) == ("approved", OFFICER, researcher_fp)

    # a second plan, one value changed: show diffs it against the approved one
    second_path = changed_plan(tmp_path, rounds=5)
    second = plan_hash(second_path)
    assert second != first
    ok(capsys, "silo", "plan", "import", sign(capsys, second_path, researcher_key, tmp_path / "second.json"), "--site", site)
    out = ok(capsys, "silo", "plan", "show", second, "--site", site)
    assert "status: pending" in out.splitlines()
    diff = out.split("--- against the closest approved plan ", 1)[1].splitlines()[1:]
    assert diff[:2] == [f"--- approved {first[:12]}", f"+++ this plan {second[:12]}"]
    changed = [line for line in diff[2:] if line[:1] in "+-"]
    assert changed == ["-  rounds: 2", "+  rounds: 5"]

    out = ok(capsys, "silo", "plan", "reject", second[:10], "--site", site, "--officer", OFFICER,
             "--reason", "five rounds  spend too much\nbudget")
    assert out == f"rejected plan {second[:12]} at site hospital0 as {OFFICER}\n"
    rows = list_rows(ok(capsys, "silo", "plan", "list", "--site", site))
    assert [r[:5] for r in rows] == [[first[:12], "seg3d-unet-dp", RESEARCHER, "approved", OFFICER],
                                     [second[:12], "seg3d-unet-dp", RESEARCHER, "rejected", OFFICER]]
    out = ok(capsys, "silo", "plan", "show", second[:8], "--site", site)
    assert "status: rejected" in out.splitlines()
    assert ", reason: five rounds spend too much budget" in out

    # every step is in the site's audit log, which verifies
    records = audit_records(site)
    assert [r["event"] for r in records] == ["config.changed", "policy.changed", "config.changed", "plan.received", "plan.approved",
                                             "plan.received", "plan.rejected"]
    created, policy, officer, received, approved, received_second, rejected = records
    for record, plan in ((received, first), (received_second, second)):
        assert record["object"]["sha256"] == plan and record["details"] == {"via": "bundle import", "researcher": RESEARCHER,
                                                                             "researcher_key": researcher_fp}
        assert record["actor"]["role"] == "hospital-it"
    assert created["object"]["type"] == "site" and created["details"] == {"change": "site created"}
    assert policy["object"] == {"type": "policy", "id": "policy.yaml",
                                "sha256": hashlib.sha256((site / "policy.yaml").read_bytes()).hexdigest()}
    assert officer["object"] == {"type": "officer", "id": OFFICER, "sha256": None}
    assert officer["details"] == {"change": "officer key added", "key": officer_fp}
    for record, plan, outcome in ((approved, first, "success"), (rejected, second, "denied")):
        assert record["actor"] == {"kind": "person", "id": OFFICER, "site": "hospital0", "role": "site-officer", "key": officer_fp}
        assert record["object"] == {"type": "plan", "id": "seg3d-unet-dp", "sha256": plan}
        assert record["outcome"] == outcome
        assert record["details"]["researcher"] == RESEARCHER and record["details"]["researcher_key"] == researcher_fp
    assert approved["details"]["expires"] == decision["expires"] and approved["reason"] is None
    assert rejected["reason"] == "five rounds spend too much budget" and rejected["details"]["expires"] is None
    assert approved["details"]["policy_sha256"] == hashlib.sha256((site / "policy.yaml").read_bytes()).hexdigest()
    result = verify_log(site / "audit")
    assert result.records == 7


def test_approve_with_an_expiry_date(site: Path, imported: str, capsys: pytest.CaptureFixture[str]) -> None:
    out = ok(capsys, "silo", "plan", "approve", imported[:8], "--site", site, "--officer", OFFICER, "--expires", "2999-01-31")
    assert out.endswith("expires 2999-01-31T00:00:00.000000Z\n")
    show = ok(capsys, "silo", "plan", "show", imported[:8], "--site", site)
    assert f"decision: approved by {OFFICER} on " in show and ", expires 2999-01-31T00:00:00.000000Z" in show


# --- bad input: exit 2, one line, the fix; nothing recorded or written ----------------------------------------


def assert_still_pending(site: Path, plan: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert not (site / "plans" / f"{plan}.decision").exists()
    assert [r[3] for r in list_rows(ok(capsys, "silo", "plan", "list", "--site", site))] == ["pending"]
    assert "plan.approved" not in events(site) and "plan.rejected" not in events(site)


def test_approve_by_an_unknown_officer(site: Path, imported: str, capsys: pytest.CaptureFixture[str]) -> None:
    bad_input(capsys, "silo", "plan", "approve", imported[:8], "--site", site, "--officer", "x.doe",
              needles=("site hospital0 has no officer 'x.doe'", "fedsilo silo officer add x.doe"))
    assert_still_pending(site, imported, capsys)


def test_approve_a_plan_that_breaks_the_policy(site: Path, imported: str, capsys: pytest.CaptureFixture[str]) -> None:
    set_policy(site, max_epsilon_per_plan=1.0)
    show = ok(capsys, "silo", "plan", "show", imported[:8], "--site", site)
    assert "site policy: BREAKS IT:\n  - privacy.target_epsilon: 8.0 exceeds the site's 1.0 (max_epsilon_per_plan)" in show
    bad_input(capsys, "silo", "plan", "approve", imported[:8], "--site", site, "--officer", OFFICER, "--days", "30",
              needles=(f"plan {imported[:12]} breaks the site policy", "privacy.target_epsilon", "max_epsilon_per_plan"))
    assert_still_pending(site, imported, capsys)


@pytest.mark.parametrize("command", [("show",), ("approve", "--officer", OFFICER), ("reject", "--officer", OFFICER, "--reason", "no")])
def test_a_hash_prefix_that_names_no_plan(site: Path, imported: str, capsys: pytest.CaptureFixture[str], command: tuple[str, ...]) -> None:
    assert imported.startswith("741b2381")
    for prefix, needle in (("741b238", "'741b238' is not a plan hash"),  # 7 digits of the real hash
                           ("741b238g", "'741b238g' is not a plan hash"),  # not hex
                           ("ffffffff", "site hospital0 holds no plan ffffffff")):
        line = bad_input(capsys, "silo", "plan", command[0], prefix, "--site", site, *command[1:], needles=(needle,))
        assert ("give at least 8 hex digits" in line) == ("not a plan hash" in needle)
    if command[0] != "show":
        assert_still_pending(site, imported, capsys)


@pytest.mark.parametrize("args, needles, fix", [
    (("--expires", "2030-13-01"), ("--expires '2030-13-01' is not a date", "YYYY-MM-DD"), True),
    (("--expires", "next week"), ("is not a date",), True),
    (("--expires", "2020-01-01"), ("expiry 2020-01-01T00:00:00", "is in the past", "give a future date"), True),
    (("--days", "0"), ("--days 0 is too small",), True),
    (("--expires", "2999-01-01", "--days", "30"), ("give --expires or --days, not both",), True),
])
def test_approve_with_a_bad_expiry(site: Path, imported: str, capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                                   needles: tuple[str, ...], fix: bool) -> None:
    bad_input(capsys, "silo", "plan", "approve", imported[:8], "--site", site, "--officer", OFFICER, *args, needles=needles, fix=fix)
    assert_still_pending(site, imported, capsys)


def test_reject_without_a_reason_is_a_usage_error(site: Path, imported: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["silo", "plan", "reject", imported[:8], "--site", str(site), "--officer", OFFICER])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedsilo: error: the following arguments are required: --reason"), err
    bad_input(capsys, "silo", "plan", "reject", imported[:8], "--site", site, "--officer", OFFICER, "--reason", "  ",
              needles=("a rejection needs a reason",))
    assert_still_pending(site, imported, capsys)


def test_import_of_a_file_that_is_not_a_bundle(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad_input(capsys, "silo", "plan", "import", SEG3D, "--site", site, needles=(f"{SEG3D} is not a fedsilo submission bundle", "fedsilo plan sign"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "something-else/v1", "plan_yaml": SEG3D.read_text()}))
    bad_input(capsys, "silo", "plan", "import", other, "--site", site, needles=("is not a fedsilo submission bundle",))
    bad_input(capsys, "silo", "plan", "import", tmp_path / "missing.json", "--site", site, needles=("no readable submission bundle",))
    assert not (site / "plans").exists() or not any((site / "plans").iterdir())


@pytest.mark.parametrize("tamper, needle", [
    (lambda b: b.update(plan_yaml=b["plan_yaml"].replace("target_epsilon: 8.0", "target_epsilon: 7.0")),
     "the researcher's signature does not cover this plan: the submission is signed for another plan"),
    (lambda b: b.update(submission=b["submission"].replace("plan-name seg3d-unet-dp", "plan-name seg3d-unet-dq")),
     "the plan's submission signature does not verify"),
    # a comment leaves the plan hash alone, but an officer reads the text: the researcher signed that too
    (lambda b: b.update(plan_yaml="# reviewed and cleared by the ethics board\n" + b["plan_yaml"]),
     "the plan text differs from the text the researcher signed"),
])
def test_import_of_a_bundle_altered_after_signing(site: Path, researcher_key: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], tamper, needle: str) -> None:
    bundle_path = sign(capsys, SEG3D, researcher_key, tmp_path / "seg3d.json")
    bundle = json.loads(bundle_path.read_text())
    before = dict(bundle)
    tamper(bundle)
    assert bundle != before
    bundle_path.write_text(json.dumps(bundle))
    bad_input(capsys, "silo", "plan", "import", bundle_path, "--site", site, needles=(needle, "ask the researcher to sign the plan again"))
    assert not (site / "plans").exists() or not any((site / "plans").iterdir())
    assert ok(capsys, "silo", "plan", "list", "--site", site) == "no plans received yet\n"


def test_an_officer_key_is_never_overwritten(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = (site / "officers" / f"{OFFICER}.key").read_bytes()
    vkey = (site / "officers" / f"{OFFICER}.vkey").read_bytes()
    bad_input(capsys, "silo", "officer", "add", OFFICER, "--site", site, needles=(f"{OFFICER}.key exists; keys are never overwritten",))
    assert (site / "officers" / f"{OFFICER}.key").read_bytes() == key
    assert (site / "officers" / f"{OFFICER}.vkey").read_bytes() == vkey
    assert events(site).count("config.changed") == 2  # site created, one officer added


@pytest.mark.parametrize("name", ["J.Smith", "../j.smith", "j smith"])
def test_an_officer_name_that_is_not_allowed(site: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    bad_input(capsys, "silo", "officer", "add", name, "--site", site, needles=("is not allowed",))
    assert sorted(p.name for p in (site / "officers").iterdir()) == [f"{OFFICER}.key", f"{OFFICER}.vkey"]


# --- the policy ------------------------------------------------------------------------------------------------


def test_policy_reset_needs_force(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    set_policy(site, max_rounds=7)
    edited = (site / "policy.yaml").read_text()
    bad_input(capsys, "silo", "policy", "reset", "--site", site, needles=("policy.yaml exists", "add --force"))
    assert (site / "policy.yaml").read_text() == edited
    assert events(site).count("policy.changed") == 1

    assert ok(capsys, "silo", "policy", "reset", "--site", site, "--force") == f"default policy written to {site / 'policy.yaml'}\n"
    assert "max_rounds: 100\n" in (site / "policy.yaml").read_text()
    # back to the defaults recorded at init: the bytes match the last record, so nothing new is recorded
    assert events(site).count("policy.changed") == 1
    assert "max_rounds: 100" in ok(capsys, "silo", "policy", "show", "--site", site)


@pytest.mark.parametrize("edit, needles", [
    ({"max_epsilon": 3.0}, ("unknown policy key 'max_epsilon'", "fix: use only: require_dp, max_epsilon_per_plan")),
    ({"allowed_networks": "UNet"}, ("'allowed_networks' must be a list of names", "fix: choose from:")),
    ({"allowed_metrics": ["loss", "patient_age"]}, ("'allowed_metrics': 'patient_age' is not known",)),
])
def test_policy_check_refuses_a_bad_policy(site: Path, capsys: pytest.CaptureFixture[str], edit: dict, needles: tuple[str, ...]) -> None:
    set_policy(site, **edit)
    bad_input(capsys, "silo", "policy", "check", "--site", site, needles=needles)
    bad_input(capsys, "silo", "policy", "show", "--site", site, needles=needles)
    assert events(site).count("policy.changed") == 1  # an invalid policy is never recorded


@pytest.mark.parametrize("edit, needle", [
    ({"max_rounds": "many"}, "policy.yaml: 'max_rounds' must be a whole number >= 1, got 'many'"),
    ({"max_rounds": 0}, "'max_rounds' must be a whole number >= 1, got 0"),
    ({"require_dp": "yes"}, "'require_dp' must be true or false, got 'yes'"),
    ({"max_epsilon_per_plan": -1}, "'max_epsilon_per_plan' must be a positive number, got -1"),
    ({"lifetime_epsilon_per_dataset": True}, "'lifetime_epsilon_per_dataset' must be a positive number, got True"),
])
def test_policy_check_refuses_a_wrong_type(site: Path, capsys: pytest.CaptureFixture[str], edit: dict, needle: str) -> None:
    set_policy(site, **edit)
    bad_input(capsys, "silo", "policy", "check", "--site", site, needles=(needle,))
    assert events(site).count("policy.changed") == 1


def test_policy_check_records_a_hand_edit_once(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first_digest = hashlib.sha256((site / "policy.yaml").read_bytes()).hexdigest()
    assert ok(capsys, "silo", "policy", "check", "--site", site) == "policy OK\n"
    assert events(site).count("policy.changed") == 1

    set_policy(site, max_rounds=50, max_epsilon_per_plan=4)
    digest = hashlib.sha256((site / "policy.yaml").read_bytes()).hexdigest()
    out = ok(capsys, "silo", "policy", "check", "--site", site)
    assert out == "policy OK (changed since last recorded: policy.changed written to the audit log)\n"
    assert ok(capsys, "silo", "policy", "check", "--site", site) == "policy OK\n"

    changes = [r for r in audit_records(site) if r["event"] == "policy.changed"]
    assert len(changes) == 2
    assert changes[1]["object"] == {"type": "policy", "id": "policy.yaml", "sha256": digest}
    assert changes[1]["details"]["previous_sha256"] == first_digest
    assert changes[1]["details"]["max_epsilon_per_plan"] == 4.0
    assert changes[1]["actor"]["role"] == "hospital-it"
    assert "max_rounds: 50" in ok(capsys, "silo", "policy", "show", "--site", site).splitlines()
    verify_log(site / "audit")


# --- the privacy budget ------------------------------------------------------------------------------------------


def _spend(dataset: str, round_: int, epsilon_after: float, plan: str = "p" * 64) -> Spend:
    return Spend(dataset=dataset, run_id="r1", round=round_, plan_hash=plan, accountant="rdp", noise_multiplier=1.1,
                 sample_rate=0.1, steps=40, delta=1e-5, epsilon_after=epsilon_after, history=((1.1, 0.1, 40),))


def test_budget_reports_spent_and_left_per_dataset(site: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tiny_data import write_tiny_datalist

    datalist = write_tiny_datalist(tmp_path / "data")
    ok(capsys, "silo", "dataset", "add", "ct", "--site", site, "--datalist", datalist, "--task", "seg3d")
    ok(capsys, "silo", "dataset", "add", "mr", "--site", site, "--datalist", datalist, "--task", "seg3d")

    empty = json.loads(ok(capsys, "silo", "budget", "--site", site, "--json"))
    assert [(d["dataset"], d["rounds"], d["epsilon_spent"], d["epsilon_left"], d["delta"]) for d in empty["datasets"]] == [
        ("ct", 0, 0.0, 20.0, None), ("mr", 0, 0.0, 20.0, None)]

    with PrivacyLedger.for_site(site / "privacy") as ledger:
        ledger.record(_spend("ct", 1, 1.25))
        ledger.record(_spend("ct", 2, 2.5))  # the accountant's composed epsilon: the last one is what was spent

    report = json.loads(ok(capsys, "silo", "budget", "--site", site, "--json"))
    assert report == {"site": "hospital0", "datasets": [
        {"dataset": "ct", "rounds": 2, "plans": 1, "epsilon_spent": 2.5, "epsilon_budget": 20.0, "epsilon_left": 17.5, "delta": 1e-5},
        {"dataset": "mr", "rounds": 0, "plans": 0, "epsilon_spent": 0.0, "epsilon_budget": 20.0, "epsilon_left": 20.0, "delta": None}]}

    table = ok(capsys, "silo", "budget", "--site", site).splitlines()
    assert table[0] == "site hospital0: lifetime budget epsilon 20 per dataset (policy.yaml)"
    assert [line.split() for line in table[1:]] == [["dataset", "rounds", "plans", "spent", "left", "delta"],
                                                    ["ct", "2", "1", "2.50", "17.50", "1e-05"],
                                                    ["mr", "0", "0", "0.00", "20.00", "-"]]

    set_policy(site, lifetime_epsilon_per_dataset=2.0)  # a tightened policy: nothing left, never negative
    report = json.loads(ok(capsys, "silo", "budget", "--site", site, "--json"))
    assert [(d["dataset"], d["epsilon_budget"], d["epsilon_left"]) for d in report["datasets"]] == [("ct", 2.0, 0.0), ("mr", 2.0, 2.0)]
