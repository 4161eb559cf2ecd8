"""``fedsilo silo``: hospital IT's commands (site folder, datasets, officers, plan approvals, policy, budget)."""

from __future__ import annotations

import argparse
from datetime import datetime, timedelta, timezone
from pathlib import Path

from fedsilo.errors import ConfigError


def add_commands(sub) -> None:
    silo = sub.add_parser("silo", help="hospital side: site folder and datasets")
    ssub = silo.add_subparsers(dest="silo_command", metavar="COMMAND", required=True, parser_class=type(silo))
    p = ssub.add_parser("init", help="create a site folder")
    p.add_argument("site_dir", type=Path)
    p.add_argument("--site", required=True, help="the site's id, e.g. hospital0")
    p.set_defaults(func=_init)

    ds = ssub.add_parser("dataset", help="register and list datasets")
    dsub = ds.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True, parser_class=type(silo))
    p = dsub.add_parser("add", help="register a dataset from a MONAI datalist JSON")
    p.add_argument("name")
    p.add_argument("--site", dest="site_dir", type=Path, required=True, help="the site folder")
    p.add_argument("--datalist", type=Path, required=True)
    p.add_argument("--task", required=True, help="seg3d, seg2d, cls3d or cls2d")
    p.set_defaults(func=_dataset_add)
    p = dsub.add_parser("list", help="list registered datasets")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.set_defaults(func=_dataset_list)

    off = ssub.add_parser("officer", help="site officers who approve or reject plans")
    osub = off.add_subparsers(dest="officer_command", metavar="COMMAND", required=True, parser_class=type(silo))
    p = osub.add_parser("add", help="create an officer's signing key (Ed25519, private key mode 0600)")
    p.add_argument("name", help="the officer's name or staff id, e.g. j.smith")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.set_defaults(func=_officer_add)

    pl = ssub.add_parser("plan", help="training plans at this site: import, list, show, approve, reject")
    psub = pl.add_subparsers(dest="plan_command", metavar="COMMAND", required=True, parser_class=type(silo))
    p = psub.add_parser("import", help="import a researcher's signed submission bundle for review")
    p.add_argument("bundle", type=Path, help="the FILE.json written by 'fedsilo plan sign'")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.set_defaults(func=_plan_import)
    p = psub.add_parser("list", help="plans received here and their status")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.set_defaults(func=_plan_list)
    p = psub.add_parser("show", help="a plan in full, who submitted it, policy check, diff against the closest approved plan")
    p.add_argument("hash", help="the plan hash (8 or more hex digits)")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.set_defaults(func=_plan_show)
    for name, help_text in (("approve", "approve a plan (signed with your officer key)"), ("reject", "reject a plan, with a reason")):
        p = psub.add_parser(name, help=help_text)
        p.add_argument("hash", help="the plan hash (8 or more hex digits)")
        p.add_argument("--site", dest="site_dir", type=Path, required=True)
        p.add_argument("--officer", required=True, help="your officer name (fedsilo silo officer add)")
        if name == "approve":
            p.add_argument("--expires", metavar="YYYY-MM-DD", help="the approval lapses at the start of this day (UTC)")
            p.add_argument("--days", type=int, metavar="N", help="the approval lapses after N days")
            p.set_defaults(func=_plan_approve)
        else:
            p.add_argument("--reason", required=True, help="what must change; the researcher sees it")
            p.set_defaults(func=_plan_reject)

    po = ssub.add_parser("policy", help="the site policy (policy.yaml): show, check, reset")
    posub = po.add_subparsers(dest="policy_command", metavar="COMMAND", required=True, parser_class=type(silo))
    for name, func, help_text in (("show", _policy_show, "print the policy in force"),
                                  ("check", _policy_check, "check policy.yaml and record it in the audit log if it changed"),
                                  ("reset", _policy_reset, "write the default policy (refuses to overwrite without --force)")):
        p = posub.add_parser(name, help=help_text)
        p.add_argument("--site", dest="site_dir", type=Path, required=True)
        if name == "reset":
            p.add_argument("--force", action="store_true")
        p.set_defaults(func=func)

    p = ssub.add_parser("budget", help="privacy spent and left per dataset (epsilon, composed by the accountant)")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_budget)


def _init(args: argparse.Namespace) -> int:
    from silo_agent.site import init_site

    site = init_site(args.site_dir, args.site)
    print(f"site {site.site_id} ready at {site.root}")
    return 0


def _dataset_add(args: argparse.Namespace) -> int:
    from silo_agent.site import Site, register_dataset

    site = register_dataset(Site.open(args.site_dir), args.name, task=args.task, datalist=args.datalist)
    print(f"dataset {args.name} ({args.task}) registered at site {site.site_id}")
    return 0


def _dataset_list(args: argparse.Namespace) -> int:
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    for entry in site.datasets.values():
        print(f"{entry.name}\t{entry.task}\t{entry.datalist}")
    return 0


def _officer_add(args: argparse.Namespace) -> int:
    from silo_agent.approvals import add_officer
    from silo_agent.site import Site

    key = add_officer(Site.open(args.site_dir), args.name)
    print(f"officer {args.name} added; key fingerprint {key.fingerprint}")
    return 0


def _plan_import(args: argparse.Namespace) -> int:
    from silo_agent.approvals import import_bundle, load_stored
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    plan_hash = import_bundle(site, args.bundle)
    stored = load_stored(site, plan_hash)
    print(f"plan '{stored.plan.name}' {plan_hash[:12]} from {stored.submission.researcher if stored.submission else 'unknown'}: "
          f"{stored.status()}; review it with: fedsilo silo plan show {plan_hash[:12]} --site {site.root}")
    return 0


def _plan_list(args: argparse.Namespace) -> int:
    from silo_agent.approvals import stored_plans
    from silo_agent.site import Site

    plans = stored_plans(Site.open(args.site_dir))
    if not plans:
        print("no plans received yet")
        return 0
    rows = [("hash", "name", "researcher", "status", "decided by", "on")]
    for sp in plans:
        d = sp.decision.fields if sp.decision else {}
        rows.append((sp.plan_hash[:12], sp.plan.name, sp.submission.researcher if sp.submission else "unsigned", sp.status(),
                     d.get("officer", "-"), d.get("time", "-")[:10]))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def _plan_show(args: argparse.Namespace) -> int:
    from silo_agent.approvals import diff_against_closest_approved, load_stored, resolve_hash
    from silo_agent.policy import load_policy
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    stored = load_stored(site, resolve_hash(site, args.hash))
    sub = stored.submission
    print(f"plan '{stored.plan.name}'  hash {stored.plan_hash}")
    print(f"submitted by: {sub.researcher} (key {sub.fingerprint}, signed {sub.statement.fields.get('time')})" if sub
          else "submitted by: UNSIGNED (no valid researcher signature; it cannot be approved)")
    print(f"status: {stored.status()}" + (f" ({stored.decision_error})" if stored.decision_error else ""))
    if stored.decision:
        d = stored.decision.fields
        print(f"decision: {d['decision']} by {d['officer']} on {d['time']}, expires {d['expires']}"
              + (f", reason: {d['reason']}" if "reason" in d else ""))
    problems = load_policy(site.root).violations(stored.plan)
    print("site policy: " + ("complies" if not problems else "BREAKS IT:\n  - " + "\n  - ".join(problems)))
    print("--- the plan, as received " + "-" * 40)
    print(stored.plan_text.rstrip())
    closest, diff = diff_against_closest_approved(site, stored)
    print("--- against the closest approved plan " + "-" * 28)
    if closest is None:
        print("(no plan approved here yet)")
    else:
        print(diff.rstrip() or f"(same settings as approved plan {closest[:12]})")
    return 0


def _plan_approve(args: argparse.Namespace) -> int:
    from silo_agent.approvals import decide, resolve_hash
    from silo_agent.site import Site

    if args.expires and args.days is not None:
        raise ConfigError("give --expires or --days, not both", fix="keep one: --expires YYYY-MM-DD or --days N")
    expires = None
    if args.expires:
        try:
            expires = datetime.strptime(args.expires, "%Y-%m-%d").replace(tzinfo=timezone.utc)
        except ValueError:
            raise ConfigError(f"--expires {args.expires!r} is not a date", fix="write it as YYYY-MM-DD") from None
    elif args.days is not None:
        if args.days < 1:
            raise ConfigError(f"--days {args.days} is too small", fix="use 1 or more")
        expires = datetime.now(timezone.utc) + timedelta(days=args.days)
    site = Site.open(args.site_dir)
    plan_hash = resolve_hash(site, args.hash)
    statement = decide(site, plan_hash, officer=args.officer, decision="approved", expires=expires)
    print(f"approved plan {plan_hash[:12]} at site {site.site_id} as {args.officer}; expires {statement['expires']}")
    return 0


def _plan_reject(args: argparse.Namespace) -> int:
    from silo_agent.approvals import decide, resolve_hash
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    plan_hash = resolve_hash(site, args.hash)
    decide(site, plan_hash, officer=args.officer, decision="rejected", reason=args.reason)
    print(f"rejected plan {plan_hash[:12]} at site {site.site_id} as {args.officer}")
    return 0


def _policy_show(args: argparse.Namespace) -> int:
    from silo_agent.policy import load_policy

    print(load_policy(args.site_dir).to_yaml().rstrip())
    return 0


def _policy_check(args: argparse.Namespace) -> int:
    from silo_agent.site import Site, record_policy_if_changed

    site = Site.open(args.site_dir)
    changed = record_policy_if_changed(site)
    print("policy OK" + (" (changed since last recorded: policy.changed written to the audit log)" if changed else ""))
    return 0


def _policy_reset(args: argparse.Namespace) -> int:
    from silo_agent.policy import SitePolicy, policy_path
    from silo_agent.site import Site, record_policy_if_changed

    site = Site.open(args.site_dir)
    path = policy_path(site.root)
    if path.exists() and not args.force:
        raise ConfigError(f"{path} exists", fix="add --force to overwrite it with the defaults")
    path.write_text(SitePolicy().to_yaml(), encoding="utf-8")
    record_policy_if_changed(site)
    print(f"default policy written to {path}")
    return 0


def _budget(args: argparse.Namespace) -> int:
    import json

    from silo_agent.ledger import PrivacyLedger
    from silo_agent.policy import load_policy
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    budget = load_policy(site.root).lifetime_epsilon_per_dataset
    rows = []
    with PrivacyLedger.for_site(site.privacy_dir) as ledger:
        for name in sorted(set(site.datasets) | {s.dataset for s in ledger.spends()}):
            spends = ledger.spends(name)
            spent = spends[-1].epsilon_after if spends else 0.0
            rows.append({"dataset": name, "rounds": len(spends), "plans": len({s.plan_hash for s in spends}),
                         "epsilon_spent": round(spent, 4), "epsilon_budget": budget, "epsilon_left": round(max(budget - spent, 0.0), 4),
                         "delta": spends[-1].delta if spends else None})
    if args.json:
        print(json.dumps({"site": site.site_id, "datasets": rows}))
        return 0
    print(f"site {site.site_id}: lifetime budget epsilon {budget:g} per dataset (policy.yaml)")
    table = [("dataset", "rounds", "plans", "spent", "left", "delta")] + [
        (r["dataset"], r["rounds"], r["plans"], f"{r['epsilon_spent']:.2f}", f"{r['epsilon_left']:.2f}", r["delta"] or "-") for r in rows]
    widths = [max(len(str(r[i])) for r in table) for i in range(6)]
    for r in table:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0
