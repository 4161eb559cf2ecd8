"""Signed statements by people: a researcher's plan submission, a site officer's approval or rejection.

A statement is a C2SP signed note (https://c2sp.org/signed-note) whose text is a header line naming its
kind and version, then ``key value`` lines, readable as they are::

    fedsilo/plan-approval/v1
    site hospital0
    plan 06f792a8...
    decision approved
    ...

    — j.smith <base64(key ID || Ed25519 signature)>

The signature (Ed25519, RFC 8032, through pyca/cryptography) covers the whole text, so no field can be
changed without the signer's key. Keys are ``person`` keys of :mod:`compliance.keys` (a .key file, 0600,
and its .vkey line); whoever verifies holds the trusted .vkey files (a site's officers/, for example).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from compliance.checkpoint import SignatureError, Signer, VerifierKey, parse_note, sign_note, verify_note
from fedsilo.errors import ConfigError

KINDS = ("plan-submission", "plan-approval")
VERSION = "v1"
_KEY = re.compile(r"[a-z][a-z0-9-]{0,31}")
_VALUE = re.compile(r"[ -~]{1,400}")  # printable ASCII, one line


@dataclass(frozen=True)
class Statement:
    """A verified statement: its kind, fields in order, and the key that signed it."""

    kind: str
    fields: dict[str, str]
    signer: VerifierKey
    note: bytes

    def __getitem__(self, key: str) -> str:
        return self.fields[key]


def statement_text(kind: str, fields: Sequence[tuple[str, str]]) -> bytes:
    """The text of a statement; refuses unknown kinds, repeated or malformed keys and multi-line values."""
    if kind not in KINDS:
        raise ConfigError(f"unknown statement kind {kind!r}; valid: {', '.join(KINDS)}")
    lines = [f"fedsilo/{kind}/{VERSION}"]
    seen = set()
    for key, value in fields:
        if not _KEY.fullmatch(key) or key in seen:
            raise ConfigError(f"statement field {key!r} is not a lower-case name, or is repeated")
        if not isinstance(value, str) or not _VALUE.fullmatch(value):
            raise ConfigError(f"statement field {key!r} must be one line of printable ASCII (1-400 characters)")
        seen.add(key)
        lines.append(f"{key} {value}")
    return ("\n".join(lines) + "\n").encode("ascii")


def sign_statement(kind: str, fields: Sequence[tuple[str, str]], signer: Signer) -> bytes:
    """A signed note holding the statement, signed by ``signer`` (a ``person`` key)."""
    return sign_note(statement_text(kind, fields), signer)


def read_statement(note: bytes, kind: str, trusted: Iterable[VerifierKey]) -> Statement:
    """Verify ``note`` against ``trusted`` keys and parse it as a statement of ``kind``.

    Raises:
        NoteError, SignatureError: the note is malformed or no trusted key signed it.
        ConfigError: the text is not a statement of ``kind``.
    """
    verified = verify_note(note, trusted)
    lines = verified.text.decode("ascii", errors="replace").rstrip("\n").split("\n")
    if lines[0] != f"fedsilo/{kind}/{VERSION}":
        raise ConfigError(f"the note is a {lines[0]!r}, not a fedsilo/{kind}/{VERSION} statement")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        key, _, value = line.partition(" ")
        if not _KEY.fullmatch(key) or key in fields or not _VALUE.fullmatch(value):
            raise ConfigError(f"statement line {line[:40]!r} is not '<key> <value>'")
        fields[key] = value
    if len(verified.verified) != 1:
        raise SignatureError("a statement carries exactly one signature by a trusted key")
    signer = verified.verified[0].key
    return Statement(kind, fields, signer, bytes(note))


def signer_name(note: bytes) -> str:
    """The key name on a statement's (first) signature line, unverified: for messages and lookups."""
    return parse_note(note).signatures[0].name


# --- submission bundles: what a researcher hands over (a plan, its signed submission, the public key) -------

BUNDLE_FORMAT = "fedsilo-submission/v1"


@dataclass(frozen=True)
class SubmissionBundle:
    plan_text: str
    note: bytes
    researcher_key: str  # a .vkey line

    def to_json(self) -> str:
        import json

        return json.dumps({"format": BUNDLE_FORMAT, "plan_yaml": self.plan_text, "submission": self.note.decode("utf-8"),
                           "researcher_key": self.researcher_key}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str) -> SubmissionBundle:
        import json

        try:
            raw = json.loads(text)
            if raw.get("format") != BUNDLE_FORMAT:
                raise ValueError
            return cls(str(raw["plan_yaml"]), str(raw["submission"]).encode("utf-8"), str(raw["researcher_key"]).strip())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{source} is not a fedsilo submission bundle",
                              fix="use the file written by 'fedsilo plan sign'") from None

    def verify(self, plan_hash: str) -> Statement:
        """The submission statement, checked against the bundle's own key, ``plan_hash`` and the exact plan text."""
        from compliance.checkpoint import parse_vkey

        key = parse_vkey(self.researcher_key)
        statement = read_statement(self.note, "plan-submission", [key])
        check_submission(statement, key, self.plan_text, plan_hash)
        return statement


def plan_text_digest(plan_text: str) -> str:
    return hashlib.sha256(plan_text.encode("utf-8")).hexdigest()


def sign_submission(plan_text: str, plan_hash: str, plan_name: str, signer: Signer, time: str) -> SubmissionBundle:
    """A researcher's submission: a signed statement over the plan's canonical hash and its exact text
    (comments included: what a site officer reads is what the researcher signed)."""
    note = sign_statement("plan-submission", [("plan", plan_hash), ("plan-text-sha256", plan_text_digest(plan_text)),
                                              ("plan-name", plan_name[:100]), ("researcher", signer.name), ("time", time)], signer)
    return SubmissionBundle(plan_text, note, signer.vkey())


def check_submission(statement: Statement, key: VerifierKey, plan_text: str, plan_hash: str) -> None:
    """Refuse (ConfigError) a verified submission that is for another plan, another text, or another researcher."""
    if statement.fields.get("plan") != plan_hash:
        raise ConfigError("the submission is signed for another plan", fix="sign the plan again: fedsilo plan sign")
    if statement.fields.get("plan-text-sha256") != plan_text_digest(plan_text):
        raise ConfigError("the plan text differs from the text the researcher signed (an edit after signing, comments included)",
                          fix="sign the plan again: fedsilo plan sign")
    if statement.fields.get("researcher") != key.name:
        raise ConfigError("the submission names another researcher than its key", fix="sign the plan again: fedsilo plan sign")
