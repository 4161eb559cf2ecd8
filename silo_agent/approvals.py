"""Plan approval at the site: nothing runs on the site's data that a site officer has not approved.

Layout (SITE_DIR)::

    officers/<name>.key, .vkey     site officers' person keys (private 0600); officers/*.vkey are trusted
    plans/<hash>.yaml              a plan as received (from a submission bundle or a refused message)
    plans/<hash>.submission        the researcher's signed submission (compliance.statements note)
    plans/<hash>.researcher.vkey   the researcher's public key, as sent with the submission
    plans/<hash>.decision          the officer's signed decision (approved or rejected)

A decision is a ``fedsilo/plan-approval/v1`` statement binding the site, the plan hash, the toolkit
version, the researcher's key, an optional expiry and, for a rejection, the reason; signed with the
officer's Ed25519 key. :func:`require_approval` checks all of it, and the site policy, before any data
is read; a plan altered after approval has another hash and so no approval.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from compliance.checkpoint import VerifierKey, parse_vkey
from compliance.keys import generate_signer, load_signer, load_verifier_keys
from compliance.records import EventType, format_time, parse_time
from compliance.statements import Statement, SubmissionBundle, check_submission, read_statement, sign_statement
from fedsilo import __version__
from fedsilo.errors import ConfigError, FedsiloError, RefusalError, VerificationError
from pipelines.plan import Plan, parse_plan_text
from silo_agent.policy import load_policy, policy_digest
from silo_agent.site import NAME_RE, Site

TOOLKIT = f"fedsilo/{__version__}"
DECISIONS = ("approved", "rejected")


@dataclass(frozen=True)
class Submission:
    """A researcher's signed request to run a plan: the verified statement and the researcher's key."""

    plan_text: str
    statement: Statement
    researcher_key: VerifierKey

    @property
    def researcher(self) -> str:
        return self.statement["researcher"]

    @property
    def fingerprint(self) -> str:
        return self.researcher_key.fingerprint


def verify_submission(plan_text: str, plan_hash: str, note: bytes, vkey: str) -> Submission:
    """Check a submission: signed by the key it comes with, for exactly this plan hash."""
    try:
        key = parse_vkey(vkey.strip())
        statement = read_statement(note, "plan-submission", [key])
    except (ConfigError, VerificationError) as exc:
        raise RefusalError(f"the plan's submission signature does not verify ({exc.message})") from None
    try:
        check_submission(statement, key, plan_text, plan_hash)
    except ConfigError as exc:
        raise RefusalError(f"the researcher's signature does not cover this plan: {exc.message}") from None
    return Submission(plan_text, statement, key)


# --- officers ----------------------------------------------------------------------------------------------


def officers_dir(site: Site) -> Path:
    return site.root / "officers"


def add_officer(site: Site, name: str) -> VerifierKey:
    """Create a site officer's Ed25519 key (private 0600) in SITE_DIR/officers; refuses to overwrite one."""
    if not NAME_RE.match(name.replace(".", "-").replace("_", "-")):
        raise ConfigError(f"officer name {name!r} is not allowed", fix="use letters, digits, '.', '_' and '-', e.g. j.smith")
    signer = generate_signer(officers_dir(site), name, role="person")
    from silo_agent.site import audit_site

    audit_site(site, EventType.CONFIG_CHANGED, object={"type": "officer", "id": name, "sha256": None},
               details={"change": "officer key added", "key": signer.fingerprint})
    return signer.verifier


def trusted_officers(site: Site) -> tuple[VerifierKey, ...]:
    folder = officers_dir(site)
    if not folder.is_dir() or not any(folder.glob("*.vkey")):
        return ()
    return load_verifier_keys(folder)


# --- the plan store ----------------------------------------------------------------------------------------


def plans_dir(site: Site) -> Path:
    return site.root / "plans"


def store_plan(site: Site, plan_text: str, plan_hash: str, submission: Submission | None) -> None:
    """Keep a plan (and its submission) for review; idempotent, never overwrites a stored plan's text."""
    folder = plans_dir(site)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{plan_hash}.yaml"
    if not path.exists():
        _write(path, plan_text.encode("utf-8"))
    if submission is not None and not (folder / f"{plan_hash}.submission").exists():
        _write(folder / f"{plan_hash}.researcher.vkey", (submission.researcher_key.vkey() + "\n").encode("ascii"))
        _write(folder / f"{plan_hash}.submission", submission.statement.note)


def import_bundle(site: Site, bundle_path: Path) -> str:
    """Import a submission bundle written by ``fedsilo plan sign``; returns the plan hash."""
    try:
        text = Path(bundle_path).read_text(encoding="utf-8")
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        raise ConfigError(f"no readable submission bundle at {bundle_path}", fix="ask the researcher for the file written by 'fedsilo plan sign'") from None
    bundle = SubmissionBundle.from_json(text, str(bundle_path))
    plan_text, note, vkey = bundle.plan_text, bundle.note, bundle.researcher_key
    plan = parse_plan_text(plan_text, source=str(bundle_path))
    try:
        submission = verify_submission(plan_text, plan.hash(), note, vkey)
    except RefusalError as exc:
        raise ConfigError(f"{bundle_path}: {exc.message}", fix="ask the researcher to sign the plan again") from None
    store_plan(site, plan_text, plan.hash(), submission)
    from silo_agent.site import audit_site

    audit_site(site, EventType.PLAN_RECEIVED, object={"type": "plan", "id": plan.name[:100], "sha256": plan.hash()},
               details={"via": "bundle import", "researcher": submission.researcher, "researcher_key": submission.fingerprint})
    return plan.hash()


def resolve_hash(site: Site, prefix: str) -> str:
    """The full hash of the stored plan that ``prefix`` (8 or more hex digits) names."""
    prefix = prefix.strip().lower()
    if len(prefix) < 8 or any(c not in "0123456789abcdef" for c in prefix):
        raise ConfigError(f"'{prefix}' is not a plan hash", fix="give at least 8 hex digits, as 'fedsilo silo plan list' shows")
    matches = sorted(p.stem for p in plans_dir(site).glob(f"{prefix}*.yaml")) if plans_dir(site).is_dir() else []
    if not matches:
        raise ConfigError(f"site {site.site_id} holds no plan {prefix}",
                          fix="import the researcher's bundle with 'fedsilo silo plan import FILE', or wait for the plan to be submitted")
    if len(matches) > 1:
        raise ConfigError(f"'{prefix}' names {len(matches)} plans", fix="give more hex digits")
    return matches[0]


@dataclass(frozen=True)
class StoredPlan:
    plan_hash: str
    plan_text: str
    plan: Plan
    submission: Submission | None
    decision: Statement | None
    decision_error: str | None  # the decision file exists but does not verify

    def status(self, now: datetime | None = None) -> str:
        if self.decision_error:
            return "INVALID-DECISION"
        if self.decision is None:
            return "pending"
        d = self.decision.fields
        if d.get("decision") == "rejected":
            return "rejected"
        if d.get("toolkit") != TOOLKIT:
            return f"approved for {d.get('toolkit')} (re-approve)"
        if _expired(d.get("expires", "never"), now):
            return "expired"
        return "approved"


def load_stored(site: Site, plan_hash: str) -> StoredPlan:
    folder = plans_dir(site)
    text = (folder / f"{plan_hash}.yaml").read_text(encoding="utf-8")
    plan = parse_plan_text(text, source=f"stored plan {plan_hash[:12]}")
    submission = None
    sub_path, key_path = folder / f"{plan_hash}.submission", folder / f"{plan_hash}.researcher.vkey"
    if sub_path.is_file() and key_path.is_file():
        try:
            submission = verify_submission(text, plan_hash, sub_path.read_bytes(), key_path.read_text(encoding="ascii"))
        except RefusalError:
            submission = None
    decision, error = None, None
    decision_path = folder / f"{plan_hash}.decision"
    if decision_path.is_file():
        try:
            decision = read_statement(decision_path.read_bytes(), "plan-approval", trusted_officers(site))
            if decision.fields.get("plan") != plan_hash or decision.fields.get("site") != site.site_id:
                raise ConfigError("the decision is for another plan or site")
        except (ConfigError, VerificationError) as exc:
            decision, error = None, exc.one_line()
    return StoredPlan(plan_hash, text, plan, submission, decision, error)


def stored_plans(site: Site) -> list[StoredPlan]:
    folder = plans_dir(site)
    if not folder.is_dir():
        return []
    return [load_stored(site, p.stem) for p in sorted(folder.glob("*.yaml"), key=lambda p: p.stat().st_mtime)]


# --- decisions ---------------------------------------------------------------------------------------------


def decide(site: Site, plan_hash: str, *, officer: str, decision: str, expires: datetime | None = None,
           reason: str | None = None) -> Statement:
    """Sign and store an officer's decision on a stored plan; audits plan.approved / plan.rejected.

    Approval is refused (ConfigError) when the plan breaks the site policy: the officer sees each violation.
    """
    if decision not in DECISIONS:
        raise ConfigError(f"decision must be one of {', '.join(DECISIONS)}")
    stored = load_stored(site, plan_hash)
    from silo_agent.site import audit_site, record_policy_if_changed

    record_policy_if_changed(site)  # a hand edit is on record before a decision rests on it
    if decision == "approved":
        problems = load_policy(site.root).violations(stored.plan)
        if problems:
            raise ConfigError(f"plan {plan_hash[:12]} breaks the site policy: " + "; ".join(problems),
                              fix="reject it, or change policy.yaml if the hospital agrees")
        if stored.submission is None:
            raise ConfigError(f"plan {plan_hash[:12]} has no valid researcher signature", fix="import the researcher's signed bundle first")
    if decision == "rejected" and not (reason or "").strip():
        raise ConfigError("a rejection needs a reason", fix="add --reason 'what must change'")
    try:
        signer = load_signer(officers_dir(site), officer)
    except ConfigError:
        raise ConfigError(f"site {site.site_id} has no officer '{officer}'",
                          fix=f"create the officer's key first: fedsilo silo officer add {officer} --site {site.root}") from None
    now = datetime.now(timezone.utc)
    if expires is not None and expires <= now:
        raise ConfigError(f"expiry {format_time(expires)} is in the past", fix="give a future date")
    fields = [("site", site.site_id), ("plan", plan_hash), ("plan-name", stored.plan.name[:100]), ("decision", decision),
              ("toolkit", TOOLKIT),
              ("researcher", stored.submission.researcher if stored.submission else "unknown"),
              ("researcher-key", stored.submission.fingerprint if stored.submission else "none"),
              ("officer", officer), ("time", format_time(now)), ("expires", format_time(expires) if expires else "never")]
    if reason:
        fields.append(("reason", " ".join(reason.split())[:400]))
    note = sign_statement("plan-approval", fields, signer)
    _write(plans_dir(site) / f"{plan_hash}.decision", note)
    audit_site(site, EventType.PLAN_APPROVED if decision == "approved" else EventType.PLAN_REJECTED,
               actor={"kind": "person", "id": officer, "site": site.site_id, "role": "site-officer", "key": signer.fingerprint},
               object={"type": "plan", "id": stored.plan.name[:100], "sha256": plan_hash},
               outcome="success" if decision == "approved" else "denied", reason=" ".join(reason.split())[:300] if reason else None,
               details={"toolkit": TOOLKIT, "expires": format_time(expires) if expires else None,
                        "researcher": fields[5][1], "researcher_key": fields[6][1], "policy_sha256": policy_digest(site.root)})
    return read_statement(note, "plan-approval", [signer.verifier])


def require_approval(site: Site, plan: Plan, plan_text: str, plan_hash: str, submission: Submission) -> Statement:
    """Refuse (RefusalError) unless ``plan`` is approved here, unexpired, for this toolkit and researcher, and within policy.

    An unknown plan is stored for the officers' review before the refusal.
    """
    store_plan(site, plan_text, plan_hash, submission)
    stored = load_stored(site, plan_hash)
    short = plan_hash[:12]
    if stored.decision_error:
        raise RefusalError(f"plan {short}: the stored approval does not verify ({stored.decision_error})")
    if stored.decision is None:
        raise RefusalError(f"plan {short} is not approved at site {site.site_id}; it now waits for review "
                           f"(fedsilo silo plan show {short} --site SITE_DIR)")
    d = stored.decision.fields
    if d["decision"] == "rejected":
        raise RefusalError(f"plan {short} was rejected by {d['officer']} on {d['time'][:10]}: {d.get('reason', 'no reason given')}")
    if d["toolkit"] != TOOLKIT:
        raise RefusalError(f"plan {short} was approved for {d['toolkit']}, this silo runs {TOOLKIT}; it needs approving again")
    if _expired(d["expires"]):
        raise RefusalError(f"the approval of plan {short} expired on {d['expires'][:10]}")
    if d["researcher-key"] != submission.fingerprint:
        raise RefusalError(f"plan {short} was approved as submitted by {d['researcher']}, this request is signed by another key")
    problems = load_policy(site.root).violations(plan)
    if problems:
        raise RefusalError(f"plan {short} now breaks the site policy: " + "; ".join(problems))
    return stored.decision


def diff_against_closest_approved(site: Site, stored: StoredPlan) -> tuple[str | None, str]:
    """(hash of the closest approved plan or None, unified diff of the normalized plans)."""
    mine = _normalized(stored.plan)
    best, best_ratio, best_text = None, -1.0, ""
    for other in stored_plans(site):
        if other.plan_hash == stored.plan_hash or other.status() != "approved":
            continue
        text = _normalized(other.plan)
        ratio = difflib.SequenceMatcher(None, text, mine).ratio()
        if ratio > best_ratio:
            best, best_ratio, best_text = other.plan_hash, ratio, text
    if best is None:
        return None, ""
    diff = difflib.unified_diff(best_text.splitlines(keepends=True), mine.splitlines(keepends=True),
                                fromfile=f"approved {best[:12]}", tofile=f"this plan {stored.plan_hash[:12]}")
    return best, "".join(diff)


def _normalized(plan: Plan) -> str:
    return yaml.safe_dump(plan.to_dict(), sort_keys=True)


def _expired(expires: str, now: datetime | None = None) -> bool:
    if expires == "never":
        return False
    try:
        return parse_time(expires) <= (now or datetime.now(timezone.utc))
    except FedsiloError:
        return True  # an unreadable expiry is not a valid approval


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


__all__ = ["Submission", "StoredPlan", "add_officer", "decide", "diff_against_closest_approved", "import_bundle",
           "load_stored", "require_approval", "resolve_hash", "store_plan", "stored_plans", "trusted_officers",
           "verify_submission"]
