"""Signed notes, verifier keys and checkpoints (compliance.checkpoint) against published vectors.

Where the vectors come from
---------------------------
- PeterNeumann / EnochRoot: golang.org/x/mod ``sumdb/note/note_test.go`` (TestSign, TestOpen) and the package
  documentation of sumdb/note: the private key ``PRIVATE+KEY+PeterNeumann+c74f20a3+AYEK...`` is
  base64(0x01 || 32-byte Ed25519 seed); Ed25519 is deterministic (RFC 8032), so signing the two-line text must
  reproduce Go's note byte for byte, and its verifier key must come out as Go prints it.
- ARCHE_NOTE: a checkpoint of the Certificate Transparency log arche2025h1.staging.ct.transparency.dev with its
  Ed25519 note signature (key type 0x01) and four tlog-cosignature/v1 cosignatures (key type 0x04) by public
  witnesses, copied verbatim from a public tlog-checkpoint test suite; the vkeys are the log's and the
  witnesses' published keys. Its first signature line is an ECDSA signature (RFC 6962 type), which this module
  does not know and must skip. It shows that our cosignature format interoperates with deployed witnesses.
"""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compliance import merkle
from compliance.checkpoint import (
    KEY_TYPE_COSIGNATURE,
    KEY_TYPE_NOTE,
    MAX_SIGNATURES,
    Checkpoint,
    NoteError,
    SignatureError,
    Signer,
    VerifierKey,
    add_signature,
    cosign_checkpoint,
    key_id,
    parse_checkpoint,
    parse_note,
    parse_vkey,
    sign_checkpoint,
    sign_note,
    verify_checkpoint,
    verify_note,
)
from fedsilo.errors import ConfigError

PETER_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = b"If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
PETER_SIG = "— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n".encode()
ENOCH_SIG = "— EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTGwnWLox33WWd1RvMc+QQ=\n".encode()

ARCHE_NOTE = """arche2025h1.staging.ct.transparency.dev
1432088532
U7WM79jrzyhGZ5/GUBTpM7NzwdyfFx61t3RovgcC4Ro=

— arche2025h1.staging.ct.transparency.dev zTM8sQAAAZ5W0WdjBAMARjBEAiBjW5IQf9pvsYLfQFX6hoGREPMHbdQ3urbllzalApkptQIgIpwtEroeW2BXaHAI4kJXFbon5Ch9MNL5zRNZ55lvGt0=
— arche2025h1.staging.ct.transparency.dev ui8GwCF1+kWqZrxGdhj4aX3gcw7XUlXQQabg/27lefwhUkzbC3NygNI75MdhL1bfTW9g8Ei59RA23oHP7Ry1k3ZFWwQ=
— transparency.dev/DEV:witness-little-garden 2AQqhwAAAABqEiEgzgFIqqhbUoDwjMWE6UP8nd8/KYTzwZ2rhIgcqoXHAwVkjZr4AscylP3v7sEodkRAErumC2q44vdgJY096st5BQ==
— witness1.smartit.nu/witness1 pIyCDwAAAABqEiEghIp82KWebrw7/oHQwlTAm3g2RKS4+eebl8eO0WH+/iEcxZ75W3u5hNI7TOQtmJbqmNWVuE0tgh0XwzdZsDsUAQ==
— remora.n621.de 2net5wAAAABqEiEgPlfF3V06o0Y+fHM+J5J9s27wgxxcOVSpZ/2g/KSiXCg9DEZI+aVCIobWX9sXTynk5XeU/zZ0WBxtqB0DrAWfBw==
— witness.stagemole.eu Z/euoAAAAABqEiEgw0i+7g2ENfDAWHmtRzCfKTHSDwYDJA2NmKeGi9Y8FtEyOUvVr+AJmIY/2TUFucgKi7lI7cUiOvKFYe/TmN9DAg==
""".encode()
ARCHE_LOG = "arche2025h1.staging.ct.transparency.dev+ba2f06c0+AU0vHmlGCS/PdN8b2OaGmKprLI8HKM+dJ472xgFYh15f"
ARCHE_WITNESSES = (
    "transparency.dev/DEV:witness-little-garden+d8042a87+BCtusOxINQNUTN5Oj8HObRkh2yHf/MwYaGX4CPdiVEPM",
    "witness1.smartit.nu/witness1+a48c820f+BPSFWg9G6KPiO7QPryYO5Xq4oYJJ+kAvLKLSimDhoxMO",
    "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2",
    "witness.stagemole.eu+67f7aea0+BEqSG3yu9YrmcM3BHvQYTxwFj3uSWakQepafafpUqklv",
)


def _peter() -> Signer:
    raw = base64.b64decode(PETER_SKEY.split("+", 4)[4])
    assert raw[0] == KEY_TYPE_NOTE
    return Signer("PeterNeumann", Ed25519PrivateKey.from_private_bytes(raw[1:]))


@pytest.fixture
def log_signer() -> Signer:
    return Signer("fedsilo.test/coordinator", Ed25519PrivateKey.generate())


@pytest.fixture
def witness_signer() -> Signer:
    return Signer("fedsilo.test/hospital0", Ed25519PrivateKey.generate(), key_type=KEY_TYPE_COSIGNATURE)


# --- the Go sumdb/note vectors -----------------------------------------------------------------------------


def test_signing_reproduces_go_sumdb_note_byte_for_byte() -> None:
    peter = _peter()
    assert peter.vkey() == PETER_VKEY
    assert sign_note(TEXT, peter) == TEXT + b"\n" + PETER_SIG


def test_open_go_note_with_one_key_known_and_one_unknown() -> None:
    note = TEXT + b"\n" + PETER_SIG + ENOCH_SIG
    verified = verify_note(note, [parse_vkey(PETER_VKEY)])
    assert verified.text == TEXT
    assert [v.key.name for v in verified.verified] == ["PeterNeumann"]
    assert [s.name for s in verified.unverified] == ["EnochRoot"]
    both = verify_note(note, [parse_vkey(PETER_VKEY), parse_vkey(ENOCH_VKEY)])
    assert [v.key.name for v in both.verified] == ["PeterNeumann", "EnochRoot"]


def test_a_note_no_trusted_key_signed_is_refused() -> None:
    with pytest.raises(SignatureError, match="no signature by a trusted key"):
        verify_note(TEXT + b"\n" + ENOCH_SIG, [parse_vkey(PETER_VKEY)])


def test_an_altered_text_fails_for_a_trusted_key() -> None:
    note = TEXT.replace(b"cryptography", b"cryptographY") + b"\n" + PETER_SIG
    with pytest.raises(SignatureError, match="invalid signature by key PeterNeumann\\+c74f20a3"):
        verify_note(note, [parse_vkey(PETER_VKEY)])


def test_a_corrupted_signature_by_a_trusted_key_fails_even_beside_a_good_one() -> None:
    bad = PETER_SIG[:60] + b"ABCD" + PETER_SIG[60:]
    with pytest.raises(SignatureError):
        verify_note(TEXT + b"\n" + bad, [parse_vkey(PETER_VKEY)])
    with pytest.raises(SignatureError):
        verify_note(TEXT + b"\n" + ENOCH_SIG + bad, [parse_vkey(PETER_VKEY), parse_vkey(ENOCH_VKEY)])


@pytest.mark.parametrize("note", [
    TEXT,  # no signatures
    TEXT + b"\n",
    TEXT + b"\n" + PETER_SIG[:-1],  # last line without newline
    b"\x01" + TEXT + b"\n" + PETER_SIG,  # control character
    b"\xff" + TEXT + b"\n" + PETER_SIG,  # not UTF-8
    TEXT + b"\n" + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n".encode(),
    TEXT + b"\n" + PETER_SIG + b"Unexpected line.\n",
    TEXT + b"\n" + PETER_SIG * (MAX_SIGNATURES + 1),
    TEXT + b"\n" + "— PeterNeumann x08g\n".encode(),  # too short for key ID and signature
    TEXT + b"\n" + "— PeterNeumann !!!!\n".encode(),  # not base64
])
def test_malformed_notes_are_refused(note: bytes) -> None:
    # The bad messages of Go's TestOpen, and a few more.
    with pytest.raises(NoteError):
        verify_note(note, [parse_vkey(PETER_VKEY)])


def test_two_signature_lines_by_the_same_trusted_key_are_refused() -> None:
    with pytest.raises(SignatureError, match="two signatures by key"):
        verify_note(TEXT + b"\n" + PETER_SIG + PETER_SIG, [parse_vkey(PETER_VKEY)])


# --- verifier keys -----------------------------------------------------------------------------------------


def test_vkeys_round_trip_and_their_key_ids_are_derived() -> None:
    key = parse_vkey(PETER_VKEY)
    assert (key.name, key.key_type, key.key_id.hex()) == ("PeterNeumann", KEY_TYPE_NOTE, "c74f20a3")
    assert key.vkey() == PETER_VKEY
    assert key.key_id == key_id("PeterNeumann", KEY_TYPE_NOTE, key.public_key)
    plus = parse_vkey("TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6")  # '+' inside the base64
    assert plus.name == "TEST"
    cosigner = parse_vkey(ARCHE_WITNESSES[2])
    assert (cosigner.key_type, cosigner.key_id.hex()) == (KEY_TYPE_COSIGNATURE, "da77ade7")


def test_every_mangled_vkey_is_refused() -> None:
    # Go's TestNewVerifier: every proper substring, and every single-byte increment, is not a valid key.
    b = PETER_VKEY.encode()
    bad = [b[i:j] for i in range(len(b) + 1) for j in range(i + 1, len(b) + 1) if (i, j) != (0, len(b))]
    bad += [b[:i] + bytes([b[i] + 1]) + b[i + 1:] for i in range(len(b))]
    bad += [b"PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==",
            b"PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"]
    accepted = []
    for text in bad:
        try:
            parse_vkey(text.decode("latin-1"))
        except ConfigError:
            continue
        accepted.append(text)
    assert accepted == []


def test_a_signer_never_shows_its_private_key(log_signer: Signer) -> None:
    raw = log_signer._private.private_bytes_raw()
    for shown in (repr(log_signer), str(log_signer)):
        assert raw.hex() not in shown and base64.b64encode(raw).decode() not in shown
        assert log_signer.key_id.hex() in shown


# --- checkpoints -------------------------------------------------------------------------------------------


def test_a_real_ct_checkpoint_with_four_witness_cosignatures_verifies() -> None:
    keys = [parse_vkey(ARCHE_LOG), *map(parse_vkey, ARCHE_WITNESSES)]
    verified = verify_checkpoint(ARCHE_NOTE, keys, origin="arche2025h1.staging.ct.transparency.dev",
                                 min_cosignatures=4)
    cp = verified.checkpoint
    assert (cp.size, base64.b64encode(cp.root).decode()) == (1432088532, "U7WM79jrzyhGZ5/GUBTpM7NzwdyfFx61t3RovgcC4Ro=")
    assert [c.timestamp for c in verified.cosignatures] == [1779573024] * 4
    assert len(verified.log_signatures) == 1  # the ECDSA line is skipped, the Ed25519 one verified


def test_the_real_checkpoint_with_an_altered_size_fails() -> None:
    altered = ARCHE_NOTE.replace(b"\n1432088532\n", b"\n1432088533\n")
    with pytest.raises(SignatureError):
        verify_checkpoint(altered, [parse_vkey(ARCHE_LOG)])
    with pytest.raises(SignatureError):  # a cosignature alone, by a trusted witness, does not pass either
        verify_note(altered, [parse_vkey(ARCHE_WITNESSES[2])])


def test_cosignatures_alone_are_not_a_log_signature() -> None:
    with pytest.raises(SignatureError, match="no signature by a trusted log key"):
        verify_checkpoint(ARCHE_NOTE, [parse_vkey(ARCHE_WITNESSES[0])])


def test_sign_cosign_verify(log_signer: Signer, witness_signer: Signer) -> None:
    cp = Checkpoint("fedsilo.test/run-1", 12, merkle.leaf_hash(b"x"))
    note = sign_checkpoint(cp, log_signer)
    assert note.startswith(cp.body() + b"\n\xe2\x80\x94 fedsilo.test/coordinator ")
    cosigned = cosign_checkpoint(note, witness_signer, timestamp=1_700_000_000)
    assert cosigned.startswith(note)  # the log's signature stays, the cosignature is appended
    keys = [log_signer.verifier, witness_signer.verifier]
    verified = verify_checkpoint(cosigned, keys, origin="fedsilo.test/run-1", min_cosignatures=1)
    assert verified.checkpoint == cp and verified.cosignatures[0].timestamp == 1_700_000_000
    assert cosign_checkpoint(cosigned, witness_signer, timestamp=1_700_000_001).count("—".encode()) == 2  # replaced
    with pytest.raises(SignatureError, match="1 trusted cosignatures; 2 required"):
        verify_checkpoint(cosigned, keys, min_cosignatures=2)
    with pytest.raises(NoteError, match="for origin 'fedsilo.test/run-1', not 'fedsilo.test/run-2'"):
        verify_checkpoint(cosigned, keys, origin="fedsilo.test/run-2")


def test_a_cosignature_is_bound_to_its_time(log_signer: Signer, witness_signer: Signer) -> None:
    note = sign_checkpoint(Checkpoint("fedsilo.test/run-1", 3, merkle.EMPTY_ROOT), log_signer)
    cosigned = parse_note(cosign_checkpoint(note, witness_signer, timestamp=100))
    sig = cosigned.signatures[-1]
    shifted = type(sig)(sig.name, sig.key_id, (101).to_bytes(8, "big") + sig.signature[8:])
    forged = type(cosigned)(cosigned.text, (*cosigned.signatures[:-1], shifted)).to_bytes()
    with pytest.raises(SignatureError, match="invalid signature by key fedsilo.test/hospital0"):
        verify_note(forged, [witness_signer.verifier])


def test_roles_are_not_interchangeable(log_signer: Signer, witness_signer: Signer) -> None:
    cp = Checkpoint("fedsilo.test/run-1", 1, merkle.EMPTY_ROOT)
    with pytest.raises(ConfigError, match="witness key"):
        sign_checkpoint(cp, witness_signer)
    with pytest.raises(ConfigError, match="not a witness key"):
        cosign_checkpoint(sign_checkpoint(cp, log_signer), log_signer)
    # The same key material under the other type has another key ID, so a line never verifies across roles.
    same_key = VerifierKey(log_signer.name, KEY_TYPE_COSIGNATURE, log_signer.verifier.public_key)
    with pytest.raises(SignatureError, match="no signature by a trusted key"):
        verify_note(sign_checkpoint(cp, log_signer), [same_key])


def test_add_signature_keeps_the_others(log_signer: Signer) -> None:
    second = Signer("fedsilo.test/backup", Ed25519PrivateKey.generate())
    note = add_signature(sign_checkpoint(Checkpoint("o", 1, merkle.EMPTY_ROOT), log_signer), second)
    assert len(verify_note(note, [log_signer.verifier, second.verifier]).verified) == 2


@pytest.mark.parametrize(("body", "problem"), [
    (b"origin\n5\n", "has 2 lines"),
    (b"origin\n05\n" + base64.b64encode(bytes(32)) + b"\n", "without leading zeros"),
    (b"origin\n-1\n" + base64.b64encode(bytes(32)) + b"\n", "not a decimal"),
    (b"origin\n5\n" + base64.b64encode(bytes(31)) + b"\n", "base64 of 32 bytes"),
    (b"origin\n5\n" + base64.b64encode(bytes(32)), "newline"),
    (b"origin\n5\n" + base64.b64encode(bytes(32)).rstrip(b"=") + b"\n", "base64 of 32 bytes"),
    (b"origin\n9223372036854775808\n" + base64.b64encode(bytes(32)) + b"\n", "2\\*\\*63-1"),
    (b"has space\n5\n" + base64.b64encode(bytes(32)) + b"\n", "whitespace"),
    (b"origin\n5\n" + base64.b64encode(bytes(32)) + b"\n\n", "empty or not one printable line"),
])
def test_malformed_checkpoint_bodies(body: bytes, problem: str) -> None:
    with pytest.raises(NoteError, match=problem):
        parse_checkpoint(body)


def test_checkpoint_bodies_round_trip() -> None:
    cp = Checkpoint("fedsilo.test/run-1", 10, merkle.leaf_hash(b"y"), ("extension line",))
    assert parse_checkpoint(cp.body()) == cp
    assert cp.body() == b"fedsilo.test/run-1\n10\n" + base64.b64encode(cp.root) + b"\nextension line\n"
