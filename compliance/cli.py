"""``fedsilo audit``: the compliance officer's commands (verify, show, export, report)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compliance import merkle
from compliance.audit_log import AuditLog
from compliance.report import build_report, write_csv
from compliance.records import EventType
from compliance.verify import AuditVerificationError, VerifyResult, verify_log
from fedsilo.errors import ConfigError, VerificationError

SHOW_COLUMNS = ("seq", "time", "event", "actor", "round", "outcome")


def add_commands(sub) -> None:
    audit = sub.add_parser("audit", help="audit log: verify, show, export")
    asub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True, parser_class=type(audit))
    p = asub.add_parser("verify", help="check every record, the Merkle tree, checkpoints and witnesses' copies; "
                                       "exit 1 at the first problem")
    p.add_argument("path", type=Path, help="the log's folder, e.g. runs/demo/audit")
    p.add_argument("--keys", type=Path, metavar="DIR",
                   help="folder of trusted .vkey files (the log's key, witness keys); checks checkpoint signatures")
    p.add_argument("--witness", type=Path, action="append", default=[], metavar="SITE_AUDIT_DIR",
                   help="a silo's audit folder holding its witness state; repeat for each silo")
    p.add_argument("--inclusion", type=_natural, metavar="SEQ",
                   help="print and check the inclusion proof of record SEQ in the whole tree")
    p.add_argument("--consistency", type=_natural, nargs=2, metavar=("OLD", "NEW"),
                   help="print and check the consistency proof between tree sizes OLD and NEW")
    p.add_argument("--record-as", metavar="NAME",
                   help="append the verdict to the log as a verification.run record by NAME (role compliance-officer); "
                        "the log is otherwise only read")
    p.set_defaults(func=_verify)
    p = asub.add_parser("show", help="list the records (not verified: run 'verify' for that)")
    p.add_argument("path", type=Path, help="the log's folder, e.g. runs/demo/audit")
    p.add_argument("--tail", type=_positive_int, metavar="N", help="only the last N records")
    p.add_argument("--json", action="store_true", help="print each record as its canonical JSON line")
    p.set_defaults(func=_show)
    p = asub.add_parser("export", help="write the exact record bytes, one per line (JSON Lines)")
    p.add_argument("path", type=Path, help="the log's folder, e.g. runs/demo/audit")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.jsonl")
    p.set_defaults(func=_export)
    p = asub.add_parser("report", help="write the review report (one self-contained HTML file): verdict, runs, "
                                       "sites per round, rejected updates, privacy, security events; exit 1 if "
                                       "the log is not intact (the report is still written)")
    p.add_argument("path", type=Path, help="the log's folder, e.g. runs/demo/audit")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.html")
    p.add_argument("--keys", type=Path, metavar="DIR", help="folder of trusted .vkey files; checks checkpoint signatures")
    p.add_argument("--witness", type=Path, action="append", default=[], metavar="SITE_AUDIT_DIR",
                   help="a silo's audit folder holding its witness state; repeat for each silo")
    p.add_argument("--sites-root", type=Path, metavar="DIR",
                   help="folder of site folders, each with audit/ (e.g. runs/demo/sites): privacy spent per dataset")
    p.add_argument("--csv", type=Path, metavar="FILE.csv", help="also write one CSV row per record (for a SIEM)")
    p.set_defaults(func=_report)


def _verify(args: argparse.Namespace) -> int:
    if args.record_as is not None and not args.record_as.strip():
        raise ConfigError("--record-as needs a name", fix="give your name or staff id, e.g. --record-as j.smith")
    try:
        result = verify_log(args.path, keys=args.keys, witnesses=args.witness)
    except VerificationError as exc:
        if args.record_as:
            _record_verification(args, outcome="failure", reason=exc.one_line()[:300],
                                 details={"first_bad_seq": exc.seq if isinstance(exc, AuditVerificationError) else None})
        raise
    print(f"OK: {result.records} records intact, head {result.head[:12]}, root {result.root[:12]}")
    _print_anchors(result)
    for warning in result.warnings:
        print(f"fedsilo: warning: {warning}", file=sys.stderr)
    if args.record_as:
        _record_verification(args, outcome="success", reason=None, details={
            "records": result.records, "root": result.root, "anchored": result.anchored, "checkpoints": result.checkpoints,
            "signatures_checked": result.signatures_checked, "witnesses": len(result.witnesses)})
    if args.inclusion is not None or args.consistency is not None:
        with AuditLog.open(args.path, read_only=True) as log:
            hashes = log.leaf_hashes(result.records)
        if args.inclusion is not None:
            _inclusion(args.inclusion, hashes)
        if args.consistency is not None:
            _consistency(*args.consistency, hashes)
    return 0


def _record_verification(args: argparse.Namespace, *, outcome: str, reason: str | None, details: dict) -> None:
    """Append a verification.run record: who verified, with which keys and witnesses, and the verdict."""
    actor = {"kind": "person", "id": args.record_as.strip(), "site": None, "role": "compliance-officer", "key": None}
    details = {**details, "keys_given": args.keys is not None, "witness_folders": len(args.witness)}
    with AuditLog.open(args.path, create=False, source="audit-cli") as log:
        record = log.append(EventType.VERIFICATION_RUN, actor=actor, outcome=outcome, reason=reason, details=details)
    print(f"recorded: verification.run by {actor['id']} ({outcome}) at seq {record['seq']}")


def _print_anchors(result: VerifyResult) -> None:
    if result.checkpoints:
        how = "signatures verified" if result.signatures_checked else "signatures NOT checked"
        print(f"checkpoints: {result.checkpoints} match the records ({how}); anchored up to size {result.anchored}")
    for w in result.witnesses:
        how = "cosignatures verified" if w.cosignatures_checked else "cosignatures NOT checked"
        print(f"witness {w.folder}: {w.checkpoints} checkpoints consistent, latest size {w.latest} ({how})")


def _inclusion(seq: int, hashes: list[bytes]) -> None:
    size = len(hashes)
    if seq >= size:
        raise ConfigError(f"--inclusion {seq}: the log has {size} records (seq 0..{size - 1})")
    root = merkle.root(hashes)
    proof = merkle.inclusion_proof(seq, hashes)
    print(f"inclusion of seq {seq} in tree size {size}, root {root.hex()}")
    print(f"leaf hash {hashes[seq].hex()}")
    for i, h in enumerate(proof):
        print(f"  {i}: {h.hex()}")
    merkle.verify_inclusion(seq, size, hashes[seq], proof, root)
    print(f"inclusion proof OK ({len(proof)} hashes)")


def _consistency(old: int, new: int, hashes: list[bytes]) -> None:
    if not 0 <= old <= new <= len(hashes):
        raise ConfigError(f"--consistency {old} {new}: need 0 <= OLD <= NEW <= {len(hashes)} (the log's size)")
    old_root, new_root = merkle.root(hashes[:old]), merkle.root(hashes[:new])
    proof = merkle.consistency_proof(old, new, hashes)
    print(f"consistency from size {old} (root {old_root.hex()}) to size {new} (root {new_root.hex()})")
    for i, h in enumerate(proof):
        print(f"  {i}: {h.hex()}")
    merkle.verify_consistency(old, new, old_root, new_root, proof)
    print(f"consistency proof OK ({len(proof)} hashes)")


def _show(args: argparse.Namespace) -> int:
    with AuditLog.open(args.path, read_only=True) as log:
        if args.json:
            for _, leaf, _ in log.rows(tail=args.tail):
                print(leaf.decode("utf-8"))
            return 0
        rows = [_show_row(record) for record in log.records(tail=args.tail)]
    widths = [max([len(c), *(len(r[i]) for r in rows)]) for i, c in enumerate(SHOW_COLUMNS)]
    for row in (SHOW_COLUMNS, *rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


def _export(args: argparse.Namespace) -> int:
    with AuditLog.open(args.path, read_only=True) as log:
        count = log.export_jsonl(args.out)
    print(f"exported {count} records to {args.out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    for out in (args.out, args.csv):
        if out is not None and not out.parent.is_dir():
            raise ConfigError(f"cannot write {out}: folder {out.parent} does not exist", fix="create it first")
    report = build_report(args.path, keys=args.keys, witnesses=args.witness, sites_root=args.sites_root)
    args.out.write_text(report.html, encoding="utf-8")
    print(f"{report.verdict}: report of {report.records} records written to {args.out}")
    if args.csv is not None:
        print(f"exported {write_csv(args.path, args.csv)} records to {args.csv}")
    for warning in report.warnings:
        print(f"fedsilo: warning: {warning}", file=sys.stderr)
    if not report.verified:
        print(f"fedsilo: error: {report.message}", file=sys.stderr)
        return 1
    return 0


def _show_row(record: dict) -> tuple[str, ...]:
    actor = record.get("actor") or {}
    round_ = record.get("round")
    return (str(record.get("seq")), str(record.get("time")), str(record.get("event")),
            f"{actor.get('kind')}:{actor.get('id')}", "-" if round_ is None else str(round_), str(record.get("outcome")))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, not {text!r}")
    return value


def _natural(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, not {text!r}")
    return value
