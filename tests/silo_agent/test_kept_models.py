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


def test_a_model_changed_on_disk_is_flagged_and_not_exported(trained_site, tmp_path, capsys):
    site, _ = trained_site
    path = personalized_model_path(site, "run1")
    arrays = load_model(path)
    name = next(iter(arrays))
    arrays[name] = arrays[name] + np.float32(0.5)
    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    save_model(path, arrays, metadata=metadata)  # the same run, round and plan: only a tensor differs
    code, out, err = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert code == 0 and "CHANGED" in out and "warning: the tensors of run1 are not those the silo agent saved" in out
    code, out, err = cli(capsys, "silo", "models", "export", "run1", "--site", site.root, "--out", tmp_path / "x")
    assert code == 1 and "its tensors differ from those the silo agent saved" in one_line_error(err)
    assert not (tmp_path / "x").exists()


def test_bad_input_gets_one_line_and_exit_2(trained_site, tmp_path, capsys):
    site, _ = trained_site
    code, _, err = cli(capsys, "silo", "models", "export", "run9", "--site", site.root, "--out", tmp_path / "x")
    assert code == 2 and "keeps no personalized model of run 'run9' (kept: run1)" in one_line_error(err)
    (site.models_dir / "personalized-0000000000000000.safetensors").write_bytes(b"DOE^JANE not a model")
    code, _, err = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert code == 2 and "is not a readable safetensors model" in one_line_error(err) and "DOE" not in err


def test_a_site_without_kept_models_says_so(tmp_path, capsys):
    site, _, _ = _personalizing_site(tmp_path, personalize=False)
    code, out, err = cli(capsys, "silo", "models", "list", "--site", site.root)
    assert (code, err) == (0, "") and "keeps no personalized model" in out
    code, out, _ = cli(capsys, "silo", "models", "list", "--site", site.root, "--json")
    assert code == 0 and '"models": []' in out
