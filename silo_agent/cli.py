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

    ds = ssub.add_parser("dataset", help="register, list, show, check and remove datasets")
    dsub = ds.add_subparsers(dest="dataset_command", metavar="COMMAND", required=True, parser_class=type(silo))
    p = dsub.add_parser("add", help="scan DICOM/NIfTI images (or a MONAI datalist), validate them and register the cases")
    p.add_argument("name")
    p.add_argument("--site", dest="site_dir", type=Path, required=True, help="the site folder")
    p.add_argument("--images", type=Path, help="a folder (or file, or DICOMDIR) of DICOM series and/or NIfTI images")
    p.add_argument("--labels", type=Path, help="segmentation: a folder of NIfTI masks; classification: a CSV (image,label)")
    p.add_argument("--datalist", type=Path, help="instead of --images: a MONAI Decathlon-style datalist JSON")
    p.add_argument("--task", required=True, help="seg3d, seg2d, cls3d or cls2d")
    p.add_argument("--classes", help="classification: comma-separated class names, in class-number order, if the CSV uses names")
    p.add_argument("--workers", type=int, default=None, help="processes for the header scan (default 1: one parses about 5,000 headers/s; more help on idle cores)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    p.set_defaults(func=_dataset_add)
    p = dsub.add_parser("list", help="list registered datasets")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_dataset_list)
    p = dsub.add_parser("show", help="a registered dataset: counts, shapes, spacing, sources, rejections")
    p.add_argument("name")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_dataset_show)
    p = dsub.add_parser("check", help="re-hash every registered file and report drift (exit 1 when anything changed)")
    p.add_argument("name")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_dataset_check)
    p = dsub.add_parser("remove", help="forget a dataset (registry and cache; source files are never touched)")
    p.add_argument("name")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.set_defaults(func=_dataset_remove)

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

    mo = ssub.add_parser("models", help="models this site keeps and never sends (personalized models): list, export")
    mosub = mo.add_subparsers(dest="models_cmd", required=True)
    p = mosub.add_parser("list", help="each personalized model: run, plan, when saved, its final figures beside the "
                                       "global model's, and whether its tensors are those the audit log recorded")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_models_list)
    p = mosub.add_parser("export", help="copy a run's personalized model with the plan that builds its network "
                                         "(model.safetensors, plan.yaml) into a folder, after checking it; audited")
    p.add_argument("run", help="the run id, or its first characters, as 'models list' shows it")
    p.add_argument("--site", dest="site_dir", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="a new or empty folder")
    p.set_defaults(func=_models_export)

    from silo_agent.node import add_start_command

    add_start_command(ssub)  # fedsilo silo start --kit DIR --site-dir SITE_DIR


def _init(args: argparse.Namespace) -> int:
    from silo_agent.site import init_site

    site = init_site(args.site_dir, args.site)
    print(f"site {site.site_id} ready at {site.root}")
    return 0


class _ProgressBar:
    """A progress bar on stderr: redrawn in place on a terminal; otherwise (a log) a line per quarter for long
    work only (over LOG_MIN_TOTAL items). Counts only, never a path."""

    LOG_MIN_TOTAL = 1000

    def __init__(self, what: str) -> None:
        import sys

        self.what, self.stream = what, sys.stderr
        self.tty = self.stream.isatty()
        self.last, self.quarter = 0.0, -1

    def __call__(self, done: int, total: int) -> None:
        import time

        pct = 100 * done // max(total, 1)
        if self.tty:
            now = time.monotonic()
            if now - self.last < 0.1 and done < total:
                return
            self.last = now
            filled = pct * 30 // 100
            end = "\n" if done >= total else ""
            print(f"\r{self.what} [{'#' * filled}{'.' * (30 - filled)}] {done}/{total} ({pct}%)", end=end, file=self.stream, flush=True)
        elif total > self.LOG_MIN_TOTAL and pct // 25 != self.quarter:
            self.quarter = pct // 25
            print(f"{self.what}: {done}/{total} ({pct}%)", file=self.stream, flush=True)


def _dataset_add(args: argparse.Namespace) -> int:
    import json

    from silo_agent.registry import register
    from silo_agent.site import Site

    classes = tuple(c.strip() for c in args.classes.split(",") if c.strip()) if args.classes else None
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers} is too small", fix="use 1 or more")
    site = Site.open(args.site_dir)
    reg = register(site, args.name, task=args.task, images=args.images, labels=args.labels, datalist=args.datalist,
                   classes=classes, workers=args.workers, progress=None if args.json else _ProgressBar("scanning"))
    summary = reg.summary()
    if args.json:
        print(json.dumps({"site": site.site_id, **summary}))
        return 0
    c = reg.registry.counts
    print(f"scanned {reg.files_seen} file(s) in {reg.seconds:.1f} s")
    print(f"dataset {args.name} ({args.task}) {'re-registered' if reg.replaced else 'registered'} at site {site.site_id}: "
          f"{c['cases']} case(s), {c['training']} training + {c['test']} test; shapes {', '.join(summary['shapes'])}")
    if reg.rejected:
        kinds = ", ".join(f"{n} {k}" for k, n in reg.rejected.items())
        print(f"not used: {sum(reg.rejected.values())} file(s) ({kinds}); one reason per file in {reg.rejections_path}")
    for note in reg.registry.notes:
        print(f"note: {note}")
    return 0


def _dataset_list(args: argparse.Namespace) -> int:
    import json

    from silo_agent.registry import load_registry
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    rows = []
    for entry in site.datasets.values():
        row = {"dataset": entry.name, "task": entry.task, "cases": None, "training": None, "test": None, "registered_at": None,
               "source": "datalist (legacy entry)" if entry.registry is None else None}
        if entry.registry is not None:
            reg = load_registry(entry.registry)
            row.update({k: reg.counts[k] for k in ("cases", "training", "test")}, registered_at=reg.registered_at, source=reg.source["kind"])
        rows.append(row)
    if args.json:
        print(json.dumps({"site": site.site_id, "datasets": rows}))
        return 0
    if not rows:
        print("no datasets registered yet")
        return 0
    table = [("dataset", "task", "cases", "training", "test", "source", "registered")] + [
        (r["dataset"], r["task"], r["cases"] if r["cases"] is not None else "-", r["training"] if r["training"] is not None else "-",
         r["test"] if r["test"] is not None else "-", r["source"], r["registered_at"] or "-") for r in rows]
    _table(table)
    return 0


def _table(rows) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())


def _dataset_show(args: argparse.Namespace) -> int:
    import json

    from silo_agent.registry import dataset_dir, load_registry
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    entry = site.dataset(args.name)
    if entry.registry is None:
        raise ConfigError(f"dataset '{args.name}' was registered before the registry existed (datalist {entry.datalist})",
                          fix=f"register it again: fedsilo silo dataset add {args.name} --site {site.root} --datalist {entry.datalist} --task {entry.task}")
    reg = load_registry(entry.registry)
    rejections_path = dataset_dir(site.root, args.name) / "rejections.json"
    rejections = json.loads(rejections_path.read_text(encoding="utf-8"))["rejections"] if rejections_path.is_file() else []
    by_kind: dict[str, int] = {}
    for r in rejections:
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + 1
    shapes: dict[str, int] = {}
    for c in reg.cases:
        key = "x".join(map(str, c.shape))
        shapes[key] = shapes.get(key, 0) + 1
    spacing = [sorted({round(c.spacing[i], 4) for c in reg.cases}) for i in range(len(reg.cases[0].spacing))] if reg.cases else []
    info = {"site": site.site_id, "dataset": reg.name, "task": reg.task, "registered_at": reg.registered_at, "source": reg.source,
            "counts": reg.counts, "manifest_sha256": reg.manifest_sha256, "shapes": shapes,
            "spacing_mm": [[s[0], s[-1]] for s in spacing], "formats": sorted({c.image_format for c in reg.cases}),
            "rejected_by_kind": dict(sorted(by_kind.items())), "rejections_file": str(rejections_path),
            "registry_file": str(entry.registry), "notes": list(reg.notes)}
    if args.json:
        print(json.dumps(info))
        return 0
    c = reg.counts
    print(f"dataset {reg.name} ({reg.task}) at site {site.site_id}, registered {reg.registered_at}")
    src = reg.source
    print("source: " + (f"datalist {src['datalist']}" if src["kind"] == "datalist" else
                        f"images {src['images']}" + (f", labels {src['labels']}" if src.get("labels") else "")))
    print(f"cases: {c['cases']} ({c['training']} training, {c['test']} test) from {c['files_in_cases']} file(s); "
          f"{c['files_seen']} file(s) scanned")
    if "classes" in c:
        print("classes: " + ", ".join(f"{k}: {n}" for k, n in c["classes"].items()))
    print("formats: " + ", ".join(info["formats"]) + "; shapes: " + ", ".join(f"{k} ({n})" for k, n in shapes.items()))
    print("spacing (mm): " + " x ".join(f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}" for lo, hi in info["spacing_mm"]))
    print(f"manifest sha256: {reg.manifest_sha256}")
    if by_kind:
        print(f"not used: {len(rejections)} file(s) (" + ", ".join(f"{n} {k}" for k, n in info["rejected_by_kind"].items())
              + f"); list: {rejections_path}")
    for note in reg.notes:
        print(f"note: {note}")
    return 0


def _dataset_check(args: argparse.Namespace) -> int:
    import json

    from silo_agent.registry import check
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    report = check(site, args.name, progress=None if args.json else _ProgressBar("re-hashing"))
    if args.json:
        print(json.dumps({"site": site.site_id, **report.to_json()}))
    else:
        print(f"dataset {args.name}: {report.unchanged} of {report.cases} case(s) unchanged"
              + (f"; {report.touched} touched but identical (fingerprint refreshed)" if report.touched else ""))
        if report.changed:
            print(f"CHANGED since registration: {len(report.changed)} case(s): {', '.join(report.changed[:10])}"
                  + (" ..." if len(report.changed) > 10 else ""))
        if report.missing:
            print(f"MISSING files: {len(report.missing)} case(s): {', '.join(report.missing[:10])}" + (" ..." if len(report.missing) > 10 else ""))
        if report.new_files:
            print(f"NEW files under the registered folders: {report.new_files}")
        print("no drift" if report.clean else f"drift found: register the dataset again to use the current files "
              f"(fedsilo silo dataset add {args.name} ...)")
    return 0 if report.clean else 1


def _dataset_remove(args: argparse.Namespace) -> int:
    from silo_agent.registry import remove
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    result = remove(site, args.name)
    print(f"dataset {args.name} removed from site {site.site_id} ({result['cases']} case(s), {result['cache_entries_removed']} cache "
          "entries); source files untouched; its privacy spends stay in the ledger")
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


def _models_list(args: argparse.Namespace) -> int:
    import json
    import sys

    from silo_agent.kept_models import audit_log_present, kept_models
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    models = kept_models(site)
    if not audit_log_present(site) and models:
        print(f"warning: site {site.site_id} has no audit log (SITE_DIR/audit): nothing vouches for these models", file=sys.stderr)
    if args.json:
        print(json.dumps({"site": site.site_id, "models": [
            {"run_id": m.run_id, "round": m.round, "plan_hash": m.plan_hash, "file": m.path.name, "sha256": m.sha256,
             "integrity": m.integrity, "problem": m.problem, "saved_at": m.saved_at, "lr_scale": m.lr_scale,
             "final_evaluation": m.figures}
            for m in models]}))
        return 0
    if not models:
        print(f"site {site.site_id} keeps no personalized model (a plan with training.personalize leaves one per run)")
        return 0
    metric = next((k for k in ("dice", "accuracy", "auc") if any(k in m.figures for m in models)), None)
    head = ("run", "plan", "round", "saved (UTC)", *((f"global {metric}", f"personalized {metric}") if metric else ()), "tensors", "file")
    rows = [head]
    for m in models:
        figures = ()
        if metric:
            figures = tuple(f"{m.figures[k]:.3f}" if isinstance(m.figures.get(k), (int, float)) else "-"
                            for k in (metric, f"personalized-{metric}"))
        rows.append((m.run_id or "-", m.plan_hash[:12] or "-", m.round if m.round is not None else "-",
                     (m.saved_at or "-")[:19].replace("T", " "), *figures, m.integrity, m.path.name))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    print(f"site {site.site_id}: {len(models)} personalized model file(s) in {site.models_dir}")
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip())
    for m in models:
        if m.integrity in ("CHANGED", "unreadable"):
            print(f"warning: {m.path.name}: {m.problem} (see 'fedsilo audit show')")
    return 0


def _models_export(args: argparse.Namespace) -> int:
    from silo_agent.kept_models import export_model, find_model
    from silo_agent.site import Site

    site = Site.open(args.site_dir)
    model = find_model(site, args.run)
    written = export_model(site, model, args.out)
    print(f"exported the personalized model of run {model.run_id} (sha256 {model.sha256[:16]}, tensors intact) to "
          f"{args.out}: {', '.join(p.name for p in written)}")
    return 0
