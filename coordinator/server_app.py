"""The coordinator: a Flower ServerApp.

Run config (``flwr run ... --run-config``):

- ``submission``: the text of a submission bundle from ``fedsilo plan sign`` (the plan with the
  researcher's signature), as ``fedsilo plan submit`` sends it from the researcher's machine; or
  ``plan-path``: such a bundle (.json) or a bare plan YAML on the coordinator's disk (a bare plan runs,
  but every silo refuses an unsigned plan).
- ``out-dir``: the run folder; ``audit-key-dir`` / ``witness-keys-dir``: the coordinator's checkpoint
  key and the silos' witness keys; ``node-keys-dir``: the sites' node public keys (``<site>.pub``), which
  tell each node's site from the key it authenticated with.
- ``resume-from``: the folder of an interrupted run (``fedsilo plan resume``). Its plan, submission and
  last run state are read from there and the run continues after its last completed round, in the
  same folder and audit log, under its original run id.

A coordinator started with ``fedsilo coordinator start`` sets ``FEDSILO_COORDINATOR_DIR`` (its state
folder) for the SuperLink, whose ServerApp processes inherit it; run-config keys left out then default to
``$FEDSILO_COORDINATOR_DIR/runs/<run id>``, ``.../audit-keys``, ``.../audit-trust`` and ``.../sites``.

The ServerApp builds the initial model from the plan (same seed at every party), then hands over to
:class:`coordinator.federation.FederatedRun`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.federation import FederatedRun
from coordinator.pki import load_node_keys
from coordinator.progress import PROGRESS_PREFIX
from fedsilo.errors import ConfigError, FedsiloError

app = ServerApp()
log = logging.getLogger("fedsilo.coordinator")

#: The coordinator's state folder, set by ``fedsilo coordinator start`` for the SuperLink and its ServerApps.
COORDINATOR_DIR_ENV = "FEDSILO_COORDINATOR_DIR"
NODE_AUTH_ENV = "FEDSILO_NODE_AUTH"  # coordinator.deployment sets it: "0" when the SuperNodes do not use the kit's keys
RUNS_DIR, AUDIT_KEYS_DIR, AUDIT_TRUST_DIR, NODE_KEYS_DIR = "runs", "audit-keys", "audit-trust", "sites"


@app.main()
def main(grid: Grid, context: Context) -> None:
    from pipelines.networks import build_network
    from pipelines.plan import parse_plan_text
    from pipelines.serialization import to_numpy

    from fedsilo import flower_tuning

    flower_tuning.apply()  # only when the coordinator was started with fedsilo's Flower tuning
    cfg = run_settings(dict(context.run_config), str(context.run_id))
    try:
        resume = None
        if cfg.get("resume-from"):
            out_dir, plan_text, submission, resume = read_resume(resume_folder(cfg["resume-from"]))
        else:
            out_dir = Path(cfg["out-dir"]) if cfg.get("out-dir") else None
            if out_dir is None:
                raise ConfigError("no out-dir in the run config", fix="pass --run-config \"out-dir='/abs/run'\", or start the coordinator with fedsilo coordinator start")
            plan_text, submission = read_submission(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        plan = parse_plan_text(plan_text, source=cfg.get("plan-path") or "the submitted plan")
        if submission is not None:
            submission.verify(plan.hash())
        initial = to_numpy(build_network(plan, seed=plan.training.seed).state_dict())
        signer, witness_keys = _audit_keys(cfg)
        run_id = resume.run_id if resume is not None else str(context.run_id)
        node_keys = load_node_keys(Path(cfg["node-keys-dir"])) if cfg.get("node-keys-dir") else None
        FederatedRun(grid, plan, plan_text, out_dir, run_id, initial, signer=signer, witness_keys=witness_keys,
                     submission=submission, resume=resume, flower_run_id=str(context.run_id), node_keys=node_keys).execute()
    except FedsiloError as exc:
        # The ServerApp's exit is reported by Flower; the reason goes to its log in one line.
        log.error("fedsilo: error: %s", exc.one_line())
        print(PROGRESS_PREFIX + json.dumps({"event": "failed", "reason": exc.one_line()}), flush=True)
        # Not SystemExit: Flower's run_serverapp catches Exception only, and its handler is what uploads the
        # remaining output and marks the run failed at once.
        raise RuntimeError(exc.one_line()) from None


def run_settings(run_config: dict, run_id: str) -> dict[str, str]:
    """The run config as strings, with defaults from the coordinator's state folder (``FEDSILO_COORDINATOR_DIR``)."""
    cfg = {k: str(v) for k, v in run_config.items() if str(v)}
    home = os.environ.get(COORDINATOR_DIR_ENV, "")
    if home:
        root = Path(home)
        cfg.setdefault("out-dir", str(root / RUNS_DIR / run_id))
        if (root / AUDIT_KEYS_DIR).is_dir():
            cfg.setdefault("audit-key-dir", str(root / AUDIT_KEYS_DIR))
        if (root / AUDIT_TRUST_DIR).is_dir():
            cfg.setdefault("witness-keys-dir", str(root / AUDIT_TRUST_DIR))
        if (root / NODE_KEYS_DIR).is_dir() and os.environ.get(NODE_AUTH_ENV) != "0":  # --insecure-dev: random node keys
            cfg.setdefault("node-keys-dir", str(root / NODE_KEYS_DIR))
    return cfg


def read_submission(cfg: dict[str, str]):
    """(plan text, SubmissionBundle or None) from run config ``submission`` (bundle text) or ``plan-path``."""
    from compliance.statements import SubmissionBundle

    if cfg.get("submission"):
        bundle = SubmissionBundle.from_json(cfg["submission"], "the submitted bundle")
        return bundle.plan_text, bundle
    plan_path = Path(cfg.get("plan-path", ""))
    if not cfg.get("plan-path") or not plan_path.is_file():
        raise ConfigError(f"no plan at '{cfg.get('plan-path', '')}'",
                          fix="submit with fedsilo plan submit, or pass --run-config \"plan-path='/abs/plan.yaml' out-dir='/abs/run'\"")
    return read_plan_or_bundle(plan_path)


def resume_folder(ref: str) -> Path:
    """The run folder ``resume-from`` names: a path, or a run id under the coordinator's runs/ folder."""
    home = os.environ.get(COORDINATOR_DIR_ENV, "")
    if ref.isdigit():
        if not home:
            raise ConfigError(f"resume-from '{ref}' is a run id, but this coordinator has no state folder to find it in",
                              fix="give the run's folder instead, or start the coordinator with fedsilo coordinator start")
        return Path(home) / RUNS_DIR / ref
    return Path(ref)


def read_resume(run_dir: Path):
    """(run folder, plan text, submission or None, RunSnapshot) of an interrupted run."""
    from compliance.statements import SubmissionBundle
    from coordinator.federation import SUBMISSION_FILE
    from coordinator.run_state import load_snapshot

    if not (run_dir / "plan.yaml").is_file():
        raise ConfigError(f"no run folder at '{run_dir}' (plan.yaml missing)", fix="give the run folder of the interrupted run (its out-dir)")
    snapshot = load_snapshot(run_dir)
    bundle_path = run_dir / SUBMISSION_FILE
    submission = SubmissionBundle.from_json(bundle_path.read_text(encoding="utf-8"), str(bundle_path)) if bundle_path.is_file() else None
    return run_dir, (run_dir / "plan.yaml").read_text(encoding="utf-8"), submission, snapshot


def read_plan_or_bundle(path: Path):
    """(plan text, SubmissionBundle or None): a .json file is a submission bundle, anything else a plan YAML."""
    from compliance.statements import SubmissionBundle

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        bundle = SubmissionBundle.from_json(text, str(path))
        return bundle.plan_text, bundle
    return text, None


def _audit_keys(cfg: dict[str, str]) -> tuple:
    """The coordinator's checkpoint key (run config ``audit-key-dir``) and the silos' witness keys
    (``witness-keys-dir``). Without a key the log is still hash-chained but not signed or witnessed."""
    from compliance.keys import load_signer, load_verifier_keys
    from fedsilo.protocol import COORDINATOR_LOG_KEY

    key_dir = cfg.get("audit-key-dir", "")
    if not key_dir:
        log.warning("fedsilo: no audit-key-dir in the run config: checkpoints will not be signed or witnessed")
        return None, ()
    signer = load_signer(key_dir, COORDINATOR_LOG_KEY)
    witness_dir = cfg.get("witness-keys-dir", "")
    witness_keys = load_verifier_keys(witness_dir) if witness_dir and any(Path(witness_dir).glob("*.vkey")) else ()
    return signer, witness_keys
