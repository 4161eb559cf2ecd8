"""fedsilo silo models: the personalized models a site keeps, listed with what its audit log says of them, and
exported (with the plan that builds them) only when their tensors are those the silo agent saved.

The models are made by the real silo agent (a personalizing plan's round and its final evaluation), as in
test_client_app."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors import safe_open

from compliance import AuditLog, verify_log
from fedsilo.cli import main
from fedsilo.wire import pack
from pipelines.networks import build_network
from pipelines.plan import parse_plan
from pipelines.serialization import load_model, save_model
from silo_agent.client_app import evaluate, train
from silo_agent.kept_models import personalized_model_path
from test_client_app import _personalizing_site, context, message
from test_client_app import serverapp_identity  # noqa: F401  (autouse: messages are created as a ServerApp would)


def cli(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error: ") and "(fix: " in lines[0], err
    return lines[0]


@pytest.fixture
def trained_site(tmp_path: Path):
    """A site that ran round 1 of 1 of a personalizing plan and its final evaluation."""
    site, plan, text = _personalizing_site(tmp_path)
    reply = train(message(text, plan.hash(), pack(build_network(plan, seed=0).state_dict())), context(site.root))
    assert not reply.has_error(), reply.error.reason
    final = evaluate(message(text, plan.hash(), pack(build_network(plan, seed=0).state_dict()), "evaluate"), context(site.root))
    assert not final.has_error(), final.error.reason
    return site, plan


def records(site) -> list[dict]:
    with AuditLog.open(site.audit_dir, read_only=True) as log:
        return list(log.records())


def test_list_shows_each_kept_model_with_its_final_figures_and_intact_tensors(trained_site, capsys):
    import json

    site, plan = trained_site
    code, out, err = cli(capsys, "silo", "models", "list", "--site", site.root, "--json")
    assert (code, err) == (0, "")
    [model] = json.loads(out)["models"]
    assert model["run_id"] == "run1" and model["round"] == 1 and model["plan_hash"] == plan.hash()
    assert model["integrity"] == "intact" and model["lr_scale"] == 1.0
    assert model["file"] == personalized_model_path(site, "run1").name
    [used] = [r for r in records(site) if r["event"] == "dataset.used" and r["details"]["split"] == "test"]
    assert model["final_evaluation"]["dice"] == used["details"]["dice"]
    assert model["final_evaluation"]["personalized-dice"] == used["details"]["personalized-dice"]
    code, out, err = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert (code, err) == (0, "")
    header, row = out.splitlines()[1:3]
    assert header.split()[:4] == ["run", "plan", "round", "saved"] and "personalized dice" in header
    assert row.split()[0] == "run1" and row.split()[1] == plan.hash()[:12]
    assert f"{used['details']['personalized-dice']:.3f}" in row and "intact" in row


def test_export_copies_the_model_and_its_plan_and_audits_it_and_never_overwrites(trained_site, tmp_path, capsys):
    site, plan = trained_site
    out_dir = tmp_path / "export"
    code, out, err = cli(capsys, "silo", "models", "export", "run", "--site", site.root, "--out", out_dir)  # a prefix
    assert (code, err) == (0, ""), err
    assert "exported the personalized model of run run1" in out
    kept = personalized_model_path(site, "run1")
    assert (out_dir / "model.safetensors").read_bytes() == kept.read_bytes()
    exported_plan = parse_plan(yaml.safe_load((out_dir / "plan.yaml").read_text(encoding="utf-8")))
    assert exported_plan.hash() == plan.hash()
    model = build_network(exported_plan)  # the plan rebuilds the network the tensors belong to
    arrays = load_model(out_dir / "model.safetensors")
    assert set(arrays) == set(model.state_dict())
    [exported] = [r for r in records(site) if r["event"] == "model.exported"]
    [saved] = [r for r in records(site) if r["event"] == "state.saved"]
    assert exported["object"]["sha256"] == saved["object"]["sha256"] and exported["run_id"] == "run1"
    assert exported["actor"]["kind"] == "person"
    verify_log(site.audit_dir)  # raises at the first problem: the export's record extends an intact log
    before = (out_dir / "plan.yaml").read_bytes()
    code, _, err = cli(capsys, "silo", "models", "export", "run1", "--site", site.root, "--out", out_dir)
    assert code == 2 and "already holds model.safetensors, plan.yaml" in one_line_error(err)
    assert (out_dir / "plan.yaml").read_bytes() == before
    assert len([r for r in records(site) if r["event"] == "model.exported"]) == 1


def _rewrite(path: Path, *, add: float = 0.0, **metadata: str) -> None:
    """Save the kept model again with ``add`` on its first tensor and the given metadata changed."""
    arrays = load_model(path)
    name = next(iter(arrays))
    arrays[name] = arrays[name] + np.float32(add)
    with safe_open(str(path), "np") as f:
        meta = {**f.metadata(), **metadata}
    save_model(path, arrays, metadata=meta)


def _refused_export(capsys, site, out: Path, needle: str) -> None:
    code, _, err = cli(capsys, "silo", "models", "export", "run1", "--site", site.root, "--out", out)
    assert code == 1 and needle in one_line_error(err)
    assert not out.exists() or not any(out.iterdir())
    [failed] = [r for r in records(site) if r["event"] == "model.exported"]
    assert failed["outcome"] == "failure" and needle in failed["reason"]


def test_a_model_whose_tensors_changed_on_disk_is_flagged_and_not_exported(trained_site, tmp_path, capsys):
    site, _ = trained_site
    _rewrite(personalized_model_path(site, "run1"), add=0.5)  # the same run, round and plan: only a tensor differs
    code, out, err = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert code == 0 and "CHANGED" in out and "its tensors differ from those the silo agent saved" in out
    _refused_export(capsys, site, tmp_path / "x", "its tensors differ from those the silo agent saved")


def test_a_model_relabelled_with_another_plan_is_flagged_and_not_exported(trained_site, tmp_path, capsys):
    # The tensors are untouched, but the metadata now names another plan approved here: the export would hand out
    # a plan.yaml that is not the one the model was trained with.
    from test_client_app import PLAN, approve

    site, plan = trained_site
    other = {**PLAN, "name": "other"}
    approve(site, other)
    _rewrite(personalized_model_path(site, "run1"), plan_hash=parse_plan(other).hash())
    code, out, _ = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert code == 0 and "CHANGED" in out and "it names another plan than the one it was trained with" in out
    _refused_export(capsys, site, tmp_path / "x", "it names another plan")


def test_a_copy_of_a_kept_model_is_flagged_and_the_original_is_the_one_exported(trained_site, tmp_path, capsys):
    import shutil

    site, _ = trained_site
    original = personalized_model_path(site, "run1")
    copy = site.models_dir / "personalized-0000000000000000.safetensors"
    shutil.copyfile(original, copy)
    code, out, _ = cli(capsys, "silo", "models", "list", "--site", site.root, "--json")
    import json

    integrity = {m["file"]: (m["integrity"], m["problem"]) for m in json.loads(out)["models"]}
    assert integrity[original.name] == ("intact", "")
    assert integrity[copy.name] == ("CHANGED", "it is not the file the silo agent saved for run run1")
    code, out, err = cli(capsys, "silo", "models", "export", "run1", "--site", site.root, "--out", tmp_path / "x")
    assert (code, err) == (0, "") and (tmp_path / "x" / "model.safetensors").read_bytes() == original.read_bytes()


def test_export_refuses_a_model_the_audit_log_does_not_vouch_for(trained_site, tmp_path, capsys):
    import shutil

    site, _ = trained_site
    save_model(site.models_dir / "personalized-1111111111111111.safetensors", load_model(personalized_model_path(site, "run1")),
               metadata={"run_id": "run2", "round": "1", "plan_hash": "0" * 64, "kind": "personalized"})
    code, out, _ = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert code == 0 and "not audited" in out
    code, _, err = cli(capsys, "silo", "models", "export", "run2", "--site", site.root, "--out", tmp_path / "x")
    assert code == 1 and "is not exported: not audited" in one_line_error(err) and not (tmp_path / "x").exists()
    code, _, err = cli(capsys, "silo", "models", "export", "run", "--site", site.root, "--out", tmp_path / "x")
    assert code == 2 and "'run' names the models of 2 runs" in one_line_error(err)
    # Without the audit log nothing vouches for any model: listed with a warning, never exported.
    shutil.move(site.audit_dir, tmp_path / "audit-elsewhere")
    code, out, err = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert code == 0 and "has no audit log" in err and "not audited" in out
    code, _, err = cli(capsys, "silo", "models", "export", "run1", "--site", site.root, "--out", tmp_path / "x")
    assert code == 1 and "the site's audit log is missing" in one_line_error(err)
    assert not site.audit_dir.exists()  # the refusal did not start a new log


def test_export_refuses_an_audit_log_whose_chain_is_broken(trained_site, tmp_path, capsys):
    import sqlite3

    site, _ = trained_site
    with sqlite3.connect(site.audit_dir / "audit.sqlite") as db:  # an edit of a record, as an intruder would make it
        seq, leaf = db.execute("SELECT seq, leaf FROM records WHERE seq = 1").fetchone()
        db.execute("UPDATE records SET leaf = ? WHERE seq = ?", (bytes(leaf).replace(b"hospital0", b"hospital9"), seq))
    code, _, err = cli(capsys, "silo", "models", "export", "run1", "--site", site.root, "--out", tmp_path / "x")
    assert code == 1 and not (tmp_path / "x").exists()
    one_line_error(err)


def test_bad_input_gets_one_line_and_exit_2_and_leaves_nothing(trained_site, tmp_path, capsys):
    from silo_agent.approvals import plans_dir

    site, plan = trained_site
    code, _, err = cli(capsys, "silo", "models", "export", "run9", "--site", site.root, "--out", tmp_path / "x")
    assert code == 2 and "keeps no personalized model of run 'run9' (kept: run1)" in one_line_error(err)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        code, _, err = cli(capsys, "silo", "models", "export", "run1", "--site", site.root, "--out", out)
        assert code == 2 and str(a_file) in one_line_error(err)
    assert a_file.read_text() == "x"
    (plans_dir(site) / f"{plan.hash()}.yaml").rename(tmp_path / "plan-elsewhere.yaml")
    code, _, err = cli(capsys, "silo", "models", "export", "run1", "--site", site.root, "--out", tmp_path / "y")
    assert code == 2 and "is no longer stored at this site" in one_line_error(err) and not (tmp_path / "y").exists()
    assert not [r for r in records(site) if r["event"] == "model.exported"]


def test_an_unreadable_file_is_listed_as_such_and_the_others_still_are(trained_site, capsys):
    site, _ = trained_site
    (site.models_dir / "personalized-0000000000000000.safetensors").write_bytes(b"DOE^JANE not a model")
    code, out, err = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert (code, err) == (0, "")
    assert "unreadable" in out and "intact" in out and "not a readable safetensors model" in out and "DOE" not in out


def test_a_site_without_kept_models_says_so(tmp_path, capsys):
    site, _, _ = _personalizing_site(tmp_path, personalize=False)
    code, out, err = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert (code, err) == (0, "") and "keeps no personalized model" in out
    code, out, _ = cli(capsys, "silo", "models", "list", "--site", site.root, "--json")
    assert code == 0 and '"models": []' in out
