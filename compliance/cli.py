"""``fedsilo audit``: the compliance officer's commands (verify, show, export)."""

from __future__ import annotations

import argparse
from pathlib import Path

from compliance.audit_log import AuditLog
from compliance.verify import verify_log

SHOW_COLUMNS = ("seq", "time", "event", "actor", "round", "outcome")


def add_commands(sub) -> None:
    audit = sub.add_parser("audit", help="audit log: verify, show, export")
    asub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True, parser_class=type(audit))
    p = asub.add_parser("verify", help="check every record and the hash chain; exit 1 at the first broken record")
    p.add_argument("path", type=Path, help="the log's folder, e.g. runs/demo/audit")
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


def _verify(args: argparse.Namespace) -> int:
    result = verify_log(args.path)
    print(f"OK: {result.records} records intact, head {result.head[:12]}")
    return 0


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
