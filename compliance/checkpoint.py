"""Signed checkpoints: C2SP tlog-checkpoint bodies in C2SP signed notes, Ed25519 (pyca/cryptography).

A checkpoint body (https://c2sp.org/tlog-checkpoint) is three newline-terminated lines, then optional
extension lines::

    fedsilo-audit/5b0c...        origin: names the log (no spaces, no "+")
    1024                         tree size, decimal, no leading zeros
    3RUYv0n...aQ=                root hash, standard base64 with padding

A signed note (https://c2sp.org/signed-note) is the body, a blank line, and one line per signature::

    — <key name> <base64(4-byte key ID || signature)>

Two signature types are used, told apart by the byte in the verifier key ("vkey",
``<name>+<hex key ID>+<base64(type || 32-byte public key)>``):

- 0x01, Ed25519 note signature: the log's signature over the body. Key ID = SHA-256(name || 0x0A || 0x01 ||
  public key)[:4].
- 0x04, C2SP tlog-cosignature v1 (https://c2sp.org/tlog-cosignature): a witness's cosignature. The signature
  field is an 8-byte big-endian POSIX time followed by an Ed25519 signature over
  ``"cosignature/v1\\ntime <time>\\n" || body``; key ID = SHA-256(name || 0x0A || 0x04 || public key)[:4]. Its
  statement: at that time, this was the largest tree the witness had seen for this origin, consistent with
  every earlier one.

Verification raises (:class:`NoteError`, :class:`SignatureError`); it never returns a falsy result. Signature
lines by keys the caller does not trust are skipped, as the signed-note spec says; a line that names a trusted
key and does not verify is an error, and so is a note that no trusted log key signed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import time as _time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from compliance.merkle import HASH_SIZE, MAX_TREE_SIZE
from fedsilo.errors import ConfigError, VerificationError

KEY_TYPE_NOTE = 0x01  # Ed25519 signed-note signature (the log)
KEY_TYPE_COSIGNATURE = 0x04  # C2SP tlog-cosignature/v1, Ed25519 (a witness)
KEY_TYPES = {KEY_TYPE_NOTE: "Ed25519 note signature", KEY_TYPE_COSIGNATURE: "Ed25519 cosignature/v1"}
SIGNATURE_PREFIX = "— "  # U+2014 EM DASH, U+0020
COSIGNATURE_HEADER = b"cosignature/v1\n"
# The signed-note spec lets verifiers bound the work a note can cause; Go's sumdb/note uses 100.
MAX_SIGNATURES = 100
# A note is a few hundred bytes; refusing large inputs early bounds parsing work on hostile input.
MAX_NOTE_BYTES = 64 * 1024
MAX_TIMESTAMP = 2**63 - 1
ED25519_SIGNATURE_SIZE = 64
ED25519_KEY_SIZE = 32

_DECIMAL = re.compile(r"0|[1-9][0-9]*")
_KEY_ID = re.compile(r"[0-9a-f]{8}")


class NoteError(VerificationError):
    """A signed note or checkpoint is malformed (its bytes, not its signatures)."""


class SignatureError(VerificationError):
    """A note's signatures do not verify against the trusted keys, or no trusted key signed it."""


def _valid_name(name: object) -> bool:
    """signed-note: a key name is non-empty and holds no Unicode whitespace and no "+"."""
    return isinstance(name, str) and bool(name) and "+" not in name and not any(c.isspace() for c in name)


def key_id(name: str, key_type: int, public_key: bytes) -> bytes:
    """The 4-byte key ID: SHA-256(name || 0x0A || type || public key)[:4]."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([key_type]) + public_key).digest()[:4]


@dataclass(frozen=True)
class VerifierKey:
    """A trusted public key: name, type (0x01 log / 0x04 witness) and raw Ed25519 key; text form via :meth:`vkey`."""

    name: str
    key_type: int
    public_key: bytes

    def __post_init__(self) -> None:
        if not _valid_name(self.name):
            raise ConfigError(f"key name {self.name!r} is empty or holds whitespace or '+'",
                              fix="use a schema-less URL such as fedsilo.example/coordinator")
        if self.key_type not in KEY_TYPES:
            raise ConfigError(f"key type 0x{self.key_type:02x} is not supported; "
                              f"valid: {', '.join(f'0x{t:02x} ({d})' for t, d in KEY_TYPES.items())}")
        if len(self.public_key) != ED25519_KEY_SIZE:
            raise ConfigError(f"an Ed25519 public key is {ED25519_KEY_SIZE} bytes, not {len(self.public_key)}")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.key_type, self.public_key)

    @property
    def fingerprint(self) -> str:
        """``ed25519:<SHA-256 of the raw public key, hex>``: how audit records name this key."""
        return "ed25519:" + hashlib.sha256(self.public_key).hexdigest()

    def vkey(self) -> str:
        """``<name>+<hex key ID>+<base64(type || public key)>``."""
        material = base64.b64encode(bytes([self.key_type]) + self.public_key).decode("ascii")
        return f"{self.name}+{self.key_id.hex()}+{material}"

    def __str__(self) -> str:
        return self.vkey()


def parse_vkey(text: str) -> VerifierKey:
    """Parse a verifier key ``<name>+<hex key ID>+<base64(type || key)>``; the key ID must match the key.

    Raises:
        ConfigError: the text is not a supported, self-consistent verifier key.
    """
    if not isinstance(text, str):
        raise ConfigError(f"a verifier key is text, not {type(text).__name__}")
    parts = text.split("+", 2)  # the base64 part may itself hold '+'
    if len(parts) != 3 or not _valid_name(parts[0]) or not _KEY_ID.fullmatch(parts[1]):
        raise ConfigError(f"not a verifier key: {text[:60]!r}", fix="expected <name>+<8 hex digits>+<base64>")
    name, hex_id, material = parts
    try:
        raw = base64.b64decode(material, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"verifier key {name}: the key material is not base64") from None
    if base64.b64encode(raw).decode("ascii") != material or len(raw) < 1:
        raise ConfigError(f"verifier key {name}: the key material is not canonical base64")
    key = VerifierKey(name, raw[0], raw[1:])
    if key.key_id.hex() != hex_id:
        raise ConfigError(f"verifier key {name}: key ID {hex_id} does not match the key ({key.key_id.hex()})",
                          fix="copy the vkey line again from its source; it was altered")
    return key


class Signer:
    """An Ed25519 private key with its key name and type; :mod:`compliance.keys` loads and stores it.

    The private key never appears in ``repr``, ``str`` or errors.
    """

    __slots__ = ("name", "key_type", "_private", "_public")

    def __init__(self, name: str, private_key: Ed25519PrivateKey, *, key_type: int = KEY_TYPE_NOTE) -> None:
        if not isinstance(private_key, Ed25519PrivateKey):
            raise ConfigError(f"a signer needs an Ed25519 private key, not {type(private_key).__name__}")
        self.name = name
        self.key_type = key_type
        self._private = private_key
        public = private_key.public_key().public_bytes_raw()
        self._public = VerifierKey(name, key_type, public)  # checks name and type

    @property
    def verifier(self) -> VerifierKey:
        return self._public

    @property
    def key_id(self) -> bytes:
        return self._public.key_id

    @property
    def fingerprint(self) -> str:
        return self._public.fingerprint

    def vkey(self) -> str:
        return self._public.vkey()

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def __repr__(self) -> str:
        return f"Signer({self.name!r}, key_id={self.key_id.hex()}, type=0x{self.key_type:02x})"


# --- checkpoints -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    """A tlog-checkpoint body: origin, tree size, root hash and optional extension lines."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not _valid_name(self.origin):
            raise ConfigError(f"checkpoint origin {self.origin!r} is empty or holds whitespace or '+'",
                              fix="use a schema-less URL such as fedsilo.example/run-1")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or not 0 <= self.size <= MAX_TREE_SIZE:
            raise ConfigError(f"checkpoint size {self.size!r} is not an integer 0..2**63-1")
        if not isinstance(self.root, bytes) or len(self.root) != HASH_SIZE:
            raise ConfigError(f"checkpoint root must be {HASH_SIZE} bytes")
        for line in self.extensions:
            if not line or "\n" in line or not line.isprintable():
                raise ConfigError(f"checkpoint extension line {line!r} is empty or not one printable line")

    def body(self) -> bytes:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode("ascii"), *self.extensions]
        return "".join(line + "\n" for line in lines).encode("utf-8")


def parse_checkpoint(body: bytes) -> Checkpoint:
    """Parse a checkpoint body (the note text, without signatures).

    Raises:
        NoteError: not origin, decimal size, base64 32-byte root, each line ending in a newline.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError("checkpoint is not UTF-8") from None
    if not text.endswith("\n"):
        raise NoteError("checkpoint does not end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) < 3:
        raise NoteError(f"checkpoint has {len(lines)} lines; expected origin, size and root hash")
    origin, size_text, root_text, *extensions = lines
    if not _DECIMAL.fullmatch(size_text) or int(size_text) > MAX_TREE_SIZE:
        raise NoteError(f"checkpoint size {size_text[:30]!r} is not a decimal 0..2**63-1 without leading zeros")
    try:
        root = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError):
        root = b""
    if len(root) != HASH_SIZE or base64.b64encode(root).decode("ascii") != root_text:
        raise NoteError(f"checkpoint root {root_text[:50]!r} is not the base64 of {HASH_SIZE} bytes")
    try:
        return Checkpoint(origin, int(size_text), root, tuple(extensions))
    except ConfigError as exc:
        raise NoteError(exc.message) from None


# --- signed notes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key ID and the signature bytes after the ID."""

    name: str
    key_id: bytes
    signature: bytes

    def line(self) -> bytes:
        blob = base64.b64encode(self.key_id + self.signature).decode("ascii")
        return f"{SIGNATURE_PREFIX}{self.name} {blob}\n".encode("utf-8")


@dataclass(frozen=True)
class Note:
    """A parsed signed note: its text (the signed body) and its signature lines in order."""

    text: bytes
    signatures: tuple[NoteSignature, ...]

    def to_bytes(self) -> bytes:
        return self.text + b"\n" + b"".join(sig.line() for sig in self.signatures)


@dataclass(frozen=True)
class VerifiedSignature:
    """A signature that verified: the key and, for a cosignature, its POSIX time."""

    key: VerifierKey
    timestamp: int | None = None


@dataclass(frozen=True)
class VerifiedNote:
    """A note whose signatures were checked: the verified ones, and those by keys not trusted (skipped)."""

    text: bytes
    verified: tuple[VerifiedSignature, ...]
    unverified: tuple[NoteSignature, ...] = field(default=())

    def signers(self, key_type: int) -> tuple[VerifiedSignature, ...]:
        return tuple(v for v in self.verified if v.key.key_type == key_type)


def parse_note(note: bytes) -> Note:
    """Split a signed note into text and signature lines, checking its syntax (not its signatures).

    Raises:
        NoteError: not UTF-8, a control character, no blank line before the signatures, a bad signature line,
            more than MAX_SIGNATURES lines, or larger than MAX_NOTE_BYTES.
    """
    if not isinstance(note, (bytes, bytearray)):
        raise NoteError(f"a note is bytes, not {type(note).__name__}")
    note = bytes(note)
    if len(note) > MAX_NOTE_BYTES:
        raise NoteError(f"note is {len(note)} bytes; the limit is {MAX_NOTE_BYTES}")
    try:
        text = note.decode("utf-8")
    except UnicodeDecodeError:
        raise NoteError("note is not UTF-8") from None
    if any(c < " " and c != "\n" for c in text):
        raise NoteError("note holds a control character other than newline")
    split = text.rfind("\n\n")
    if split < 0:
        raise NoteError("note has no blank line before its signatures")
    body, sig_text = text[: split + 1], text[split + 2:]
    if not sig_text or not sig_text.endswith("\n"):
        raise NoteError("note has no signature lines, or its last line does not end with a newline")
    lines = sig_text[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"note has {len(lines)} signature lines; the limit is {MAX_SIGNATURES}")
    signatures = []
    for line in lines:
        if not line.startswith(SIGNATURE_PREFIX):
            raise NoteError(f"signature line {line[:40]!r} does not start with '— '")
        name, _, blob_text = line[len(SIGNATURE_PREFIX):].partition(" ")
        if not _valid_name(name) or not blob_text or " " in blob_text:
            raise NoteError(f"signature line {line[:40]!r} is not '— <name> <base64>'")
        try:
            blob = base64.b64decode(blob_text, validate=True)
        except (binascii.Error, ValueError):
            raise NoteError(f"signature of {name} is not base64") from None
        if len(blob) < 5:
            raise NoteError(f"signature of {name} is too short to hold a key ID and a signature")
        signatures.append(NoteSignature(name, blob[:4], blob[4:]))
    return Note(body.encode("utf-8"), tuple(signatures))


def _cosigned_message(text: bytes, timestamp: int) -> bytes:
    return COSIGNATURE_HEADER + b"time " + str(timestamp).encode("ascii") + b"\n" + text


def _signature_for(signer: Signer, text: bytes, timestamp: int | None) -> NoteSignature:
    if signer.key_type == KEY_TYPE_NOTE:
        return NoteSignature(signer.name, signer.key_id, signer.sign(text))
    ts = int(_time.time()) if timestamp is None else timestamp
    if not 0 <= ts <= MAX_TIMESTAMP:
        raise ConfigError(f"cosignature time {ts} is not 0..2**63-1")
    return NoteSignature(signer.name, signer.key_id, ts.to_bytes(8, "big") + signer.sign(_cosigned_message(text, ts)))


def sign_note(text: bytes, signer: Signer) -> bytes:
    """Sign ``text`` (non-empty, ending in a newline) and return the signed note."""
    if not text.endswith(b"\n") or b"\n\n" in text:
        raise ConfigError("a note's text must end with a newline and hold no blank line")
    parse_note(text + b"\n" + NoteSignature(signer.name, b"\0" * 4, b"\0").line())  # the text's syntax
    return Note(text, (_signature_for(signer, text, None),)).to_bytes()


def add_signature(note: bytes, signer: Signer, *, timestamp: int | None = None) -> bytes:
    """Add ``signer``'s signature line to a signed note (replacing an earlier one by the same key).

    For a witness key (type 0x04) this is a tlog-cosignature/v1 at ``timestamp`` (default now); the note's
    text is what gets signed, so the other signatures stay valid. The caller checks the note first.
    """
    parsed = parse_note(note)
    kept = tuple(s for s in parsed.signatures if (s.name, s.key_id) != (signer.name, signer.key_id))
    return Note(parsed.text, (*kept, _signature_for(signer, parsed.text, timestamp))).to_bytes()


def verify_note(note: bytes, keys: Iterable[VerifierKey]) -> VerifiedNote:
    """Check a note's signatures against trusted ``keys``; raise unless at least one verifies.

    Steps:
      1. parse the note (syntax);
      2. for each signature line, find the trusted key with the same name and key ID (none: skip the line);
      3. verify it: Ed25519 over the text (type 0x01), or over the cosignature/v1 message (type 0x04);
         a line by a trusted key that does not verify fails the note;
      4. fail if no line verified.

    Raises:
        NoteError: step 1.
        SignatureError: step 3 or 4; the message names the key.
        ConfigError: two different trusted keys share a name and key ID.
    """
    # 1. syntax
    parsed = parse_note(note)
    trusted: dict[tuple[str, bytes], VerifierKey] = {}
    for key in keys:
        known = trusted.setdefault((key.name, key.key_id), key)
        if known != key:
            raise ConfigError(f"two trusted keys are named {key.name}+{key.key_id.hex()}",
                              fix="remove one of them from the trusted keys")
    verified: list[VerifiedSignature] = []
    unverified: list[NoteSignature] = []
    seen: set[tuple[str, bytes]] = set()
    for sig in parsed.signatures:
        # 2. trusted key?
        key = trusted.get((sig.name, sig.key_id))
        if key is None:
            unverified.append(sig)
            continue
        if (sig.name, sig.key_id) in seen:
            raise SignatureError(f"note carries two signatures by key {sig.name}+{sig.key_id.hex()}")
        seen.add((sig.name, sig.key_id))
        # 3. verify
        verified.append(_verify_one(key, sig, parsed.text))
    # 4. at least one
    if not verified:
        names = ", ".join(f"{s.name}+{s.key_id.hex()}" for s in parsed.signatures)
        raise SignatureError(f"note has no signature by a trusted key (signed by: {names})",
                             fix="check the trusted keys (--keys); a note signed by another key is not this log's")
    return VerifiedNote(parsed.text, tuple(verified), tuple(unverified))


def _verify_one(key: VerifierKey, sig: NoteSignature, text: bytes) -> VerifiedSignature:
    public = Ed25519PublicKey.from_public_bytes(key.public_key)
    timestamp = None
    if key.key_type == KEY_TYPE_NOTE:
        size_ok, message, signature = len(sig.signature) == ED25519_SIGNATURE_SIZE, text, sig.signature
    else:
        size_ok = len(sig.signature) == 8 + ED25519_SIGNATURE_SIZE
        timestamp = int.from_bytes(sig.signature[:8], "big")
        size_ok = size_ok and timestamp <= MAX_TIMESTAMP
        message, signature = _cosigned_message(text, timestamp), sig.signature[8:]
    if not size_ok:
        raise SignatureError(f"signature by key {key.name}+{key.key_id.hex()} has the wrong length")
    try:
        public.verify(signature, message)
    except InvalidSignature:
        raise SignatureError(f"invalid signature by key {key.name}+{key.key_id.hex()}",
                             fix="the note was altered after signing, or signed by another key with that name") from None
    return VerifiedSignature(key, timestamp)


@dataclass(frozen=True)
class VerifiedCheckpoint:
    """A checkpoint with the log signatures and witness cosignatures that verified."""

    checkpoint: Checkpoint
    log_signatures: tuple[VerifiedSignature, ...]
    cosignatures: tuple[VerifiedSignature, ...]


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer) -> bytes:
    """The checkpoint as a signed note, signed by the log's key (type 0x01)."""
    if signer.key_type != KEY_TYPE_NOTE:
        raise ConfigError(f"key {signer.name} is a witness key (type 0x{signer.key_type:02x}); "
                          "a log signs checkpoints with a type 0x01 key", fix="generate a log key (role 'log')")
    return sign_note(checkpoint.body(), signer)


def cosign_checkpoint(note: bytes, signer: Signer, *, timestamp: int | None = None) -> bytes:
    """Add a witness's tlog-cosignature/v1 to a checkpoint note (the caller has checked the note)."""
    if signer.key_type != KEY_TYPE_COSIGNATURE:
        raise ConfigError(f"key {signer.name} is not a witness key (type 0x04)", fix="generate a witness key (role 'witness')")
    parse_checkpoint(parse_note(note).text)
    return add_signature(note, signer, timestamp=timestamp)


def verify_checkpoint(note: bytes, keys: Sequence[VerifierKey], *, origin: str | None = None,
                      min_cosignatures: int = 0) -> VerifiedCheckpoint:
    """Check a checkpoint note: its syntax, at least one trusted log signature, its origin, and cosignatures.

    Steps:
      1. the note's signatures verify against ``keys`` (see :func:`verify_note`);
      2. at least one verified signature is by a log key (type 0x01);
      3. the text is a checkpoint body; its origin is ``origin`` when given;
      4. at least ``min_cosignatures`` trusted witness cosignatures (type 0x04) verified.

    Raises:
        NoteError, SignatureError: as above.
    """
    verified = verify_note(note, keys)  # 1.
    log_signatures = verified.signers(KEY_TYPE_NOTE)
    if not log_signatures:  # 2.
        raise SignatureError("checkpoint carries no signature by a trusted log key (only cosignatures)",
                             fix="add the log's vkey (type 0x01) to the trusted keys")
    checkpoint = parse_checkpoint(verified.text)  # 3.
    if origin is not None and checkpoint.origin != origin:
        raise NoteError(f"checkpoint is for origin {checkpoint.origin!r}, not {origin!r}",
                        fix="a checkpoint of another log was presented")
    cosignatures = verified.signers(KEY_TYPE_COSIGNATURE)
    if len(cosignatures) < min_cosignatures:  # 4.
        raise SignatureError(f"checkpoint has {len(cosignatures)} trusted cosignatures; {min_cosignatures} required")
    return VerifiedCheckpoint(checkpoint, log_signatures, cosignatures)
