"""``fedsilo plan``: the researcher's commands (validate, hash)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub) -> None:
    plan = sub.add_parser("plan", help="training plans: validate, hash")
    psub = plan.add_subparsers(dest="plan_command", metavar="COMMAND", required=True, parser_class=type(plan))
    p = psub.add_parser("validate", help="check a plan; each error names the key and the fix")
    p.add_argument("plan", type=Path)
    p.set_defaults(func=_validate)
    p = psub.add_parser("hash", help="print the plan's canonical hash (sha256)")
    p.add_argument("plan", type=Path)
    p.set_defaults(func=_hash)


def _validate(args: argparse.Namespace) -> int:
    from pipelines.plan import load_plan

    plan = load_plan(args.plan)
    f = plan.federation
    print(f"OK: plan '{plan.name}' ({plan.task}, {plan.model.network}, {f.rounds} rounds, {f.aggregation.rule}, "
          f"DP {'epsilon ' + str(plan.privacy.target_epsilon) if plan.privacy.enabled else 'off'}), hash {plan.hash()}")
    return 0


def _hash(args: argparse.Namespace) -> int:
    from pipelines.plan import load_plan

    print(load_plan(args.plan).hash())
    return 0
