"""``fedsilo plan``: the researcher's commands (validate, hash, keygen, sign)."""

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
    p = psub.add_parser("schema", help="print the plan schema reference (Markdown), generated from the schema itself")
    p.add_argument("--out", type=Path, metavar="FILE.md", help="write it to a file instead")
    p.set_defaults(func=_schema)
    p = psub.add_parser("keygen", help="create your researcher signing key (Ed25519; private key mode 0600)")
    p.add_argument("--researcher", required=True, help="your name as sites will see it, e.g. a.jones")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder for NAME.key and NAME.vkey")
    p.set_defaults(func=_keygen)
    p = psub.add_parser("sign", help="sign a plan with your researcher key: writes the submission bundle that "
                                     "sites import and the coordinator runs")
    p.add_argument("plan", type=Path)
    p.add_argument("--key", type=Path, required=True, metavar="DIR/NAME.key", help="your key from 'fedsilo plan keygen'")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.json")
    p.set_defaults(func=_sign)


def _validate(args: argparse.Namespace) -> int:
    from pipelines.plan import load_plan

    from coordinator.aggregation import rule_for_plan
    from coordinator.server_optimizer import build_server_optimizer

    plan = load_plan(args.plan)
    f = plan.federation
    rule_for_plan(f)  # the rule's own argument checks, and enough silos for it
    build_server_optimizer(f.server_optimizer.name, f.server_lr, f.server_optimizer.args)
    print(f"OK: plan '{plan.name}' ({plan.task}, {plan.model.network}, {f.rounds} rounds, {f.aggregation.rule}, "
          f"DP {'epsilon ' + str(plan.privacy.target_epsilon) if plan.privacy.enabled else 'off'}), hash {plan.hash()}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from pipelines.plan import schema_reference

    text = schema_reference()
    if args.out:
        args.out.write_text(text, encoding="utf-8")
        print(f"plan schema reference written to {args.out}")
    else:
        print(text, end="")
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from compliance.keys import generate_signer

    signer = generate_signer(args.out, args.researcher, role="person")
    print(f"researcher key {signer.name} written to {args.out} (public: {signer.vkey()})")
    print(f"fingerprint {signer.fingerprint}: give it to the sites' officers to confirm out of band")
    return 0


def _sign(args: argparse.Namespace) -> int:
    from compliance.keys import load_signer
    from compliance.records import utc_now
    from compliance.statements import sign_submission
    from fedsilo.errors import ConfigError
    from pipelines.plan import load_plan

    plan = load_plan(args.plan)
    key_path = args.key
    if key_path.suffix != ".key":
        raise ConfigError(f"--key {key_path} is not a .key file", fix="give DIR/NAME.key as written by 'fedsilo plan keygen'")
    signer = load_signer(key_path.parent, key_path.stem)
    bundle = sign_submission(args.plan.read_text(encoding="utf-8"), plan.hash(), plan.name, signer, utc_now())
    args.out.write_text(bundle.to_json(), encoding="utf-8")
    print(f"signed plan '{plan.name}' ({plan.hash()[:12]}) as {signer.name}: {args.out}")
    return 0


def _hash(args: argparse.Namespace) -> int:
    from pipelines.plan import load_plan

    print(load_plan(args.plan).hash())
    return 0
