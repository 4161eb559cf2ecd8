"""``fedsilo plan``: the researcher's commands (validate, hash, keygen, sign, submit);
``fedsilo provision`` and ``fedsilo coordinator``: the coordinator operator's (kits, start, status, renew-cert, rotate-audit-key)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedsilo.errors import ConfigError


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
    p = psub.add_parser("submit", help="start a signed plan on a running coordinator and stream its round table "
                                       "(exit 0 finished, 1 failed, 2 bad input)")
    p.add_argument("plan", type=Path, metavar="PLAN", help="a bundle .json from 'fedsilo plan sign', or a plan .yaml with --key")
    p.add_argument("--federation", required=True, metavar="NAME", help="the federation's name (its connection name)")
    p.add_argument("--key", type=Path, metavar="DIR/NAME.key", help="sign a plan .yaml now with your researcher key")
    p.add_argument("--superlink", metavar="HOST:PORT", help="the coordinator's address (from the researcher kit's README)")
    p.add_argument("--ca", type=Path, metavar="ca.crt", help="the federation's CA certificate (researcher kit)")
    p.add_argument("--kit", type=Path, metavar="DIR", help="on the coordinator's machine: its kit folder, instead of --superlink/--ca")
    p.add_argument("--insecure-dev", action="store_true", help="UNSAFE: no TLS; development machines only")
    p.add_argument("-v", "--verbose", action="store_true", help="also print Flower's own log lines (to stderr)")
    p.set_defaults(func=_submit)
    p = psub.add_parser("resume", help="continue an interrupted run after its last completed round, with that round's model "
                                       "(exit 0 finished, 1 failed, 2 bad input)")
    p.add_argument("run", metavar="RUN", help="the run's id (as 'plan submit' printed it), or its folder on the coordinator's machine")
    p.add_argument("--federation", required=True, metavar="NAME", help="the federation's name (its connection name)")
    p.add_argument("--metric", default="dice", help="the metric the round table shows (default dice)")
    p.add_argument("--superlink", metavar="HOST:PORT", help="the coordinator's address (from the researcher kit's README)")
    p.add_argument("--ca", type=Path, metavar="ca.crt", help="the federation's CA certificate (researcher kit)")
    p.add_argument("--kit", type=Path, metavar="DIR", help="on the coordinator's machine: its kit folder, instead of --superlink/--ca")
    p.add_argument("--insecure-dev", action="store_true", help="UNSAFE: no TLS; development machines only")
    p.add_argument("-v", "--verbose", action="store_true", help="also print Flower's own log lines (to stderr)")
    p.set_defaults(func=_resume)

    p = sub.add_parser("provision", help="coordinator operator: write the startup kits of a federation (CA, coordinator, sites)")
    p.add_argument("project", type=Path, metavar="PROJECT.yaml", help="federation name, coordinator address and port, sites")
    p.add_argument("--out", type=Path, required=True, metavar="KITS", help="folder for the kits (ca/, coordinator/, researcher/, one per site)")
    p.add_argument("--force", action="store_true", help="replace existing kit folders (their keys are lost)")
    p.set_defaults(func=_provision)

    coord = sub.add_parser("coordinator", help="coordinator operator: start the federation's SuperLink, its status, certificate "
                                               "renewal, checkpoint-key rotation")
    csub = coord.add_subparsers(dest="coordinator_command", metavar="COMMAND", required=True, parser_class=type(coord))
    p = csub.add_parser("start", help="run the SuperLink from a coordinator kit (TLS, SuperNode authentication, persistent "
                                      "state) until Ctrl-C")
    p.add_argument("--kit", type=Path, required=True, metavar="DIR", help="KITS/coordinator from 'fedsilo provision' (also holds the state)")
    p.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, help="listen port (default: the kit's)")
    p.add_argument("--insecure-dev", action="store_true", help="UNSAFE: no TLS; development machines only")
    p.set_defaults(func=_coordinator_start)
    p = csub.add_parser("status", help="sites (online, offline, not registered) and runs of the running coordinator")
    p.add_argument("--kit", type=Path, required=True, metavar="DIR")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_coordinator_status)
    p = csub.add_parser("renew-cert", help="issue a new server certificate with the federation's CA (sites need nothing new)")
    p.add_argument("--kit", type=Path, required=True, metavar="DIR")
    p.add_argument("--ca", type=Path, required=True, metavar="KITS/ca", help="the CA folder from 'fedsilo provision'")
    p.add_argument("--days", type=int, default=365)
    p.set_defaults(func=_coordinator_renew)
    p = csub.add_parser("rotate-audit-key", help="replace the coordinator's checkpoint key (the old one is deleted; its "
                                                  "public key stays trusted for verifying earlier runs)")
    p.add_argument("--kit", type=Path, required=True, metavar="DIR")
    p.set_defaults(func=_coordinator_rotate_audit_key)


def _coordinator_rotate_audit_key(args: argparse.Namespace) -> int:
    from coordinator.deployment import load_coordinator_kit, rotate_audit_key

    done = rotate_audit_key(load_coordinator_kit(args.kit))
    if done.finished_interrupted:
        print(f"finished an interrupted rotation: the checkpoint key is {done.new} (nothing new was made)")
    else:
        print(f"new checkpoint key {done.new} (the old key {done.old} is deleted; its public key stays in audit-trust/ "
              "for verifying earlier runs; wipe any backup of the old private key)")
    print(f"send {done.shared} to every site: it replaces trust/{done.shared.name} in the site's kit, and the site trusts "
          "the new key when its node restarts (fedsilo silo start). Runs started from now on are signed with the new key.")
    return 0


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


def _resume(args: argparse.Namespace) -> int:
    from coordinator.submit import connection, resume

    if sum(x is not None for x in (args.superlink, args.kit)) > 1:
        raise ConfigError("give either --superlink (with --ca) or --kit, not both", fix="researchers use --superlink and --ca")
    run = args.run.strip()
    if not run.isdigit():
        folder = Path(run).expanduser()
        if not (folder / "state" / "run-state.json").is_file():
            raise ConfigError(f"'{run}' is neither a run id nor a run folder with run state (state/run-state.json)",
                              fix="give the run id 'plan submit' printed, or the run's folder on the coordinator's machine")
        run = str(folder.resolve())
    conn = connection(args.federation, superlink=args.superlink, ca=args.ca, kit=args.kit, insecure_dev=args.insecure_dev)
    try:
        outcome = resume(run, conn, metric=args.metric, verbose=args.verbose)
    finally:
        conn.close()
    if outcome.exit_code == 0:
        print(f"run {args.run} finished after resuming ({outcome.rounds} more round(s))", file=sys.stderr)
    else:
        print(f"fedsilo: resuming run {args.run} failed: {outcome.reason}", file=sys.stderr)
    return outcome.exit_code


def _submit(args: argparse.Namespace) -> int:
    import signal

    from coordinator.submit import connection, load_submission, submit

    def _raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    if sum(x is not None for x in (args.superlink, args.kit)) > 1:
        raise ConfigError("give either --superlink (with --ca) or --kit, not both", fix="researchers use --superlink and --ca")
    bundle, plan = load_submission(args.plan, args.key)
    if args.insecure_dev:
        print("WARNING: --insecure-dev: the plan goes to the coordinator WITHOUT TLS; development machines only", file=sys.stderr)
    conn = connection(args.federation, superlink=args.superlink, ca=args.ca, kit=args.kit, insecure_dev=args.insecure_dev)
    old = signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM stops the flwr child too, as Ctrl-C does
    try:
        outcome = submit(bundle, plan, conn, verbose=args.verbose)
    finally:
        signal.signal(signal.SIGTERM, old)
        conn.close()
    if outcome.exit_code == 0:
        print(f"run {outcome.run_id} finished after {outcome.rounds} round(s); its results are in the coordinator's runs/{outcome.run_id}/",
              file=sys.stderr)
    else:
        print(f"fedsilo: run {outcome.run_id} failed: {outcome.reason}", file=sys.stderr)
    return outcome.exit_code


def _provision(args: argparse.Namespace) -> int:
    from coordinator.provision import load_project, provision

    project = load_project(args.project)
    result = provision(project, args.out, force=args.force)
    print(f"kits for federation {project.federation} written to {result.out}: ca/ (store offline), coordinator/, researcher/, "
          + ", ".join(f"{s.id}/" for s in project.sites))
    print("fingerprints to confirm out of band (also in each kit's README.md):")
    for what, fingerprint in result.fingerprints.items():
        print(f"  {what:<32} {fingerprint}")
    return 0


def _coordinator_start(args: argparse.Namespace) -> int:
    from coordinator.deployment import load_coordinator_kit, run_coordinator

    kit = load_coordinator_kit(args.kit)
    try:
        run_coordinator(kit, host=args.host, port=args.port, insecure_dev=args.insecure_dev)
    except KeyboardInterrupt:
        print(f"coordinator of federation {kit.federation} stopped", file=sys.stderr)
    return 0


def _coordinator_status(args: argparse.Namespace) -> int:
    import json

    from coordinator.deployment import coordinator_status, format_status, load_coordinator_kit

    status = coordinator_status(load_coordinator_kit(args.kit))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def _coordinator_renew(args: argparse.Namespace) -> int:
    from coordinator.deployment import load_coordinator_kit, renew_server_certificate

    if not 1 <= args.days <= 36500:
        raise ConfigError(f"--days must be 1-36500, got {args.days}", fix="e.g. --days 365")
    fingerprint = renew_server_certificate(load_coordinator_kit(args.kit), args.ca, days=args.days)
    print(f"new server certificate {fingerprint} in {args.kit} (the old one is kept as server.pem.old); "
          "restart the coordinator to use it")
    return 0
