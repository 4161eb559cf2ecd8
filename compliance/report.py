"""The compliance officer's review report: one self-contained HTML file, and a CSV export for a SIEM.

The report opens with the verification verdict (``verify_log``), then reads the records to show the runs and
plans, which sites took part in each round, the updates rejected and why, the privacy spent (epsilon) per site,
the security events, and two plots. The HTML holds inline CSS and inline SVG only: no script, font, image or
link that a browser would fetch. Every value taken from a log is escaped (``html.escape``).

When verification fails, the report is still written from whatever records can be read, and it says so at the
top: its content is then untrusted.
"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compliance.audit_log import DB_NAME, AuditLog
from compliance.records import EventType, utc_now
from compliance.verify import VerifyResult, verify_log
from fedsilo.errors import ConfigError, VerificationError

CSV_COLUMNS = ("seq", "time", "event", "actor_kind", "actor_id", "actor_site", "run_id", "round", "outcome",
               "reason", "object_type", "object_id", "object_sha256")
# Colours of the sites' lines in the plots (distinguishable in greyscale print too, with the markers).
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")
# run.started details that may carry the plan's privacy target (none does yet).
BUDGET_KEYS = ("target_epsilon", "epsilon_budget", "max_epsilon")
NOT_RECORDED = "not recorded"


@dataclass(frozen=True)
class SiteLog:
    """One silo's own audit log read from ``--sites-root``: its verdict and its ``dp.spent`` records."""

    site: str
    verified: bool
    message: str
    records: int
    spends: tuple[dict[str, Any], ...]
    problems: tuple[dict[str, Any], ...]  # records whose outcome is not "success"
    admin: tuple[dict[str, Any], ...] = ()  # governance and configuration events (ADMIN_EVENTS)
    actors: tuple[dict[str, Any], ...] = ()  # every record's actor and source (for the "who acted" table)


@dataclass(frozen=True)
class Report:
    """The review report of one coordinator log.

    Attributes:
        html: the whole report, a self-contained HTML document.
        verified: the log verified intact (``verify_log`` returned).
        verdict: "INTACT" or "TAMPERED / NOT VERIFIED".
        message: the verification error's one line, or "" when intact.
        warnings: what the verification could not show (unanchored tail, signatures not checked, ...).
        records: records read (all of them; when not verified, the readable ones).
        unreadable: stored records that could not be parsed (only when not verified).
        result: the ``VerifyResult`` when verified.
        sites: the silo logs read from ``sites_root``.
    """

    html: str
    verified: bool
    verdict: str
    message: str
    warnings: tuple[str, ...]
    records: int
    unreadable: int = 0
    result: VerifyResult | None = None
    sites: tuple[SiteLog, ...] = field(default=())


def build_report(log_path: str | Path, *, keys: str | Path | None = None, witnesses: Sequence[str | Path] = (),
                 sites_root: str | Path | None = None) -> Report:
    """Verify the log in folder ``log_path`` and build its review report.

    Args:
        log_path: the coordinator's audit folder, e.g. ``runs/demo/audit``.
        keys: trusted verifier keys (as for ``verify_log``).
        witnesses: silo audit folders holding a witness state.
        sites_root: a folder of site folders, each with ``audit/`` (e.g. ``runs/demo/sites``): their ``dp.spent``
            records give the privacy spent per site and dataset.

    Raises:
        ConfigError: no audit log at ``log_path`` (or it is not a readable SQLite audit log), bad keys, witness
            folders or ``sites_root``. A log that fails verification does not raise: the report says so.
    """
    path = Path(log_path)
    if not (path / DB_NAME).is_file():
        raise ConfigError(f"no audit log at {path}", fix="pass the run's audit/ folder, e.g. runs/demo/audit")
    root = Path(sites_root) if sites_root is not None else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"--sites-root {root} is not a folder", fix="pass the run's sites/ folder, e.g. runs/demo/sites")
    result: VerifyResult | None = None
    error: VerificationError | None = None
    try:
        result = verify_log(path, keys=keys, witnesses=witnesses)
    except VerificationError as exc:
        error = exc
    records, unreadable = _read_records(path)
    sites = tuple(_read_site(folder) for folder in _site_folders(root)) if root is not None else ()
    verified = error is None
    verdict = "INTACT" if verified else "TAMPERED / NOT VERIFIED"
    message = "" if error is None else error.one_line()
    warnings = result.warnings if result is not None else ()
    page = _render(path, records, unreadable, result, error, sites)
    return Report(html=page, verified=verified, verdict=verdict, message=message, warnings=warnings,
                  records=len(records), unreadable=unreadable, result=result, sites=sites)


def write_csv(log_path: str | Path, out_path: str | Path) -> int:
    """Write one CSV row per record (columns :data:`CSV_COLUMNS`, with a header) and return the row count.

    The records are written as stored, unverified (run ``verify_log`` or the report for that); a stored record
    that cannot be parsed gets a row with its seq and ``event`` "unreadable".

    Raises:
        ConfigError: no audit log at ``log_path``, or the output folder does not exist.
    """
    path, out = Path(log_path), Path(out_path)
    if not (path / DB_NAME).is_file():
        raise ConfigError(f"no audit log at {path}", fix="pass the run's audit/ folder, e.g. runs/demo/audit")
    if not out.parent.is_dir():
        raise ConfigError(f"cannot write {out}: folder {out.parent} does not exist", fix="create it first")
    count = 0
    with AuditLog.open(path, read_only=True) as log, out.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for seq, leaf, _ in log.rows():
            record = _parse(leaf)
            if record is None:
                writer.writerow([seq, "", "unreadable"] + [""] * (len(CSV_COLUMNS) - 3))
            else:
                actor, obj = _map(record.get("actor")), _map(record.get("object"))
                writer.writerow([_cell(v) for v in (
                    record.get("seq"), record.get("time"), record.get("event"), actor.get("kind"), actor.get("id"),
                    actor.get("site"), record.get("run_id"), record.get("round"), record.get("outcome"),
                    record.get("reason"), obj.get("type"), obj.get("id"), obj.get("sha256"))])
            count += 1
    return count


# --- reading -----------------------------------------------------------------------------------------------


def _parse(leaf: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(leaf)
    except ValueError:  # includes invalid UTF-8
        return None
    return record if isinstance(record, dict) else None


def _read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    records, unreadable = [], 0
    with AuditLog.open(path, read_only=True) as log:
        for _, leaf, _ in log.rows():
            record = _parse(leaf)
            if record is None:
                unreadable += 1
            else:
                records.append(record)
    return records, unreadable


def _site_folders(root: Path) -> list[Path]:
    return sorted(d for d in root.iterdir() if (d / "audit" / DB_NAME).is_file())


def _read_site(folder: Path) -> SiteLog:
    audit = folder / "audit"
    try:
        result = verify_log(audit)
        verified, message = True, f"every record, the Merkle tree and {result.checkpoints} checkpoints agree"
    except (VerificationError, ConfigError) as exc:
        verified, message = False, exc.one_line()
    try:
        records, _ = _read_records(audit)
    except ConfigError as exc:
        return SiteLog(folder.name, False, exc.one_line(), 0, (), ())
    spends = tuple(r for r in records if r.get("event") == EventType.DP_SPENT)
    problems = tuple(r for r in records if r.get("outcome") != "success")
    admin = tuple(r for r in records if r.get("event") in ADMIN_EVENTS)
    return SiteLog(folder.name, verified, message, len(records), spends, problems, admin, tuple(records))


# Who changed what the federation may do: registrations, approvals, policy and configuration, verifications.
ADMIN_EVENTS = frozenset({EventType.NODE_REGISTERED, EventType.PLAN_SUBMITTED, EventType.PLAN_APPROVED, EventType.PLAN_REJECTED,
                          EventType.DATASET_REGISTERED, EventType.DATASET_REMOVED, EventType.POLICY_CHANGED,
                          EventType.CONFIG_CHANGED, EventType.VERIFICATION_RUN})


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _cell(value: Any) -> str:
    return "" if value is None else str(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _fmt(value: Any) -> str:
    number = _number(value)
    if number is not None and isinstance(value, float):
        return f"{number:.4g}"
    return "-" if value is None else str(value)


def _round_key(record: Mapping[str, Any]) -> int | None:
    value = record.get("round")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- the facts the report shows ----------------------------------------------------------------------------


@dataclass
class _Facts:
    runs: list[dict[str, Any]]
    rounds: list[int]
    sites: list[str]
    participation: dict[tuple[int, str], str]  # (round, site) -> "accepted" / "rejected"
    rejected: list[dict[str, str]]
    epsilon: dict[tuple[int, str], float | None]
    accepted: dict[int, int]
    problems: list[dict[str, Any]]
    checkpoint_counts: dict[str, dict[str, int]]


def _facts(records: list[dict[str, Any]]) -> _Facts:
    node_site: dict[str, str] = {}  # node id -> site, from update.received
    for r in records:
        d = _map(r.get("details"))
        if r.get("event") == EventType.UPDATE_RECEIVED and isinstance(d.get("node"), str) and isinstance(d.get("site"), str):
            node_site[d["node"]] = d["site"]
    runs: dict[str, dict[str, Any]] = {}
    participation: dict[tuple[int, str], str] = {}
    epsilon: dict[tuple[int, str], float | None] = {}
    accepted: dict[int, int] = {}
    rejected: list[dict[str, str]] = []
    rounds: set[int] = set()
    sites: set[str] = set()
    counts = {e: {"success": 0, "failure": 0} for e in (EventType.CHECKPOINT_SIGNED, EventType.CHECKPOINT_COSIGNED)}
    for r in records:
        event, d, obj = r.get("event"), _map(r.get("details")), _map(r.get("object"))
        run_id, round_ = str(r.get("run_id") or "-"), _round_key(r)
        if event in counts:
            counts[event]["success" if r.get("outcome") == "success" else "failure"] += 1
        if event == EventType.RUN_STARTED:
            runs[run_id] = {"run_id": run_id, "plan": obj.get("id"), "plan_sha256": obj.get("sha256"),
                            "rounds": d.get("rounds"), "rule": d.get("rule"), "min_silos": d.get("min_silos"),
                            "started": r.get("time"), "status": "no run.finished record (incomplete or still running)",
                            "budget": next((d[k] for k in BUDGET_KEYS if _number(d.get(k)) is not None), None)}
        elif event in (EventType.RUN_FINISHED, EventType.RUN_FAILED) and run_id in runs:
            if event == EventType.RUN_FINISHED:
                runs[run_id]["status"] = f"finished {r.get('time')}"
            else:
                runs[run_id]["status"] = f"FAILED {r.get('time')}: {r.get('reason') or 'no reason recorded'}"
        elif event == EventType.UPDATE_RECEIVED and round_ is not None:
            site = str(d.get("site") or obj.get("id") or "unknown")
            rounds.add(round_)
            sites.add(site)
            participation[(round_, site)] = "accepted"
            accepted[round_] = accepted.get(round_, 0) + 1
            epsilon[(round_, site)] = _number(d.get("epsilon"))
        elif event == EventType.UPDATE_REJECTED:
            node = str(obj.get("id") or d.get("node") or "-")
            site = d.get("site") if isinstance(d.get("site"), str) else node_site.get(node)
            if round_ is not None:
                rounds.add(round_)
                label = site or f"node {node}"
                sites.add(label)
                participation.setdefault((round_, label), "rejected")
            rejected.append({"round": _fmt(round_), "node": node, "site": site or "unknown",
                             "outcome": str(r.get("outcome")), "reason": str(r.get("reason") or "no reason recorded")})
    for round_ in rounds:
        accepted.setdefault(round_, 0)
    problems = [r for r in records if r.get("outcome") != "success"]
    return _Facts(list(runs.values()), sorted(rounds), sorted(sites), participation, rejected, epsilon, accepted,
                  problems, counts)


# --- rendering ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;
line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em;max-width:100%}th,td{border:1px solid #bbb;padding:.3em .6em;text-align:left;
vertical-align:top}td{overflow-wrap:anywhere;min-width:5.5em}th{background:#eee}
td.hash{word-break:break-all;min-width:10em;font-family:monospace}td.num{text-align:right;font-variant-numeric:tabular-nums}
.verdict{border:3px solid;padding:1em 1.4em;margin:1em 0;border-radius:6px}
.verdict.intact{border-color:#2a7d2a;background:#eaf6ea}.verdict.tampered{border-color:#b00020;background:#fdecee}
.verdict .word{font-size:2em;font-weight:bold;letter-spacing:.05em}
.intact .word{color:#2a7d2a}.tampered .word{color:#b00020}
.untrusted{background:#b00020;color:#fff;padding:.6em 1em;font-weight:bold;border-radius:4px}
.warn{color:#8a5300}.accepted{background:#eaf6ea}.rejected{background:#fdecee;font-weight:bold}.absent{color:#888}
.note{color:#555;font-size:.9em}code{font-size:.9em;word-break:break-all}
svg{background:#fff;border:1px solid #ddd;margin:.5em 0}
"""


def _e(value: Any) -> str:
    return html.escape(_cell(value), quote=True)


def _table(table_id: str, headers: Sequence[str], rows: Iterable[Sequence[tuple[str, str]] | Sequence[str]],
           empty: str = "none") -> str:
    """A table; each cell is either a plain value or ``(value, css class)``. Values are escaped here."""
    body = []
    for row in rows:
        cells = []
        for cell in row:
            text, cls = cell if isinstance(cell, tuple) else (cell, "")
            cells.append(f'<td class="{_e(cls)}">{_e(text)}</td>' if cls else f"<td>{_e(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        return f'<p id="{_e(table_id)}" class="note">{_e(empty)}</p>'
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    return f'<table id="{_e(table_id)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _render(path: Path, records: list[dict[str, Any]], unreadable: int, result: VerifyResult | None,
            error: VerificationError | None, sites: tuple[SiteLog, ...]) -> str:
    facts = _facts(records)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>fedsilo audit review report</title>", f"<style>{_CSS}</style></head><body>",
             "<h1>Audit review report</h1>",
             f'<p class="note">Log: <code>{_e(path)}</code> &middot; generated {_e(utc_now())} (UTC) by '
             "<code>fedsilo audit report</code>. HIPAA Security Rule 164.308(a)(1)(ii)(D), information system "
             "activity review.</p>"]
    parts.append(_verdict(result, error, len(records), unreadable))
    parts.append(_runs_section(facts, records, sites))
    parts.append(_sites_section(facts))
    parts.append(_rejected_section(facts))
    parts.append(_privacy_section(facts, sites))
    parts.append(_security_section(facts, sites))
    parts.append(_governance_section(records, sites))
    parts.append(_actors_section(records, sites))
    parts.append("</body></html>")
    return "\n".join(parts)


def _verdict(result: VerifyResult | None, error: VerificationError | None, readable: int, unreadable: int) -> str:
    if result is not None:
        how = "checked against the trusted keys" if result.signatures_checked else "NOT checked (no trusted keys given)"
        facts = [("Records", str(result.records)), ("First record", result.first_time), ("Last record", result.last_time),
                 ("Signed checkpoints matching the records", str(result.checkpoints)),
                 ("Checkpoint signatures", how if result.checkpoints else "no checkpoint in the log"),
                 ("Anchored (covered by a checkpoint)", f"{result.anchored} of {result.records} records"),
                 ("Unanchored tail (hash chain only)", str(result.unanchored)),
                 ("Merkle root", result.root)]
        for w in result.witnesses:
            state = "verified" if w.cosignatures_checked else "NOT checked"
            facts.append((f"Witness {w.folder}", f"{w.checkpoints} checkpoints consistent, latest size {w.latest}, "
                                                 f"cosignatures {state}"))
        if not result.witnesses:
            facts.append(("Witnesses", "none given (pass each hospital's audit folder with --witness)"))
        rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
        warnings = "".join(f'<li class="warn">{_e(w)}</li>' for w in result.warnings)
        warn = f'<h3>Warnings</h3><ul id="warnings">{warnings}</ul>' if warnings else '<p id="warnings">No warnings.</p>'
        return (f'<section id="verdict" class="verdict intact" data-verdict="INTACT"><div class="word">INTACT</div>'
                "<p>Every record, the Merkle tree over them and every checkpoint agree: no record was changed, removed "
                f'or reordered.</p><table id="verification">{rows}</table>{warn}</section>')
    assert error is not None
    skipped = f" {unreadable} stored records could not be read at all and are left out." if unreadable else ""
    return (f'<section id="verdict" class="verdict tampered" data-verdict="TAMPERED"><div class="word">TAMPERED / NOT '
            f'VERIFIED</div><p id="verdict-reason">{_e(error.one_line())}</p></section>'
            f'<p class="untrusted" id="untrusted">UNTRUSTED: everything below is read from a log that failed '
            f"verification ({readable} readable records).{_e(skipped)} Do not rely on it without an intact copy.</p>")


def _approvals(plan_sha256: Any, records: list[dict[str, Any]], sites: tuple[SiteLog, ...]) -> str:
    """Who decided on this plan at each site (from the sites' own logs) and who submitted it (the coordinator's)."""
    parts = []
    for r in records:
        if r.get("event") == EventType.PLAN_SUBMITTED and _map(r.get("object")).get("sha256") == plan_sha256:
            a = _map(r.get("actor"))
            parts.append(f"submitted by {a.get('id')} (researcher, key {str(a.get('key'))[:20]}...)")
    for s in sites:
        for r in s.admin:
            if r.get("event") in (EventType.PLAN_APPROVED, EventType.PLAN_REJECTED) and _map(r.get("object")).get("sha256") == plan_sha256:
                a = _map(r.get("actor"))
                verb = "approved" if r.get("event") == EventType.PLAN_APPROVED else "REJECTED"
                parts.append(f"{s.site}: {verb} by {a.get('id')} on {str(r.get('time'))[:10]}")
    if not parts:
        return "no approval in the logs read (give --sites-root to read the sites' logs)" if not sites else "no approval recorded"
    return "; ".join(parts)


def _runs_section(facts: _Facts, records: list[dict[str, Any]], sites: tuple[SiteLog, ...]) -> str:
    rows = [[r["run_id"], _fmt(r["plan"]), (_fmt(r["plan_sha256"]), "hash"), _fmt(r["rounds"]), _fmt(r["rule"]),
             _fmt(r["min_silos"]), _fmt(r["started"]), r["status"], _approvals(r["plan_sha256"], records, sites)]
            for r in facts.runs]
    table = _table("runs", ("Run", "Plan", "Plan SHA-256", "Rounds planned", "Aggregation rule", "Minimum sites",
                            "Started (UTC)", "Outcome", "Plan approvals per site"), rows, "No run.started record.")
    return f'<section id="runs-section"><h2>Runs and plans</h2>{table}</section>'


def _sites_section(facts: _Facts) -> str:
    rows = []
    for round_ in facts.rounds:
        row: list[Any] = [str(round_)]
        for site in facts.sites:
            state = facts.participation.get((round_, site))
            row.append((state, state) if state else ("-", "absent"))
        row.append(str(facts.accepted.get(round_, 0)))
        rows.append(row)
    table = _table("sites-per-round", ("Round", *facts.sites, "Accepted updates"), rows, "No update records.")
    plot = _bar_chart("participation-plot", [(str(r), facts.accepted.get(r, 0)) for r in facts.rounds],
                      "Accepted updates per round", "round", "accepted updates") if facts.rounds else ""
    return (f'<section id="sites-section"><h2>Sites per round</h2><p class="note">accepted: the site\'s update was '
            "received and checked; rejected: refused or failed (see below); -: no update recorded.</p>"
            f"{table}{plot}</section>")


def _rejected_section(facts: _Facts) -> str:
    rows = [[r["round"], r["node"], r["site"], (r["outcome"], "rejected"), r["reason"]] for r in facts.rejected]
    table = _table("rejected-updates", ("Round", "Node", "Site", "Outcome", "Reason"), rows, "No update was rejected.")
    return f'<section id="rejected-section"><h2>Updates rejected and why</h2>{table}</section>'


def _privacy_section(facts: _Facts, sites: tuple[SiteLog, ...]) -> str:
    rows = []
    for round_ in facts.rounds:
        row: list[Any] = [str(round_)]
        for site in facts.sites:
            if (round_, site) not in facts.epsilon:
                row.append(("-", "absent"))
            else:
                value = facts.epsilon[(round_, site)]
                row.append((f"{value:.4g}", "num") if value is not None else ("not reported", "absent"))
        rows.append(row)
    table = _table("epsilon", ("Round", *facts.sites), rows, "No update records.")
    series = {site: [(r, facts.epsilon[(r, site)]) for r in facts.rounds
                     if facts.epsilon.get((r, site)) is not None] for site in facts.sites}
    series = {s: pts for s, pts in series.items() if pts}
    plot = (_line_chart("epsilon-plot", series, "Cumulative epsilon per site", "round", "epsilon (cumulative)")
            if series else '<p class="note">No epsilon reported (differential privacy off, or no updates).</p>')
    budgets = [f"{r['run_id']}: {_fmt(r['budget'])}" for r in facts.runs if r["budget"] is not None]
    budget = ("plan target epsilon " + "; ".join(budgets)) if budgets else "budget: not recorded"
    out = [f'<section id="privacy-section"><h2>Privacy spent (differential privacy)</h2><p class="note">Epsilon '
           "(cumulative, as each site reported it with its update) per round and site; smaller is more private. "
           f'<span id="budget">{_e(budget)}</span>.</p>{table}{plot}']
    if sites:
        out.append(_site_spends(sites, budget))
    else:
        out.append('<p class="note">The hospitals\' own logs were not read (pass --sites-root to show the privacy '
                   "spent per dataset as each hospital recorded it).</p>")
    out.append("</section>")
    return "".join(out)


def _site_lifetime_budget(site: SiteLog) -> float | None:
    """The lifetime epsilon per dataset in the site's policy, as its last policy.changed record states it."""
    value = None
    for r in site.admin:
        if r.get("event") == EventType.POLICY_CHANGED:
            value = _number(_map(r.get("details")).get("lifetime_epsilon_per_dataset"))
    return value


def _budget_cell(spent: float | None, lifetime: float | None, fallback: str) -> str:
    if lifetime is None:
        return fallback
    if spent is None:
        return f"site lifetime budget {_fmt(lifetime)}"
    return f"{_fmt(spent)} of the site's lifetime {_fmt(lifetime)} ({100 * spent / lifetime:.0f}%)"


def _site_spends(sites: tuple[SiteLog, ...], budget: str) -> str:
    status = _table("site-logs", ("Site", "Own log", "Records"),
                    [[s.site, (("INTACT: " if s.verified else "NOT VERIFIED: ") + s.message,
                                "accepted" if s.verified else "rejected"), str(s.records)] for s in sites])
    summary: dict[tuple[str, str], dict[str, Any]] = {}
    detail = []
    for s in sites:
        for r in s.spends:
            d, obj = _map(r.get("details")), _map(r.get("object"))
            dataset = str(obj.get("id") or "-")
            eps = _number(d.get("epsilon_cumulative"))
            entry = summary.setdefault((s.site, dataset), {"epsilon": None, "rounds": 0, "delta": d.get("delta")})
            entry["rounds"] += 1
            if eps is not None:
                entry["epsilon"] = eps if entry["epsilon"] is None else max(entry["epsilon"], eps)
            detail.append([s.site, dataset, _fmt(r.get("run_id")), _fmt(r.get("round")), _fmt(d.get("accountant")),
                           _fmt(d.get("noise_multiplier")), _fmt(d.get("max_grad_norm")), _fmt(d.get("sample_rate")),
                           _fmt(d.get("steps")), _fmt(d.get("delta")), (_fmt(d.get("epsilon_cumulative")), "num")])
    lifetime = {s.site: _site_lifetime_budget(s) for s in sites}
    rows = [[site, dataset, (_fmt(v["epsilon"]), "num"), _fmt(v["delta"]), str(v["rounds"]),
             _budget_cell(v["epsilon"], lifetime.get(site), budget)]
            for (site, dataset), v in sorted(summary.items())]
    return ("<h3>As recorded by each hospital (dp.spent)</h3>" + status +
            _table("site-epsilon", ("Site", "Dataset", "Epsilon spent (cumulative)", "Delta", "Spend records", "Budget"),
                   rows, "No dp.spent record in the hospitals' logs.") +
            _table("site-dp-spent", ("Site", "Dataset", "Run", "Round", "Accountant", "Noise multiplier",
                                     "Max grad norm", "Sample rate", "Steps", "Delta", "Epsilon cumulative"), detail, ""))


def _security_section(facts: _Facts, sites: tuple[SiteLog, ...]) -> str:
    counts = [[event, str(c["success"]), (str(c["failure"]), "rejected" if c["failure"] else "")]
              for event, c in facts.checkpoint_counts.items()]
    rows = []
    for r in facts.problems:
        actor = _map(r.get("actor"))
        rows.append(["coordinator", _fmt(r.get("seq")), _fmt(r.get("time")), _fmt(r.get("event")),
                     f"{actor.get('kind')}:{actor.get('id')}", _fmt(r.get("round")), (_fmt(r.get("outcome")), "rejected"),
                     _fmt(r.get("reason"))])
    for s in sites:
        for r in s.problems:
            actor = _map(r.get("actor"))
            rows.append([s.site, _fmt(r.get("seq")), _fmt(r.get("time")), _fmt(r.get("event")),
                         f"{actor.get('kind')}:{actor.get('id')}", _fmt(r.get("round")),
                         (_fmt(r.get("outcome")), "rejected"), _fmt(r.get("reason"))])
    return ('<section id="security-section"><h2>Security events</h2>'
            + _table("checkpoint-counts", ("Event", "Succeeded", "Failed"), counts)
            + "<h3>Refusals and failures</h3>"
            + _table("security-events", ("Log", "Seq", "Time (UTC)", "Event", "Actor", "Round", "Outcome", "Reason"),
                     rows, "No refusal or failure recorded.") + "</section>")


def _governance_section(records: list[dict[str, Any]], sites: tuple[SiteLog, ...]) -> str:
    rows = []
    for log_name, entries in [("coordinator", [r for r in records if r.get("event") in ADMIN_EVENTS])] + [(s.site, s.admin) for s in sites]:
        for r in entries:
            actor, obj = _map(r.get("actor")), _map(r.get("object"))
            what = f"{obj.get('type')} {obj.get('id')}" if obj else "-"
            rows.append([log_name, _fmt(r.get("seq")), _fmt(r.get("time")), _fmt(r.get("event")),
                         f"{actor.get('id')} ({actor.get('role')})", what,
                         (_fmt(r.get("outcome")), "" if r.get("outcome") == "success" else "rejected")])
    return ('<section id="governance-section"><h2>Approvals, registrations, policy and verification</h2>'
            '<p class="note">Who registered data, approved or rejected plans, changed a policy or configuration, '
            "or verified a log (HIPAA 164.308(a)(1)(ii)(D), 164.312(b)).</p>"
            + _table("governance-events", ("Log", "Seq", "Time (UTC)", "Event", "By (role)", "Object", "Outcome"),
                     rows, "No registration, approval, policy change or verification recorded.") + "</section>")


def _actors_section(records: list[dict[str, Any]], sites: tuple[SiteLog, ...]) -> str:
    seen: dict[tuple[str, ...], list[Any]] = {}
    for log_name, entries in [("coordinator", records)] + [(s.site, s.actors) for s in sites]:
        for r in entries:
            a = _map(r.get("actor"))
            key = (log_name, _fmt(a.get("kind")), _fmt(a.get("id")), _fmt(a.get("site")), _fmt(a.get("role")),
                   _fmt(a.get("key")), _fmt(r.get("source")))
            entry = seen.setdefault(key, [0, r.get("time"), r.get("time")])
            entry[0] += 1
            entry[2] = r.get("time")
    rows = [[*k[:5], (k[5], "hash"), k[6], str(v[0]), _fmt(v[1]), _fmt(v[2])] for k, v in seen.items()]
    return ('<section id="actors-section"><h2>Who acted</h2><p class="note">Every actor, in which role, '
            "authenticated by which key (fingerprint), writing from which component and host (HIPAA 164.312(b), "
            "164.312(d)).</p>"
            + _table("actors", ("Log", "Kind", "Id", "Site", "Role", "Key fingerprint", "Source", "Records",
                                "First (UTC)", "Last (UTC)"), rows) + "</section>")


# --- plots (inline SVG) ------------------------------------------------------------------------------------

_W, _H, _L, _R, _T, _B = 640, 300, 70, 150, 30, 50  # size and margins


def _frame(svg_id: str, title: str, xlabel: str, ylabel: str, ymax: float) -> list[str]:
    x0, y0, x1, y1 = _L, _H - _B, _W - _R, _T
    out = [f'<svg id="{_e(svg_id)}" width="{_W}" height="{_H}" '
           f'viewBox="0 0 {_W} {_H}" role="img" aria-label="{_e(title)}" font-family="sans-serif" font-size="12">',
           f'<text x="{_W / 2:.0f}" y="18" text-anchor="middle" font-weight="bold">{_e(title)}</text>',
           f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y0}" stroke="#333"/>',
           f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="#333"/>',
           f'<text x="{(x0 + x1) / 2:.0f}" y="{_H - 10}" text-anchor="middle">{_e(xlabel)}</text>',
           f'<text x="16" y="{(y0 + y1) / 2:.0f}" text-anchor="middle" transform="rotate(-90 16 {(y0 + y1) / 2:.0f})">'
           f"{_e(ylabel)}</text>"]
    for i in range(5):
        value = ymax * i / 4
        y = y0 - (y0 - y1) * i / 4
        out.append(f'<line x1="{x0 - 4}" y1="{y:.1f}" x2="{x1}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<text x="{x0 - 8}" y="{y + 4:.1f}" text-anchor="end">{_e(f"{value:.3g}")}</text>')
    return out


def _line_chart(svg_id: str, series: Mapping[str, list[tuple[int, float]]], title: str, xlabel: str,
                ylabel: str) -> str:
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ymax = max((y for pts in series.values() for _, y in pts), default=1.0) or 1.0
    ymax *= 1.1
    out = _frame(svg_id, title, xlabel, ylabel, ymax)
    x0, y0, x1, y1 = _L, _H - _B, _W - _R, _T
    span = max(xs[-1] - xs[0], 1)

    def px(x: float) -> float:
        return x0 + 20 + (x1 - x0 - 40) * (x - xs[0]) / span

    def py(y: float) -> float:
        return y0 - (y0 - y1) * y / ymax

    step = max(1, len(xs) // 12)
    for x in xs[::step]:
        out.append(f'<text x="{px(x):.1f}" y="{y0 + 16}" text-anchor="middle">{_e(x)}</text>')
    for i, (name, pts) in enumerate(sorted(series.items())):
        colour = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>')
        for x, y in pts:
            out.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}"/>')
        ly = y1 + 10 + 18 * i
        out.append(f'<line x1="{x1 + 12}" y1="{ly}" x2="{x1 + 32}" y2="{ly}" stroke="{colour}" stroke-width="3"/>'
                   f'<text x="{x1 + 38}" y="{ly + 4}">{_e(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def _bar_chart(svg_id: str, bars: list[tuple[str, int]], title: str, xlabel: str, ylabel: str) -> str:
    ymax = float(max((v for _, v in bars), default=1) or 1)
    out = _frame(svg_id, title, xlabel, ylabel, ymax)
    x0, y0, x1, y1 = _L, _H - _B, _W - _R, _T
    slot = (x1 - x0) / max(len(bars), 1)
    for i, (label, value) in enumerate(bars):
        height = (y0 - y1) * value / ymax
        x = x0 + slot * i + slot * 0.15
        out.append(f'<rect x="{x:.1f}" y="{y0 - height:.1f}" width="{slot * 0.7:.1f}" height="{height:.1f}" '
                   f'fill="#1f77b4"><title>{_e(label)}: {_e(value)}</title></rect>'
                   f'<text x="{x + slot * 0.35:.1f}" y="{y0 + 16}" text-anchor="middle">{_e(label)}</text>'
                   f'<text x="{x + slot * 0.35:.1f}" y="{y0 - height - 4:.1f}" text-anchor="middle">{_e(value)}</text>')
    out.append("</svg>")
    return "".join(out)
