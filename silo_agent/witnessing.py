"""The silo as a witness of the coordinator's audit log.

Each checkpoint the coordinator signs reaches every silo with a consistency proof from the last
checkpoint that silo cosigned; the silo checks the coordinator's signature and the proof, refuses
a replayed, shortened or forked log, cosigns, and keeps both in its audit folder
(``compliance.witness.Witness``). The coordinator then cannot rewrite history without the silos'
copies showing it (``fedsilo audit verify LOG --witness SITE/audit``).

Keys in the site folder: ``keys/`` holds the silo's own witness key (made at ``silo init``,
never leaves the site); ``trust/`` holds the public keys (.vkey) of the coordinators it trusts.
"""

from __future__ import annotations

from pathlib import Path

from compliance.checkpoint import parse_note
from compliance.keys import generate_signer, key_stem, load_signer, read_vkey_file
from compliance.witness import Witness
from fedsilo.errors import RefusalError


def witness_key_name(site_id: str) -> str:
    return f"{site_id}-witness"


def ensure_witness_key(site_root: Path, site_id: str) -> None:
    """Create the site's witness key once (private key 0600 in keys/, public .vkey beside it)."""
    name = witness_key_name(site_id)
    if not (site_root / "keys" / f"{key_stem(name)}.vkey").exists():
        generate_signer(site_root / "keys", name, role="witness")


def witness_fingerprint(site_root: Path, site_id: str) -> str | None:
    """The fingerprint of the site's witness key (how audit records name the silo's key), or None if it has none."""
    path = site_root / "keys" / f"{key_stem(witness_key_name(site_id))}.vkey"
    return read_vkey_file(path).fingerprint if path.is_file() else None


def trust_coordinator(site_root: Path, vkey_file: Path) -> Path:
    """Install a coordinator's public checkpoint key (.vkey) in the site's trust/ folder."""
    key = read_vkey_file(vkey_file)  # refuses anything that is not a valid vkey
    dest = site_root / "trust" / vkey_file.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(key.vkey() + "\n", encoding="utf-8")
    return dest


def open_witness(site_root: Path, site_id: str, audit_dir: Path) -> Witness | None:
    """The site's witness, or None when the site trusts no coordinator key yet."""
    trust = site_root / "trust"
    if not trust.is_dir() or not any(trust.glob("*.vkey")):
        return None
    signer = load_signer(site_root / "keys", witness_key_name(site_id))
    return Witness(audit_dir, signer, log_keys=trust)


def check_cosigned(received: bytes, cosigned: bytes) -> None:
    """Egress rule for a cosigned checkpoint: the coordinator's own note plus signature lines, nothing else."""
    before, after = parse_note(received), parse_note(cosigned)
    if after.text != before.text or not set(before.signatures) <= set(after.signatures):
        raise RefusalError("egress blocked: the cosigned checkpoint is not the note the coordinator sent")
    if len(after.signatures) != len(before.signatures) + 1:
        raise RefusalError("egress blocked: a cosigned checkpoint must add exactly one signature")

