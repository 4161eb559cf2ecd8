"""The coordinator: a Flower ServerApp.

Run config (``flwr run ... --run-config``): ``plan-path`` (a submission bundle from
``fedsilo plan sign``: the plan with the researcher's signature; a bare plan YAML runs too, but every
silo refuses an unsigned plan) and ``out-dir`` (the run folder). It builds the initial model from the plan (same seed at every party), then
hands over to :class:`coordinator.federation.FederatedRun`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.federation import FederatedRun
from fedsilo.errors import ConfigError, FedsiloError

app = ServerApp()
log = logging.getLogger("fedsilo.coordinator")


@app.main()
def main(grid: Grid, context: Context) -> None:
    from pipelines.networks import build_network
    from pipelines.plan import parse_plan_text
    from pipelines.serialization import to_numpy

    cfg = context.run_config
    try:
        plan_path = Path(str(cfg.get("plan-path", "")))
        out_dir = Path(str(cfg.get("out-dir", "")))
        if not plan_path.is_file():
            raise ConfigError(f"no plan at '{plan_path}'", fix="pass --run-config \"plan-path='/abs/plan.yaml' out-dir='/abs/run'\"")
        if not str(out_dir) or str(out_dir) == ".":
            raise ConfigError("no out-dir in the run config", fix="pass --run-config \"out-dir='/abs/run'\"")
        out_dir.mkdir(parents=True, exist_ok=True)
        plan_text, submission = read_plan_or_bundle(plan_path)
        plan = parse_plan_text(plan_text, source=str(plan_path))
        if submission is not None:
            submission.verify(plan.hash())
        initial = to_numpy(build_network(plan, seed=plan.training.seed).state_dict())
        signer, witness_keys = _audit_keys(cfg)
        FederatedRun(grid, plan, plan_text, out_dir, str(context.run_id), initial, signer=signer, witness_keys=witness_keys,
                     submission=submission).execute()
    except FedsiloError as exc:
        # The ServerApp's exit is reported by Flower; the reason goes to its log in one line.
        log.error("fedsilo: error: %s", exc.one_line())
        raise SystemExit(exc.exit_code) from None


def read_plan_or_bundle(path: Path):
    """(plan text, SubmissionBundle or None): a .json file is a submission bundle, anything else a plan YAML."""
    from compliance.statements import SubmissionBundle

    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        bundle = SubmissionBundle.from_json(text, str(path))
        return bundle.plan_text, bundle
    return text, None


def _audit_keys(cfg) -> tuple:
    """The coordinator's checkpoint key (run config ``audit-key-dir``) and the silos' witness keys
    (``witness-keys-dir``). Without a key the log is still hash-chained but not signed or witnessed."""
    from compliance.keys import load_signer, load_verifier_keys
    from fedsilo.protocol import COORDINATOR_LOG_KEY

    key_dir = str(cfg.get("audit-key-dir", ""))
    if not key_dir:
        log.warning("fedsilo: no audit-key-dir in the run config: checkpoints will not be signed or witnessed")
        return None, ()
    signer = load_signer(key_dir, COORDINATOR_LOG_KEY)
    witness_dir = str(cfg.get("witness-keys-dir", ""))
    witness_keys = load_verifier_keys(witness_dir) if witness_dir and any(Path(witness_dir).glob("*.vkey")) else ()
    return signer, witness_keys
